//! The pass pipeline: which passes run, in which order, built from one options type. The CLI's
//! flags (with the `cli` feature, `Options` is a clap argument group) and a recipe (the same
//! struct deserialised from TOML) fill it; `compile`, `demo` and the tests all call [`build`].
//!
//! Phases: canonicalise → rewrite (LayerNorms written out, LoRA, attention, hooks, token
//! merging) → lower (CUDA fusions, fixed shapes, precision) → check (the target's kernels).
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use attune_compiler::pass::PassManager;

use crate::attention::{AttentionPass, FeatureMap, Mode, Target as AttentionTarget};
use crate::cache::{StepCache, StepCachePass};
use crate::canonical::Canonicalize;
use crate::controller::{ControllerPass, Hook};
use crate::glob::Globs;
use crate::layer_norm::LayerNormPass;
use crate::lora::adapter::AdapterPass;
use crate::lora::{Component, LoraPass, LoraSource};
use crate::lower::{CudaFusion, FixShapes, Precision, PrecisionPass, ShapeSpec, SupportCheck};
use crate::tome::{Mode as TomeMode, Pool, TomeOptions, TomePass};

/// A closed set of names (`target = "cuda"`): one enum for the flag and the recipe key, and
/// one error for an unknown name ("'tpu' is not one of cpu, cuda").
macro_rules! choice {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? } default $default:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
        #[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
        #[serde(try_from = "String", into = "String")]
        pub enum $name {
            $($(#[$vm])* $variant),+
        }

        impl Default for $name {
            fn default() -> Self {
                $name::$default
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                match s.to_ascii_lowercase().as_str() {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!("'{s}' is not one of {}", [$($text),+].join(", "))),
                }
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                match v {
                    $($name::$variant => $text.to_string(),)+
                }
            }
        }
    };
}

choice!(
    /// The execution provider the output is for.
    TargetArg { Cpu = "cpu", Cuda = "cuda" } default Cpu
);
choice!(PrecisionArg { Fp32 = "fp32", Fp16 = "fp16", Bf16 = "bf16" } default Fp32);
choice!(AttentionArg { Keep = "keep", Flash = "flash", Onnx = "onnx", Linear = "linear" } default Keep);
choice!(FeatureMapArg { Relu = "relu", Elu1 = "elu1" } default Elu1);
choice!(LoraModeArg { Fuse = "fuse", Adapter = "adapter" } default Fuse);
choice!(
    /// Which model of a pipeline a graph is, for the LoRA keys it takes (auto: a graph with
    /// an `input_ids` input is `text_encoder`, any other the denoiser).
    LoraComponentArg {
        Auto = "auto",
        Unet = "unet",
        Transformer = "transformer",
        #[cfg_attr(feature = "cli", value(name = "text_encoder"))]
        TextEncoder = "text_encoder",
        #[cfg_attr(feature = "cli", value(name = "text_encoder_2"))]
        TextEncoder2 = "text_encoder_2",
        #[cfg_attr(feature = "cli", value(name = "text_encoder_3"))]
        TextEncoder3 = "text_encoder_3",
    } default Auto
);

impl LoraComponentArg {
    /// The component, `None` for auto.
    pub fn component(self) -> Option<Component> {
        Some(match self {
            LoraComponentArg::Auto => return None,
            LoraComponentArg::Unet | LoraComponentArg::Transformer => Component::Denoiser,
            LoraComponentArg::TextEncoder => Component::TextEncoder,
            LoraComponentArg::TextEncoder2 => Component::TextEncoder2,
            LoraComponentArg::TextEncoder3 => Component::TextEncoder3,
        })
    }
}

impl From<Component> for LoraComponentArg {
    fn from(c: Component) -> Self {
        match c {
            Component::Denoiser => LoraComponentArg::Unet,
            Component::TextEncoder => LoraComponentArg::TextEncoder,
            Component::TextEncoder2 => LoraComponentArg::TextEncoder2,
            Component::TextEncoder3 => LoraComponentArg::TextEncoder3,
        }
    }
}

choice!(TomeModeArg { Merge = "merge", Todo = "todo" } default Merge);
choice!(PoolArg { Avg = "avg", Nearest = "nearest" } default Avg);
choice!(HookArg { Capture = "capture", P2p = "p2p", Masactrl = "masactrl", Pag = "pag" } default Capture);
choice!(
    /// How the output's weights are written (see `attune_compiler::export::WeightsMode`).
    Weights { Copy = "copy", Link = "link" } default Copy
);

/// A LoRA file and its multiplier: `--lora FILE[:M]`, or a recipe's `[[lora]] file, scale`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    pub file: PathBuf,
    #[serde(default = "one")]
    pub scale: f32,
}

fn one() -> f32 {
    1.0
}

impl LoraSpec {
    pub fn parse(text: &str) -> Result<LoraSpec, String> {
        let s = LoraSource::parse(text)?;
        Ok(LoraSpec {
            file: s.path,
            scale: s.multiplier,
        })
    }
}

/// What to do to the model. Field names are the recipe's keys; with the `cli` feature each
/// is also a flag (its clap id is the recipe path, e.g. `attention.mode`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Bring the export to the canonical form only (constants folded, Identity nodes and
    /// no-ops gone, CSE); it runs first whenever any other pass is asked
    #[cfg_attr(feature = "cli", arg(long))]
    pub canonical: bool,
    /// Execution provider the output is for (decides which fused ops may be emitted)
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value_t))]
    pub target: TargetArg,
    /// Precision of the data path: fp16/bf16 convert weights and activations, with
    /// normalisation statistics and the timestep projection kept in fp32 (after LoRA fusion
    /// and the other rewrites)
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value_t))]
    pub precision: PrecisionArg,
    /// With --precision fp16/bf16: keep the graph's inputs and outputs in their original types
    /// (Casts at the boundary)
    #[cfg_attr(feature = "cli", arg(long))]
    pub keep_io_types: bool,
    /// With --target cuda: fusions to leave out (comma-separated), e.g. to measure what each
    /// one gains or to bisect a numeric difference
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ',', value_name = "FUSION", value_parser = CudaFusion::parse))]
    pub disable_fusions: Vec<CudaFusion>,
    /// With --target cuda: fusions off by default to apply too (packed-qkv)
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ',', value_name = "FUSION", value_parser = CudaFusion::parse))]
    pub enable_fusions: Vec<CudaFusion>,
    /// Specialise to fixed input sizes and fold the shape arithmetic: comma-separated
    /// INPUT=AxBx.. (an input's full shape) or SYMBOL=N (a dim symbol of the inputs), e.g.
    /// "sample=2x4x64x64,sequence=77". With every size fixed, ONNX Runtime places no node on the
    /// CPU, as CUDA graphs (`bench --cuda-graph`) need
    #[cfg_attr(feature = "cli", arg(long, value_name = "SPEC"))]
    pub fix_shapes: Option<String>,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub attention: AttentionOptions,
    /// A LoRA file to fuse, FILE or FILE:MULTIPLIER (repeatable; kohya, diffusers/PEFT, LyCORIS)
    #[cfg_attr(feature = "cli", arg(long = "lora", id = "lora", value_name = "FILE[:M]", value_parser = LoraSpec::parse))]
    pub lora: Vec<LoraSpec>,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub lora_options: LoraOptions,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub tome: TomeArgs,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub hooks: HookOptions,
    /// Split the denoiser for step caching: deepcache[:BRANCH] (DeepCache's cache_branch_id,
    /// default 0) makes the deep part of a UNet run on refresh steps only; the runtime reuses
    /// its feature in between (`sample`/`generate --cache-interval N`)
    #[cfg_attr(
        feature = "cli",
        arg(long = "step-cache", id = "step_cache", value_name = "KIND[:ARG]")
    )]
    pub step_cache: Option<String>,
    /// An IP-Adapter file (.safetensors, the published layout): decoupled cross-attention at
    /// every cross-attention site (new inputs ip_tokens and ip_adapter.<site>.scale); a
    /// pipeline folder's output also gets image_proj/model.onnx, the image projection
    #[cfg_attr(feature = "cli", arg(long = "ip-adapter", value_name = "FILE"))]
    pub ip_adapter: Option<std::path::PathBuf>,
    /// Join this ControlNet (an .onnx file or a folder with model.onnx) into the denoiser: one
    /// graph whose residual inputs it feeds, scaled by a `controlnet_scale` input; the control
    /// image is its `controlnet_cond` input
    #[cfg_attr(
        feature = "cli",
        arg(long = "merge-controlnet", value_name = "CONTROLNET")
    )]
    pub merge_controlnet: Option<std::path::PathBuf>,
    /// copy: one self-contained data file; link: keep the original data (referenced in place,
    /// else reflinked or copied), write only changed tensors
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value_t))]
    pub weights: Weights,
}

/// Attention substitution.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct AttentionOptions {
    /// Attention substitution: keep, flash (com.microsoft.MultiHeadAttention), onnx (opset-23 Attention), linear
    #[cfg_attr(
        feature = "cli",
        arg(long = "attention", id = "attention.mode", value_enum, default_value_t)
    )]
    pub mode: AttentionArg,
    /// Only rewrite attention sites whose module path matches (comma-separated globs, e.g. "up_blocks.*,*.attn1")
    #[cfg_attr(
        feature = "cli",
        arg(
            long = "attention-layers",
            id = "attention.layers",
            value_name = "GLOB"
        )
    )]
    pub layers: Option<String>,
    /// Feature map of linear attention: relu, or elu1 (elu(x)+1)
    #[cfg_attr(
        feature = "cli",
        arg(
            long = "linear-feature-map",
            id = "attention.feature_map",
            value_enum,
            default_value_t
        )
    )]
    pub feature_map: FeatureMapArg,
}

/// How LoRAs are applied.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct LoraOptions {
    /// fuse: bake the LoRAs into the weights; adapter: add switchable low-rank branches
    /// (A, B graph inputs) and write the LoRAs' tensors to OUT.adapter.safetensors
    #[cfg_attr(
        feature = "cli",
        arg(
            long = "lora-mode",
            id = "lora_options.mode",
            value_enum,
            default_value_t
        )
    )]
    pub mode: LoraModeArg,
    /// Make LoRA layers that match no layer of the graph an error
    #[cfg_attr(feature = "cli", arg(long = "lora-strict", id = "lora_options.strict"))]
    pub strict: bool,
    /// Which model of a pipeline the graph is: the LoRA files' keys for it are fused, the
    /// others noted as theirs (auto: a graph with an `input_ids` input is text_encoder, any
    /// other the unet/transformer)
    #[cfg_attr(
        feature = "cli",
        arg(
            long = "lora-component",
            id = "lora_options.component",
            value_enum,
            default_value_t
        )
    )]
    pub component: LoraComponentArg,
    /// In adapter mode, also give branches to every layer whose module path matches
    #[cfg_attr(
        feature = "cli",
        arg(long = "lora-layers", id = "lora_options.layers", value_name = "GLOB")
    )]
    pub layers: Option<String>,
}

/// Token merging (ToMe) and key/value downsampling (ToDo).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct TomeArgs {
    /// Merge this fraction of the tokens (tomesd's ratio, in [0, 1)) in high-resolution blocks
    #[cfg_attr(
        feature = "cli",
        arg(long = "tome", id = "tome.ratio", value_name = "RATIO")
    )]
    pub ratio: Option<f32>,
    /// merge: ToMe; todo: downsample self-attention keys/values instead (ToDo)
    #[cfg_attr(
        feature = "cli",
        arg(long = "tome-mode", id = "tome.mode", value_enum, default_value_t)
    )]
    pub mode: TomeModeArg,
    /// Blocks at most this many times downsampled from the latent take part (1: the highest resolution)
    #[cfg_attr(
        feature = "cli",
        arg(
            long = "tome-max-downsample",
            id = "tome.max_downsample",
            default_value_t = 1
        )
    )]
    pub max_downsample: i64,
    /// Window width for choosing dst tokens
    #[cfg_attr(
        feature = "cli",
        arg(long = "tome-sx", id = "tome.sx", default_value_t = 2)
    )]
    pub sx: i64,
    /// Window height for choosing dst tokens
    #[cfg_attr(
        feature = "cli",
        arg(long = "tome-sy", id = "tome.sy", default_value_t = 2)
    )]
    pub sy: i64,
    /// Merge around self-attention
    #[cfg_attr(feature = "cli", arg(long = "tome-attn", id = "tome.attn", default_value_t = true, action = clap::ArgAction::Set))]
    pub attn: bool,
    /// Merge around cross-attention too
    #[cfg_attr(feature = "cli", arg(long = "tome-crossattn", id = "tome.crossattn"))]
    pub crossattn: bool,
    /// Merge around the feed-forward too
    #[cfg_attr(feature = "cli", arg(long = "tome-mlp", id = "tome.mlp"))]
    pub mlp: bool,
    /// Specialise to one latent size, HxW (e.g. 64x64 for 512 px)
    #[cfg_attr(
        feature = "cli",
        arg(long = "tome-static", id = "tome.static", value_name = "HxW")
    )]
    #[serde(rename = "static")]
    pub static_hw: Option<String>,
    /// Random dst slots, fed at run time as int64 input `tome_slots_ds<level>` [windows down,
    /// windows across] (values < sx·sy); left out, it is the top-left slot
    #[cfg_attr(feature = "cli", arg(long = "tome-rand", id = "tome.rand"))]
    pub rand: bool,
    /// ToDo: pooling factor of the keys/values
    #[cfg_attr(
        feature = "cli",
        arg(long = "todo-factor", id = "tome.todo_factor", default_value_t = 2)
    )]
    pub todo_factor: i64,
    /// ToDo: average or nearest (top-left) pooling
    #[cfg_attr(
        feature = "cli",
        arg(long = "todo-pool", id = "tome.todo_pool", value_enum, default_value_t)
    )]
    pub todo_pool: PoolArg,
}

impl Default for TomeArgs {
    fn default() -> Self {
        TomeArgs {
            ratio: None,
            mode: TomeModeArg::Merge,
            max_downsample: 1,
            sx: 2,
            sy: 2,
            attn: true,
            crossattn: false,
            mlp: false,
            static_hw: None,
            rand: false,
            todo_factor: 2,
            todo_pool: PoolArg::Avg,
        }
    }
}

/// Attention-control hooks.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct HookOptions {
    /// Attention-control hooks: capture (cross-attention map outputs), p2p (Prompt-to-Prompt
    /// inputs), masactrl (K/V injection gates), pag (perturbed-attention guidance's
    /// identity-map gates, at mid_block.*.attn1 without --hooks-layers); comma-separated
    #[cfg_attr(
        feature = "cli",
        arg(long = "hooks", id = "hooks.kinds", value_enum, value_delimiter = ',')
    )]
    pub kinds: Vec<HookArg>,
    /// Only attention modules whose path matches get hooks (comma-separated globs matching
    /// whole module paths)
    #[cfg_attr(
        feature = "cli",
        arg(long = "hooks-layers", id = "hooks.layers", value_name = "GLOB")
    )]
    pub layers: Option<String>,
    /// Text tokens of the hook inputs' defaults (mapper, alpha, equalizer)
    #[cfg_attr(
        feature = "cli",
        arg(long = "hooks-words", id = "hooks.words", default_value_t = 77)
    )]
    pub words: i64,
}

impl Default for HookOptions {
    fn default() -> Self {
        HookOptions {
            kinds: Vec::new(),
            layers: None,
            words: 77,
        }
    }
}

impl Options {
    /// A recipe file: these options as TOML (paths relative to the recipe's folder).
    pub fn from_recipe(path: &Path) -> Result<Options, String> {
        let text = attune_compiler::files::read_text(path)
            .map_err(|e| format!("cannot read recipe: {e}"))?;
        let mut o: Options =
            toml::from_str(&text).map_err(|e| format!("recipe {}: {e}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for l in &mut o.lora {
            l.file = dir.join(&l.file);
        }
        Ok(o)
    }

    /// Does any option ask for a rewrite? (Without one, compile is a faithful round trip.)
    pub fn any_pass(&self) -> bool {
        let none = Options::default();
        self.canonical
            || self.target != none.target
            || self.precision != none.precision
            || self.attention.mode != none.attention.mode
            || !self.lora.is_empty()
            || self.lora_options.layers.is_some()
            || self.tome.ratio.is_some()
            || self.tome.mode != none.tome.mode
            || !self.hooks.kinds.is_empty()
            || self.fix_shapes.is_some()
            || !self.disable_fusions.is_empty()
            || !self.enable_fusions.is_empty()
            || self.step_cache.is_some()
            || self.merge_controlnet.is_some()
            || self.ip_adapter.is_some()
    }

    /// Does the compiled model compute something else than the original?
    pub fn changes_function(&self) -> bool {
        self.attention.mode == AttentionArg::Linear
    }

    pub fn lora_sources(&self) -> Vec<LoraSource> {
        self.lora
            .iter()
            .map(|l| LoraSource {
                path: l.file.clone(),
                multiplier: l.scale,
            })
            .collect()
    }

    /// The token-merging pass these options ask for, if any.
    pub fn tome_pass(&self) -> Result<Option<TomePass>, String> {
        let t = &self.tome;
        let mode = match (t.mode, t.ratio) {
            (TomeModeArg::Merge, None) => return Ok(None),
            (TomeModeArg::Merge, Some(ratio)) => TomeMode::Merge { ratio },
            (TomeModeArg::Todo, _) => TomeMode::Downsample {
                factor: t.todo_factor,
                pool: match t.todo_pool {
                    PoolArg::Avg => Pool::Average,
                    PoolArg::Nearest => Pool::Nearest,
                },
            },
        };
        let static_hw = t
            .static_hw
            .as_deref()
            .map(|text| {
                let bad = || format!("--tome-static {text}: expected HxW with positive integers");
                let (h, w) = text.split_once(['x', 'X']).ok_or_else(bad)?;
                let side = |s: &str| {
                    s.trim()
                        .parse::<i64>()
                        .ok()
                        .filter(|v| *v > 0)
                        .ok_or_else(bad)
                };
                Ok::<_, String>((side(h)?, side(w)?))
            })
            .transpose()?;
        let options = TomeOptions {
            mode,
            max_downsample: t.max_downsample,
            sx: t.sx,
            sy: t.sy,
            merge_attn: t.attn,
            merge_crossattn: t.crossattn,
            merge_mlp: t.mlp,
            static_hw,
            random: t.rand,
        };
        options.check()?;
        Ok(Some(TomePass { options }))
    }

    /// The default fusions, plus `enable_fusions`, minus `disable_fusions`.
    fn cuda_fusions(&self) -> Result<Vec<CudaFusion>, String> {
        if let Some(f) = self
            .enable_fusions
            .iter()
            .find(|f| self.disable_fusions.contains(f))
        {
            return Err(format!("fusion {} is both enabled and disabled", f.name()));
        }
        let mut fusions = CudaFusion::DEFAULT.to_vec();
        fusions.extend(&self.enable_fusions);
        fusions.retain(|f| !self.disable_fusions.contains(f));
        Ok(fusions)
    }

    fn hook_layers(&self) -> Globs {
        Globs::parse(self.hooks.layers.as_deref().unwrap_or("*"))
    }
}

/// The passes `options` ask for, in order.
pub fn build(o: &Options) -> Result<PassManager, String> {
    let mut pm = PassManager::new();
    let target = match o.target {
        TargetArg::Cpu => AttentionTarget::Cpu,
        TargetArg::Cuda => AttentionTarget::Cuda,
    };
    if !o.any_pass() {
        // Nothing asked: a faithful round trip (checked for the CPU EP).
        pm.add(SupportCheck { target });
        return Ok(pm);
    }
    if let Some(path) = &o.merge_controlnet {
        // Before the canonical form: both graphs get it, and every later pass sees one graph.
        pm.add(crate::merge_controlnet::MergeControlNet { path: path.clone() });
    }
    pm.add(Canonicalize);
    let tome = o.tome_pass()?;
    // Passes that read transformer blocks' norms, or fuse or convert them: exports below
    // opset 17 write LayerNorms out, so first they become LayerNormalization.
    if !o.hooks.kinds.is_empty()
        || tome.is_some()
        || target == AttentionTarget::Cuda
        || o.precision != PrecisionArg::Fp32
    {
        pm.add(LayerNormPass);
    }
    let sources = o.lora_sources();
    match o.lora_options.mode {
        LoraModeArg::Fuse if !sources.is_empty() => {
            pm.add(LoraPass {
                sources,
                strict: o.lora_options.strict,
                component: o.lora_options.component.component(),
            });
        }
        LoraModeArg::Adapter if !sources.is_empty() || o.lora_options.layers.is_some() => {
            pm.add(AdapterPass {
                sources,
                layers: o.lora_options.layers.as_deref().map(Globs::parse),
            });
        }
        _ => {}
    }
    if let Some(path) = &o.ip_adapter {
        // Before attention fusion, which then fuses the image attention like the text's.
        pm.add(crate::ip_adapter::IpAdapterPass { path: path.clone() });
    }
    let mode = match o.attention.mode {
        AttentionArg::Keep => None,
        AttentionArg::Flash => Some(Mode::Flash),
        AttentionArg::Onnx => Some(Mode::Onnx),
        AttentionArg::Linear => Some(Mode::Linear(match o.attention.feature_map {
            FeatureMapArg::Relu => FeatureMap::Relu,
            FeatureMapArg::Elu1 => FeatureMap::Elu1,
        })),
    };
    let hooks = &o.hooks.kinds;
    if let Some(mode) = mode {
        pm.add(AttentionPass {
            mode,
            target,
            layers: o.attention.layers.as_deref().map(Globs::parse),
            keep_unfused: hooks
                .iter()
                .any(|h| matches!(h, HookArg::Capture | HookArg::P2p))
                .then(|| o.hook_layers()),
            keep_joint_unfused: hooks.contains(&HookArg::Capture),
        });
    }
    if !hooks.is_empty() {
        pm.add(ControllerPass {
            hooks: hooks
                .iter()
                .map(|h| match h {
                    HookArg::Capture => Hook::Capture,
                    HookArg::P2p => Hook::P2p,
                    HookArg::Masactrl => Hook::MasaCtrl,
                    HookArg::Pag => Hook::Pag,
                })
                .collect(),
            layers: o.hooks.layers.as_deref().map(Globs::parse),
            words: o.hooks.words,
        });
    }
    if let Some(tome) = tome {
        pm.add(tome);
    }
    let precision = match o.precision {
        PrecisionArg::Fp32 => Precision::F32,
        PrecisionArg::Fp16 => Precision::F16,
        PrecisionArg::Bf16 => Precision::Bf16,
    };
    if target == AttentionTarget::Cuda {
        for pass in crate::lower::cuda::passes(&o.cuda_fusions()?, precision) {
            pm.add_boxed(pass);
        }
    } else if !o.disable_fusions.is_empty() || !o.enable_fusions.is_empty() {
        return Err(
            "--disable-fusions/--enable-fusions apply to --target cuda (the CPU target fuses none of these)".into(),
        );
    }
    if let Some(spec) = &o.fix_shapes {
        let specs = ShapeSpec::parse_list(spec)?;
        if specs.is_empty() {
            return Err(format!("--fix-shapes '{spec}': no sizes given"));
        }
        pm.add(FixShapes { specs });
    }
    if precision != Precision::F32 {
        pm.add(PrecisionPass {
            precision,
            keep_io_types: o.keep_io_types,
        });
    }
    if o.step_cache.is_some()
        && o.lora_options.mode == LoraModeArg::Adapter
        && pm.names().contains(&"lora-adapter")
    {
        // The adapter file is made from the compiled graph, whose cached layers are then in
        // the If branch.
        return Err(
            "--lora-mode adapter with --step-cache: the adapter's tensors for layers in the cached part cannot be written from the split graph; fuse the LoRAs (--lora-mode fuse) with the split, or compile the adapter graph without --step-cache".into(),
        );
    }
    if let Some(text) = &o.step_cache {
        // Last: the split moves the deep part into a branch the other passes do not enter.
        pm.add(StepCachePass {
            cache: StepCache::parse(text)?,
        });
    }
    pm.add(SupportCheck { target });
    Ok(pm)
}
