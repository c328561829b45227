//! One interface over the backends: open a model file for an execution provider, run it.
//! Both calls are the backend boundary: the model passes attune's verifier before a backend
//! sees it, and a panic inside a backend is an error naming the model and the backend.
use std::path::{Path, PathBuf};

use crate::contain::contained;
use crate::error::{Error, Result};
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
enum Session {
    Ort(OrtSession),
    Tract(TractSession),
}

pub struct Backend {
    session: Session,
    ep: Ep,
    model: PathBuf,
}

/// The model passes attune's verifier (schema, shapes, sizes) before a backend sees it:
/// backends crash, hang or allocate without bound on what it refuses.
fn checked(model: &Path) -> Result<()> {
    let m = attune_compiler::import::read(model)?;
    attune_compiler::verify::verify_model(&m).map_err(|e| Error::file(model, e.to_string()))
}

impl Backend {
    pub fn open(model: &Path, ep: Ep, opts: &OrtOptions) -> Result<Backend> {
        if opts.cuda_graph && ep != Ep::Cuda {
            return Err(Error::Cuda(format!(
                "CUDA graphs need the CUDA execution provider (--ep cuda), not {}",
                ep.name()
            )));
        }
        checked(model)?;
        let session = contained(ep.name(), model, || {
            Ok(match ep {
                Ep::Cpu => Session::Ort(OrtSession::open(model, Provider::Cpu, opts)?),
                Ep::Cuda => Session::Ort(OrtSession::open(model, Provider::Cuda, opts)?),
                Ep::Tract => Session::Tract(TractSession::open(model)?),
            })
        })?;
        Ok(Backend {
            session,
            ep,
            model: model.to_path_buf(),
        })
    }

    /// Runs with named inputs; outputs in the model's order.
    pub fn run(&mut self, inputs: &[(String, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        let session = &mut self.session;
        contained(self.ep.name(), &self.model, || match session {
            Session::Ort(s) => s.run(inputs),
            Session::Tract(s) => s.run(inputs),
        })
    }

    /// Stops ORT's profiling and returns its trace file; tract has no profiler.
    pub fn end_profiling(&mut self) -> Result<std::path::PathBuf> {
        match &mut self.session {
            Session::Ort(s) => s.end_profiling(),
            Session::Tract(_) => Err(Error::Tract(
                "no profiler: profile on --ep cpu or cuda".into(),
            )),
        }
    }

    /// Where an ORT session's graph came from (the session cache); `None` for tract.
    pub fn cached(&self) -> Option<crate::ort_backend::Cached> {
        match &self.session {
            Session::Ort(s) => Some(s.cached),
            Session::Tract(_) => None,
        }
    }

    /// Node placement ORT reported (CUDA sessions), empty otherwise.
    pub fn placement(&self) -> &[(String, usize)] {
        match &self.session {
            Session::Ort(s) => &s.placement,
            Session::Tract(_) => &[],
        }
    }
}
