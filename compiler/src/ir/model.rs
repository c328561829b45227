use std::path::PathBuf;
use std::sync::Arc;

use super::Graph;
use crate::onnx::{self, ModelProto, OperatorSetIdProto};
use crate::weights::DataFile;

/// A model: the top-level proto fields, the main graph, and where it was read from.
#[derive(Debug)]
pub struct Model {
    /// Every `ModelProto` field except `graph` (which lives in `graph`).
    pub proto: ModelProto,
    pub graph: Graph,
    /// The file it was imported from, if any.
    pub path: Option<PathBuf>,
    /// External-data files its initializers are mapped from.
    pub data_files: Vec<Arc<DataFile>>,
    /// Wrapper module prefix stripped from module paths (e.g. `unet`), empty if none.
    pub module_prefix: String,
}

impl Model {
    /// The opset version imported for a domain ("" and "ai.onnx" are the same).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        let default = onnx::is_default_domain(domain);
        self.proto
            .opset_import
            .iter()
            .find(|o| o.domain == domain || (default && onnx::is_default_domain(&o.domain)))
            .map(|o| o.version)
    }

    /// Imports `domain` at `version` unless it is already imported (passes adding ops of a
    /// new domain such as `com.microsoft` call this).
    pub fn require_opset(&mut self, domain: &str, version: i64) {
        if self.opset(domain).is_none() {
            self.proto.opset_import.push(OperatorSetIdProto {
                domain: domain.to_string(),
                version,
            });
        }
    }
}
