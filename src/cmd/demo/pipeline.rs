//! The demo on a pipeline folder: compile it, show what each pass changed, generate the same
//! image with the original and the compiled pipeline, compare and time them.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use attune_compiler::diff;
use attune_compiler::export::{ExportOptions, WeightsMode};
use attune_passes::folder;
use attune_passes::pipeline::{AttentionOptions, Options};
use attune_runtime::image::read_png;
use attune_runtime::{HostTensor, npy};
use clap::Parser;
use serde_json::Value;

use super::Args;
use crate::cmd::sample::generate;

/// Names listed per initializer/input/output/opset change list in the structural diff.
const DIFF_LIST_MAX: usize = 5;

/// The folder's reference case, if it ships one: diffusers' image for a prompt and noise.
struct Case {
    prompt: String,
    steps: usize,
    guidance: f64,
    /// The `--scheduler` the reference was made with (the manifest's class), if attune names it.
    scheduler: Option<&'static str>,
    latents: PathBuf,
    image: PathBuf,
}

pub fn run(args: &Args) -> anyhow::Result<i32> {
    let dir = &args.pipeline;
    if !dir.join("model_index.json").is_file() {
        bail!(
            "{}: no model_index.json, not a pipeline folder (run the demo from the attune repository root, or give --pipeline DIR or --model M.onnx)",
            dir.display()
        );
    }
    let tmp = tempfile::tempdir()?;
    let out = args.out.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let compiled = out.join("compiled");

    println!(
        "== compile {} (attention {:?})",
        dir.display(),
        args.attention
    );
    let options = Options {
        attention: AttentionOptions {
            mode: args.attention,
            ..Default::default()
        },
        ..Default::default()
    };
    let start = Instant::now();
    let job = folder::Job {
        input: dir,
        output: &compiled,
        options: &options,
        export: ExportOptions {
            weights: WeightsMode::Copy,
            inline: false,
        },
        verify: true,
    };
    let report = folder::compile(&job, &mut |_| {})?;
    crate::cmd::compile::print_folder_report(&report);
    let ms = start.elapsed().as_secs_f64() * 1e3;
    println!("compiled in {ms:.0} ms");

    println!("\n== what the passes changed, by component");
    let pipeline = folder::Pipeline::read(dir)?;
    for c in &pipeline.components {
        let rel = c.model.strip_prefix(dir).unwrap_or(&c.model);
        let (a, b) = (
            crate::cmd::load(&c.model)?,
            crate::cmd::load(&compiled.join(rel))?,
        );
        let d = diff::diff(&a, &b);
        println!("-- {}", c.name);
        print!("{}", d.render_with(true, Some(DIFF_LIST_MAX)));
    }

    let case = reference_case(dir)?;
    let prompt = args
        .prompt
        .clone()
        .or_else(|| case.as_ref().map(|c| c.prompt.clone()))
        .unwrap_or_else(|| "a photo of an astronaut riding a horse on mars".into());
    let mut flags = vec!["--prompt".to_string(), prompt.clone()];
    let what = match &case {
        Some(c) => {
            if let Some(scheduler) = c.scheduler {
                flags.extend(["--scheduler".into(), scheduler.into()]);
            }
            flags.extend([
                "--steps".into(),
                c.steps.to_string(),
                "--guidance".into(),
                c.guidance.to_string(),
                "--latents".into(),
                c.latents.display().to_string(),
            ]);
            format!(
                "{} steps, guidance {}, the initial noise of diffusers' reference ({})",
                c.steps,
                c.guidance,
                c.latents.display()
            )
        }
        None => "50 steps, guidance 7.5, seed 0".into(),
    };
    println!("\n== generate \"{prompt}\" on ONNX Runtime CPU: {what}");
    let images = [out.join("original.png"), out.join("compiled.png")];
    let folders = [dir.clone(), compiled.clone()];
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for run in 0..args.iters {
        for k in 0..2 {
            let mut argv = vec![
                "generate".to_string(),
                folders[k].display().to_string(),
                "-o".into(),
                images[k].display().to_string(),
                "--quiet".into(),
            ];
            argv.extend(flags.iter().cloned());
            if run > 0 {
                std::fs::remove_file(&images[k]).ok();
            }
            let start = Instant::now();
            let cli = GenerateCli::try_parse_from(&argv)?;
            let code = generate::run(cli.args)?;
            if code != 0 {
                bail!("attune {} exited with {code}", argv.join(" "));
            }
            times[k].push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let [a, b] = [read_png(&images[0])?, read_png(&images[1])?];
    let diff = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0);
    let where_ = match &args.out {
        Some(_) => format!("{} and {}", images[0].display(), images[1].display()),
        None => "in a temporary folder; --out DIR keeps them".into(),
    };
    println!(
        "images {}x{} ({where_}): the compiled pipeline's differs from the original's by at most {diff}/255 a pixel",
        a.width, a.height
    );
    if let Some(c) = &case {
        let reference = match npy::read(&c.image)? {
            HostTensor::F32(r) => r,
            other => bail!(
                "{}: not f32 but {}",
                c.image.display(),
                other.dtype().name()
            ),
        };
        let off = |img: &attune_runtime::image::Rgb| {
            img.pixels
                .iter()
                .zip(reference.iter())
                .map(|(p, r)| (*p as f32 - r * 255.0).abs())
                .fold(0f32, f32::max)
        };
        println!(
            "against diffusers' image for the same noise ({}): original {:.2}/255, compiled {:.2}/255 at most",
            c.image.display(),
            off(&a),
            off(&b)
        );
    }
    println!(
        "\n== time per image, prompt to PNG, sessions opened each run ({} alternating runs each)",
        args.iters
    );
    println!(
        "{:<10} {:>10} {:>22}",
        "", "median ms", "spread (min..max) ms"
    );
    let mut spreads = Vec::new();
    for (name, t) in ["original", "compiled"].iter().zip(&mut times) {
        t.sort_by(f64::total_cmp);
        let (median, min, max) = (t[t.len() / 2], t[0], t[t.len() - 1]);
        println!(
            "{name:<10} {median:>10.1} {:>22}",
            format!("{min:.1}..{max:.1}")
        );
        spreads.push((median, min, max));
    }
    let ((ma, a0, a1), (mb, b0, b1)) = (spreads[0], spreads[1]);
    let verdict = if a0 <= b1 && b0 <= a1 {
        "within noise: the spreads overlap"
    } else if mb < ma {
        "faster beyond the spread of the runs"
    } else {
        "slower beyond the spread of the runs"
    };
    println!("compiled/original: {:.3}x (medians), {verdict}", mb / ma);
    Ok(0)
}

/// `generate`'s flags, parsed as the command line would.
#[derive(Parser)]
struct GenerateCli {
    #[command(flatten)]
    args: generate::Args,
}

/// The `--scheduler` value of a manifest's "DDIMScheduler.from_config(...)".
fn scheduler_flag(made_with: &str) -> Option<&'static str> {
    let class = made_with.split('.').next()?;
    [
        ("DDIMScheduler", "ddim"),
        ("PNDMScheduler", "pndm"),
        ("EulerDiscreteScheduler", "euler"),
        ("FlowMatchEulerDiscreteScheduler", "flow-euler"),
    ]
    .into_iter()
    .find(|(c, _)| *c == class)
    .map(|(_, flag)| flag)
}

/// The first txt2img case of `DIR/reference/manifest.json`, if the folder ships references.
fn reference_case(dir: &Path) -> anyhow::Result<Option<Case>> {
    let path = dir.join("reference/manifest.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let manifest: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let Some(cases) = manifest["cases"].as_object() else {
        return Ok(None);
    };
    let case = cases.iter().find(|(name, c)| {
        name.starts_with("txt2img") && c["prompt"].is_string() && c["negative_prompt"] == ""
    });
    Ok(case.and_then(|(name, c)| {
        let folder = dir.join("reference").join(name);
        Some(Case {
            prompt: c["prompt"].as_str()?.to_string(),
            steps: c["steps"].as_u64()? as usize,
            guidance: c["guidance"].as_f64()?,
            scheduler: c["scheduler"].as_str().and_then(scheduler_flag),
            latents: folder.join("latents.npy"),
            image: folder.join("image.npy"),
        })
    }))
}
