//! Pipeline folders (the diffusers/optimum ONNX layout: `model_index.json`, `text_encoder/`,
//! `unet/` or `transformer/`, `vae_decoder/`, `vae_encoder/`, tokenizers, `scheduler/`)
//! compiled as a whole. Each ONNX component gets the options that apply to it (the denoiser
//! all of them; text encoders and the VAE attention fusion, the CUDA lowering, precision and
//! their own fixed shapes), and every other file is copied byte for byte. The output folder
//! is built in a temporary sibling and renamed into place at the end: it appears complete or
//! not at all, and the input folder is only read.
use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Component as PathComponent, Path, PathBuf};

use serde_json::Value;

use attune_compiler::error::Error as GraphError;
use attune_compiler::export::{self, ExportOptions, Guard, Placed};
use attune_compiler::import;
use attune_compiler::pass::{PassCx, PassReport, Skipped};
use attune_compiler::verify;

use crate::lora::{self, adapter};
use crate::pipeline::{
    self, AttentionArg, LoraComponentArg, LoraModeArg, LoraOptions, Options, PrecisionArg,
};

/// The file that makes a folder a pipeline folder.
pub const INDEX: &str = "model_index.json";

/// Why a folder could not be compiled. Nothing is written when any of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error("{}: not a pipeline folder (no {INDEX})", dir.display())]
    NotAPipeline { dir: PathBuf },
    #[error("{}: {msg}", path.display())]
    Index { path: PathBuf, msg: String },
    #[error("{}: the pipeline names {component} in {INDEX} but the folder has no {expected}", dir.display())]
    Missing {
        dir: PathBuf,
        component: String,
        expected: String,
    },
    /// A component's model does not read, verify, compile or write.
    #[error("{component} ({}): {msg}", path.display())]
    Component {
        component: String,
        path: PathBuf,
        msg: String,
    },
    #[error("{0}")]
    Options(String),
    #[error("output {}: {msg}", path.display())]
    Output { path: PathBuf, msg: String },
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: io::Error },
}

type Result<T, E = FolderError> = std::result::Result<T, E>;

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> FolderError + '_ {
    move |err| FolderError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// What a compiled component is to the pipeline, which decides the options it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `unet/` or `transformer/`: every option.
    Denoiser,
    /// `text_encoder[_2|_3]/`
    TextEncoder,
    VaeDecoder,
    VaeEncoder,
    /// `controlnet/`: as a text encoder (attention fusion, lowering, precision).
    ControlNet,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Denoiser => "denoiser",
            Role::TextEncoder => "text encoder",
            Role::VaeDecoder => "VAE decoder",
            Role::VaeEncoder => "VAE encoder",
            Role::ControlNet => "ControlNet",
        }
    }
}

/// An ONNX component of a pipeline folder.
#[derive(Clone, Debug)]
pub struct Component {
    /// Its folder's name (`text_encoder`, `unet`, `vae_decoder`...).
    pub name: String,
    pub role: Role,
    /// Its class in `model_index.json` (`CLIPTextModel`, `T5EncoderModel`, ...).
    pub class: String,
    /// `<dir>/<name>/model.onnx`
    pub model: PathBuf,
}

/// A pipeline folder as `model_index.json` describes it and the disk holds it.
#[derive(Clone, Debug)]
pub struct Pipeline {
    pub dir: PathBuf,
    /// `_class_name` (`StableDiffusionPipeline`...)
    pub class: String,
    /// The ONNX components attune compiles, in the index's order.
    pub components: Vec<Component>,
    /// Components the index names that are optional and not in the folder, or kept as they are.
    pub notes: Vec<String>,
}

/// Components diffusers loads a pipeline without (`_optional_components` of the pipelines).
const OPTIONAL: &[&str] = &["safety_checker", "feature_extractor", "image_encoder"];

impl Pipeline {
    /// Reads `dir/model_index.json` and finds each component it names on disk.
    pub fn read(dir: &Path) -> Result<Pipeline> {
        let index = dir.join(INDEX);
        if !index.is_file() {
            return Err(FolderError::NotAPipeline { dir: dir.into() });
        }
        let bad = |msg: String| FolderError::Index {
            path: index.clone(),
            msg,
        };
        let text = fs::read_to_string(&index).map_err(io_at(&index))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let map = json
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let class = map
            .get("_class_name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no _class_name".into()))?
            .to_string();
        let mut components = Vec::new();
        let mut notes = Vec::new();
        let mut denoisers = 0;
        for (key, value) in map {
            // Components are `name: [library, class]`; `[null, null]` is one left out.
            let Some([library, kind]) = value.as_array().map(Vec::as_slice) else {
                continue;
            };
            if key.starts_with('_') || library.is_null() || kind.is_null() {
                continue;
            }
            let kind = kind.as_str().unwrap_or("?");
            let missing = |expected: String| FolderError::Missing {
                dir: dir.into(),
                component: format!("{key} ({kind})"),
                expected,
            };
            let onnx = |name: &str| dir.join(name).join("model.onnx");
            let role = match key.as_str() {
                "unet" | "transformer" => Some(Role::Denoiser),
                k if k.starts_with("text_encoder") => Some(Role::TextEncoder),
                "controlnet" if kind == "ControlNetModel" => Some(Role::ControlNet),
                _ => None,
            };
            if let Some(role) = role {
                if !onnx(key).is_file() {
                    return Err(missing(format!("{key}/model.onnx")));
                }
                denoisers += usize::from(role == Role::Denoiser);
                components.push(Component {
                    name: key.clone(),
                    role,
                    class: kind.into(),
                    model: onnx(key),
                });
            } else if key == "vae" {
                // optimum splits the VAE in two; txt2img needs only the decoder.
                if !onnx("vae_decoder").is_file() {
                    return Err(missing("vae_decoder/model.onnx".into()));
                }
                components.push(Component {
                    name: "vae_decoder".into(),
                    role: Role::VaeDecoder,
                    class: kind.into(),
                    model: onnx("vae_decoder"),
                });
                if onnx("vae_encoder").is_file() {
                    components.push(Component {
                        name: "vae_encoder".into(),
                        role: Role::VaeEncoder,
                        class: kind.into(),
                        model: onnx("vae_encoder"),
                    });
                } else {
                    notes.push(
                        "vae_encoder: not in the folder (text-to-image needs only the decoder; img2img and inpainting need it)".into(),
                    );
                }
            } else if !dir.join(key).is_dir() {
                if OPTIONAL.contains(&key.as_str()) {
                    notes.push(format!(
                        "{key} ({kind}): not in the folder (optional: diffusers and optimum load the pipeline without it)"
                    ));
                } else {
                    return Err(missing(format!("{key}/")));
                }
            } else if onnx(key).is_file() {
                notes.push(format!(
                    "{key}: copied as it is (attune compiles the denoiser, the text encoders and the VAE)"
                ));
            }
        }
        if denoisers == 0 {
            return Err(bad(format!(
                "{class} names no unet or transformer (a denoiser is what attune compiles)"
            )));
        }
        Ok(Pipeline {
            dir: dir.into(),
            class,
            components,
            notes,
        })
    }

    pub fn denoiser(&self) -> &Component {
        self.components
            .iter()
            .find(|c| c.role == Role::Denoiser)
            .expect("read checks there is one")
    }
}

/// An option given that a component does not get, and why.
#[derive(Clone, Debug)]
pub struct NotApplied {
    pub option: &'static str,
    pub reason: String,
}

/// The options one component is compiled with.
#[derive(Clone, Debug)]
pub struct Plan {
    pub component: Component,
    pub options: Options,
    pub not_applied: Vec<NotApplied>,
    pub notes: Vec<String>,
}

/// Pipelines whose diffusers implementation runs the VAE in fp32 when its config says
/// `force_upcast` (diffusers' `needs_upcasting`: SDXL's VAE overflows fp16). The SD 1.x/2.x
/// pipelines decode in the pipeline's dtype whatever the config says.
pub fn honours_force_upcast(class: &str) -> bool {
    [
        "StableDiffusionXL",
        "SDXL",
        "Kolors",
        "StableVideoDiffusion",
        "Amused",
    ]
    .iter()
    .any(|k| class.contains(k))
}

/// The VAE config's `force_upcast` (diffusers' default, true, where the key is absent).
fn force_upcast(component: &Component) -> Result<bool> {
    let path = component.model.with_file_name("config.json");
    let Ok(text) = fs::read_to_string(&path) else {
        return Ok(true);
    };
    let json: Value = serde_json::from_str(&text).map_err(|e| FolderError::Index {
        path: path.clone(),
        msg: format!("not JSON: {e}"),
    })?;
    Ok(json
        .get("force_upcast")
        .and_then(Value::as_bool)
        .unwrap_or(true))
}

/// `--fix-shapes` entries by component: `NAME=..` entries are the denoiser's, `COMPONENT:NAME=..`
/// entries that component's (the sizes of one call differ: with guidance the UNet takes a
/// batch of two, the text encoder and the VAE one prompt or image at a time).
fn shape_entries(spec: &str, pipeline: &Pipeline) -> Result<Vec<(String, String)>> {
    let mut by: Vec<(String, String)> = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (target, entry) = match item.split_once('=').map(|(name, _)| name.split_once(':')) {
            Some(Some((component, _))) => {
                let component = component.trim();
                let c = pipeline
                    .components
                    .iter()
                    .find(|c| c.name == component)
                    .ok_or_else(|| {
                        FolderError::Options(format!(
                            "--fix-shapes '{item}': '{component}' is not a compiled component of this pipeline ({})",
                            pipeline
                                .components
                                .iter()
                                .map(|c| c.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })?;
                let entry = item.split_once(':').expect("has a prefix").1;
                (c.name.clone(), entry.trim().to_string())
            }
            _ => (pipeline.denoiser().name.clone(), item.to_string()),
        };
        match by.iter_mut().find(|(c, _)| *c == target) {
            Some((_, s)) => {
                s.push(',');
                s.push_str(&entry);
            }
            None => by.push((target, entry)),
        }
    }
    Ok(by)
}

/// Decides each component's options: the denoiser gets all of `o`; the others what applies
/// to them, with every given option they do not get in `not_applied`.
pub fn plan(pipeline: &Pipeline, o: &Options) -> Result<Vec<Plan>> {
    let shapes = match &o.fix_shapes {
        Some(spec) => shape_entries(spec, pipeline)?,
        None => Vec::new(),
    };
    let none = Options::default();
    if o.lora_options.component != LoraComponentArg::Auto {
        return Err(FolderError::Options(
            "--lora-component names one graph's component; in a folder each component takes the LoRA layers that are its own".into(),
        ));
    }
    // Which components each LoRA file has layers for (from its keys).
    let lora_components = o
        .lora
        .iter()
        .map(|l| {
            lora::file::components(&l.file)
                .map_err(|e| FolderError::Options(format!("--lora: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut plans = Vec::new();
    for c in &pipeline.components {
        let mut notes = Vec::new();
        let mut not = Vec::new();
        let fix_shapes = shapes
            .iter()
            .find(|(name, _)| *name == c.name)
            .map(|(_, s)| s.clone());
        if o.fix_shapes.is_some() && fix_shapes.is_none() {
            not.push(NotApplied {
                option: "--fix-shapes",
                reason: if c.role == Role::Denoiser {
                    "every entry names another component".into()
                } else {
                    format!(
                        "no {}:NAME=SIZE entry (entries without a component are the denoiser's)",
                        c.name
                    )
                },
            });
        }
        if c.role == Role::Denoiser {
            plans.push(Plan {
                component: c.clone(),
                options: Options {
                    fix_shapes,
                    lora_options: LoraOptions {
                        component: lora::Component::Denoiser.into(),
                        ..o.lora_options.clone()
                    },
                    ..o.clone()
                },
                not_applied: not,
                notes,
            });
            continue;
        }
        let mut options = Options {
            canonical: o.canonical,
            target: o.target,
            precision: o.precision,
            keep_io_types: o.keep_io_types,
            disable_fusions: o.disable_fusions.clone(),
            enable_fusions: o.enable_fusions.clone(),
            fix_shapes,
            weights: o.weights,
            ..Options::default()
        };
        match o.attention.mode {
            AttentionArg::Flash | AttentionArg::Onnx => {
                options.attention.mode = o.attention.mode;
                if o.attention.layers.is_some() {
                    notes.push(
                        "--attention-layers names the denoiser's modules: every attention site here is rewritten".into(),
                    );
                }
            }
            AttentionArg::Linear => not.push(NotApplied {
                option: "--attention linear",
                reason:
                    "linear attention changes what the model computes: it is asked of the denoiser"
                        .into(),
            }),
            AttentionArg::Keep => {}
        }
        if !o.lora.is_empty() || o.lora_options.layers.is_some() {
            let te = lora::Component::from_folder(&c.name).filter(|_| c.role == Role::TextEncoder);
            match (te, o.lora_options.mode) {
                (Some(te), LoraModeArg::Fuse) => {
                    // Only where a file has layers for this encoder (the others' are theirs).
                    if lora_components.iter().any(|m| m.contains_key(&te)) {
                        options.lora = o.lora.clone();
                        options.lora_options.strict = o.lora_options.strict;
                        options.lora_options.component = te.into();
                    } else {
                        not.push(NotApplied {
                            option: "--lora",
                            reason: format!("no LoRA file has layers for {te}"),
                        });
                    }
                }
                (Some(_), LoraModeArg::Adapter) => not.push(NotApplied {
                    option: "--lora",
                    reason: "adapters (--lora-mode adapter) are the denoiser's".into(),
                }),
                (None, _) => not.push(NotApplied {
                    option: "--lora",
                    reason: "LoRAs adapt the denoiser and the text encoders, not the VAE".into(),
                }),
            }
        }
        if o.tome.ratio.is_some() || o.tome.mode != none.tome.mode {
            not.push(NotApplied {
                option: "--tome",
                reason: "token merging is for the denoiser's image tokens".into(),
            });
        }
        if !o.hooks.kinds.is_empty() {
            not.push(NotApplied {
                option: "--hooks",
                reason: "attention-control hooks are on the denoiser's attention".into(),
            });
        }
        if o.ip_adapter.is_some() {
            not.push(NotApplied {
                option: "--ip-adapter",
                reason: "IP-Adapter's attention is the denoiser's (the image projection is written as image_proj/)".into(),
            });
        }
        if o.merge_controlnet.is_some() {
            not.push(NotApplied {
                option: "--merge-controlnet",
                reason: "a ControlNet is merged into the denoiser".into(),
            });
        }
        if o.step_cache.is_some() {
            not.push(NotApplied {
                option: "--step-cache",
                reason: "step caching reuses the denoiser's work across steps".into(),
            });
        }
        // transformers runs T5 in fp16 only with clamps on its feed-forward outputs (they
        // overflow fp16) that exist only in an fp16 torch model, never in an fp32 export.
        if c.role == Role::TextEncoder
            && c.class.starts_with("T5")
            && o.precision == PrecisionArg::Fp16
        {
            options.precision = PrecisionArg::Fp32;
            options.keep_io_types = false;
            not.push(NotApplied {
                option: "--precision",
                reason: format!(
                    "{} overflows fp16 without transformers' fp16 clamps, which an fp32 export does not hold: kept in fp32 (bf16 keeps fp32's range)",
                    c.class
                ),
            });
        }
        let vae = matches!(c.role, Role::VaeDecoder | Role::VaeEncoder);
        if vae && o.precision != PrecisionArg::Fp32 && force_upcast(c)? {
            if honours_force_upcast(&pipeline.class) {
                options.precision = PrecisionArg::Fp32;
                options.keep_io_types = false;
                not.push(NotApplied {
                    option: "--precision",
                    reason: format!(
                        "force_upcast in {}/config.json: kept in fp32, as diffusers' {} runs this VAE (it overflows fp16)",
                        c.name, pipeline.class
                    ),
                });
            } else {
                notes.push(format!(
                    "force_upcast in {}/config.json is not used by diffusers' {}, which runs the VAE in the pipeline's precision: {}, normalisation statistics in fp32",
                    c.name,
                    pipeline.class,
                    String::from(o.precision)
                ));
            }
        }
        plans.push(Plan {
            component: c.clone(),
            options,
            not_applied: not,
            notes,
        });
    }
    // Every pipeline is built once here: an option error is found before anything is read.
    for p in &plans {
        pipeline::build(&p.options)
            .map_err(|e| FolderError::Options(format!("{}: {e}", p.component.name)))?;
    }
    Ok(plans)
}

/// What compiling one component did.
#[derive(Debug)]
pub struct ComponentReport {
    pub name: String,
    pub role: Role,
    pub passes: Vec<PassReport>,
    pub not_applied: Vec<NotApplied>,
    pub notes: Vec<String>,
    /// Nodes before and after.
    pub nodes: (usize, usize),
    /// Bytes of the model and its data files, before and after.
    pub bytes: (u64, u64),
    /// Files written (relative to the output folder) with their sizes.
    pub files: Vec<(PathBuf, u64)>,
    /// Original data files referred to (`--weights link`), relative, and how they got there.
    pub linked: Vec<(PathBuf, Placed)>,
    /// Weight values clamped to fp16's range as they were written.
    pub clamped: u64,
    /// `--lora-mode adapter`: the adapter written with the denoiser, its tensor count and
    /// the LoRA layers it left out.
    pub adapter: Option<(PathBuf, usize, Vec<Skipped>)>,
}

/// What compiling a folder did.
#[derive(Debug)]
pub struct FolderReport {
    pub class: String,
    pub output: PathBuf,
    pub components: Vec<ComponentReport>,
    /// Files copied as they are (relative paths) with their sizes.
    pub copied: Vec<(PathBuf, u64)>,
    pub notes: Vec<String>,
}

/// Progress of [`compile`].
pub enum Event<'a> {
    /// A component starts (its name).
    Component(&'a str),
    /// A pass starts on the current component.
    Pass(&'a str),
    /// Weights written: (done, total) bytes of the current component.
    Bytes(u64, u64),
    /// Copying the other files.
    Copying,
}

/// How to compile a folder.
pub struct Job<'a> {
    pub input: &'a Path,
    pub output: &'a Path,
    pub options: &'a Options,
    pub export: ExportOptions,
    /// Verify the graph after every pass.
    pub verify: bool,
}

/// Compiles the pipeline folder `job.input` into the new folder `job.output`.
pub fn compile(job: &Job, observe: &mut dyn FnMut(Event)) -> Result<FolderReport> {
    let pipeline = Pipeline::read(job.input)?;
    check_output(job.input, job.output)?;
    let plans = plan(&pipeline, job.options)?;
    let (parent, name) = split_output(job.output)?;
    let created = create_dirs(&parent)?;
    let result = (|| {
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".partial")
            .tempdir_in(&parent)
            .map_err(io_at(&parent))?;
        let report = build(&pipeline, &plans, job, tmp.path(), observe)?;
        // Complete: now the folder appears under its name, in one rename. A pipeline folder
        // there is moved aside first and put back if the new one cannot take its place.
        let replaced = job.output.join(INDEX).is_file();
        let old = if replaced {
            let old = tempfile::Builder::new()
                .prefix(&format!(".{name}."))
                .suffix(".old")
                .tempdir_in(&parent)
                .map_err(io_at(&parent))?
                .keep();
            fs::rename(job.output, &old).map_err(|err| FolderError::Output {
                path: job.output.into(),
                msg: format!("cannot move the folder there aside: {err}"),
            })?;
            Some(old)
        } else {
            None
        };
        let tmp = tmp.keep();
        if let Err(err) = fs::rename(&tmp, job.output) {
            let _ = fs::remove_dir_all(&tmp);
            if let Some(old) = &old {
                let _ = fs::rename(old, job.output);
            }
            return Err(FolderError::Output {
                path: job.output.into(),
                msg: format!("cannot move the finished folder into place: {err}"),
            });
        }
        let mut notes = report.notes;
        if let Some(old) = old {
            notes.push(format!(
                "replaced the pipeline folder that was at {}",
                job.output.display()
            ));
            if let Err(err) = fs::remove_dir_all(&old) {
                notes.push(format!(
                    "the replaced folder could not be removed ({err}): it is at {}",
                    old.display()
                ));
            }
        }
        Ok(FolderReport {
            output: job.output.into(),
            notes,
            ..report
        })
    })();
    if result.is_err() {
        for dir in created.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
    result
}

/// Every component compiled and every other file copied into `tmp`.
fn build(
    pipeline: &Pipeline,
    plans: &[Plan],
    job: &Job,
    tmp: &Path,
    observe: &mut dyn FnMut(Event),
) -> Result<FolderReport> {
    let mut components = Vec::new();
    // The input files compiled components replace (models and their data): not copied.
    let mut replaced: HashSet<PathBuf> = HashSet::new();
    for p in plans {
        observe(Event::Component(&p.component.name));
        let (report, inputs) = compile_component(p, job, tmp, observe)?;
        replaced.extend(inputs.iter().filter_map(|f| fs::canonicalize(f).ok()));
        components.push(report);
    }
    if let Some(path) = &job.options.ip_adapter {
        // The IP-Adapter's image projection, beside the denoiser it feeds (replacing one
        // the input folder had).
        if let Ok(old) = fs::canonicalize(pipeline.dir.join("image_proj/model.onnx")) {
            replaced.insert(old);
        }
        let file = crate::ip_adapter::file::IpAdapterFile::read(path)
            .map_err(|e| FolderError::Options(e.to_string()))?;
        let dir = tmp.join("image_proj");
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let out = dir.join("model.onnx");
        fs::write(
            &out,
            prost::Message::encode_to_vec(&file.projection.model()),
        )
        .map_err(io_at(&out))?;
    }
    observe(Event::Copying);
    let mut copied = Vec::new();
    copy_tree(&pipeline.dir, tmp, Path::new(""), &replaced, &mut copied)?;
    Ok(FolderReport {
        class: pipeline.class.clone(),
        output: tmp.into(),
        components,
        copied,
        notes: pipeline.notes.clone(),
    })
}

/// Size of a file, 0 where it cannot be read.
fn size(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Compiles one component into `tmp/<name>/model.onnx`; its report and the input files it
/// read (the model and its data files).
fn compile_component(
    p: &Plan,
    job: &Job,
    tmp: &Path,
    observe: &mut dyn FnMut(Event),
) -> Result<(ComponentReport, Vec<PathBuf>)> {
    let c = &p.component;
    let fail = |msg: String| FolderError::Component {
        component: c.name.clone(),
        path: c.model.clone(),
        msg,
    };
    // The compiler's messages start with the path, which the error names already.
    let prefix = format!("{}: ", c.model.display());
    let graph_err = |e: GraphError| {
        let msg = e.to_string();
        fail(
            msg.strip_prefix(&prefix)
                .map_or(msg.clone(), str::to_string),
        )
    };
    let mut model = import::read(&c.model).map_err(graph_err)?;
    verify::verify_model(&model).map_err(|e| fail(format!("input model: {e}")))?;
    let mut inputs = vec![c.model.clone()];
    inputs.extend(model.data_files.iter().map(|f| f.path.clone()));
    let bytes_before = inputs.iter().map(|f| size(f)).sum();
    let nodes_before = model.graph.node_count();
    let pm = pipeline::build(&p.options).map_err(FolderError::Options)?;
    let mut cx = PassCx { verify: job.verify };
    let passes = pm
        .run_observed(
            &mut model,
            &mut cx,
            &mut |pass| observe(Event::Pass(pass)),
            &mut |_, _| Ok(()),
        )
        .map_err(graph_err)?;
    let out = tmp.join(&c.name).join("model.onnx");
    // Adapter mode: the LoRAs' tensors go with the denoiser, written with it.
    let o = &p.options;
    let adapter = if o.lora_options.mode == LoraModeArg::Adapter && !o.lora.is_empty() {
        let path = out.with_extension("adapter.safetensors");
        let (tensors, skipped) =
            adapter::adapter_tensors(&model, &o.lora_sources()).map_err(graph_err)?;
        let bytes = adapter::serialize(&path, &tensors).map_err(graph_err)?;
        Some((path, tensors.len(), skipped, bytes))
    } else {
        None
    };
    let companions: Vec<(PathBuf, Vec<u8>)> = adapter
        .iter()
        .map(|(path, _, _, bytes)| (path.clone(), bytes.clone()))
        .collect();
    let written = export::write_guarded(
        &model,
        &out,
        &job.export,
        &Guard {
            inputs: &[],
            companions: &companions,
        },
        &mut |done, total| observe(Event::Bytes(done, total)),
    )
    .map_err(|e| fail(format!("cannot write the compiled model: {e}")))?;
    let rel = |path: &Path| path.strip_prefix(tmp).unwrap_or(path).to_path_buf();
    let mut files = vec![(rel(&written.model), size(&written.model))];
    files.extend(written.data_file.iter().map(|(f, n)| (rel(f), *n)));
    files.extend(
        written
            .linked
            .iter()
            .filter(|(_, how)| *how != Placed::InPlace)
            .map(|(f, _)| (rel(f), size(f))),
    );
    let bytes_after = files.iter().map(|(_, n)| n).sum();
    let adapter = adapter.map(|(path, count, skipped, bytes)| {
        files.push((rel(&path), bytes.len() as u64));
        (rel(&path), count, skipped)
    });
    let report = ComponentReport {
        name: c.name.clone(),
        role: c.role,
        passes,
        not_applied: p.not_applied.clone(),
        notes: p.notes.clone(),
        nodes: (nodes_before, model.graph.node_count()),
        bytes: (bytes_before, bytes_after),
        linked: written
            .linked
            .iter()
            .map(|(f, how)| (rel(f), *how))
            .collect(),
        files,
        clamped: written.clamped,
        adapter,
    };
    Ok((report, inputs))
}

/// Copies every file under `src` (following links) to `dst`, except `replaced` files.
fn copy_tree(
    src: &Path,
    dst: &Path,
    rel: &Path,
    replaced: &HashSet<PathBuf>,
    copied: &mut Vec<(PathBuf, u64)>,
) -> Result<()> {
    let dir = src.join(rel);
    let mut entries: Vec<PathBuf> = fs::read_dir(&dir)
        .map_err(io_at(&dir))?
        .map(|e| e.map(|e| e.path()).map_err(io_at(&dir)))
        .collect::<Result<_>>()?;
    entries.sort();
    for path in entries {
        let name = rel.join(path.file_name().expect("a directory entry"));
        let meta = fs::metadata(&path).map_err(io_at(&path))?;
        if meta.is_dir() {
            copy_tree(src, dst, &name, replaced, copied)?;
        } else if meta.is_file() {
            let real = fs::canonicalize(&path).map_err(io_at(&path))?;
            if replaced.contains(&real) {
                continue;
            }
            let target = dst.join(&name);
            if target.exists() {
                // A file of the compiled output's name (a stale data file): the output's stays.
                continue;
            }
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(io_at(parent))?;
            }
            let n = fs::copy(&path, &target).map_err(io_at(&path))?;
            copied.push((name, n));
        }
    }
    Ok(())
}

/// `path` made absolute with the links and `..` of its existing part resolved.
fn resolve(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).map_err(io_at(path))?;
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    while fs::symlink_metadata(existing).is_err() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => break,
        }
    }
    let mut out = fs::canonicalize(existing).unwrap_or_else(|_| existing.to_path_buf());
    for name in rest.into_iter().rev() {
        out.push(name);
    }
    // What is left below the existing part is a plain path; fold its `..`.
    let mut folded = PathBuf::new();
    for c in out.components() {
        match c {
            PathComponent::ParentDir => {
                folded.pop();
            }
            PathComponent::CurDir => {}
            other => folded.push(other),
        }
    }
    Ok(folded)
}

/// Refuses an output folder that is the input, inside it or around it, a link, or a folder
/// with something in it that is not a pipeline folder (one is replaced, all at once, as
/// compile replaces an output model).
pub fn check_output(input: &Path, output: &Path) -> Result<()> {
    let refuse = |msg: String| {
        Err(FolderError::Output {
            path: output.into(),
            msg,
        })
    };
    let (i, o) = (resolve(input)?, resolve(output)?);
    if i == o {
        return refuse("is the input folder; give a new folder".into());
    }
    if o.starts_with(&i) {
        return refuse(format!(
            "is inside the input folder {}; give a folder outside it",
            input.display()
        ));
    }
    if i.starts_with(&o) {
        return refuse(format!(
            "holds the input folder {}; give a folder outside it",
            input.display()
        ));
    }
    if fs::symlink_metadata(output).is_ok_and(|m| m.is_symlink()) {
        return refuse("is a symbolic link; give a folder path".into());
    }
    match fs::metadata(output) {
        Ok(m) if !m.is_dir() => refuse("exists and is not a folder".into()),
        // A pipeline folder (an earlier compile's) is replaced, as compile replaces an
        // output model; any other folder with something in it is refused.
        Ok(_) if output.join(INDEX).is_file() => Ok(()),
        Ok(_) => {
            let empty = fs::read_dir(output)
                .map_err(io_at(output))?
                .next()
                .is_none();
            if empty {
                Ok(())
            } else {
                refuse(format!(
                    "exists, is not empty and is not a pipeline folder (no {INDEX}); attune replaces only a pipeline folder (remove it or choose another)"
                ))
            }
        }
        Err(_) => Ok(()),
    }
}

/// (the output's parent folder, its name)
fn split_output(output: &Path) -> Result<(PathBuf, String)> {
    let abs = resolve(output)?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok((parent.to_path_buf(), name.to_string_lossy().into())),
        _ => Err(FolderError::Output {
            path: output.into(),
            msg: "is not a folder path".into(),
        }),
    }
}

/// Creates `dir` and its missing parents; the folders made, outermost first.
fn create_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|d| !d.exists())
        .map(Path::to_path_buf)
        .collect();
    missing.reverse();
    fs::create_dir_all(dir).map_err(io_at(dir))?;
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(name: &str, role: Role, class: &str) -> Component {
        Component {
            name: name.into(),
            role,
            class: class.into(),
            model: PathBuf::from(name).join("model.onnx"),
        }
    }

    /// An SD3-like pipeline (no files: the plan reads only options and the index).
    fn sd3() -> Pipeline {
        Pipeline {
            dir: PathBuf::from("sd3"),
            class: "StableDiffusion3Pipeline".into(),
            components: vec![
                component(
                    "text_encoder",
                    Role::TextEncoder,
                    "CLIPTextModelWithProjection",
                ),
                component("text_encoder_3", Role::TextEncoder, "T5EncoderModel"),
                component("transformer", Role::Denoiser, "SD3Transformer2DModel"),
            ],
            notes: Vec::new(),
        }
    }

    fn planned(o: &Options) -> Vec<Plan> {
        plan(&sd3(), o).unwrap()
    }

    #[test]
    fn t5_stays_fp32_in_fp16_but_not_in_bf16() {
        let mut o = Options {
            precision: PrecisionArg::Fp16,
            ..Options::default()
        };
        let p = planned(&o);
        let by = |n: &str| p.iter().find(|p| p.component.name == n).unwrap();
        assert_eq!(by("text_encoder").options.precision, PrecisionArg::Fp16);
        assert_eq!(by("transformer").options.precision, PrecisionArg::Fp16);
        let t5 = by("text_encoder_3");
        assert_eq!(t5.options.precision, PrecisionArg::Fp32);
        assert!(t5.not_applied.iter().any(|n| n.option == "--precision"));
        o.precision = PrecisionArg::Bf16;
        let p = planned(&o);
        assert!(p.iter().all(|p| p.options.precision == PrecisionArg::Bf16));
    }

    #[test]
    fn denoiser_only_options_are_reported_for_the_others() {
        let mut o = Options::default();
        o.tome.ratio = Some(0.5);
        o.attention.mode = AttentionArg::Linear;
        let p = planned(&o);
        for plan in &p {
            let said: Vec<&str> = plan.not_applied.iter().map(|n| n.option).collect();
            if plan.component.role == Role::Denoiser {
                assert!(said.is_empty(), "{said:?}");
                assert_eq!(plan.options.tome.ratio, Some(0.5));
            } else {
                assert_eq!(said, ["--attention linear", "--tome"]);
                assert_eq!(plan.options.tome.ratio, None);
                assert_eq!(plan.options.attention.mode, AttentionArg::Keep);
            }
        }
    }

    #[test]
    fn fixed_shapes_split_by_component() {
        let pipeline = sd3();
        let by = shape_entries(
            "batch=2,text_encoder_3:batch=1, text_encoder:batch=1,height=8",
            &pipeline,
        )
        .unwrap();
        assert_eq!(
            by,
            [
                ("transformer".to_string(), "batch=2,height=8".to_string()),
                ("text_encoder_3".to_string(), "batch=1".to_string()),
                ("text_encoder".to_string(), "batch=1".to_string()),
            ]
        );
        let err = shape_entries("vae_decoder:batch=1", &pipeline)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'vae_decoder' is not a compiled component"),
            "{err}"
        );
    }

    #[test]
    fn outputs_through_links_into_the_input_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let input = tmp.path().join("in");
        fs::create_dir(&input).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&input, &link).unwrap();
        let err = check_output(&input, &link.join("out"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("inside the input folder"), "{err}");
        let err = check_output(&input, &input.join("a/../../in"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is the input folder"), "{err}");
        check_output(&input, &tmp.path().join("new/out")).unwrap();
    }

    #[test]
    fn force_upcast_is_honoured_by_sdxl_classes_only() {
        assert!(honours_force_upcast("StableDiffusionXLPipeline"));
        assert!(honours_force_upcast("StableDiffusionXLImg2ImgPipeline"));
        assert!(honours_force_upcast("KolorsPipeline"));
        assert!(!honours_force_upcast("StableDiffusionPipeline"));
        assert!(!honours_force_upcast("StableDiffusion3Pipeline"));
    }
}
