//! Options shared by the commands that run models (run, bench, diff --numeric, demo).
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use attune_runtime::inputs::{self, Dims};
use attune_runtime::ort_backend::{OptLevel, OrtOptions};
use attune_runtime::{Backend, Ep, HostTensor, npy, safetensors_io};

/// Which inputs to run a model on.
#[derive(clap::Args, Clone, Default)]
pub struct InputArgs {
    /// An input from a file: NAME=FILE.npy; FILE.safetensors for every tensor in it; or a
    /// folder, every NAME.npy in it as input NAME (as the fixtures' inputs/ folders ship them)
    #[arg(long = "input", value_name = "NAME=FILE|DIR")]
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
        self.prepare_with(model, Vec::new())
    }

    /// [`InputArgs::prepare`] with `extra` inputs given as well (a step cache's, by `bench`).
    pub fn prepare_with(
        &self,
        model: &Path,
        extra: Vec<(String, HostTensor)>,
    ) -> anyhow::Result<Vec<(String, HostTensor)>> {
        let m = super::load(model)?;
        let specs = inputs::input_specs(&m);
        let given = read_inputs(&self.inputs)?;
        // Files a folder gave that name no input: said with the files, all at once.
        let strays: Vec<&Given> = given
            .iter()
            .filter(|g| g.folder.is_some() && !specs.iter().any(|s| s.name == g.name))
            .collect();
        if let Some(first) = strays.first() {
            let folder = first.folder.as_deref().unwrap_or(Path::new(""));
            let files: Vec<String> = strays
                .iter()
                .map(|g| g.file.display().to_string())
                .collect();
            let expected: Vec<&str> = specs
                .iter()
                .filter(|s| !s.optional)
                .map(|s| s.name.as_str())
                .collect();
            bail!(
                "--input {}: {} {} no input of {} (its inputs: {}); move {} out of the folder or rename {}",
                folder.display(),
                files.join(", "),
                if files.len() == 1 { "names" } else { "name" },
                model.display(),
                expected.join(", "),
                if files.len() == 1 { "it" } else { "them" },
                if files.len() == 1 { "it" } else { "them" },
            );
        }
        let mut given: Vec<(String, HostTensor)> =
            given.into_iter().map(|g| (g.name, g.tensor)).collect();
        if let Some(a) = &self.adapter {
            given.extend(safetensors_io::read_adapter(a)?);
        }
        let extra: Vec<_> = extra
            .into_iter()
            .filter(|(n, _)| !given.iter().any(|(g, _)| g == n))
            .collect();
        given.extend(extra);
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
    /// Keep ONNX Runtime's optimised graph for this CPU in attune's cache ($ATTUNE_CACHE or
    /// ~/.cache/attune, sessions/) and load it from there next time: the full level's session
    /// start at the basic level's cost (CPU provider, --opt-level all)
    #[arg(long)]
    pub session_cache: bool,
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

/// attune's folder of saved ORT sessions (none where no cache folder can be named).
pub fn session_cache_dir() -> Option<PathBuf> {
    attune_runtime::provision::cache_dir()
        .ok()
        .map(|d| d.join("sessions"))
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
            session_cache: self.session_cache.then(session_cache_dir).flatten(),
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

impl InputArgs {
    /// Every file the inputs are read from, with the flag that names it (a folder's `.npy`
    /// files one by one), so that no output replaces one.
    pub fn read_files(&self) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let mut out = Vec::new();
        for item in &self.inputs {
            if Path::new(item).is_dir() {
                for file in npy_files(Path::new(item))? {
                    out.push((format!("--input {item}"), file));
                }
            } else {
                let file = item.split_once('=').map_or(item.as_str(), |(_, f)| f);
                out.push((format!("--input {item}"), PathBuf::from(file)));
            }
        }
        if let Some(a) = &self.adapter {
            out.push(("--adapter".into(), a.clone()));
        }
        Ok(out)
    }
}

/// An input read from a file.
pub struct Given {
    pub name: String,
    pub tensor: HostTensor,
    pub file: PathBuf,
    /// The `--input DIR` it came from.
    pub folder: Option<PathBuf>,
}

/// The `.npy` files of a folder, sorted; an error when there are none.
fn npy_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("--input {}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "npy"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "--input {}: the folder holds no .npy files (expected NAME.npy for each input NAME)",
            dir.display()
        );
    }
    Ok(files)
}

/// Reads `NAME=FILE.npy`, `FILE.safetensors` and `DIR` (every `NAME.npy` in it) items.
pub fn read_inputs(items: &[String]) -> anyhow::Result<Vec<Given>> {
    let mut out: Vec<Given> = Vec::new();
    for item in items {
        let mut push = |name: String, tensor: HostTensor, file: &Path, folder: Option<&Path>| {
            if let Some(g) = out.iter().find(|g| g.name == name) {
                bail!(
                    "input '{name}' is given twice ({} and {})",
                    g.file.display(),
                    file.display()
                );
            }
            out.push(Given {
                name,
                tensor,
                file: file.to_path_buf(),
                folder: folder.map(Path::to_path_buf),
            });
            Ok(())
        };
        let path = Path::new(item);
        if path.is_dir() {
            for file in npy_files(path)? {
                let Some(name) = file.file_stem().and_then(|s| s.to_str()) else {
                    bail!("--input {item}: {} is not a UTF-8 name", file.display());
                };
                let t = npy::read(&file)?;
                push(name.to_string(), t, &file, Some(path))?;
            }
            continue;
        }
        match item.split_once('=') {
            Some((name, file)) => {
                let t = npy::read(Path::new(file))?;
                push(name.to_string(), t, Path::new(file), None)?;
            }
            None if item.ends_with(".safetensors") => {
                for (name, t) in safetensors_io::read(path)? {
                    push(name, t, path, None)?;
                }
            }
            None if item.ends_with(".npy") => bail!(
                "--input '{item}': give the input's name, NAME={item} (or a folder of NAME.npy files)"
            ),
            None => bail!(
                "--input '{item}': expected NAME=FILE.npy, FILE.safetensors or a folder of NAME.npy files"
            ),
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
