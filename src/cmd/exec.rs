//! Options shared by the commands that run models (run, bench, diff --numeric, demo).
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use attune_runtime::inputs::{self, Dims};
use attune_runtime::ort_backend::{OptLevel, OrtOptions};
use attune_runtime::{Backend, Ep, HostTensor, npy, safetensors_io};

/// Which inputs to run a model on.
#[derive(clap::Args, Clone, Default)]
pub struct InputArgs {
    /// An input from a file: NAME=FILE.npy, or FILE.safetensors for every tensor in it
    #[arg(long = "input", value_name = "NAME=FILE")]
    pub inputs: Vec<String>,
    /// A LoRA adapter (.safetensors from `compile --lora-mode adapter` or `attune lora-adapter`)
    #[arg(long, value_name = "FILE")]
    pub adapter: Option<PathBuf>,
    /// Size of a symbolic dim for random inputs, e.g. --dim batch=2 --dim height=64
    #[arg(long = "dim", value_name = "NAME=V")]
    pub dims: Vec<String>,
    /// Seed of the random inputs
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl InputArgs {
    /// The model's inputs: given files checked against it, the rest random.
    pub fn prepare(&self, model: &Path) -> anyhow::Result<Vec<(String, HostTensor)>> {
        let m = super::load(model)?;
        let specs = inputs::input_specs(&m);
        let mut given = read_inputs(&self.inputs)?;
        if let Some(a) = &self.adapter {
            given.extend(safetensors_io::read(a)?);
        }
        let dims = Dims::parse(&self.dims)?;
        inputs::prepare(&specs, given, &dims, self.seed)
            .with_context(|| format!("inputs of {}", model.display()))
    }
}

#[derive(clap::Args, Clone)]
pub struct ExecArgs {
    /// Where to run: ONNX Runtime CPU or CUDA execution provider, or tract
    #[arg(long, value_enum, default_value_t = EpArg::Cpu)]
    pub ep: EpArg,
    #[command(flatten)]
    pub input: InputArgs,
    /// Intra-op threads (default: ONNX Runtime's choice)
    #[arg(long)]
    pub threads: Option<usize>,
    /// ONNX Runtime graph optimisation level
    #[arg(long, value_enum, default_value_t = OptArg::All)]
    pub opt_level: OptArg,
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum EpArg {
    Cpu,
    Cuda,
    Tract,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum OptArg {
    Disable,
    Basic,
    Extended,
    All,
}

impl ExecArgs {
    pub fn ep(&self) -> Ep {
        match self.ep {
            EpArg::Cpu => Ep::Cpu,
            EpArg::Cuda => Ep::Cuda,
            EpArg::Tract => Ep::Tract,
        }
    }

    pub fn ort_options(&self) -> OrtOptions {
        let opt_level = match self.opt_level {
            OptArg::Disable => OptLevel::Disable,
            OptArg::Basic => OptLevel::Basic,
            OptArg::Extended => OptLevel::Extended,
            OptArg::All => OptLevel::All,
        };
        OrtOptions {
            opt_level,
            threads: self.threads,
            ..OrtOptions::default()
        }
    }

    pub fn prepare_inputs(&self, model: &Path) -> anyhow::Result<Vec<(String, HostTensor)>> {
        self.input.prepare(model)
    }

    pub fn open(&self, model: &Path) -> anyhow::Result<Backend> {
        Backend::open(model, self.ep(), &self.ort_options())
            .with_context(|| format!("cannot run {} on {}", model.display(), self.ep().name()))
    }
}

/// Reads `NAME=FILE.npy` and `FILE.safetensors` items.
pub fn read_inputs(items: &[String]) -> anyhow::Result<Vec<(String, HostTensor)>> {
    let mut out: Vec<(String, HostTensor)> = Vec::new();
    for item in items {
        let mut push = |name: String, t: HostTensor| {
            if out.iter().any(|(n, _)| *n == name) {
                bail!("input '{name}' is given twice");
            }
            out.push((name, t));
            Ok(())
        };
        match item.split_once('=') {
            Some((name, file)) => {
                let t = npy::read(Path::new(file))?;
                push(name.to_string(), t)?;
            }
            None if item.ends_with(".safetensors") => {
                for (name, t) in safetensors_io::read(Path::new(item))? {
                    push(name, t)?;
                }
            }
            None => bail!("--input '{item}': expected NAME=FILE.npy or FILE.safetensors"),
        }
    }
    Ok(out)
}

/// File name for an output (names like `/unet/out` become `_unet_out`).
pub fn output_file(dir: &Path, name: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{safe}.npy"))
}
