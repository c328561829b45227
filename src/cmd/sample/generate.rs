//! `attune generate`: a pipeline folder and a prompt in, a PNG out. The prompts go through the
//! folder's tokenizer and text encoder, the sampler runs as `attune sample` does (the folder's
//! scheduler config, classifier-free guidance), and the VAE decoder makes the image.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use attune_compiler::export::{ExportOptions, WeightsMode};
use attune_passes::folder;
use attune_passes::lora::{LoraSource, adapter};
use attune_passes::pipeline::{LoraSpec, Options, Weights};
use attune_runtime::HostTensor;
use attune_runtime::controller::{PromptTokens, Word};
use attune_runtime::image::{Mode, read_png_mode, resize_nearest, to_mask, to_tensor, write_png};
use attune_runtime::ort_backend::{Cached, OrtOptions};
use attune_runtime::pipeline::{
    PromptEncoder, Sessions, VaeDecoder, VaeEncoder, component, time_ids,
};
use attune_runtime::sample::{Init, Inpaint};
use attune_runtime::tokenizer::TextTokenizer;
use serde_json::Value;

use super::super::exec::EpArg;
use super::{Args as SampleArgs, Given, SamplerArgs, SchedulerArg, denoise};

#[derive(clap::Args)]
pub struct Args {
    /// A diffusers/optimum ONNX pipeline folder (model_index.json, text_encoder/, tokenizer/,
    /// unet/ or SD3's transformer/, vae_decoder/, scheduler/)
    dir: PathBuf,
    /// The prompt (repeat for a batch: one image each)
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// What classifier-free guidance steers away from [default: none: "" for SD, zero
    /// embeddings for SDXL with force_zeros_for_empty_prompt, as diffusers does]
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale (1 or less: the prompts alone) [default: 7.5; 8.5 for a
    /// LatentConsistencyModelPipeline, whose UNet takes it embedded; 1 for Flux, which is
    /// guidance-distilled]
    #[arg(long)]
    guidance: Option<f32>,
    /// T5's token count (SD3's and Flux's `max_sequence_length`) [default: the pipeline's:
    /// 256 for SD3, 512 for Flux]
    #[arg(long)]
    max_sequence_length: Option<usize>,
    /// The scheduler [default: the folder's scheduler_config.json's]
    #[arg(long, value_enum)]
    scheduler: Option<SchedulerArg>,
    /// A scheduler_config.json [default: the folder's scheduler/scheduler_config.json]
    #[arg(long, value_name = "JSON")]
    scheduler_config: Option<PathBuf>,
    #[command(flatten)]
    sampler: SamplerArgs,
    /// Initial noise [1 or P, C, H/f, W/f] .npy, unscaled, as diffusers' `latents=` (the
    /// image's size follows from it)
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Image height in pixels, without --latents [default: the UNet's fixed size, else 64
    /// latent pixels: 512 for Stable Diffusion]
    #[arg(long)]
    height: Option<usize>,
    /// Image width in pixels, without --latents [default: the UNet's fixed size, else 64
    /// latent pixels]
    #[arg(long)]
    width: Option<usize>,
    /// Seed of attune's own noise without --latents (torch's generator cannot be matched)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = EpArg::Cpu)]
    ep: EpArg,
    /// Attention control (TOML, as `attune sample --controller`; words may stand for token
    /// indices and `[p2p] edit = "replace" | "refine"` computes the mapper from the prompts);
    /// the UNet compiled with --hooks
    #[arg(long, value_name = "F.toml")]
    controller: Option<PathBuf>,
    /// Write the cross-attention maps of these token indices or words (a word: its tokens
    /// in each prompt that has it) as PNG heatmaps to maps/prompt{p}_word{i}.png next to
    /// the image (a UNet compiled with --hooks capture)
    #[arg(long, value_name = "WORDS", value_delimiter = ',')]
    save_maps: Vec<String>,
    /// The image (PNG); with several prompts, `-o out.png` writes out-0.png, out-1.png, ...
    #[arg(short, long)]
    out: PathBuf,
    #[command(flatten)]
    init: InitArgs,
    /// A LoRA file, FILE or FILE:MULTIPLIER (repeatable): with a UNet compiled with
    /// --lora-mode adapter, its A and B fed at run time; otherwise fused into a temporary copy
    /// of the pipeline's components (UNet and text-encoder keys), as `attune compile DIR
    /// --lora` would
    #[arg(long = "lora", value_name = "FILE[:M]", value_parser = LoraSpec::parse)]
    lora: Vec<LoraSpec>,
    /// A LoRA adapter (.safetensors from `compile --lora-mode adapter` or `attune
    /// lora-adapter`) for a UNet compiled with --lora-mode adapter
    #[arg(long, value_name = "FILE")]
    adapter: Option<PathBuf>,
    /// Don't keep ONNX Runtime's optimised graphs in attune's cache (sessions/ in
    /// $ATTUNE_CACHE or ~/.cache/attune): every run optimises each component again
    #[arg(long)]
    no_session_cache: bool,
    /// Print nothing but errors and warnings (no progress, no "wrote" lines)
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    cache: super::StepCacheArgs,
    #[command(flatten)]
    pag: super::PagArgs,
    #[command(flatten)]
    control: super::control::ControlArgs,
    #[command(flatten)]
    ip: super::ip_adapter::IpArgs,
}

/// img2img and inpainting (diffusers' StableDiffusionImg2ImgPipeline and
/// StableDiffusionInpaintPipeline).
#[derive(clap::Args)]
struct InitArgs {
    /// Start from this image (an RGB PNG whose sides are multiples of the VAE's factor; it is
    /// not resized: its size is the output's)
    #[arg(long, value_name = "IN.png")]
    image: Option<PathBuf>,
    /// The share of the schedule run from the image, in [0, 1]: int(steps * strength) steps
    /// [default: 0.8; 1 with --mask, as diffusers]
    #[arg(long, requires = "image", value_name = "S")]
    strength: Option<f64>,
    /// Inpainting: what to repaint (white), a PNG of the image's size (any mode: its gray
    /// level, binarised at 1/2)
    #[arg(long, requires = "image", value_name = "M.png")]
    mask: Option<PathBuf>,
    /// Also write the final latents (before the VAE decoder) as .npy [prompts, C, h, w]
    #[arg(long, value_name = "FILE.npy")]
    save_latents: Option<PathBuf>,
}

/// The pipeline classes whose components `generate` runs.
const SUPPORTED: &[&str] = &[
    "StableDiffusionPipeline",
    "OnnxStableDiffusionPipeline",
    "LatentConsistencyModelPipeline",
    "StableDiffusionImg2ImgPipeline",
    "OnnxStableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "OnnxStableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionXLControlNetPipeline",
    "StableDiffusion3Pipeline",
    "FluxPipeline",
];

pub fn run(args: Args) -> anyhow::Result<i32> {
    let dir = &args.dir;
    let index_path = dir.join("model_index.json");
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(&index_path)
            .with_context(|| format!("{}: not a pipeline folder", dir.display()))?,
    )
    .with_context(|| format!("{}: not JSON", index_path.display()))?;
    let class = index["_class_name"].as_str().unwrap_or("?");
    if !SUPPORTED.contains(&class) {
        bail!(
            "{}: pipeline class {class} is not one `attune generate` runs yet (it runs {})",
            index_path.display(),
            SUPPORTED.join(", ")
        );
    }
    if class.contains("Inpaint") && args.init.mask.is_none() {
        bail!(
            "{}: an inpainting pipeline ({class}): give --image and --mask",
            index_path.display()
        );
    }
    // SD3's denoiser is a transformer (optimum's `transformer/`).
    let sd3 = class == "StableDiffusion3Pipeline";
    let flux = class == "FluxPipeline";
    let unet = component(dir, if sd3 || flux { "transformer" } else { "unet" })?;
    let mut adapter = Vec::new();
    if !args.lora.is_empty() {
        match run_time_lora(&args, &unet)? {
            Some(tensors) => adapter = tensors,
            None => return with_lora_fused(args),
        }
    }
    let ep = match args.ep {
        EpArg::Cpu => attune_runtime::Ep::Cpu,
        EpArg::Cuda => attune_runtime::Ep::Cuda,
        EpArg::Tract => attune_runtime::Ep::Tract,
    };
    let factor = vae_factor(dir)?;
    let latent = |px: Option<usize>, what: &str| -> anyhow::Result<Option<usize>> {
        match px {
            Some(p) if p == 0 || p % factor != 0 => {
                bail!("--{what} {p}: not a positive multiple of the VAE's factor {factor}")
            }
            p => Ok(p.map(|p| p / factor)),
        }
    };
    let (mut height, mut width) = (latent(args.height, "height")?, latent(args.width, "width")?);
    if sd3 {
        (height, width) = sd3_size(dir, factor, height, width, args.latents.as_deref())?;
    }
    if flux && args.latents.is_none() {
        // FluxPipeline's default: its default_sample_size (128) latent pixels a side.
        height = height.or(Some(128));
        width = width.or(Some(128));
    }
    let outputs = png_paths(&args.out, args.prompt.len());
    check_init_args(&args, &outputs)?;
    if args.init.image.is_some() && (sd3 || flux) {
        bail!(
            "--image: {class}'s img2img is not run yet; {} takes prompts alone",
            index_path.display()
        );
    }
    if args.init.image.is_some() && class == "StableDiffusionXLPipeline" {
        bail!(
            "--image: SDXL's img2img and inpainting (aesthetic-score time ids, strength 0.3 by default) are not run yet; {} takes prompts alone",
            index_path.display()
        );
    }
    // The CPU provider's optimised graphs come from attune's cache after the first run.
    let sessions = Sessions {
        ep,
        ort: OrtOptions {
            session_cache: (!args.no_session_cache && ep == attune_runtime::Ep::Cpu)
                .then(super::super::exec::session_cache_dir)
                .flatten(),
            ..OrtOptions::default()
        },
    };
    let started = Instant::now();
    // The UNet's and the VAE decoder's sessions are made while the prompts are encoded (ORT
    // makes a session on one core).
    std::thread::scope(|scope| -> anyhow::Result<i32> {
        let unet_session = scope.spawn(|| {
            let t = Instant::now();
            sessions.open(&unet).map(|s| (s, t.elapsed()))
        });
        let vae_session = scope.spawn(|| VaeDecoder::open(dir, &sessions));
        let prompts: Vec<&str> = args.prompt.iter().map(String::as_str).collect();
        let text = {
            let mut encoder = PromptEncoder::open(dir, class, &sessions)?;
            if let Some(n) = args.max_sequence_length {
                encoder.set_max_sequence_length(n)?;
            }
            encoder.encode(&prompts, args.negative_prompt.as_deref())?
            // The encoders are freed here: the denoiser needs the memory.
        };
        for k in &text.truncated {
            eprintln!(
                "warning: prompt {k} is longer than the text encoder's {} tokens: cut to fit",
                text.max_len
            );
        }
        let (cond, uncond) = (text.cond, text.uncond);
        let init = init_image(&args, factor, &sessions)?;
        let tokens = prompt_tokens(&args)?;
        let scheduler_config = args
            .scheduler_config
            .clone()
            .or_else(|| Some(dir.join("scheduler/scheduler_config.json")).filter(|p| p.is_file()));
        let (unet_session, unet_time) = joined(unet_session, "the UNet's")??;
        if !args.quiet {
            let cached = match unet_session.cached() {
                Some(Cached::Hit) => {
                    " (ONNX Runtime's optimised graph from attune's session cache)"
                }
                Some(Cached::Saved(_)) => {
                    " (ONNX Runtime's optimised graph saved in attune's session cache: later runs load it)"
                }
                _ => "",
            };
            eprintln!(
                "UNet session in {:.1} s{cached}; prompts encoded; first step after {:.1} s",
                unet_time.as_secs_f64(),
                started.elapsed().as_secs_f64()
            );
        }
        let sample_args = SampleArgs {
            adapter: args.adapter.clone(),
            unet: unet.clone(),
            steps: args.steps,
            scheduler: args.scheduler,
            scheduler_config,
            sampler: args.sampler.clone(),
            cond: PathBuf::new(),
            uncond: None,
            pooled_cond: None,
            pooled_uncond: None,
            embedded_guidance: None,
            latents: args.latents.clone(),
            height,
            width,
            seed: args.seed,
            // LatentConsistencyModelPipeline's own default, embedded in its UNet's timestep_cond.
            guidance: args
                .guidance
                .or((class == "LatentConsistencyModelPipeline").then_some(8.5)),
            controller: args.controller.clone(),
            out: folder_of(&args.out).to_path_buf(),
            save_maps: tokens.maps,
            ep: args.ep,
            cuda_graph: false,
            reference: None,
            tol: super::DEFAULT_TOL,
            cache: args.cache.clone(),
            pag: args.pag.clone(),
            control: args.control.clone(),
            ip: args.ip.clone(),
            vae_factor: factor,
        };
        let (_, latents) = denoise(
            sample_args,
            Some(Given {
                cond,
                uncond,
                pooled: text.pooled,
                time_ids: text
                    .time_ids
                    .then(|| Box::new(move |h, w| time_ids(h * factor, w * factor)) as _),
                init,
                prompts: tokens.prompts,
                map_words: tokens.prompt_maps,
                unet: Some(unet_session),
                quiet: args.quiet,
                extra: std::mem::take(&mut adapter),
                folder: Some(dir.clone()),
            }),
        )?;
        let mut vae = joined(vae_session, "the VAE decoder's")??;
        let latents = latents.expect("given embeddings return the latents");
        let images = vae.decode(&latents)?;
        let folder = folder_of(&args.out);
        std::fs::create_dir_all(folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
        if let Some(path) = &args.init.save_latents {
            attune_runtime::npy::write(path, &attune_runtime::HostTensor::F32(latents.clone()))?;
            if !args.quiet {
                println!("wrote {} {:?}", path.display(), latents.shape());
            }
        }
        for (image, path) in images.iter().zip(&outputs) {
            write_png(path, image)?;
            if !args.quiet {
                println!(
                    "wrote {} ({}x{})",
                    path.display(),
                    image.width,
                    image.height
                );
            }
        }
        Ok(0)
    })
}

/// A session thread's result; its panic an error.
fn joined<T>(h: std::thread::ScopedJoinHandle<'_, T>, what: &str) -> anyhow::Result<T> {
    h.join()
        .map_err(|_| anyhow::anyhow!("{what} session: its thread panicked"))
}

/// Flags checked before any component loads: the strength, and outputs that would replace
/// inputs.
fn check_init_args(args: &Args, outputs: &[PathBuf]) -> anyhow::Result<()> {
    if let Some(s) = args.init.strength {
        attune_runtime::sample::first_step(args.steps, s)?;
    }
    let mut read = Vec::new();
    let inputs = [
        ("--image", &args.init.image),
        ("--mask", &args.init.mask),
        ("--latents", &args.latents),
    ];
    for (flag, path) in inputs {
        if let Some(p) = path {
            read.push((flag.to_string(), p.clone()));
        }
    }
    let mut written: Vec<(String, PathBuf)> = outputs
        .iter()
        .map(|p| ("the output".to_string(), p.clone()))
        .collect();
    if let Some(p) = &args.init.save_latents {
        written.push(("--save-latents".to_string(), p.clone()));
    }
    super::super::refuse_outputs_over_inputs(&written, &read)
}

/// The image to start from (VAE-encoded), the mask at the latents' size with the masked
/// image's latents, and the noise: --latents, else seeded noise of the image latents' shape.
fn init_image(
    args: &Args,
    factor: usize,
    sessions: &Sessions,
) -> anyhow::Result<Option<(Init, ndarray::ArrayD<f32>)>> {
    let Some(image_path) = &args.init.image else {
        return Ok(None);
    };
    let (image, mode) = read_png_mode(image_path)?;
    if mode != Mode::Rgb {
        bail!(
            "--image {}: a PNG of mode {}; give an RGB one (diffusers' image processor takes RGB images as they are)",
            image_path.display(),
            mode.name()
        );
    }
    let (h, w) = (image.height, image.width);
    if h % factor != 0 || w % factor != 0 {
        bail!(
            "--image {}: {w}x{h} pixels, not multiples of the VAE's factor {factor} (attune does not resize: give an image of such a size)",
            image_path.display()
        );
    }
    for (flag, given, have) in [("height", args.height, h), ("width", args.width, w)] {
        if let Some(g) = given.filter(|&g| g != have) {
            bail!(
                "--{flag} {g}: the --image {} is {w}x{h} (the output takes the image's size)",
                image_path.display()
            );
        }
    }
    let mask = match &args.init.mask {
        Some(mask_path) => {
            let (mask, _) = read_png_mode(mask_path)?;
            if (mask.height, mask.width) != (h, w) {
                bail!(
                    "--mask {} is {}x{} pixels, the --image {} {w}x{h}: they must be the same size",
                    mask_path.display(),
                    mask.width,
                    mask.height,
                    image_path.display()
                );
            }
            let HostTensor::F32(m) = to_mask(&mask) else {
                unreachable!("masks are f32")
            };
            Some(m)
        }
        None => None,
    };
    let mut encoder = VaeEncoder::open(&args.dir, sessions)?;
    if encoder.draws {
        eprintln!(
            "note: {}: the VAE encoder outputs latent_sample (a draw from the posterior), not the mean diffusers' references use",
            args.dir.join("vae_encoder").display()
        );
    }
    let HostTensor::F32(pixels) = to_tensor(&image) else {
        unreachable!("images are f32")
    };
    let image_latents = encoder.encode(&pixels)?;
    let mask = match mask {
        Some(m) => {
            // diffusers: image * (mask < 0.5), the mask binarised.
            let kept = m.mapv(|v| if v < 0.5 { 1.0 } else { 0.0 });
            let masked = &pixels * &kept;
            let shape = image_latents.shape();
            Some(Inpaint {
                mask: resize_nearest(&m, shape[2], shape[3]),
                masked_image_latents: Some(encoder.encode(&masked)?),
            })
        }
        None => None,
    };
    let strength = args
        .init
        .strength
        .unwrap_or(if mask.is_some() { 1.0 } else { 0.8 });
    let mut shape = image_latents.shape().to_vec();
    let p = args.prompt.len();
    let noise = match &args.latents {
        Some(path) => {
            let noise = super::read_f32(path, "latents", 4)?;
            if noise.shape()[1..] != shape[1..] || (noise.shape()[0] != 1 && noise.shape()[0] != p)
            {
                shape[0] = p;
                bail!(
                    "--latents {}: shape {:?}, but the --image {} gives latents {shape:?} (or batch 1)",
                    path.display(),
                    noise.shape(),
                    image_path.display()
                );
            }
            noise
        }
        None => {
            shape[0] = p;
            seeded_noise(&shape, args.seed)?
        }
    };
    let init = Init {
        strength,
        image_latents,
        mask,
    };
    Ok(Some((init, noise)))
}

/// attune's seeded noise of `shape` (as `attune sample` draws it for a 4-channel UNet).
fn seeded_noise(shape: &[usize], seed: u64) -> anyhow::Result<ndarray::ArrayD<f32>> {
    use attune_compiler::onnx::DataType;
    use attune_runtime::inputs;
    let spec = inputs::InputSpec {
        name: "sample".into(),
        optional: false,
        elem_type: DataType::Float as i32,
        dims: shape.iter().map(|&d| inputs::Dim::Fixed(d)).collect(),
    };
    let mut random = inputs::prepare(&[spec], vec![], &inputs::Dims::default(), seed)?;
    match random.remove(0).1 {
        HostTensor::F32(a) => Ok(a),
        other => unreachable!("f32 noise was asked for, not {}", other.dtype().name()),
    }
}

/// The prompts and --save-maps resolved with the folder's tokenizer.
struct Tokens {
    /// The prompts as tokenized (a controller's words and P2P edits).
    prompts: Option<Vec<PromptTokens>>,
    /// Every map's token index (for the sampler's checks).
    maps: Vec<usize>,
    /// Each prompt's: an index for all, a word where it is in that prompt.
    prompt_maps: Option<Vec<Vec<usize>>>,
}

fn prompt_tokens(args: &Args) -> anyhow::Result<Tokens> {
    if args.controller.is_none() && args.save_maps.is_empty() {
        return Ok(Tokens {
            prompts: None,
            maps: Vec::new(),
            prompt_maps: None,
        });
    }
    let tokenizer = TextTokenizer::from_dir(&args.dir.join("tokenizer"))?;
    let tokens = args
        .prompt
        .iter()
        .map(|p| PromptTokens::encode(&tokenizer, p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut all: Vec<usize> = Vec::new();
    let mut per: Vec<Vec<usize>> = vec![Vec::new(); tokens.len()];
    for w in &args.save_maps {
        let found: Vec<Vec<usize>> = match w.parse() {
            Ok(i) => vec![vec![i]; tokens.len()],
            Err(_) => tokens
                .iter()
                .map(|t| t.word_indices(Word::Text(w)))
                .collect(),
        };
        if found.iter().all(Vec::is_empty) {
            bail!(
                "--save-maps {w}: the word is in none of the prompts {:?} (words are a prompt split on spaces, matched exactly)",
                args.prompt
            );
        }
        for (p, found) in found.into_iter().enumerate() {
            for i in found {
                if i >= tokenizer.max_len {
                    bail!(
                        "--save-maps {w}: token {i} is beyond the text encoder's {} tokens",
                        tokenizer.max_len
                    );
                }
                if !all.contains(&i) {
                    all.push(i);
                }
                if !per[p].contains(&i) {
                    per[p].push(i);
                }
            }
        }
    }
    Ok(Tokens {
        prompts: Some(tokens),
        maps: all,
        prompt_maps: Some(per),
    })
}

/// f = 2^(stages − 1) of the VAE's `block_out_channels` (8 for Stable Diffusion's).
fn vae_factor(dir: &Path) -> anyhow::Result<usize> {
    let path = dir.join("vae_decoder/config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(8);
    };
    let config: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    match config["block_out_channels"].as_array().map(Vec::len) {
        Some(n @ 1..=8) => Ok(1 << (n - 1)),
        None => Ok(8),
        Some(n) => bail!("{}: {n} block_out_channels", path.display()),
    }
}

/// SD3's latent size: the transformer's `sample_size` by default (as StableDiffusion3Pipeline's
/// default image, sample_size x the VAE's factor); a side that is not a multiple of its
/// `patch_size` or has more patches than its `pos_embed_max_size` refused naming it (the graph
/// would fail deep inside its position embedding).
fn sd3_size(
    dir: &Path,
    factor: usize,
    height: Option<usize>,
    width: Option<usize>,
    latents: Option<&Path>,
) -> anyhow::Result<(Option<usize>, Option<usize>)> {
    let path = dir.join("transformer/config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok((height, width));
    };
    let config: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let number = |key: &str| config[key].as_u64().and_then(|n| usize::try_from(n).ok());
    let patch = number("patch_size").unwrap_or(2).max(1);
    let (height, width) = match latents {
        Some(p) => {
            let shape = attune_runtime::npy::read(p)?.shape().to_vec();
            match shape[..] {
                [_, _, h, w] => (Some(h), Some(w)),
                _ => return Ok((height, width)),
            }
        }
        None => {
            let default = number("sample_size");
            (height.or(default), width.or(default))
        }
    };
    for (side, what) in [(height, "height"), (width, "width")] {
        let Some(side) = side else { continue };
        let px = side * factor;
        if side % patch != 0 {
            bail!(
                "{what} {px} px ({side} latent px): not a multiple of {} px, the VAE's factor {factor} times the transformer's patch_size {patch} ({})",
                factor * patch,
                path.display()
            );
        }
        if let Some(max) = number("pos_embed_max_size").filter(|&m| side / patch > m) {
            bail!(
                "{what} {px} px: {} patches, more than the transformer's pos_embed_max_size {max} ({}): at most {} px",
                side / patch,
                path.display(),
                max * patch * factor
            );
        }
    }
    Ok((height, width))
}

fn folder_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `out` for one image; `stem-k.ext` for several.
fn png_paths(out: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    (0..n)
        .map(|k| out.with_file_name(format!("{stem}-{k}.png")))
        .collect()
}

/// --lora on a UNet compiled with --lora-mode adapter: the A and B inputs that make its
/// branches compute the files' layers (`None`: the UNet has no branches).
fn run_time_lora(args: &Args, unet: &Path) -> anyhow::Result<Option<Vec<(String, HostTensor)>>> {
    let model = super::super::load(unet)?;
    if model.graph.value_id(adapter::SCALE_INPUT).is_none() {
        return Ok(None);
    }
    let sources: Vec<LoraSource> = args
        .lora
        .iter()
        .map(|l| LoraSource {
            path: l.file.clone(),
            multiplier: l.scale,
        })
        .collect();
    let (tensors, skipped) = adapter::adapter_tensors(&model, &sources)?;
    if !args.quiet {
        eprintln!(
            "LoRA at run time: {} layers into {}'s branches",
            tensors.len() / 2,
            unet.display()
        );
        for s in &skipped {
            eprintln!("  - {}: {}", s.site, s.reason);
        }
    }
    Ok(Some(
        tensors
            .into_iter()
            .map(|t| {
                let a = ndarray::ArrayD::from_shape_vec(t.dims, t.data).expect("sized");
                (t.name, HostTensor::F32(a))
            })
            .collect(),
    ))
}

/// --lora on a pipeline without adapter branches: its components compiled with the LoRA
/// fused (unchanged weights linked, not copied) into a temporary folder, which this run uses
/// and removes (so its sessions are not cached).
fn with_lora_fused(args: Args) -> anyhow::Result<i32> {
    let start = Instant::now();
    let tmp = tempfile::tempdir()?;
    let fused = tmp.path().join("pipeline");
    let options = Options {
        lora: args.lora.clone(),
        weights: Weights::Link,
        ..Options::default()
    };
    let job = folder::Job {
        input: &args.dir,
        output: &fused,
        options: &options,
        export: ExportOptions {
            weights: WeightsMode::Link,
            inline: false,
        },
        verify: false,
    };
    let report = folder::compile(&job, &mut |_| {})?;
    if !args.quiet {
        let layers: Vec<String> = report
            .components
            .iter()
            .filter_map(|c| {
                let lora = c.passes.iter().find(|p| p.pass == "lora")?;
                Some(format!("{} {}", c.name, lora.rewritten.len()))
            })
            .collect();
        eprintln!(
            "LoRA fused for this run in {:.1} s ({}); `attune compile {} -o OUT --lora ...` keeps the result",
            start.elapsed().as_secs_f64(),
            layers.join(", "),
            args.dir.display()
        );
        for c in &report.components {
            for p in c.passes.iter().filter(|p| p.pass == "lora") {
                for s in &p.skipped {
                    eprintln!("  - {}: {}: {}", c.name, s.site, s.reason);
                }
            }
        }
    }
    let code = run(Args {
        dir: fused,
        lora: Vec::new(),
        no_session_cache: true,
        ..args
    })?;
    drop(tmp);
    Ok(code)
}
