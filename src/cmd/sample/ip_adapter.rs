//! `generate --ip-image IMG --ip-scale S`: the image prompt of a UNet compiled with
//! `--ip-adapter`. The pipeline folder's `feature_extractor/` preprocessing, its
//! `image_encoder/` (CLIP vision, `image_embeds`) and the `image_proj/` graph `compile` wrote
//! make the image tokens; the unconditional rows get the projection of zero embeddings, as
//! diffusers does.
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use attune_passes::glob::Globs;
use attune_runtime::HostTensor;
use attune_runtime::image::{Filter, clip_pixels, read_png};
use attune_runtime::inputs::{Dim, InputSpec};
use attune_runtime::pipeline::Sessions;
use ndarray::{ArrayD, Axis, IxDyn, concatenate};
use serde_json::Value;

/// The image-prompt flags of `sample` and `generate`.
#[derive(Clone, Default, clap::Args)]
pub struct IpArgs {
    /// The image prompt of a UNet compiled with --ip-adapter (generate: a pipeline folder with
    /// image_encoder/, feature_extractor/ and the image_proj/ compile wrote)
    #[arg(long, value_name = "IMG.png")]
    ip_image: Option<PathBuf>,
    /// IP-Adapter's scale: S for every cross-attention site, or GLOB=S for the sites whose
    /// module path matches (repeatable, later ones win: layer-wise scales) [default: 1]
    #[arg(long, value_name = "[GLOB=]S", value_parser = parse_scale)]
    ip_scale: Vec<(Option<String>, f32)>,
}

fn parse_scale(text: &str) -> Result<(Option<String>, f32), String> {
    let (glob, value) = match text.rsplit_once('=') {
        Some((g, v)) => (Some(g.to_string()), v),
        None => (None, text),
    };
    match value.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok((glob, v)),
        _ => Err(format!("{text}: give S or GLOB=S with S a number")),
    }
}

/// What the UNet's IP-Adapter inputs get: the image tokens (conds', unconditional rows') and
/// every site's scale.
pub type IpInputs = (
    Option<(ArrayD<f32>, ArrayD<f32>)>,
    Vec<(String, HostTensor)>,
);

impl IpArgs {
    pub fn prepare(
        &self,
        unet: &Path,
        specs: &[InputSpec],
        folder: Option<&Path>,
        sessions: &Sessions,
    ) -> anyhow::Result<IpInputs> {
        let tokens = specs
            .iter()
            .find(|s| s.name == attune_passes::ip_adapter::TOKENS_INPUT);
        let Some(tokens) = tokens else {
            if self.ip_image.is_some() || !self.ip_scale.is_empty() {
                bail!(
                    "--ip-image/--ip-scale: {} takes no image prompt: compile it with --ip-adapter FILE",
                    unet.display()
                );
            }
            return Ok((None, Vec::new()));
        };
        let sites: Vec<(String, String)> = specs
            .iter()
            .filter_map(|s| {
                let path = s.name.strip_prefix("ip_adapter.")?.strip_suffix(".scale")?;
                Some((s.name.clone(), path.to_string()))
            })
            .collect();
        let Some(image) = &self.ip_image else {
            // No image prompt: scale 0 everywhere, the UNet without its IP-Adapter.
            let width = match tokens.dims.get(2) {
                Some(Dim::Fixed(w)) => *w,
                _ => bail!("{}: 'ip_tokens' has no fixed width", unet.display()),
            };
            let zeros = ArrayD::zeros(IxDyn(&[1, 1, width]));
            let scales = sites
                .iter()
                .map(|(n, _)| (n.clone(), scalar(0.0)))
                .collect();
            return Ok((Some((zeros.clone(), zeros)), scales));
        };
        let mut scales: Vec<(String, String, f32)> =
            sites.into_iter().map(|(n, p)| (n, p, 1.0)).collect();
        for (glob, value) in &self.ip_scale {
            let Some(glob) = glob else {
                scales.iter_mut().for_each(|s| s.2 = *value);
                continue;
            };
            let g = Globs::parse(glob);
            let mut hit = false;
            for s in scales.iter_mut().filter(|s| g.matches(&s.1)) {
                s.2 = *value;
                hit = true;
            }
            if !hit {
                bail!(
                    "--ip-scale {glob}={value}: the glob matches no IP-Adapter site of {} (they are {})",
                    unet.display(),
                    scales
                        .iter()
                        .map(|s| s.1.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        let Some(folder) = folder else {
            bail!(
                "--ip-image: the image encoder and projection are a pipeline folder's: use `attune generate`"
            );
        };
        let tokens = image_tokens(folder, image, sessions)?;
        let scales = scales.into_iter().map(|(n, _, v)| (n, scalar(v))).collect();
        Ok((Some(tokens), scales))
    }
}

fn scalar(v: f32) -> HostTensor {
    HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), v))
}

/// The CLIP preprocessing of `feature_extractor/preprocessor_config.json`.
struct Preprocess {
    shortest: usize,
    crop: (usize, usize),
    filter: Filter,
    mean: [f32; 3],
    std: [f32; 3],
}

fn preprocess(folder: &Path) -> anyhow::Result<Preprocess> {
    let path = folder.join("feature_extractor/preprocessor_config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("--ip-image: cannot read {}", path.display()))?;
    let c: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let bad = |what: &str| anyhow::anyhow!("{}: {what}", path.display());
    for (key, want) in [
        ("do_resize", true),
        ("do_center_crop", true),
        ("do_rescale", true),
        ("do_normalize", true),
    ] {
        if c[key].as_bool().unwrap_or(true) != want {
            return Err(bad(&format!(
                "{key} false: attune runs CLIP's preprocessing (resize, crop, rescale, normalise)"
            )));
        }
    }
    if c["rescale_factor"]
        .as_f64()
        .is_some_and(|f| (f - 1.0 / 255.0).abs() > 1e-9)
    {
        return Err(bad("rescale_factor is not 1/255"));
    }
    let shortest = c["size"]["shortest_edge"]
        .as_u64()
        .or_else(|| c["size"].as_u64())
        .ok_or_else(|| bad("size.shortest_edge missing"))? as usize;
    let crop = match &c["crop_size"] {
        Value::Number(n) => (
            n.as_u64().unwrap_or(0) as usize,
            n.as_u64().unwrap_or(0) as usize,
        ),
        v => (
            v["height"].as_u64().unwrap_or(0) as usize,
            v["width"].as_u64().unwrap_or(0) as usize,
        ),
    };
    if crop.0 == 0 || crop.1 == 0 || shortest == 0 {
        return Err(bad("crop_size or size is 0"));
    }
    let filter = Filter::from_pil(c["resample"].as_i64().unwrap_or(3)).ok_or_else(|| {
        bad("resample: attune runs PIL's bicubic (3), bilinear (2) and Lanczos (1)")
    })?;
    let three = |key: &str| -> anyhow::Result<[f32; 3]> {
        let v: Vec<f32> = c[key]
            .as_array()
            .ok_or_else(|| bad(&format!("{key} missing")))?
            .iter()
            .filter_map(|x| x.as_f64().map(|x| x as f32))
            .collect();
        v.try_into()
            .map_err(|_| bad(&format!("{key}: not 3 numbers")))
    };
    Ok(Preprocess {
        shortest,
        crop,
        filter,
        mean: three("image_mean")?,
        std: three("image_std")?,
    })
}

/// The image prompt's tokens and the projection of zero embeddings, each [1, tokens, width].
fn image_tokens(
    folder: &Path,
    image: &Path,
    sessions: &Sessions,
) -> anyhow::Result<(ArrayD<f32>, ArrayD<f32>)> {
    let p = preprocess(folder)?;
    let rgb = read_png(image).with_context(|| format!("--ip-image {}", image.display()))?;
    let pixels = clip_pixels(&rgb, p.shortest, p.crop, p.filter, p.mean, p.std);
    let component = |name: &str| -> anyhow::Result<PathBuf> {
        let path = folder.join(name).join("model.onnx");
        if !path.is_file() {
            bail!(
                "--ip-image: {} has no {name}/model.onnx ({})",
                folder.display(),
                if name == "image_proj" {
                    "compile the folder with --ip-adapter FILE"
                } else {
                    "the CLIP vision encoder export the IP-Adapter was trained with"
                }
            );
        }
        Ok(path)
    };
    // Plus and Full Face project the encoder's penultimate hidden states (rank 3), and their
    // unconditional rows those of a zero image; the plain IP-Adapter projects image_embeds,
    // and zeros for the unconditional rows (diffusers' encode_image).
    let proj_path = component("image_proj")?;
    let hidden = attune_compiler::import::read(&proj_path)?
        .graph
        .inputs
        .first()
        .and_then(|io| attune_compiler::analysis::shapes::declared_dims(&io.info))
        .is_some_and(|d| d.len() == 3);
    let encoder_path = component("image_encoder")?;
    let mut encoder = sessions.open(&encoder_path)?;
    let mut encode = |pixels: ArrayD<f32>| -> anyhow::Result<ArrayD<f32>> {
        let out = encoder.run(&[("pixel_values".to_string(), HostTensor::F32(pixels))])?;
        let wanted = if hidden {
            // hidden_states[-2]: the output hidden_states.N with the second largest N.
            let mut ns: Vec<usize> = out
                .iter()
                .filter_map(|(n, _)| n.strip_prefix("hidden_states.")?.parse().ok())
                .collect();
            ns.sort_unstable();
            match ns.len() {
                0 | 1 => bail!(
                    "{}: IP-Adapter Plus and Full Face read the image encoder's penultimate hidden states: export it with its hidden states as outputs hidden_states.0, .1, ...",
                    encoder_path.display()
                ),
                n => format!("hidden_states.{}", ns[n - 2]),
            }
        } else {
            "image_embeds".to_string()
        };
        out.into_iter()
            .find(|(n, _)| *n == wanted)
            .and_then(|(_, t)| match t {
                HostTensor::F32(a) => Some(a),
                other => match other.float_as(attune_runtime::tensor::DType::F32) {
                    Some(HostTensor::F32(a)) => Some(a),
                    _ => None,
                },
            })
            .ok_or_else(|| {
                anyhow::anyhow!("{}: no float output '{wanted}'", encoder_path.display())
            })
    };
    let embeds = encode(pixels.clone())?;
    let zeros = if hidden {
        encode(ArrayD::zeros(pixels.raw_dim()))?
    } else {
        ArrayD::zeros(embeds.raw_dim())
    };
    let both = concatenate(Axis(0), &[zeros.view(), embeds.view()])?;
    let mut proj = sessions.open(&proj_path)?;
    let out = proj.run(&[(
        attune_passes::ip_adapter::projection::EMBEDS_INPUT.to_string(),
        HostTensor::F32(both),
    )])?;
    let Some((_, HostTensor::F32(tokens))) = out.first() else {
        bail!(
            "{}: its output is not f32",
            folder.join("image_proj").display()
        );
    };
    let uncond = tokens.slice_axis(Axis(0), (0..1).into()).to_owned();
    let cond = tokens.slice_axis(Axis(0), (1..2).into()).to_owned();
    Ok((cond, uncond))
}
