//! One interface over the backends: open a model file for an execution provider, run it.
use std::path::Path;

use crate::error::Result;
use crate::ort_backend::{OrtOptions, OrtSession, Provider};
use crate::tensor::HostTensor;
use crate::tract_backend::TractSession;

/// Where a model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ep {
    /// ONNX Runtime, CPU execution provider.
    Cpu,
    /// ONNX Runtime, CUDA execution provider (never silently on the CPU).
    Cuda,
    /// tract, pure Rust.
    Tract,
}

impl Ep {
    pub fn name(self) -> &'static str {
        match self {
            Ep::Cpu => "ort-cpu",
            Ep::Cuda => "ort-cuda",
            Ep::Tract => "tract",
        }
    }
}

#[allow(clippy::large_enum_variant)] // one per session, never in a collection
pub enum Backend {
    Ort(OrtSession),
    Tract(TractSession),
}

impl Backend {
    pub fn open(model: &Path, ep: Ep, opts: &OrtOptions) -> Result<Backend> {
        if opts.cuda_graph && ep != Ep::Cuda {
            return Err(crate::Error::Cuda(format!(
                "CUDA graphs need the CUDA execution provider (--ep cuda), not {}",
                ep.name()
            )));
        }
        Ok(match ep {
            Ep::Cpu => Backend::Ort(OrtSession::open(model, Provider::Cpu, opts)?),
            Ep::Cuda => Backend::Ort(OrtSession::open(model, Provider::Cuda, opts)?),
            Ep::Tract => Backend::Tract(TractSession::open(model)?),
        })
    }

    /// Runs with named inputs; outputs in the model's order.
    pub fn run(&mut self, inputs: &[(String, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        match self {
            Backend::Ort(s) => s.run(inputs),
            Backend::Tract(s) => s.run(inputs),
        }
    }

    /// Stops ORT's profiling and returns its trace file; tract has no profiler.
    pub fn end_profiling(&mut self) -> Result<std::path::PathBuf> {
        match self {
            Backend::Ort(s) => s.end_profiling(),
            Backend::Tract(_) => Err(crate::Error::Tract(
                "no profiler: profile on --ep cpu or cuda".into(),
            )),
        }
    }

    /// Where an ORT session's graph came from (the session cache); `None` for tract.
    pub fn cached(&self) -> Option<crate::ort_backend::Cached> {
        match self {
            Backend::Ort(s) => Some(s.cached),
            Backend::Tract(_) => None,
        }
    }

    /// Node placement ORT reported (CUDA sessions), empty otherwise.
    pub fn placement(&self) -> &[(String, usize)] {
        match self {
            Backend::Ort(s) => &s.placement,
            Backend::Tract(_) => &[],
        }
    }
}
