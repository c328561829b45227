//! ONNX Runtime sessions (CPU and CUDA execution providers), created from the model file so
//! ORT resolves external data itself.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ort::environment::Environment;
use ort::logging::LogLevel;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use crate::bound::Bound;
use crate::error::{Error, Result};
use crate::provision::{self, Flavor};
use crate::session_cache;
use crate::tensor::HostTensor;

/// Which ORT execution provider runs the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    Cpu,
    Cuda,
}

/// ORT's graph optimisation levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OptLevel {
    Disable,
    Basic,
    Extended,
    #[default]
    All,
}

#[derive(Clone, Debug, Default)]
pub struct OrtOptions {
    pub opt_level: OptLevel,
    /// Intra-op threads (ORT's default: one per physical core).
    pub threads: Option<usize>,
    /// Write ORT's profile (a JSON trace) under this file prefix; see [`OrtSession::end_profiling`].
    pub profile: Option<PathBuf>,
    /// Run with inputs and outputs in fixed buffers on the device (an IoBinding), shaped by the
    /// first run; later runs must give inputs of the same shapes.
    pub bind_io: bool,
    /// Capture the CUDA kernels of a run into a CUDA graph and replay it (CUDA provider only;
    /// implies `bind_io`; every node must be placed on CUDA: a model with fixed shapes).
    pub cuda_graph: bool,
    /// Keep ORT's optimised graph in this folder and load it from there next time (CPU
    /// provider at the full level, not profiling): see `session_cache`.
    pub session_cache: Option<PathBuf>,
}

/// Where a session's graph came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cached {
    /// Optimised by ORT now, no cache asked for.
    No,
    /// Loaded from the cache, ORT's optimisation off.
    Hit,
    /// Optimised by ORT now and saved: this many bytes.
    Saved(u64),
}

/// The most intra-op threads a session may ask for: ORT starts them all at once, and a
/// mistyped count (100000) would otherwise hang the process starting threads.
pub const MAX_THREADS: usize = 1024;

/// The process-wide ORT environment and which library flavour it loaded.
static ENVIRONMENT: OnceLock<(Flavor, PathBuf, Environment)> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

/// Loads ONNX Runtime (provisioning it if needed) for `flavor`; once per process.
pub fn environment(flavor: Flavor) -> Result<&'static Environment> {
    let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((loaded, path, env)) = ENVIRONMENT.get() {
        if *loaded != flavor
            && std::env::var_os("ORT_DYLIB_PATH").is_none()
            && flavor == Flavor::Gpu
        {
            return Err(Error::Cuda(format!(
                "this process already loaded the CPU build of ONNX Runtime ({}); the CUDA provider needs onnxruntime-gpu in a separate run",
                path.display()
            )));
        }
        return Ok(env);
    }
    let lib = provision::locate(flavor)?;
    let env = ort::init_from(&lib.path)
        .map_err(|e| Error::Provision(format!("{}: {e}", lib.path.display())))?
        .with_name("attune")
        .build()?;
    let (_, _, env) = ENVIRONMENT.get_or_init(|| (flavor, lib.path.clone(), env));
    Ok(env)
}

/// ORT's log of one session: the node placement is kept; warnings are printed as attune
/// prints them; errors are dropped, since each one also comes back as the failing call's
/// error (printed once, by the caller, instead of twice).
fn session_logger(placement: Arc<Mutex<Vec<String>>>) -> ort::logging::LoggerFunction {
    Arc::new(move |level, _category, _id, _location, message: &str| {
        if message.contains("placed on [") {
            placement
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(message.to_string());
        } else if level == LogLevel::Warning {
            eprintln!("warning: onnxruntime: {message}");
        }
    })
}

/// The library this process loaded, if any.
pub fn loaded_library() -> Option<PathBuf> {
    ENVIRONMENT.get().map(|(_, p, _)| p.clone())
}

/// A session and what ORT reported while creating it.
pub struct OrtSession {
    session: Session,
    pub provider: Provider,
    bind_io: bool,
    bound: Option<Bound>,
    /// (execution provider, node count) from ORT's node-placement log (CUDA sessions).
    pub placement: Vec<(String, usize)>,
    pub cached: Cached,
}

impl OrtSession {
    pub fn open(model: &Path, provider: Provider, opts: &OrtOptions) -> Result<Self> {
        if provider == Provider::Cuda {
            crate::cuda::check_driver()?;
        } else if opts.cuda_graph {
            return Err(Error::Cuda(
                "CUDA graphs need the CUDA execution provider (--ep cuda)".into(),
            ));
        }
        let flavor = if provider == Provider::Cuda {
            Flavor::Gpu
        } else {
            Flavor::Cpu
        };
        let env = environment(flavor)?;
        if provider == Provider::Cuda {
            crate::cuda::preload_libraries()?;
        }
        let level = match opts.opt_level {
            OptLevel::Disable => GraphOptimizationLevel::Disable,
            OptLevel::Basic => GraphOptimizationLevel::Level1,
            OptLevel::Extended => GraphOptimizationLevel::Level2,
            OptLevel::All => GraphOptimizationLevel::All,
        };
        let placement_log: Arc<Mutex<Vec<String>>> = Arc::default();
        let builder = |level| builder(env, provider, opts, level, placement_log.clone());
        let commit = |mut b: SessionBuilder, path: &Path| {
            b.commit_from_file(path).map_err(|e| match provider {
                Provider::Cuda => Error::Cuda(format!("{}: {e}", model.display())),
                Provider::Cpu => Error::Ort(format!("{}: {e}", model.display())),
            })
        };
        let entry = match &opts.session_cache {
            Some(root)
                if provider == Provider::Cpu
                    && opts.opt_level == OptLevel::All
                    && opts.profile.is_none() =>
            {
                let lib = loaded_library().unwrap_or_default();
                let settings = format!(
                    "cpu all {} {:?}",
                    lib.display(),
                    std::fs::metadata(&lib)
                        .ok()
                        .map(|m| (m.len(), m.modified().ok()))
                );
                Some(session_cache::entry(root, model, &settings)?)
            }
            _ => None,
        };
        let (session, cached) = match entry {
            Some(entry) => {
                let hit = if entry.hit {
                    // A damaged entry is made again.
                    let b = builder(GraphOptimizationLevel::Disable)?;
                    commit(b, &entry.model())
                        .inspect_err(|_| session_cache::discard(&entry))
                        .ok()
                } else {
                    None
                };
                match hit {
                    Some(session) => {
                        session_cache::touch(&entry);
                        (session, Cached::Hit)
                    }
                    None => {
                        let staged = session_cache::staging(&entry)?;
                        let b = saving(builder(level)?, &staged)?;
                        match commit(b, model) {
                            Ok(session) => {
                                session_cache::publish(&staged, &entry);
                                if let Some(root) = &opts.session_cache {
                                    session_cache::prune(root, &entry, session_cache::limit());
                                }
                                (session, Cached::Saved(session_cache::size(&entry)))
                            }
                            // ORT could not save this graph (a full disk, an op it cannot
                            // write): the session is made without the cache.
                            Err(_) => {
                                let _ = std::fs::remove_dir_all(&staged);
                                (commit(builder(level)?, model)?, Cached::No)
                            }
                        }
                    }
                }
            }
            None => (commit(builder(level)?, model)?, Cached::No),
        };
        let placement = parse_placement(&placement_log.lock().unwrap_or_else(|e| e.into_inner()));
        if provider == Provider::Cuda {
            let on_cuda: usize = placement
                .iter()
                .filter(|(ep, _)| ep == "CUDAExecutionProvider")
                .map(|(_, n)| n)
                .sum();
            if on_cuda == 0 {
                return Err(Error::Cuda(format!(
                    "ONNX Runtime placed no node on CUDAExecutionProvider (placement: {placement:?}); refusing to run on the CPU instead"
                )));
            }
        }
        Ok(OrtSession {
            session,
            provider,
            bind_io: opts.bind_io || opts.cuda_graph,
            bound: None,
            placement,
            cached,
        })
    }

    pub fn input_names(&self) -> Vec<String> {
        self.session
            .inputs()
            .iter()
            .map(|i| i.name().to_string())
            .collect()
    }

    pub fn output_names(&self) -> Vec<String> {
        self.session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect()
    }

    /// Stops profiling (sessions opened with `OrtOptions::profile`) and returns the trace file.
    pub fn end_profiling(&mut self) -> Result<PathBuf> {
        Ok(PathBuf::from(self.session.end_profiling()?))
    }

    /// Runs the graph; outputs in the model's order.
    pub fn run(&mut self, inputs: &[(String, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        if self.bind_io {
            let bound = match &mut self.bound {
                Some(b) => b,
                None => self.bound.insert(Bound::new(
                    &self.session,
                    self.provider == Provider::Cuda,
                    inputs,
                )?),
            };
            return bound.run(&mut self.session, inputs);
        }
        let values: Vec<(String, DynValue)> = inputs
            .iter()
            .map(|(n, t)| Ok((n.clone(), to_value(t)?)))
            .collect::<Result<_>>()?;
        let names = self.output_names();
        // The session gets views: `values` owns the input buffers and must outlive the copies
        // of the outputs below, because ORT may hand an input back as an output without a copy
        // (a graph output that is also an input, an Identity chain).
        let views: Vec<(&str, SessionInputValue<'_>)> = values
            .iter()
            .map(|(n, v)| (n.as_str(), SessionInputValue::from(v)))
            .collect();
        let outputs = self.session.run(views)?;
        let copied = names
            .into_iter()
            .map(|name| {
                let value = outputs
                    .get(&name)
                    .ok_or_else(|| Error::Ort(format!("no output '{name}'")))?;
                let t =
                    from_value(value).map_err(|e| Error::Ort(format!("output '{name}': {e}")))?;
                Ok((name, t))
            })
            .collect();
        drop(outputs);
        drop(values);
        copied
    }
}

/// `b`, also saving the optimised graph into `dir` (its weights next to it).
fn saving(b: SessionBuilder, dir: &Path) -> Result<SessionBuilder> {
    let err = |e: ort::Error<SessionBuilder>| Error::Ort(e.to_string());
    b.with_optimized_model_path(dir.join(session_cache::MODEL))
        .map_err(err)?
        .with_config_entry(
            "session.optimized_model_external_initializers_file_name",
            session_cache::DATA,
        )
        .map_err(err)?
        .with_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes",
            "1024",
        )
        .map_err(err)
}

/// A session builder with `opts`' threads, profiling, provider and logger at `level`.
fn builder(
    env: &Environment,
    provider: Provider,
    opts: &OrtOptions,
    level: GraphOptimizationLevel,
    placement_log: Arc<Mutex<Vec<String>>>,
) -> Result<SessionBuilder> {
    let ort_err = |e: ort::Error<SessionBuilder>| Error::Ort(e.to_string());
    let mut builder = Session::builder(env)?
        .with_optimization_level(level)
        .map_err(ort_err)?;
    if let Some(n) = opts.threads {
        if n > MAX_THREADS {
            return Err(Error::Ort(format!(
                "--threads {n}: at most {MAX_THREADS} intra-op threads"
            )));
        }
        builder = builder.with_intra_threads(n).map_err(ort_err)?;
    }
    if let Some(prefix) = &opts.profile {
        builder = builder.with_profiling(prefix).map_err(ort_err)?;
    }
    if provider == Provider::Cuda {
        builder = builder
            .with_execution_providers([ort::ep::CUDA::default()
                .with_cuda_graph(opts.cuda_graph)
                .build()
                .error_on_failure()])
            .map_err(|e| Error::Cuda(e.to_string()))?
            // Verbose: the node placement is only logged at this level.
            .with_log_level(LogLevel::Verbose)
            .map_err(ort_err)?;
    }
    builder
        .with_logger(session_logger(placement_log))
        .map_err(ort_err)
}

/// `All nodes placed on [CUDAExecutionProvider]. Number of nodes: 812` → ("CUDAExecutionProvider", 812)
fn parse_placement(lines: &[String]) -> Vec<(String, usize)> {
    lines
        .iter()
        .filter_map(|l| {
            let ep = l.split("placed on [").nth(1)?.split(']').next()?;
            let count = l
                .split("Number of nodes:")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((ep.to_string(), count))
        })
        .collect()
}

pub(crate) fn to_value(t: &HostTensor) -> Result<DynValue> {
    Ok(match t {
        HostTensor::F32(a) => Tensor::from_array(a.clone())?.into_dyn(),
        HostTensor::F16(a) => Tensor::from_array(a.clone())?.into_dyn(),
        HostTensor::I64(a) => Tensor::from_array(a.clone())?.into_dyn(),
        HostTensor::I32(a) => Tensor::from_array(a.clone())?.into_dyn(),
        HostTensor::Bool(a) => Tensor::from_array(a.clone())?.into_dyn(),
    })
}

pub(crate) fn from_value(v: &DynValue) -> std::result::Result<HostTensor, String> {
    let ty = match v.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => return Err(format!("is a {other:?}, not a tensor")),
    };
    let e = |e: ort::Error| e.to_string();
    Ok(match ty {
        TensorElementType::Float32 => {
            HostTensor::F32(v.try_extract_array::<f32>().map_err(e)?.into_owned())
        }
        TensorElementType::Float16 => {
            HostTensor::F16(v.try_extract_array::<half::f16>().map_err(e)?.into_owned())
        }
        TensorElementType::Int64 => {
            HostTensor::I64(v.try_extract_array::<i64>().map_err(e)?.into_owned())
        }
        TensorElementType::Int32 => {
            HostTensor::I32(v.try_extract_array::<i32>().map_err(e)?.into_owned())
        }
        TensorElementType::Bool => {
            HostTensor::Bool(v.try_extract_array::<bool>().map_err(e)?.into_owned())
        }
        other => return Err(format!("element type {other:?} is not supported")),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn placement_lines() {
        let lines = vec![
            " All nodes placed on [CUDAExecutionProvider]. Number of nodes: 812".to_string(),
            " Node(s) placed on [CPUExecutionProvider]. Number of nodes: 3".to_string(),
        ];
        assert_eq!(
            super::parse_placement(&lines),
            vec![
                ("CUDAExecutionProvider".into(), 812),
                ("CPUExecutionProvider".into(), 3)
            ]
        );
    }
}
