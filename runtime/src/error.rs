//! Runtime errors: each names the model, input, file or library it is about.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    #[error("input '{input}': {msg}")]
    Input { input: String, msg: String },
    #[error("{0}")]
    Inputs(String),
    #[error("ONNX Runtime library: {0}")]
    Provision(String),
    #[error("CUDA execution provider: {0}")]
    Cuda(String),
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    #[error("tract: {0}")]
    Tract(String),
    #[error("{backend} failed on {}: it crashed inside the backend ({msg})", model.display())]
    Backend {
        backend: String,
        model: PathBuf,
        msg: String,
    },
    #[error(transparent)]
    Compiler(#[from] attune_compiler::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

impl From<ort::Error> for Error {
    fn from(e: ort::Error) -> Self {
        Error::Ort(e.to_string())
    }
}
