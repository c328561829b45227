//! Lowering for a deployment target: precision conversion and the check that the target
//! execution provider runs every op of the result.
pub mod cuda;
pub(crate) mod decided_if;
pub mod fix_shapes;
pub mod precision;
pub mod support;

pub use cuda::CudaFusion;
pub use fix_shapes::{FixShapes, ShapeSpec};
pub use precision::{Precision, PrecisionPass};
pub use support::SupportCheck;

pub(crate) use precision::typeless_slot as precision_typeless_slot;
