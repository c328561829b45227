use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use attune_compiler::Model;
use attune_compiler::analysis::{Dim, Shapes};
use attune_compiler::onnx::DataType;
use attune_runtime::controller::{Controller, PromptTokens};
use attune_runtime::ort_backend::OrtOptions;
use attune_runtime::sample::{self, Layout, Pooled, SampleRun};
use attune_runtime::scheduler::{self, FlowConfig, Kind, Noise, Schedule, Scheduler, Spread};
use attune_runtime::{Backend, HostTensor, inputs, npy, safetensors_io};
use ndarray::ArrayD;

use super::exec::EpArg;
use super::numeric::{DEFAULT_TOL, tolerance};

pub mod control;
pub mod generate;
mod heatmaps;
pub mod ip_adapter;
mod model;
mod step_cache;

pub use step_cache::StepCacheArgs;

use heatmaps::{write_heatmaps, write_prompt_heatmaps};
use model::{
    guidance_embedding_width, latent_channels, map_resolutions, patch_size, timestep_form,
};

#[derive(clap::Args)]
pub struct Args {
    /// The UNet (compiled with --hooks for a controller)
    #[arg(long)]
    unet: PathBuf,
    /// Denoising steps
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// The scheduler, as diffusers computes it [default: the one --scheduler-config names,
    /// else ddim]
    #[arg(long, value_enum)]
    scheduler: Option<SchedulerArg>,
    /// A diffusers scheduler_config.json (a pipeline folder's scheduler/): its betas, spacing,
    /// prediction type or flow shift [default: Stable Diffusion's DDIM schedule]
    #[arg(long, value_name = "JSON")]
    scheduler_config: Option<PathBuf>,
    /// Text embeddings of the prompts, [P, tokens, dim] .npy (prompt 0 is the source)
    #[arg(long)]
    cond: PathBuf,
    /// Unconditional embeddings, [1 or P, tokens, dim] .npy (needed with guidance > 1)
    #[arg(long)]
    uncond: Option<PathBuf>,
    /// Pooled text embeddings of the prompts, [P, dim] .npy (SD3's pooled_projections,
    /// SDXL's text_embeds)
    #[arg(long)]
    pooled_cond: Option<PathBuf>,
    /// Unconditional pooled embeddings, [1 or P, dim] .npy
    #[arg(long)]
    pooled_uncond: Option<PathBuf>,
    /// Flux-dev's embedded guidance scale, fed to its `guidance` input [default: 3.5, as
    /// FluxPipeline's]
    #[arg(long, value_name = "G")]
    embedded_guidance: Option<f32>,
    /// Initial latents [1 or P, 4, h, w] .npy (else seeded noise of --height x --width)
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Latent height for seeded noise [default: the model's fixed size, else 64]
    #[arg(long)]
    height: Option<usize>,
    /// Latent width for seeded noise [default: the model's fixed size, else 64]
    #[arg(long)]
    width: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Classifier-free guidance scale; 1 or less runs the prompts alone [default: 7.5; 1 for
    /// Flux, which is guidance-distilled]
    #[arg(long)]
    guidance: Option<f32>,
    /// A LoRA adapter (.safetensors from `compile --lora-mode adapter` or `attune
    /// lora-adapter`) for a UNet compiled with --lora-mode adapter
    #[arg(long, value_name = "FILE")]
    adapter: Option<PathBuf>,
    /// Attention control (TOML: [p2p], [local_blend], [masactrl]; see README)
    #[arg(long)]
    controller: Option<PathBuf>,
    /// Folder for latents.npy (and maps/)
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// Also write the captured cross-attention maps as PNG heatmaps (per prompt and word)
    #[arg(long, value_name = "WORDS", value_delimiter = ',')]
    save_maps: Vec<usize>,
    #[arg(long, value_enum, default_value_t = EpArg::Cpu)]
    ep: EpArg,
    /// Replay the UNet's steps as a CUDA graph (--ep cuda; a UNet compiled with --fix-shapes
    /// for these latents and prompts)
    #[arg(long)]
    cuda_graph: bool,
    /// Compare the final latents with these (.npy, e.g. a shipped models/sample/*/final_latents.npy):
    /// prints max abs, relative L2 and cosine, and exits 1 when the relative L2 is above --tol
    #[arg(long, value_name = "FILE.npy")]
    reference: Option<PathBuf>,
    /// Largest relative L2 error of the final latents against --reference that passes
    #[arg(long, value_name = "T", default_value_t = DEFAULT_TOL, value_parser = tolerance, requires = "reference")]
    tol: f64,
    #[command(flatten)]
    sampler: SamplerArgs,
    #[command(flatten)]
    cache: StepCacheArgs,
    #[command(flatten)]
    pag: PagArgs,
    #[command(flatten)]
    control: control::ControlArgs,
    #[command(flatten)]
    ip: ip_adapter::IpArgs,
    /// Image pixels per latent pixel, the size --control-image is resized to (the VAE's
    /// factor: 8 for Stable Diffusion)
    #[arg(long, default_value_t = 8, value_name = "F")]
    vae_factor: usize,
}

/// Perturbed-attention guidance, as diffusers' PAG pipelines run it.
#[derive(Clone, Default, clap::Args)]
pub struct PagArgs {
    /// Perturbed-attention guidance scale (diffusers' `pag_scale`; 0: none): the batch gets
    /// the conds a third time with identity self-attention at the sites the model was
    /// compiled with `--hooks pag` for, and the guided noise adds S·(cond - perturbed)
    #[arg(long, value_name = "S", value_parser = non_negative)]
    pag_scale: Option<f32>,
    /// diffusers' `pag_adaptive_scale`: the PAG scale at timestep t is
    /// max(0, S - A·(1000 - t))
    #[arg(long, value_name = "A", default_value_t = 0.0, value_parser = non_negative, requires = "pag_scale")]
    pag_adaptive_scale: f32,
}

fn non_negative(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s}: not a finite number >= 0")),
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SchedulerArg {
    /// DDIM, eta 0 (noise, v or sample prediction)
    Ddim,
    /// PLMS (diffusers' PNDMScheduler with skip_prk_steps; Stable Diffusion 1.x's default)
    Pndm,
    /// Euler steps over the noise levels (diffusers' EulerDiscreteScheduler, no churn)
    Euler,
    /// Euler ancestral (EulerAncestralDiscreteScheduler): fresh noise at every step
    EulerAncestral,
    /// Heun's second order (HeunDiscreteScheduler): two model calls per step but the last
    Heun,
    /// DPM-Solver++ multistep, orders 1-3 (DPMSolverMultistepScheduler; "DPM++ 2M")
    Dpm,
    /// DPM-Solver++ multistep SDE (algorithm_type sde-dpmsolver++; "DPM++ 2M SDE")
    Dpm2mSde,
    /// DPM++ SDE (DPMSolverSDEScheduler): second order, stochastic, two calls per step
    DpmSde,
    /// UniPC multistep predictor-corrector (UniPCMultistepScheduler)
    Unipc,
    /// Latent consistency (LCMScheduler): LCM-distilled UNets and LCM-LoRA, few steps
    Lcm,
    /// Trajectory consistency distillation (TCDScheduler), with --eta as its gamma
    Tcd,
    /// Flow matching's Euler steps (SD3)
    FlowEuler,
}

/// Sampler settings on top of the scheduler and its config.
#[derive(Clone, Default, clap::Args)]
pub struct SamplerArgs {
    /// Noise levels spaced by Karras's ramp, exponentially or by beta quantiles (the config's
    /// use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas; Euler, Heun, DPM-Solver++
    /// and UniPC)
    #[arg(long, value_enum)]
    sigmas: Option<SigmasArg>,
    /// The noise stochastic steps add (Euler ancestral, DPM-Solver++ SDE, LCM), [draws,
    /// *latents shape] .npy taken in order, one draw per noise the scheduler adds [default:
    /// drawn from --seed]
    #[arg(long, value_name = "FILE.npy")]
    noise_file: Option<PathBuf>,
    /// The pipelines' `eta`: DDIM's share of fresh noise per step (0: deterministic DDIM),
    /// TCD's gamma
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SigmasArg {
    Karras,
    Exponential,
    Beta,
}

/// A --noise-file: finite f32 draws [k, *latents shape].
fn read_noise(path: &Path) -> anyhow::Result<ArrayD<f32>> {
    match npy::read(path)? {
        HostTensor::F32(a) if a.ndim() >= 2 => {
            if let Some(pos) = a.iter().position(|v| !v.is_finite()) {
                bail!(
                    "--noise-file {}: element {pos} is not a finite number",
                    path.display()
                );
            }
            Ok(a)
        }
        other => bail!(
            "--noise-file {}: expected f32 draws [k, *latents shape], got {} {:?}",
            path.display(),
            other.dtype().name(),
            other.shape()
        ),
    }
}

fn read_f32(path: &Path, what: &str, rank: usize) -> anyhow::Result<ArrayD<f32>> {
    match npy::read(path)? {
        HostTensor::F32(a) if a.ndim() == rank => {
            if let Some(pos) = a.iter().position(|v| !v.is_finite()) {
                bail!(
                    "--{what} {}: element {pos} is {}, not a finite number",
                    path.display(),
                    a.iter().nth(pos).copied().unwrap_or(f32::NAN)
                );
            }
            Ok(a)
        }
        other => bail!(
            "--{what} {}: expected a {rank}-D f32 array, got {} {:?}",
            path.display(),
            other.dtype().name(),
            other.shape()
        ),
    }
}

fn ep_of(ep: EpArg) -> attune_runtime::Ep {
    match ep {
        EpArg::Cpu => attune_runtime::Ep::Cpu,
        EpArg::Cuda => attune_runtime::Ep::Cuda,
        EpArg::Tract => attune_runtime::Ep::Tract,
    }
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    Ok(denoise(args, None)?.0)
}

/// Text embeddings computed by the caller (`attune generate`) instead of read from --cond and
/// --uncond: [P, tokens, dim] and [1 or P, tokens, dim].
pub(super) struct Given {
    pub cond: ArrayD<f32>,
    pub uncond: ArrayD<f32>,
    /// Pooled embeddings for the UNet's pooled input (SDXL's text_embeds): [P, dim], [1 or P, dim].
    pub pooled: Option<(ArrayD<f32>, ArrayD<f32>)>,
    /// SDXL's time ids for latents of (height, width): the caller knows the VAE's factor.
    pub time_ids: Option<TimeIds>,
    /// img2img/inpainting: the image to start from, and the noise (unscaled) for it.
    pub init: Option<(sample::Init, ArrayD<f32>)>,
    /// The prompts as tokenized, for a controller's words and computed P2P edits.
    pub prompts: Option<Vec<PromptTokens>>,
    /// --save-maps per prompt (words resolved in each), within `args.save_maps`.
    pub map_words: Option<Vec<Vec<usize>>>,
    /// The UNet's session, opened by the caller while it encoded the prompts.
    pub unet: Option<Backend>,
    /// No progress report.
    pub quiet: bool,
    /// Inputs fed every step as they are (run-time LoRA: an adapter's A and B).
    pub extra: Vec<(String, HostTensor)>,
    /// The pipeline folder: its controlnet/ (for --control-image without --controlnet),
    /// image_encoder/, feature_extractor/ and image_proj/ (for --ip-image).
    pub folder: Option<PathBuf>,
}

/// SDXL's time ids for latents of (height, width).
pub(super) type TimeIds = Box<dyn Fn(usize, usize) -> [f32; 6]>;

/// The sampling run `args` describes, with `given` embeddings (then nothing is written and
/// the final latents are returned) or those of --cond/--uncond (written to --out).
fn denoise(args: Args, mut given: Option<Given>) -> anyhow::Result<(i32, Option<ArrayD<f32>>)> {
    let init = given.as_mut().and_then(|g| g.init.take());
    let mut prompt_tokens = given.as_mut().and_then(|g| g.prompts.take());
    let map_words = given.as_mut().and_then(|g| g.map_words.take());
    let opened = given.as_mut().and_then(|g| g.unet.take());
    let mut extra = given
        .as_mut()
        .map(|g| std::mem::take(&mut g.extra))
        .unwrap_or_default();
    let quiet = given.as_ref().is_some_and(|g| g.quiet);
    let folder = given.as_mut().and_then(|g| g.folder.take());
    let controlnet_dir = folder.as_ref().map(|f| f.join("controlnet"));
    let vae_factor = args.vae_factor;
    let model = super::load(&args.unet)?;
    let specs = inputs::input_specs(&model);
    // ControlNets' sessions, or a merged one's control image.
    let merged = specs.iter().any(|s| s.name == sample::control::IMAGE_INPUT);
    let sessions = attune_runtime::pipeline::Sessions {
        ep: ep_of(args.ep),
        ort: OrtOptions::default(),
    };
    let (control_specs, merged_control) =
        args.control
            .open(&args.unet, merged, controlnet_dir.as_deref(), &sessions)?;
    // A ControlNet's residual inputs: zeros unless a ControlNet runs.
    let residuals = control::residuals(&args.unet, &model, &specs, &control_specs)?;
    let (ip_tokens, ip_scales) =
        args.ip
            .prepare(&args.unet, &specs, folder.as_deref(), &sessions)?;
    extra.extend(ip_scales);
    if !control_specs.is_empty() || merged_control.is_some() {
        if init.is_some() {
            bail!(
                "--controlnet with --image: ControlNet img2img and inpainting (diffusers' StableDiffusionControlNetImg2ImgPipeline) are not run yet"
            );
        }
        let split = [
            sample::step_cache::REFRESH_INPUT,
            sample::step_cache::THRESHOLD,
            sample::step_cache::tea::THRESHOLD,
        ];
        if split.iter().any(|n| specs.iter().any(|s| s.name == *n)) {
            bail!("--controlnet with a step cache: the cached part would reuse stale residuals");
        }
    }
    let has = |name: &str| specs.iter().any(|s| s.name == name);
    let layout = if has("hidden_states") && has("img_ids") && has("txt_ids") {
        Layout::Packed
    } else {
        Layout::Image
    };
    let latents_input = latents_name(&model, layout);
    for name in [latents_input, "timestep", "encoder_hidden_states"] {
        if !has(name) {
            bail!(
                "{} has no '{name}' input; `attune sample` runs models exported with sample/timestep/encoder_hidden_states (UNets, PixArt, SD3) or Flux's hidden_states/img_ids/txt_ids",
                args.unet.display()
            );
        }
    }
    let guidance = args.guidance.unwrap_or(match layout {
        Layout::Packed => 1.0,
        Layout::Image => 7.5,
    });
    if !guidance.is_finite() {
        bail!("--guidance {guidance}: must be a finite number");
    }
    // An LCM-distilled UNet takes the guidance as an embedding, in one batch (diffusers runs
    // no classifier-free guidance for a UNet with `time_cond_proj_dim`).
    let guidance_embedding = match has("timestep_cond") {
        true => Some(guidance_embedding_width(&model, &args.unet)?),
        false => None,
    };
    let cfg = guidance > 1.0 && guidance_embedding.is_none();
    let embedded_guidance = match (has("guidance"), args.embedded_guidance) {
        (true, g) => Some(g.unwrap_or(3.5)),
        (false, None) => None,
        (false, Some(_)) => bail!(
            "--embedded-guidance: {} has no 'guidance' input (Flux-dev's embedded guidance)",
            args.unet.display()
        ),
    };
    if let Some(g) = embedded_guidance.filter(|g| !g.is_finite()) {
        bail!("--embedded-guidance {g}: must be a finite number");
    }
    let pooled_input = ["pooled_projections", "text_embeds"]
        .into_iter()
        .find(|n| has(n));
    let pooled_given = given.as_ref().is_some_and(|g| g.pooled.is_some());
    let pooled_files = match (&args.pooled_cond, &args.pooled_uncond, pooled_input) {
        (Some(_), None, _) | (None, Some(_), _) => {
            bail!("--pooled-cond and --pooled-uncond go together")
        }
        (Some(c), Some(u), Some(input)) => Some((c, u, input)),
        (None, None, None) => None,
        (None, None, Some(_)) if pooled_given => None,
        (Some(_), Some(_), None) => bail!(
            "--pooled-cond/--pooled-uncond: {} has no pooled text input (SD3's 'pooled_projections', SDXL's 'text_embeds')",
            args.unet.display()
        ),
        (None, None, Some(input)) => bail!(
            "{} takes pooled text embeddings ('{input}'): give --pooled-cond and --pooled-uncond",
            args.unet.display()
        ),
    };
    // Inputs it cannot know (a ControlNet's residuals, an IP-Adapter's image embeddings): ONNX
    // Runtime would fail deep in the graph.
    let fed = [
        latents_input,
        "timestep",
        "encoder_hidden_states",
        "pooled_projections",
        "text_embeds",
        "time_ids",
        "img_ids",
        "txt_ids",
        "guidance",
        "timestep_cond",
        sample::step_cache::REFRESH_INPUT,
        sample::step_cache::CACHED_INPUT,
        sample::step_cache::THRESHOLD,
        sample::step_cache::PREV_RESIDUAL,
        sample::step_cache::tea::THRESHOLD,
        sample::step_cache::tea::FORCE,
        sample::step_cache::tea::ACCUMULATED,
        sample::step_cache::tea::PREV_MODULATED,
    ];
    if let Some(s) = specs.iter().find(|s| {
        !s.optional
            && !fed.contains(&s.name.as_str())
            && !s.name.starts_with(sample::step_cache::CACHED_RESIDUAL)
            && !s.name.starts_with(sample::step_cache::tea::CACHED_RESIDUAL)
            && !s.name.contains(attune_compiler::cache_io::CACHED_OUTPUT)
            && !sample::control::is_residual(&s.name)
            && s.name != sample::control::IMAGE_INPUT
            && s.name != attune_passes::ip_adapter::TOKENS_INPUT
    }) {
        bail!(
            "{}: input '{}' is not one `attune sample` feeds (it feeds sample, timestep, \
             encoder_hidden_states, SD3's pooled_projections, SDXL's text_embeds and time_ids, \
             LCM's timestep_cond, and Flux's hidden_states, img_ids, txt_ids and guidance)",
            args.unet.display(),
            s.name
        );
    }
    // Every input is fed as the type the UNet declares (fp16 UNets take fp16 latents too).
    let mut input_dtypes = BTreeMap::new();
    for s in &specs {
        match s.dtype() {
            Some(d) => {
                input_dtypes.insert(s.name.clone(), d);
            }
            None if !s.optional
                || s.name.starts_with("p2p.")
                || s.name.starts_with("masactrl.")
                || s.name.starts_with("pag.") =>
            {
                bail!(
                    "{}: input '{}' has element type {}, which `attune sample` cannot feed",
                    args.unet.display(),
                    s.name,
                    s.elem_type
                )
            }
            None => {}
        }
    }
    // Hook inputs in call order (the order their readers run in).
    let g = &model.graph;
    let order = g.topo_order()?;
    let mut hooks: Vec<(usize, String)> = g
        .inputs
        .iter()
        .map(|io| g.value(io.value).name.clone())
        .filter(|n| n.starts_with("p2p.") || n.starts_with("masactrl."))
        .map(|n| {
            let v = g.value_id(&n).expect("input");
            let first = g
                .value(v)
                .consumers
                .iter()
                .filter_map(|u| order.iter().position(|x| *x == u.node()))
                .min()
                .unwrap_or(usize::MAX);
            (first, n)
        })
        .collect();
    hooks.sort();
    let hooks: Vec<String> = hooks.into_iter().map(|(_, n)| n).collect();
    let captured = g
        .outputs
        .iter()
        .any(|io| g.value(io.value).name.starts_with("attn."));
    drop(order);
    let pag_gates: Vec<String> = g
        .inputs
        .iter()
        .map(|io| g.value(io.value).name.clone())
        .filter(|n| n.starts_with("pag.") && n.ends_with(".gate"))
        .collect();
    let pag = match args.pag.pag_scale.filter(|s| *s > 0.0) {
        Some(_) if pag_gates.is_empty() => bail!(
            "--pag-scale: {} has no perturbed-attention gates (pag.<layer>.gate inputs): compile it with --hooks pag",
            args.unet.display()
        ),
        Some(_) if args.controller.is_some() => bail!(
            "--pag-scale with --controller: the controls act on the classifier-free-guidance batch's halves, PAG adds a third part; run them apart"
        ),
        Some(scale) => Some(sample::Pag {
            scale,
            adaptive_scale: args.pag.pag_adaptive_scale,
            gates: pag_gates,
        }),
        None => None,
    };

    // Checked first: the controller's schedules are sized by the step count.
    let schedule = schedule(&args)?;
    let returned = given.is_some();
    let (cond, uncond, given_pooled, given_time_ids) = match given {
        Some(g) => (g.cond, g.uncond, g.pooled, g.time_ids),
        None => {
            let cond = read_f32(&args.cond, "cond", 3)?;
            let uncond = match &args.uncond {
                Some(p) => read_f32(p, "uncond", 3)?,
                None if cfg => bail!(
                    "--guidance {guidance} needs --uncond (the unconditional embeddings of classifier-free guidance); --guidance 1 runs the prompts alone"
                ),
                None => cond.clone(),
            };
            (cond, uncond, None, None)
        }
    };
    if cond.is_empty() {
        bail!(
            "--cond {}: shape {:?} is empty (expected [prompts >= 1, tokens >= 1, dim >= 1])",
            args.cond.display(),
            cond.shape()
        );
    }
    let (prompts, words) = (cond.shape()[0], cond.shape()[1]);
    if uncond.shape()[1..] != cond.shape()[1..]
        || (uncond.shape()[0] != 1 && uncond.shape()[0] != prompts)
    {
        bail!(
            "--uncond {} {:?} does not fit --cond {} {:?} (expected [1 or {prompts}, {words}, {}])",
            args.uncond.as_deref().unwrap_or(Path::new("")).display(),
            uncond.shape(),
            args.cond.display(),
            cond.shape(),
            cond.shape()[2]
        );
    }
    let latents = match (&init, &args.latents) {
        (Some((_, noise)), _) => noise.clone(),
        (None, Some(p)) => read_f32(p, "latents", 4)?,
        (None, None) => seeded_latents(&model, &args, layout, prompts)?,
    };
    let init = match init {
        Some((init, _)) => Some(init_for_unet(init, &model, layout, &latents, &args.unet)?),
        None => None,
    };
    if latents.shape()[0] != 1 && latents.shape()[0] != prompts {
        let from = args.latents.as_ref().map_or_else(
            || format!("the seeded latents for {}", args.unet.display()),
            |p| format!("--latents {}", p.display()),
        );
        bail!(
            "{from} have batch {}, expected 1 or {prompts} (the prompts in --cond)",
            latents.shape()[0]
        );
    }
    let (h, w) = (latents.shape()[2], latents.shape()[3]);
    let tokens = match layout {
        Layout::Packed => Some((h / 2) * (w / 2)),
        Layout::Image => patch_size(&model, latents_input).map(|p| (h / p) * (w / p)),
    };
    let spread = match layout {
        Layout::Packed => Spread::Flux,
        Layout::Image => Spread::Scheduler,
    };
    let scheduler =
        Scheduler::new(&schedule, args.steps, spread, tokens).map_err(|e| {
            match &args.scheduler_config {
                Some(p) => anyhow::anyhow!("--scheduler-config {}: {e}", p.display()),
                None => anyhow::Error::msg(e),
            }
        })?;
    let noise = match &args.sampler.noise_file {
        Some(path) => Noise::from_file(path, read_noise(path)?),
        // Apart from the initial latents' stream.
        None => Noise::seeded(args.seed ^ 0x005e_ed0f_d4a3),
    };
    let scheduler = scheduler
        .with_noise(noise)
        .with_eta(args.sampler.eta)
        .map_err(anyhow::Error::msg)?;
    if let Some(path) = &args.sampler.noise_file
        && scheduler.draws(0) == 0
    {
        eprintln!(
            "note: --noise-file {}: {} draws no noise, so the file is not used",
            path.display(),
            scheduler.name()
        );
    }
    let self_layers = hooks.iter().filter(|h| h.starts_with("masactrl.")).count();
    // Every file read, so that no output replaces one.
    let mut read: Vec<(String, PathBuf)> = vec![
        ("--unet".into(), args.unet.clone()),
        ("--cond".into(), args.cond.clone()),
    ];
    if let Some(a) = &args.adapter {
        read.push(("--adapter".into(), a.clone()));
        extra.extend(safetensors_io::read_adapter(a)?);
    }
    if let Some((name, _)) = extra.iter().find(|(n, _)| !has(n)) {
        bail!(
            "{}: no input '{name}' for the LoRA adapter (a UNet compiled with --lora-mode adapter takes lora.<module>.down/up)",
            args.unet.display()
        );
    }
    if let Some(p) = &args.uncond {
        read.push(("--uncond".into(), p.clone()));
    }
    if let Some(p) = &args.latents {
        read.push(("--latents".into(), p.clone()));
    }
    if let Some(p) = &args.scheduler_config {
        read.push(("--scheduler-config".into(), p.clone()));
    }
    if let Some(p) = &args.sampler.noise_file {
        read.push(("--noise-file".into(), p.clone()));
    }
    // Read and checked before the (long) run.
    let reference = match &args.reference {
        Some(p) => {
            read.push(("--reference".into(), p.clone()));
            let r = npy::read(p)?;
            if r.shape() != latents.shape() {
                let seeded = if args.latents.is_none() {
                    ": give the --latents the reference started from"
                } else {
                    ""
                };
                bail!(
                    "--reference {}: shape {:?}, but the final latents will be {:?} (the initial latents' shape){seeded}",
                    p.display(),
                    r.shape(),
                    latents.shape()
                );
            }
            Some(r)
        }
        None => None,
    };
    let pooled = match pooled_files {
        Some((c, u, input)) => {
            read.push(("--pooled-cond".into(), c.clone()));
            read.push(("--pooled-uncond".into(), u.clone()));
            let (pc, pu) = (
                read_f32(c, "pooled-cond", 2)?,
                read_f32(u, "pooled-uncond", 2)?,
            );
            if pc.shape()[0] != prompts
                || pu.shape()[1] != pc.shape()[1]
                || (pu.shape()[0] != 1 && pu.shape()[0] != prompts)
            {
                bail!(
                    "--pooled-cond {} {:?} and --pooled-uncond {} {:?} do not fit {prompts} prompts (expected [{prompts}, dim] and [1 or {prompts}, dim])",
                    c.display(),
                    pc.shape(),
                    u.display(),
                    pu.shape()
                );
            }
            Some((input, pc, pu))
        }
        None => match (given_pooled, pooled_input) {
            (Some((c, u)), Some(input)) => Some((input, c, u)),
            (Some(_), None) => bail!(
                "{} has no pooled text input (SDXL's 'text_embeds') for the text encoders' pooled embeddings",
                args.unet.display()
            ),
            (None, _) => None,
        },
    };
    let plan = match &args.controller {
        Some(path) => {
            let c = match prompt_tokens.take() {
                Some(t) => Controller::read(path)?.with_prompts(t),
                None => Controller::read(path)?,
            };
            read.push(("--controller".into(), path.clone()));
            if let Some(p) = &c.p2p {
                let files = [("mapper", &p.mapper), ("refine_alphas", &p.refine_alphas)];
                for (key, f) in files {
                    if let Some(f) = f {
                        read.push((format!("[p2p] {key} of --controller"), f.clone()));
                    }
                }
            }
            if !cfg && (c.p2p.is_some() || c.masactrl.is_some()) {
                bail!(
                    "controller {}: [p2p] and [masactrl] act on the classifier-free-guidance batch's halves: give --guidance above 1 and --uncond",
                    path.display()
                );
            }
            let needs = [
                (c.p2p.is_some(), "p2p.", "p2p"),
                (c.masactrl.is_some(), "masactrl.", "masactrl"),
            ];
            for (wanted, prefix, flag) in needs {
                if wanted && !hooks.iter().any(|h| h.starts_with(prefix)) {
                    bail!(
                        "the controller has [{flag}] but {} has no {flag} hook inputs: compile it with --hooks {flag}",
                        args.unet.display()
                    );
                }
            }
            if c.local_blend.is_some() && !captured {
                bail!(
                    "the controller has [local_blend] but {} outputs no attention maps: compile it with --hooks capture",
                    args.unet.display()
                );
            }
            let plan = c
                .plan(args.steps, prompts, words, self_layers)
                .with_context(|| format!("controller {}", path.display()))?;
            if let Some(lb) = &plan.local_blend
                && let Some(have) = map_resolutions(&model, latents.shape())
                && !have.contains(&lb.resolution)
            {
                let have: Vec<String> = have.iter().map(usize::to_string).collect();
                let r = lb.resolution;
                bail!(
                    "controller {}: [local_blend] resolution = {}: {} has no cross-attention maps of {r}x{r} query tokens for {:?} latents (its maps have resolutions {})",
                    path.display(),
                    lb.resolution,
                    args.unet.display(),
                    latents.shape(),
                    have.join(", ")
                );
            }
            Some(plan)
        }
        None => None,
    };
    // Outputs: checked before the (long) run.
    let latents_out = args.out.join("latents.npy");
    let maps_dir = args.out.join("maps");
    let mut written = vec![latents_out.clone()];
    if !args.save_maps.is_empty() {
        if !captured {
            bail!(
                "--save-maps: {} outputs no attention maps (compile it with --hooks capture)",
                args.unet.display()
            );
        }
        if let Some(w) = args.save_maps.iter().find(|w| **w >= words) {
            bail!(
                "--save-maps {w}: word {w} is beyond the {words} text tokens of --cond {}",
                args.cond.display()
            );
        }
        for p in 0..prompts {
            for w in &args.save_maps {
                written.push(maps_dir.join(format!("prompt{p}_word{w}.png")));
            }
        }
    }
    let mut dirs = vec![("--out", &args.out)];
    if !args.save_maps.is_empty() {
        dirs.push(("--save-maps folder", &maps_dir));
    }
    for (what, dir) in dirs {
        if dir.exists() && !dir.is_dir() {
            bail!("{what} {}: exists and is not a folder", dir.display());
        }
    }
    let outputs: Vec<(String, PathBuf)> = written
        .iter()
        .map(|out| ("the output".to_string(), out.clone()))
        .collect();
    super::refuse_outputs_over_inputs(&outputs, &read)?;
    let ep = ep_of(args.ep);
    let opts = OrtOptions {
        cuda_graph: args.cuda_graph,
        ..OrtOptions::default()
    };
    let mut unet = match opened {
        Some(unet) => unet,
        None => Backend::open(&args.unet, ep, &opts)?,
    };
    let run = SampleRun {
        cond: &cond,
        uncond: &uncond,
        latents,
        guidance,
        scheduler,
        pooled: pooled.as_ref().map(|(input, cond, uncond)| Pooled {
            input,
            cond,
            uncond,
        }),
        // SDXL pipelines' default micro-conditioning: the image's own size (latents x 8), no crop.
        time_ids: has("time_ids").then(|| match &given_time_ids {
            Some(ids) => ids(h, w),
            None => {
                let (h, w) = ((8 * h) as f32, (8 * w) as f32);
                [h, w, 0.0, 0.0, h, w]
            }
        }),
        plan,
        hooks,
        input_dtypes,
        timestep: timestep_form(&model),
        cfg,
        embedded_guidance,
        guidance_embedding,
        layout,
        latents_input,
        timestep_scale: match layout {
            Layout::Packed => 1e-3,
            Layout::Image => 1.0,
        },
        init: None,
        progress: None,
        extra,
        step_cache: args.cache.request()?,
        pag,
        residuals,
        controls: control::controlnets(control_specs, h * vae_factor, w * vae_factor),
        merged: merged_control
            .map(|(image, s)| control::merged(&image, s, h * vae_factor, w * vae_factor)),
        ip_tokens,
    };
    let mut bar = sample::progress::Bar::stderr();
    let mut report = |s: sample::progress::Step| bar.report(s);
    let run = SampleRun {
        init,
        progress: (!quiet).then_some(&mut report as _),
        ..run
    };
    let schedule_name = run.scheduler.name();
    let embedded_cond = run.guidance_embedding.is_some();
    let sample::Sampled {
        latents: x,
        maps,
        step_cache,
    } = sample::sample(&mut unet, run)?;
    if let Some((computed, cached, part, maps)) = &step_cache {
        let steps: Vec<String> = computed.iter().map(|k| k.to_string()).collect();
        eprintln!(
            "step cache: {part} computed on {} steps ({}), reused on {cached}",
            computed.len(),
            steps.join(", ")
        );
        if *maps > 0 && *cached > 0 {
            eprintln!(
                "step cache: the {maps} attention-map outputs of the cached part are the last computed step's on the {cached} steps that reused it"
            );
        }
    }
    if returned {
        // `attune generate`: maps next to its images.
        if !args.save_maps.is_empty() {
            let n = match &map_words {
                Some(w) => write_prompt_heatmaps(&maps_dir, &maps, w)?,
                None => write_heatmaps(&maps_dir, &maps, prompts, &args.save_maps)?,
            };
            println!("wrote {n} attention heatmaps to {}", maps_dir.display());
        }
        return Ok((0, Some(x)));
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let path = latents_out;
    npy::write(&path, &HostTensor::F32(x.clone()))?;
    println!(
        "{} {} steps, {prompts} prompts, guidance {guidance}{}: wrote {} {:?}",
        args.steps,
        schedule_name,
        if embedded_cond { " (embedded)" } else { "" },
        path.display(),
        x.shape()
    );
    if !args.save_maps.is_empty() {
        let n = write_heatmaps(&maps_dir, &maps, prompts, &args.save_maps)?;
        println!("wrote {n} attention heatmaps to {}", maps_dir.display());
    }
    if let (Some(want), Some(path)) = (&reference, &args.reference) {
        let c = attune_runtime::compare::compare("latents", want, &HostTensor::F32(x))
            .map_err(anyhow::Error::msg)?;
        println!("against --reference {}:", path.display());
        let (table, ok) = super::numeric::render(&[c], Some(args.tol));
        print!("{table}");
        if !ok {
            println!(
                "note: the final latents depend on --steps, --guidance, --scheduler(-config), the \
                 initial --latents and the prompts: sample with those the reference was made with \
                 (models/sample/*: --steps 4 --guidance 5, Flux --guidance 1; \
                 models/export/sampling.py); --tol sets what is accepted"
            );
        }
        return Ok((if ok { 0 } else { 1 }, None));
    }
    Ok((0, None))
}

/// The input the latents go in: the layout's (`sample`; Flux's `hidden_states`), or
/// `hidden_states` for an image-layout model without `sample` (SD3 as optimum exports it).
fn latents_name(model: &Model, layout: Layout) -> &'static str {
    let g = &model.graph;
    let has = |n: &str| g.inputs.iter().any(|io| g.value(io.value).name == n);
    match layout {
        Layout::Image if !has("sample") && has("hidden_states") => "hidden_states",
        _ => layout.latents_input(),
    }
}

/// `init` for this UNet: a mask with a plain UNet (as many channels as the latents) blends,
/// an inpainting UNet (latents, mask and masked image: 2C + 1) takes the masked image.
fn init_for_unet(
    mut init: sample::Init,
    model: &Model,
    layout: Layout,
    latents: &ArrayD<f32>,
    unet: &Path,
) -> anyhow::Result<sample::Init> {
    let sample = model
        .graph
        .value_id(latents_name(model, layout))
        .expect("checked");
    let declared = Shapes::infer(model)
        .shape(sample)
        .map(<[Dim]>::to_vec)
        .unwrap_or_default();
    let c = latents.shape()[1];
    let takes = latent_channels(model, sample, &declared);
    match (&mut init.mask, takes) {
        (Some(m), Some(t)) if t == c => m.masked_image_latents = None,
        (Some(m), Some(t)) if t == 2 * c + 1 && m.masked_image_latents.is_some() => {}
        (None, Some(t)) if t == c => {}
        (Some(_), None) | (None, None) => {}
        (_, Some(t)) if t == 2 * c + 1 => bail!(
            "{}: an inpainting UNet ({t} input channels: latents, mask, masked image): give --image and --mask",
            unet.display()
        ),
        (_, Some(t)) => bail!(
            "{}: takes {t} input channels, and the image's latents have {c}",
            unet.display()
        ),
    }
    Ok(init)
}

/// The schedule --scheduler-config gives (else --scheduler, DDIM by default, over Stable
/// Diffusion's betas, or flow matching's defaults for --scheduler flow-euler).
fn schedule(args: &Args) -> anyhow::Result<Schedule> {
    let kind = args.scheduler.map(|s| match s {
        SchedulerArg::Ddim => Kind::Ddim,
        SchedulerArg::Pndm => Kind::Pndm,
        SchedulerArg::Euler => Kind::Euler,
        SchedulerArg::EulerAncestral => Kind::EulerAncestral,
        SchedulerArg::Heun => Kind::Heun,
        SchedulerArg::Dpm | SchedulerArg::Dpm2mSde => Kind::Dpm,
        SchedulerArg::DpmSde => Kind::DpmSde,
        SchedulerArg::Unipc => Kind::UniPc,
        SchedulerArg::Lcm => Kind::Lcm,
        SchedulerArg::Tcd => Kind::Tcd,
        SchedulerArg::FlowEuler => Kind::FlowEuler,
    });
    // Flags that set a config key.
    let mut overrides = serde_json::Map::new();
    if let Some(s) = args.sampler.sigmas {
        let key = match s {
            SigmasArg::Karras => "use_karras_sigmas",
            SigmasArg::Exponential => "use_exponential_sigmas",
            SigmasArg::Beta => "use_beta_sigmas",
        };
        for other in [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
        ] {
            // The others off (null: as if absent), the flag's on.
            let on = serde_json::Value::Bool(true);
            overrides.insert(
                other.into(),
                if other == key {
                    on
                } else {
                    serde_json::Value::Null
                },
            );
        }
    }
    if matches!(args.scheduler, Some(SchedulerArg::Dpm2mSde)) {
        overrides.insert("algorithm_type".into(), "sde-dpmsolver++".into());
    }
    let flags = |e: attune_runtime::Error| {
        let mut set: Vec<&str> = Vec::new();
        if args.sampler.sigmas.is_some() {
            set.push("--sigmas");
        }
        if matches!(args.scheduler, Some(SchedulerArg::Dpm2mSde)) {
            set.push("--scheduler dpm2m-sde");
        }
        match set.is_empty() {
            true => anyhow::Error::new(e),
            false => anyhow::anyhow!("{e} (set by {})", set.join(", ")),
        }
    };
    Ok(match &args.scheduler_config {
        Some(path) => {
            let (schedule, ignored) = scheduler::read(path, kind, &overrides).map_err(flags)?;
            if !ignored.is_empty() {
                eprintln!(
                    "note: --scheduler-config {}: not used by attune's scheduler: {}",
                    path.display(),
                    ignored.join(", ")
                );
            }
            schedule
        }
        None if kind == Some(Kind::FlowEuler) && overrides.is_empty() => {
            Schedule::Flow(FlowConfig::default())
        }
        None => scheduler::stable_diffusion(kind, &overrides).map_err(flags)?,
    })
}

/// Seeded noise [prompts, channels, height, width] in latent pixels, whatever the export calls
/// its sizes (`batch_size`, dynamo's `8*height`); a model with fixed sizes gives its own unless
/// --height/--width say otherwise.
fn seeded_latents(
    model: &Model,
    args: &Args,
    layout: Layout,
    prompts: usize,
) -> anyhow::Result<ArrayD<f32>> {
    let latents_input = latents_name(model, layout);
    let sample = model.graph.value_id(latents_input).expect("checked");
    let declared = Shapes::infer(model)
        .shape(sample)
        .map(<[Dim]>::to_vec)
        .unwrap_or_default();
    let side = |axis: usize, given: Option<usize>| {
        given
            .or_else(|| usize::try_from(declared.get(axis)?.known()?).ok())
            .unwrap_or(64)
    };
    let (height, width, channels) = match layout {
        Layout::Image => (
            side(2, args.height),
            side(3, args.width),
            latent_channels(model, sample, &declared),
        ),
        // Tokens of 2x2 patches: 4 features per latent channel.
        Layout::Packed => (
            args.height.unwrap_or(64),
            args.width.unwrap_or(64),
            declared
                .get(2)
                .and_then(Dim::known)
                .filter(|f| f % 4 == 0)
                .and_then(|f| usize::try_from(f / 4).ok()),
        ),
    };
    let Some(channels) = channels else {
        bail!(
            "{}: the {latents_input} input's channel count is neither declared nor read by a convolution; give --latents",
            args.unet.display()
        );
    };
    let spec = inputs::InputSpec {
        name: "sample".into(),
        optional: false,
        elem_type: DataType::Float as i32,
        dims: [prompts, channels, height, width]
            .map(inputs::Dim::Fixed)
            .to_vec(),
    };
    let mut random = inputs::prepare(&[spec], vec![], &inputs::Dims::default(), args.seed)
        .with_context(|| format!("seeded latents of --height {height} --width {width}"))?;
    match random.remove(0).1 {
        HostTensor::F32(a) => Ok(a),
        other => unreachable!("f32 noise was asked for, not {}", other.dtype().name()),
    }
}
