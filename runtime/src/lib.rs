//! attune-runtime: run models on ONNX Runtime (CPU, CUDA) or tract; the ORT library is
//! provisioned automatically. Tensor I/O (.npy, .safetensors), random inputs, numeric
//! comparison and benchmarking.
pub mod backend;
pub mod bench;
mod bound;
pub mod compare;
mod contain;
pub mod controller;
pub mod cuda;
pub mod error;
pub mod image;
pub mod inputs;
pub mod npy;
pub mod ort_backend;
pub mod pipeline;
pub mod profile;
pub mod provision;
pub mod safetensors_io;
pub mod sample;
pub mod scheduler;
pub mod session_cache;
pub mod tensor;
pub mod tokenizer;
pub mod tract_backend;

pub use backend::{Backend, Ep};
pub use error::{Error, Result};
pub use tensor::{DType, HostTensor};
