//! `generate --controlnet PATH[:SCALE[:START:END]] --control-image IMG`: the ControlNets'
//! sessions, their checks against the denoiser, and their control images at the output size.
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use attune_compiler::analysis::shapes::declared_dims;
use attune_runtime::Backend;
use attune_runtime::image::{Rgb, read_png, resize_lanczos, to_unit_tensor};
use attune_runtime::inputs::{self, Dim, InputSpec};
use attune_runtime::pipeline::Sessions;
use attune_runtime::sample::control::{
    self, ControlNet, IMAGE_INPUT, Merged, Residual, SCALE_INPUT, Schedule,
};

use super::model::timestep_form;

/// One `--controlnet`: where it is, its conditioning scale and its share of the steps.
#[derive(Clone, Debug)]
pub struct ControlArg {
    pub path: PathBuf,
    pub schedule: Schedule,
}

impl ControlArg {
    /// `PATH`, `PATH:SCALE` or `PATH:SCALE:START:END` (diffusers' defaults: 1, 0, 1).
    pub fn parse(text: &str) -> Result<ControlArg, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let numbers = parts
            .iter()
            .rev()
            .take_while(|p| p.parse::<f64>().is_ok())
            .count()
            .min(3);
        if numbers == 2 {
            return Err(format!(
                "{text}: give PATH, PATH:SCALE or PATH:SCALE:START:END"
            ));
        }
        let path = parts[..parts.len() - numbers].join(":");
        let values: Vec<f64> = parts[parts.len() - numbers..]
            .iter()
            .map(|p| p.parse().expect("counted as numbers"))
            .collect();
        if path.is_empty() {
            return Err(format!("{text}: no ControlNet path"));
        }
        Ok(ControlArg {
            path: path.into(),
            schedule: schedule(text, &values)?,
        })
    }
}

/// `--controlnet-scale SCALE[:START:END]` of a merged denoiser.
pub fn parse_schedule(text: &str) -> Result<Schedule, String> {
    let values = text
        .split(':')
        .map(|p| {
            p.parse::<f64>()
                .map_err(|_| format!("{text}: give SCALE or SCALE:START:END"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    schedule(text, &values)
}

/// SCALE, or SCALE, START, END (diffusers' defaults: 1, 0, 1).
fn schedule(text: &str, values: &[f64]) -> Result<Schedule, String> {
    let (scale, start, end) = match values[..] {
        [] => (1.0, 0.0, 1.0),
        [s] => (s, 0.0, 1.0),
        [s, a, b] => (s, a, b),
        _ => return Err(format!("{text}: give SCALE or SCALE:START:END")),
    };
    if !scale.is_finite() || !(0.0..=1.0).contains(&start) || !(start..=1.0).contains(&end) {
        return Err(format!(
            "{text}: the scale must be a number and 0 <= START <= END <= 1"
        ));
    }
    Ok(Schedule {
        scale: scale as f32,
        start,
        end,
    })
}

/// The ControlNets to run, or a merged one's control image and schedule.
pub type Controls = (Vec<ControlSpec>, Option<(Rgb, Schedule)>);

/// An opened ControlNet with its (not yet resized) control image.
pub struct ControlSpec {
    pub arg: ControlArg,
    pub model: PathBuf,
    pub net: Backend,
    pub image: Rgb,
    pub specs: Vec<InputSpec>,
    pub timestep: attune_runtime::sample::TimestepForm,
    /// Its outputs' names and declared dims.
    pub outputs: Vec<(String, Option<Vec<attune_compiler::analysis::Dim>>)>,
}

/// The ControlNet's model file: PATH itself, or PATH/model.onnx.
fn model_file(path: &Path) -> anyhow::Result<PathBuf> {
    let file = if path.is_dir() {
        path.join("model.onnx")
    } else {
        path.to_path_buf()
    };
    if !file.is_file() {
        bail!(
            "--controlnet {}: no such ONNX file (give a ControlNet's model.onnx or its folder)",
            path.display()
        );
    }
    Ok(file)
}

/// The ControlNet flags of `sample` and `generate`.
#[derive(Clone, Default, clap::Args)]
pub struct ControlArgs {
    /// A ControlNet (an .onnx file or a folder with model.onnx) with its conditioning scale and
    /// share of the steps, as diffusers' controlnet_conditioning_scale and
    /// control_guidance_start/end [generate's default: the folder's controlnet/ at 1, when
    /// --control-image is given]; repeatable (the residuals are summed)
    #[arg(long = "controlnet", value_name = "PATH[:SCALE[:START:END]]", value_parser = ControlArg::parse)]
    controlnet: Vec<ControlArg>,
    /// The control image of each --controlnet, in order (a PNG; made RGB and resized to the
    /// output size with PIL's Lanczos, as diffusers' control image processor)
    #[arg(long = "control-image", value_name = "IMG.png")]
    control_image: Vec<PathBuf>,
    /// The conditioning scale and share of the steps of a ControlNet merged into the UNet
    /// (`attune compile --merge-controlnet`) [default: 1, all steps]
    #[arg(long, value_name = "SCALE[:START:END]", value_parser = parse_schedule)]
    controlnet_scale: Option<Schedule>,
}

impl ControlArgs {
    /// The ControlNets to run (`default` when only --control-image is given), or a merged
    /// one's image and schedule.
    pub fn open(
        &self,
        unet: &Path,
        merged: bool,
        default: Option<&Path>,
        sessions: &Sessions,
    ) -> anyhow::Result<Controls> {
        if merged {
            return open_merged(&self.controlnet, &self.control_image, self.controlnet_scale)
                .with_context(|| format!("{} has a ControlNet merged in", unet.display()));
        }
        if self.controlnet_scale.is_some() {
            bail!(
                "--controlnet-scale: {} has no merged ControlNet; give each ControlNet's scale as --controlnet PATH:SCALE",
                unet.display()
            );
        }
        Ok((
            open(default, &self.controlnet, &self.control_image, sessions)?,
            None,
        ))
    }
}

/// Opens each `--controlnet` (`default` when none is given) with its `--control-image`,
/// checking what it reads.
fn open(
    default: Option<&Path>,
    args: &[ControlArg],
    images: &[PathBuf],
    sessions: &Sessions,
) -> anyhow::Result<Vec<ControlSpec>> {
    let defaulted;
    let args = if args.is_empty() && !images.is_empty() {
        let Some(folder) = default.filter(|d| d.join("model.onnx").is_file()) else {
            bail!(
                "--control-image: no ControlNet to read it{}; name it with --controlnet",
                default.map_or(String::new(), |d| format!(
                    " ({} has no model.onnx)",
                    d.display()
                ))
            );
        };
        defaulted = vec![ControlArg {
            path: folder.to_path_buf(),
            schedule: Schedule::default(),
        }];
        &defaulted[..]
    } else {
        args
    };
    if args.len() != images.len() {
        bail!(
            "{} --controlnet and {} --control-image: give one control image per ControlNet, in the same order",
            args.len(),
            images.len()
        );
    }
    let mut out = Vec::new();
    for (arg, image_path) in args.iter().zip(images) {
        let model = model_file(&arg.path)?;
        let graph = attune_compiler::import::read(&model)
            .with_context(|| format!("--controlnet {}", model.display()))?;
        let specs = inputs::input_specs(&graph);
        let reads = ["sample", "timestep", "encoder_hidden_states", IMAGE_INPUT];
        for want in reads {
            if !specs.iter().any(|s| s.name == want) {
                bail!(
                    "--controlnet {}: no input '{want}' (a ControlNet export reads sample, timestep, encoder_hidden_states and controlnet_cond, and optionally conditioning_scale)",
                    model.display()
                );
            }
        }
        // SDXL's ControlNets also read the pooled text and the time ids, as its UNet does.
        let also = [SCALE_INPUT, "text_embeds", "time_ids"];
        if let Some(s) = specs.iter().find(|s| {
            !s.optional && !reads.contains(&s.name.as_str()) && !also.contains(&s.name.as_str())
        }) {
            bail!(
                "--controlnet {}: input '{}' is not one attune feeds (sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, and SDXL's text_embeds and time_ids)",
                model.display(),
                s.name
            );
        }
        let outputs = graph
            .graph
            .outputs
            .iter()
            .map(|io| (io.info.name.clone(), declared_dims(&io.info)))
            .collect();
        let image = read_png(image_path)
            .with_context(|| format!("--control-image {}", image_path.display()))?;
        let net = sessions
            .open(&model)
            .with_context(|| format!("--controlnet {}", model.display()))?;
        out.push(ControlSpec {
            arg: arg.clone(),
            timestep: timestep_form(&graph),
            model,
            net,
            image,
            specs,
            outputs,
        });
    }
    Ok(out)
}

/// The denoiser's residual inputs, with zeros for them; each ControlNet must output every
/// one, with the channels the denoiser declares.
pub fn residuals(
    unet: &Path,
    model: &attune_compiler::Model,
    specs: &[InputSpec],
    controls: &[ControlSpec],
) -> anyhow::Result<Vec<Residual>> {
    let wanted: Vec<&InputSpec> = specs
        .iter()
        .filter(|s| control::is_residual(&s.name))
        .collect();
    if wanted.is_empty() && !controls.is_empty() {
        bail!(
            "--controlnet: {} has no ControlNet residual inputs (down_block_N_additional_residual, mid_block_additional_residual): export the UNet with them, or merge the ControlNet in with `attune compile --merge-controlnet`",
            unet.display()
        );
    }
    let fixed = |d: &Dim| match d {
        Dim::Fixed(n) => Some(*n),
        _ => None,
    };
    for c in controls {
        for w in &wanted {
            let Some((_, dims)) = c.outputs.iter().find(|(n, _)| *n == w.name) else {
                bail!(
                    "--controlnet {}: no output '{}' for {}'s residual input",
                    c.model.display(),
                    w.name,
                    unet.display()
                );
            };
            let ours = model
                .graph
                .inputs
                .iter()
                .find(|io| io.info.name == w.name)
                .and_then(|io| declared_dims(&io.info));
            if let (Some(ours), Some(theirs)) = (ours, dims)
                && !attune_compiler::controlnet_io::declared_fit(&ours, theirs)
            {
                bail!(
                    "--controlnet {}: residual '{}' is declared {theirs:?}, {}'s input {ours:?}: they do not fit",
                    c.model.display(),
                    w.name,
                    unet.display(),
                );
            }
        }
    }
    wanted
        .iter()
        .map(|s| {
            let dims: Vec<Option<usize>> = s.dims.iter().map(fixed).collect();
            Residual::new(&s.name, &dims, s.dtype()).map_err(anyhow::Error::from)
        })
        .collect()
}

/// The runtime's ControlNets, their images resized to `height` x `width` pixels as diffusers'
/// control image processor does (PIL's Lanczos).
pub fn controlnets(specs: Vec<ControlSpec>, height: usize, width: usize) -> Vec<ControlNet> {
    specs
        .into_iter()
        .map(|c| {
            let image = resize_lanczos(&c.image, width, height);
            let input_dtypes = c
                .specs
                .iter()
                .filter_map(|s| s.dtype().map(|d| (s.name.clone(), d)))
                .collect();
            ControlNet {
                name: c.model.display().to_string(),
                net: c.net,
                image: to_unit_tensor(&image),
                schedule: c.arg.schedule,
                input_dtypes,
                timestep: c.timestep,
            }
        })
        .collect()
}

/// A merged denoiser's control: `--control-image` (one) and `--controlnet-scale`, the image
/// resized to `height` x `width` pixels.
pub fn merged(image: &Rgb, schedule: Schedule, height: usize, width: usize) -> Merged {
    Merged {
        image: to_unit_tensor(&resize_lanczos(image, width, height)),
        schedule,
    }
}

/// The control of a denoiser with a merged ControlNet: one `--control-image`, no other
/// ControlNet.
fn open_merged(
    args: &[ControlArg],
    images: &[PathBuf],
    schedule: Option<Schedule>,
) -> anyhow::Result<Controls> {
    if !args.is_empty() {
        bail!(
            "--controlnet: no residual inputs for another ControlNet; set the merged one's scale with --controlnet-scale"
        );
    }
    let [image] = images else {
        bail!(
            "give the merged ControlNet one --control-image ({} given)",
            images.len()
        );
    };
    let rgb = read_png(image).with_context(|| format!("--control-image {}", image.display()))?;
    let schedule = schedule.unwrap_or_default();
    Ok((Vec::new(), Some((rgb, schedule))))
}
