use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use attune_compiler::export::{self, ExportOptions, WeightsMode};
use attune_compiler::pass::{PassCx, PassManager, PassReport};
use attune_compiler::verify;
use attune_passes::attention::{AttentionPass, FeatureMap, Mode, Target};
use attune_passes::canonical::Canonicalize;
use attune_passes::controller::{ControllerPass, Hook};
use attune_passes::glob::Globs;
use attune_passes::layer_norm::LayerNormPass;
use attune_passes::lora::adapter::{self, AdapterPass};
use attune_passes::lora::{LoraPass, LoraSource};
use attune_passes::lower::{
    CudaFusion, CudaFusions, FixShapes, Precision, PrecisionPass, ShapeSpec, SupportCheck,
};
use attune_passes::tome::{Mode as TomeMode, Pool, TomeOptions, TomePass};

use super::exec::{EpArg, ExecArgs, InputArgs, OptArg};
use crate::progress::Progress;

#[derive(clap::Args)]
pub struct Args {
    /// The .onnx model to compile
    model: PathBuf,
    /// Output .onnx path (its data file is written next to it)
    #[arg(short, long)]
    output: PathBuf,
    #[command(flatten)]
    options: CompileOptions,
    /// copy: one self-contained data file; link: keep the original data (referenced in place, else reflinked or copied), write only changed tensors
    #[arg(long, value_enum, default_value_t = Weights::Copy)]
    weights: Weights,
    /// Write all tensors inside the .onnx (models under 2 GB)
    #[arg(long)]
    inline: bool,
    /// Verify the graph after every pass (always on in debug builds and with ATTUNE_VERIFY set)
    #[arg(long)]
    verify: bool,
    /// Inputs on which passes that change the model's function (linear attention) are measured
    #[command(flatten)]
    measure: InputArgs,
    /// A recipe (TOML) holding the whole conversion; flags given here override it
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// No progress bars and no pass reports (errors still go to stderr)
    #[arg(short, long)]
    quiet: bool,
    /// Also write the graph after these passes, as OUT's name + `.after-PASS.onnx`
    /// (comma-separated pass names, as the reports print them)
    #[arg(long, value_delimiter = ',', value_name = "PASS")]
    dump_after: Vec<String>,
    /// Run the pipeline up to this pass and write what it made (bisecting a pipeline)
    #[arg(long, value_name = "PASS")]
    stop_after: Option<String>,
}

/// What to do to the model.
#[derive(clap::Args, Clone)]
pub struct CompileOptions {
    /// Bring the export to the canonical form only (constants folded, Identity nodes and
    /// no-ops gone, CSE); it runs first whenever any other pass is asked
    #[arg(long)]
    pub canonical: bool,
    /// Execution provider the output is for (decides which fused ops may be emitted)
    #[arg(long, value_enum, default_value_t = TargetArg::Cpu)]
    pub target: TargetArg,
    /// Precision of the data path: fp16/bf16 convert weights and activations, with
    /// normalisation statistics and the timestep projection kept in fp32 (after LoRA fusion
    /// and the other rewrites)
    #[arg(long, value_enum, default_value_t = PrecisionArg::Fp32)]
    pub precision: PrecisionArg,
    /// With --precision fp16/bf16: keep the graph's inputs and outputs in their original types
    /// (Casts at the boundary)
    #[arg(long)]
    pub keep_io_types: bool,
    /// With --target cuda: fusions to leave out (comma-separated), e.g. to measure what each
    /// one gains or to bisect a numeric difference
    #[arg(long, value_delimiter = ',', value_name = "FUSION", value_parser = CudaFusion::parse)]
    pub disable_fusions: Vec<CudaFusion>,
    /// With --target cuda: fusions off by default to apply too (packed-qkv)
    #[arg(long, value_delimiter = ',', value_name = "FUSION", value_parser = CudaFusion::parse)]
    pub enable_fusions: Vec<CudaFusion>,
    /// Specialise to fixed input sizes and fold the shape arithmetic: comma-separated
    /// INPUT=AxBx.. (an input's full shape) or SYMBOL=N (a dim symbol of the inputs), e.g.
    /// "sample=2x4x64x64,sequence=77". With every size fixed, ONNX Runtime places no node on the
    /// CPU, as CUDA graphs (`bench --cuda-graph`) need
    #[arg(long, value_name = "SPEC")]
    pub fix_shapes: Option<String>,
    /// Attention substitution: keep, flash (com.microsoft.MultiHeadAttention), onnx (opset-23 Attention), linear
    #[arg(long, value_enum, default_value_t = AttentionArg::Keep)]
    pub attention: AttentionArg,
    /// Only rewrite attention sites whose module path matches (comma-separated globs, e.g. "up_blocks.*,*.attn1")
    #[arg(long, value_name = "GLOB")]
    pub attention_layers: Option<String>,
    /// Feature map of linear attention: relu, or elu1 (elu(x)+1)
    #[arg(long, value_enum, default_value_t = FeatureMapArg::Elu1)]
    pub linear_feature_map: FeatureMapArg,
    /// A LoRA file to fuse, FILE or FILE:MULTIPLIER (repeatable; kohya, diffusers/PEFT, LyCORIS)
    #[arg(long = "lora", value_name = "FILE[:M]")]
    pub loras: Vec<String>,
    /// Make LoRA layers that match no layer of the graph an error
    #[arg(long)]
    pub lora_strict: bool,
    /// fuse: bake the LoRAs into the weights; adapter: add switchable low-rank branches
    /// (A, B graph inputs) and write the LoRAs' tensors to OUT.adapter.safetensors
    #[arg(long, value_enum, default_value_t = LoraModeArg::Fuse)]
    pub lora_mode: LoraModeArg,
    /// In adapter mode, also give branches to every layer whose module path matches
    #[arg(long, value_name = "GLOB")]
    pub lora_layers: Option<String>,
    #[command(flatten)]
    pub tome: TomeArgs,
    /// Attention-control hooks: capture (cross-attention map outputs), p2p (Prompt-to-Prompt
    /// inputs), masactrl (K/V injection gates); comma-separated
    #[arg(long, value_enum, value_delimiter = ',')]
    pub hooks: Vec<HookArg>,
    /// Only attention modules whose path matches get hooks (comma-separated globs)
    #[arg(long, value_name = "GLOB")]
    pub hooks_layers: Option<String>,
    /// Text tokens of the hook inputs' defaults (mapper, alpha, equalizer)
    #[arg(long, default_value_t = 77)]
    pub hooks_words: i64,
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum HookArg {
    Capture,
    P2p,
    Masactrl,
}

/// Token merging (ToMe) and key/value downsampling (ToDo).
#[derive(clap::Args, Clone, Default)]
pub struct TomeArgs {
    /// Merge this fraction of the tokens (tomesd's ratio, in [0, 1)) in high-resolution blocks
    #[arg(long, value_name = "RATIO")]
    pub tome: Option<f32>,
    /// merge: ToMe; todo: downsample self-attention keys/values instead (ToDo)
    #[arg(long, value_enum, default_value_t = TomeModeArg::Merge)]
    pub tome_mode: TomeModeArg,
    /// Blocks at most this many times downsampled from the latent take part (1: the highest resolution)
    #[arg(long, default_value_t = 1)]
    pub tome_max_downsample: i64,
    /// Window width for choosing dst tokens
    #[arg(long, default_value_t = 2)]
    pub tome_sx: i64,
    /// Window height for choosing dst tokens
    #[arg(long, default_value_t = 2)]
    pub tome_sy: i64,
    /// Merge around self-attention
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub tome_attn: bool,
    /// Merge around cross-attention too
    #[arg(long)]
    pub tome_crossattn: bool,
    /// Merge around the feed-forward too
    #[arg(long)]
    pub tome_mlp: bool,
    /// Random dst slots, fed at run time as int64 input `tome_slots_ds<level>` [windows down,
    /// windows across] (values < sx·sy); left out, it is the top-left slot
    #[arg(long)]
    pub tome_rand: bool,
    /// Specialise to one latent size, HxW (e.g. 64x64 for 512 px)
    #[arg(long, value_name = "HxW")]
    pub tome_static: Option<String>,
    /// ToDo: pooling factor of the keys/values
    #[arg(long, default_value_t = 2)]
    pub todo_factor: i64,
    /// ToDo: average or nearest (top-left) pooling
    #[arg(long, value_enum, default_value_t = PoolArg::Avg)]
    pub todo_pool: PoolArg,
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq, Default)]
pub enum TomeModeArg {
    #[default]
    Merge,
    Todo,
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq, Default)]
pub enum PoolArg {
    #[default]
    Avg,
    Nearest,
}

impl TomeArgs {
    /// The token-merging pass these flags ask for, if any.
    pub fn pass(&self) -> anyhow::Result<Option<TomePass>> {
        let mode = match (self.tome_mode, self.tome) {
            (TomeModeArg::Merge, None) => return Ok(None),
            (TomeModeArg::Merge, Some(ratio)) => TomeMode::Merge { ratio },
            (TomeModeArg::Todo, _) => TomeMode::Downsample {
                factor: self.todo_factor,
                pool: match self.todo_pool {
                    PoolArg::Avg => Pool::Average,
                    PoolArg::Nearest => Pool::Nearest,
                },
            },
        };
        let static_hw = self
            .tome_static
            .as_deref()
            .map(|t| {
                let bad =
                    || anyhow::anyhow!("--tome-static {t}: expected HxW with positive integers");
                let (h, w) = t.split_once(['x', 'X']).ok_or_else(bad)?;
                let side = |s: &str| {
                    s.trim()
                        .parse::<i64>()
                        .ok()
                        .filter(|v| *v > 0)
                        .ok_or_else(bad)
                };
                Ok::<_, anyhow::Error>((side(h)?, side(w)?))
            })
            .transpose()?;
        let options = TomeOptions {
            mode,
            max_downsample: self.tome_max_downsample,
            sx: self.tome_sx,
            sy: self.tome_sy,
            merge_attn: self.tome_attn,
            merge_crossattn: self.tome_crossattn,
            merge_mlp: self.tome_mlp,
            static_hw,
            random: self.tome_rand,
        };
        options.check().map_err(anyhow::Error::msg)?;
        Ok(Some(TomePass { options }))
    }
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum LoraModeArg {
    Fuse,
    Adapter,
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum TargetArg {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum PrecisionArg {
    Fp32,
    Fp16,
    Bf16,
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum AttentionArg {
    Keep,
    Flash,
    Onnx,
    Linear,
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum FeatureMapArg {
    Relu,
    Elu1,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Weights {
    Copy,
    Link,
}

impl Default for CompileOptions {
    /// The options of a command line that gives none.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            options: CompileOptions,
        }
        <Defaults as clap::Parser>::parse_from(["attune"]).options
    }
}

impl CompileOptions {
    /// The passes these options ask for, in order.
    pub fn pipeline(&self) -> anyhow::Result<PassManager> {
        let mut pm = PassManager::new();
        if !self.any_pass() {
            // Nothing asked: a faithful round trip (checked for the CPU EP).
            pm.add(SupportCheck {
                target: Target::Cpu,
            });
            return Ok(pm);
        }
        pm.add(Canonicalize);
        let tome = self.tome.pass()?;
        // Passes that read transformer blocks' norms, or fuse or convert them: exports below
        // opset 17 write LayerNorms out, so first they become LayerNormalization.
        if !self.hooks.is_empty()
            || tome.is_some()
            || self.target == TargetArg::Cuda
            || self.precision != PrecisionArg::Fp32
        {
            pm.add(LayerNormPass);
        }
        let sources = self.lora_sources()?;
        match self.lora_mode {
            LoraModeArg::Fuse if !sources.is_empty() => {
                pm.add(LoraPass {
                    sources,
                    strict: self.lora_strict,
                });
            }
            LoraModeArg::Adapter if !sources.is_empty() || self.lora_layers.is_some() => {
                pm.add(AdapterPass {
                    sources,
                    layers: self.lora_layers.as_deref().map(Globs::parse),
                });
            }
            _ => {}
        }
        let target = match self.target {
            TargetArg::Cpu => Target::Cpu,
            TargetArg::Cuda => Target::Cuda,
        };
        let mode = match self.attention {
            AttentionArg::Keep => None,
            AttentionArg::Flash => Some(Mode::Flash),
            AttentionArg::Onnx => Some(Mode::Onnx),
            AttentionArg::Linear => Some(Mode::Linear(match self.linear_feature_map {
                FeatureMapArg::Relu => FeatureMap::Relu,
                FeatureMapArg::Elu1 => FeatureMap::Elu1,
            })),
        };
        if let Some(mode) = mode {
            pm.add(AttentionPass {
                mode,
                target,
                layers: self.attention_layers.as_deref().map(Globs::parse),
                keep_unfused: self
                    .hooks
                    .iter()
                    .any(|h| matches!(h, HookArg::Capture | HookArg::P2p))
                    .then(|| self.hook_layers()),
                keep_joint_unfused: self.hooks.contains(&HookArg::Capture),
            });
        }
        if !self.hooks.is_empty() {
            let hooks = self
                .hooks
                .iter()
                .map(|h| match h {
                    HookArg::Capture => Hook::Capture,
                    HookArg::P2p => Hook::P2p,
                    HookArg::Masactrl => Hook::MasaCtrl,
                })
                .collect();
            pm.add(ControllerPass {
                hooks,
                layers: self.hooks_layers.as_deref().map(Globs::parse),
                words: self.hooks_words,
            });
        }
        if let Some(tome) = tome {
            pm.add(tome);
        }
        let precision = match self.precision {
            PrecisionArg::Fp32 => Precision::F32,
            PrecisionArg::Fp16 => Precision::F16,
            PrecisionArg::Bf16 => Precision::Bf16,
        };
        if target == Target::Cuda {
            pm.add(CudaFusions {
                precision,
                fusions: self.cuda_fusions()?,
            });
        } else if !self.disable_fusions.is_empty() || !self.enable_fusions.is_empty() {
            bail!(
                "--disable-fusions/--enable-fusions apply to --target cuda (the CPU target fuses none of these)"
            );
        }
        if let Some(spec) = &self.fix_shapes {
            let specs = ShapeSpec::parse_list(spec).map_err(anyhow::Error::msg)?;
            if specs.is_empty() {
                bail!("--fix-shapes '{spec}': no sizes given");
            }
            pm.add(FixShapes { specs });
        }
        if precision != Precision::F32 {
            pm.add(PrecisionPass {
                precision,
                keep_io_types: self.keep_io_types,
            });
        }
        pm.add(SupportCheck { target });
        Ok(pm)
    }

    /// The default fusions, plus --enable-fusions, minus --disable-fusions.
    fn cuda_fusions(&self) -> anyhow::Result<Vec<CudaFusion>> {
        if let Some(f) = self
            .enable_fusions
            .iter()
            .find(|f| self.disable_fusions.contains(f))
        {
            bail!("fusion {} is both enabled and disabled", f.name());
        }
        let mut fusions = CudaFusion::DEFAULT.to_vec();
        fusions.extend(&self.enable_fusions);
        fusions.retain(|f| !self.disable_fusions.contains(f));
        Ok(fusions)
    }

    fn hook_layers(&self) -> Globs {
        Globs::parse(self.hooks_layers.as_deref().unwrap_or("*"))
    }

    pub fn lora_sources(&self) -> anyhow::Result<Vec<LoraSource>> {
        self.loras
            .iter()
            .map(|l| LoraSource::parse(l).map_err(anyhow::Error::msg))
            .collect()
    }

    /// Does any option ask for a rewrite? (Without one, compile is a faithful round trip.)
    fn any_pass(&self) -> bool {
        let none = CompileOptions::default();
        self.canonical
            || self.target != none.target
            || self.precision != none.precision
            || self.attention != none.attention
            || !self.loras.is_empty()
            || self.lora_layers.is_some()
            || self.tome.tome.is_some()
            || self.tome.tome_mode != none.tome.tome_mode
            || !self.hooks.is_empty()
            || self.fix_shapes.is_some()
            || !self.disable_fusions.is_empty()
            || !self.enable_fusions.is_empty()
    }

    /// Does the compiled model compute something else than the original?
    pub fn changes_function(&self) -> bool {
        self.attention == AttentionArg::Linear
    }
}

/// Prints what each pass did.
pub fn print_reports(reports: &[PassReport]) {
    for r in reports {
        println!(
            "{}: {} rewritten, {} skipped ({:.1} ms)",
            r.pass,
            r.rewritten.len(),
            r.skipped.len(),
            r.time.as_secs_f64() * 1e3
        );
        for s in &r.rewritten {
            println!("  + {s}");
        }
        for s in &r.skipped {
            println!("  - {}: {}", s.site, s.reason);
        }
        for n in &r.notes {
            println!("  note: {n}");
        }
    }
}

/// `OUT.onnx` → `OUT.after-PASS.onnx`
fn dump_path(output: &std::path::Path, pass: &str) -> PathBuf {
    output.with_extension(format!("after-{pass}.onnx"))
}

/// `OUT.onnx` → `OUT.adapter.safetensors`
pub fn adapter_path(output: &std::path::Path) -> PathBuf {
    output.with_extension("adapter.safetensors")
}

pub fn run(mut args: Args, matches: &clap::ArgMatches) -> anyhow::Result<i32> {
    if let Some(path) = &args.recipe {
        let (recipe, dir) = super::recipe::Recipe::read(path)?;
        let given = super::recipe::given_on_command_line(matches);
        recipe
            .apply(&dir, &mut args.options, &given)
            .with_context(|| format!("recipe {}", path.display()))?;
        if let (Some(w), false) = (&recipe.weights, given("weights")) {
            args.weights = <Weights as clap::ValueEnum>::from_str(w, true).map_err(|_| {
                anyhow::anyhow!(
                    "recipe {}: key `weights`: '{w}' is not one of copy, link",
                    path.display()
                )
            })?;
        }
    }
    // Every file this command reads; no output may replace one. Checked before any work.
    let inputs = args.read_files()?;
    let adapter_out = (args.options.lora_mode == LoraModeArg::Adapter
        && !args.options.loras.is_empty())
    .then(|| adapter_path(&args.output));
    for out in std::iter::once(&args.output).chain(&adapter_out) {
        export::check_output(out, &inputs)
            .with_context(|| format!("cannot write {}", args.output.display()))?;
    }
    let start = Instant::now();
    let progress = Progress::start(&format!("loading {}", args.model.display()), args.quiet);
    let mut model = super::load(&args.model)?;
    verify::verify(&model).with_context(|| format!("input model {}", args.model.display()))?;
    // Inputs for measuring a function-changing rewrite are settled before anything is written.
    let measure_inputs = if args.options.changes_function() {
        Some(args.measure.prepare(&args.model).context(
            "linear attention changes the model's outputs and attune measures by how much: give --dim NAME=V (or --input) for the inputs",
        )?)
    } else {
        None
    };
    let loaded = start.elapsed();
    let mut cx = PassCx {
        verify: args.verify
            || cfg!(debug_assertions)
            || std::env::var_os("ATTUNE_VERIFY").is_some(),
    };
    let mut pipeline = args.options.pipeline()?;
    pipeline.stop_after = args.stop_after.clone();
    pipeline.dump_after = args.dump_after.clone();
    let export_options = ExportOptions {
        weights: match args.weights {
            Weights::Copy => WeightsMode::Copy,
            Weights::Link => WeightsMode::Link,
        },
        inline: args.inline,
    };
    let mut dumped = Vec::new();
    let reports = pipeline.run_observed(
        &mut model,
        &mut cx,
        &mut |pass| progress.step(pass),
        &mut |pass, m| {
            let path = dump_path(&args.output, pass);
            export::write_guarded(
                m,
                &path,
                &export_options,
                &export::Guard {
                    inputs: &inputs,
                    companions: &[],
                },
                &mut |_, _| {},
            )?;
            dumped.push(path);
            Ok(())
        },
    )?;
    if !args.quiet {
        for path in &dumped {
            progress.suspend(|| println!("dumped {}", path.display()));
        }
    }
    let say = !args.quiet;
    if say {
        progress.suspend(|| print_reports(&reports));
    }
    // The adapter's tensors are built (and the LoRAs' shapes checked) before anything is
    // written: a bad LoRA leaves no output behind. It is placed with the model, all or nothing.
    let adapter = match &adapter_out {
        Some(path) => {
            let (tensors, skipped) =
                adapter::adapter_tensors(&model, &args.options.lora_sources()?)?;
            let bytes = adapter::serialize(path, &tensors)?;
            Some((path.clone(), tensors.len(), skipped, bytes))
        }
        None => None,
    };
    progress.step(&format!("writing {}", args.output.display()));
    let companions: Vec<(PathBuf, Vec<u8>)> = adapter
        .iter()
        .map(|(path, _, _, bytes)| (path.clone(), bytes.clone()))
        .collect();
    let written = export::write_guarded(
        &model,
        &args.output,
        &export_options,
        &export::Guard {
            inputs: &inputs,
            companions: &companions,
        },
        &mut |done, total| progress.bytes(done, total),
    )
    .with_context(|| format!("cannot write {}", args.output.display()))?;
    progress.finish();
    if say {
        println!("wrote {}", written.model.display());
        if let Some((path, size)) = &written.data_file {
            println!("  data   {} ({})", path.display(), super::bytes(*size));
        }
        for (path, how) in &written.linked {
            println!("  {how}   {}", path.display());
        }
        if let Some((path, count, skipped, _)) = adapter {
            println!(
                "  adapter {} ({count} tensors; run with --adapter)",
                path.display()
            );
            for s in skipped {
                println!("  - {}: {}", s.site, s.reason);
            }
        }
    }
    if !say {
        return Ok(0);
    }
    println!(
        "  load {:.0} ms, total {:.0} ms",
        loaded.as_secs_f64() * 1e3,
        start.elapsed().as_secs_f64() * 1e3
    );
    if let Some(inputs) = measure_inputs {
        let exec = ExecArgs {
            ep: EpArg::Cpu,
            input: InputArgs::default(),
            threads: None,
            opt_level: OptArg::All,
        };
        // A CUDA-target output may hold ops only CUDA runs: measure its CPU-target twin (same
        // passes, no CUDA fusions), which computes the same function.
        let twin = tempfile::tempdir()?;
        let measured = match args.options.target {
            TargetArg::Cpu => Ok(args.output.clone()),
            TargetArg::Cuda => cpu_twin(&args, twin.path()),
        };
        // The output is written and complete: measuring it is a report, so a model ONNX
        // Runtime cannot run is said, not an error.
        let compared = measured.and_then(|measured| {
            let results = super::numeric::compare_on(&args.model, &measured, &exec, &inputs)?;
            Ok((measured, results))
        });
        match compared {
            Ok((measured, results)) => {
                let what = if measured == args.output {
                    ""
                } else {
                    ", its CPU-target twin"
                };
                println!("measured change of the outputs (ONNX Runtime CPU{what}, these inputs):");
                print!("{}", super::numeric::render(&results, None).0);
            }
            Err(e) => println!("change of the outputs not measured on the CPU: {e:#}"),
        }
    }
    Ok(0)
}

impl Args {
    /// The files besides the model that the command reads: LoRAs, the recipe, --input and
    /// --adapter files.
    fn read_files(&self) -> anyhow::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = self
            .options
            .lora_sources()?
            .into_iter()
            .map(|s| s.path)
            .collect();
        files.extend(self.recipe.iter().cloned());
        files.extend(self.measure.adapter.iter().cloned());
        files.extend(
            self.measure
                .inputs
                .iter()
                .map(|i| PathBuf::from(i.split_once('=').map_or(i.as_str(), |(_, file)| file))),
        );
        Ok(files)
    }
}

/// The model compiled with the same passes for `--target cpu`, written (weights linked) in `dir`.
fn cpu_twin(args: &Args, dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let options = CompileOptions {
        target: TargetArg::Cpu,
        ..args.options.clone()
    };
    let mut model = super::load(&args.model)?;
    options
        .pipeline()?
        .run(&mut model, &mut PassCx::default())?;
    let out = dir.join("cpu_twin.onnx");
    let opts = ExportOptions {
        weights: WeightsMode::Link,
        inline: false,
    };
    export::write(&model, &out, &opts)?;
    Ok(out)
}
