//! The compiler's errors. Every error about the graph names the node (or tensor) and its
//! module path, so users can find it in their model.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: not a valid ONNX model ({err})", path.display())]
    Decode {
        path: PathBuf,
        err: prost::DecodeError,
    },
    #[error("{}: {msg}", path.display())]
    Model { path: PathBuf, msg: String },
    #[error("tensor '{tensor}': {msg}")]
    Tensor { tensor: String, msg: String },
    #[error("{node}: {msg}")]
    Node { node: String, msg: String },
    #[error("{0}")]
    Graph(String),
    #[error("output {}: {msg}", path.display())]
    Output { path: PathBuf, msg: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }
    pub fn tensor(tensor: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor {
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
}

/// Adds the path to an io::Error.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
