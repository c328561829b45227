//! Analyses shared by the passes: symbolic shapes and where attention is.
pub mod attention;
pub mod dim;
pub mod shapes;
pub mod types;

pub use attention::{AttentionAnalysis, AttentionSite, Kind, TransformerBlock};
pub use dim::Dim;
pub use shapes::{Num, Shapes};
pub use types::ElemTypes;
