//! attune-compiler: the ONNX IR (zero-copy import, atomic export), module paths,
//! verification, structural diff, model summaries and the pass manager.
pub mod analysis;
pub mod cache_io;
pub mod controlnet_io;
pub mod dce;
pub mod diff;
pub mod error;
pub mod export;
pub mod feasible;
pub mod files;
pub mod import;
pub mod ir;
pub mod module_path;
pub mod onnx;
pub mod pass;
pub mod patch;
pub mod pattern;
pub mod rule;
pub mod schema;
pub mod summary;
pub mod verify;
pub mod weights;

pub use error::{Error, Result};
pub use ir::Model;
