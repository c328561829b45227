//! `attune generate`: a pipeline folder and a prompt in, a PNG out. The prompts go through the
//! folder's tokenizer and text encoder, the sampler runs as `attune sample` does (the folder's
//! scheduler config, classifier-free guidance), and the VAE decoder makes the image.
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use attune_runtime::image::write_png;
use attune_runtime::pipeline::{TextEncoder, VaeDecoder, component};
use serde_json::Value;

use super::super::exec::EpArg;
use super::{Args as SampleArgs, Given, SchedulerArg, denoise};

#[derive(clap::Args)]
pub struct Args {
    /// A diffusers/optimum ONNX pipeline folder (model_index.json, text_encoder/, tokenizer/,
    /// unet/, vae_decoder/, scheduler/)
    dir: PathBuf,
    /// The prompt (repeat for a batch: one image each)
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// What classifier-free guidance steers away from
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale (1 or less: the prompts alone)
    #[arg(long, default_value_t = 7.5)]
    guidance: f32,
    /// The scheduler [default: the folder's scheduler_config.json's, PNDM read as DDIM]
    #[arg(long, value_enum)]
    scheduler: Option<SchedulerArg>,
    /// A scheduler_config.json [default: the folder's scheduler/scheduler_config.json]
    #[arg(long, value_name = "JSON")]
    scheduler_config: Option<PathBuf>,
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
    /// The image (PNG); with several prompts, `-o out.png` writes out-0.png, out-1.png, ...
    #[arg(short, long)]
    out: PathBuf,
}

/// The pipeline classes whose components `generate` runs.
const SUPPORTED: &[&str] = &["StableDiffusionPipeline", "OnnxStableDiffusionPipeline"];

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
    let unet = component(dir, "unet")?;
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
    let (height, width) = (latent(args.height, "height")?, latent(args.width, "width")?);
    let outputs = png_paths(&args.out, args.prompt.len());
    let mut encoder = TextEncoder::open(dir, "text_encoder", "tokenizer", ep)?;
    let mut vae = VaeDecoder::open(dir, ep)?;
    let mut prompts: Vec<&str> = args.prompt.iter().map(String::as_str).collect();
    prompts.push(&args.negative_prompt);
    let embeddings = encoder.encode(&prompts)?;
    for k in embeddings.truncated {
        eprintln!(
            "warning: prompt {k} is longer than the text encoder's {} tokens: cut to fit",
            encoder.tokenizer.max_len
        );
    }
    let p = args.prompt.len();
    let hidden = embeddings.hidden;
    let cond = hidden
        .slice_axis(ndarray::Axis(0), (0..p).into())
        .to_owned();
    let uncond = hidden
        .slice_axis(ndarray::Axis(0), (p..p + 1).into())
        .to_owned();
    let scheduler_config = args
        .scheduler_config
        .clone()
        .or_else(|| Some(dir.join("scheduler/scheduler_config.json")).filter(|p| p.is_file()));
    let sample_args = SampleArgs {
        unet,
        steps: args.steps,
        scheduler: args.scheduler,
        scheduler_config,
        cond: PathBuf::new(),
        uncond: None,
        pooled_cond: None,
        pooled_uncond: None,
        embedded_guidance: None,
        latents: args.latents.clone(),
        height,
        width,
        seed: args.seed,
        guidance: Some(args.guidance),
        controller: None,
        out: folder_of(&args.out).to_path_buf(),
        save_maps: Vec::new(),
        ep: args.ep,
        cuda_graph: false,
        reference: None,
        tol: super::DEFAULT_TOL,
    };
    let (_, latents) = denoise(sample_args, Some(Given { cond, uncond }))?;
    let latents = latents.expect("given embeddings return the latents");
    let images = vae.decode(&latents)?;
    let folder = folder_of(&args.out);
    std::fs::create_dir_all(folder)
        .with_context(|| format!("cannot create {}", folder.display()))?;
    for (image, path) in images.iter().zip(&outputs) {
        write_png(path, image)?;
        println!(
            "wrote {} ({}x{})",
            path.display(),
            image.width,
            image.height
        );
    }
    Ok(0)
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
