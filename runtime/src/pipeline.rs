//! The components of a pipeline folder (diffusers/optimum ONNX layout) around the denoiser:
//! a text encoder with its tokenizer, and the VAE decoder, each an ONNX Runtime session fed
//! the element types its graph declares.
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use serde_json::Value;

use crate::backend::{Backend, Ep};
use crate::error::{Error, Result};
use crate::image::{Rgb, from_decoded};
use crate::inputs::input_specs;
use crate::ort_backend::OrtOptions;
use crate::tensor::{DType, HostTensor};
use crate::tokenizer::TextTokenizer;

/// A component's folder and the model in it (`model.onnx`), or an error naming what is missing.
pub fn component(dir: &Path, name: &str) -> Result<PathBuf> {
    let model = dir.join(name).join("model.onnx");
    if !model.is_file() {
        return Err(Error::file(
            dir,
            format!("the pipeline has no {name} (no {name}/model.onnx)"),
        ));
    }
    Ok(model)
}

/// The declared element type of each input of the model at `path`.
fn declared(path: &Path) -> Result<Vec<(String, Option<DType>)>> {
    let model = attune_compiler::import::read(path)?;
    Ok(input_specs(&model)
        .into_iter()
        .map(|s| (s.name.clone(), s.dtype()))
        .collect())
}

/// A text encoder and its tokenizer (`text_encoder/` with `tokenizer/`, or `_2`, `_3`).
pub struct TextEncoder {
    pub tokenizer: TextTokenizer,
    session: Backend,
    ids_type: DType,
    path: PathBuf,
}

/// What a text encoder gives for a batch of prompts.
pub struct TextEmbeddings {
    /// The last hidden states [prompts, tokens, dim].
    pub hidden: ArrayD<f32>,
    /// The pooled (or projected) output [prompts, dim], where the encoder has one.
    pub pooled: Option<ArrayD<f32>>,
    /// Prompts cut to the encoder's length.
    pub truncated: Vec<usize>,
}

impl TextEncoder {
    /// `dir/<encoder>/model.onnx` with `dir/<tokenizer>/`.
    pub fn open(dir: &Path, encoder: &str, tokenizer: &str, ep: Ep) -> Result<TextEncoder> {
        let path = component(dir, encoder)?;
        let tokenizer = TextTokenizer::from_dir(&dir.join(tokenizer))?;
        let ids_type = match declared(&path)?.into_iter().find(|(n, _)| n == "input_ids") {
            Some((_, Some(t @ (DType::I64 | DType::I32)))) => t,
            Some(_) => {
                return Err(Error::file(&path, "its input_ids are not int32 or int64"));
            }
            None => return Err(Error::file(&path, "no input_ids input: not a text encoder")),
        };
        let session = Backend::open(&path, ep, &OrtOptions::default())?;
        Ok(TextEncoder {
            tokenizer,
            session,
            ids_type,
            path,
        })
    }

    /// The prompts' embeddings, one row each.
    pub fn encode(&mut self, prompts: &[&str]) -> Result<TextEmbeddings> {
        let len = self.tokenizer.max_len;
        let mut ids = Vec::with_capacity(prompts.len() * len);
        let mut truncated = Vec::new();
        for (k, p) in prompts.iter().enumerate() {
            let e = self.tokenizer.encode(p)?;
            if e.truncated {
                truncated.push(k);
            }
            ids.extend(e.ids);
        }
        let shape = IxDyn(&[prompts.len(), len]);
        let ids = ArrayD::from_shape_vec(shape, ids).expect("sized");
        let ids = match self.ids_type {
            DType::I32 => HostTensor::I32(ids.mapv(|i| i as i32)),
            _ => HostTensor::I64(ids),
        };
        let outs = self.session.run(&[("input_ids".into(), ids)])?;
        let output = |names: &[&str]| {
            outs.iter()
                .find(|(n, _)| names.contains(&n.as_str()))
                .map(|(_, t)| float(t))
        };
        let hidden = output(&["last_hidden_state"])
            .or_else(|| outs.first().map(|(_, t)| float(t)))
            .flatten()
            .ok_or_else(|| Error::file(&self.path, "no float last_hidden_state output"))?;
        let pooled = output(&["pooler_output", "text_embeds"]).flatten();
        Ok(TextEmbeddings {
            hidden,
            pooled,
            truncated,
        })
    }
}

fn float(t: &HostTensor) -> Option<ArrayD<f32>> {
    match t {
        HostTensor::F32(a) => Some(a.clone()),
        HostTensor::F16(a) => Some(a.mapv(half::f16::to_f32)),
        _ => None,
    }
}

/// The VAE decoder with its latent scaling (`vae_decoder/config.json`).
pub struct VaeDecoder {
    session: Backend,
    pub scaling_factor: f32,
    pub shift_factor: f32,
    input_type: DType,
}

impl VaeDecoder {
    pub fn open(dir: &Path, ep: Ep) -> Result<VaeDecoder> {
        let path = component(dir, "vae_decoder")?;
        let config_path = dir.join("vae_decoder/config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::file(&config_path, format!("not JSON: {e}")))?,
            Err(_) => Value::Null,
        };
        let number = |key: &str, default: f64| -> Result<f32> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(default as f32),
                Some(v) => v
                    .as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| Error::file(&config_path, format!("{key} is not a number"))),
            }
        };
        let input_type = match declared(&path)?
            .into_iter()
            .find(|(n, _)| n == "latent_sample")
        {
            Some((_, Some(t @ (DType::F32 | DType::F16)))) => t,
            _ => {
                return Err(Error::file(
                    &path,
                    "no float latent_sample input: not a VAE decoder",
                ));
            }
        };
        Ok(VaeDecoder {
            scaling_factor: number("scaling_factor", 0.18215)?,
            shift_factor: number("shift_factor", 0.0)?,
            session: Backend::open(&path, ep, &OrtOptions::default())?,
            input_type,
        })
    }

    /// Final latents [N, C, h, w] (as the sampler leaves them) → images.
    pub fn decode(&mut self, latents: &ArrayD<f32>) -> Result<Vec<Rgb>> {
        let (scale, shift) = (self.scaling_factor, self.shift_factor);
        let z = HostTensor::F32(latents.mapv(|x| x / scale + shift));
        let z = match self.input_type {
            DType::F16 => z.float_as(DType::F16).expect("f32 to f16"),
            _ => z,
        };
        let outs = self.session.run(&[("latent_sample".into(), z)])?;
        let (_, image) = outs
            .first()
            .ok_or_else(|| Error::Inputs("the VAE decoder returned nothing".into()))?;
        from_decoded(image)
    }
}

/// The VAE encoder (`vae_encoder/`, config in `vae_encoder/config.json`): images to the
/// latents img2img and inpainting start from.
pub struct VaeEncoder {
    session: Backend,
    pub scaling_factor: f32,
    pub shift_factor: f32,
    input_type: DType,
    path: PathBuf,
}

impl VaeEncoder {
    pub fn open(dir: &Path, ep: Ep) -> Result<VaeEncoder> {
        let path = component(dir, "vae_encoder")?;
        let config_path = dir.join("vae_encoder/config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::file(&config_path, format!("not JSON: {e}")))?,
            Err(_) => Value::Null,
        };
        let number = |key: &str, default: f64| -> Result<f32> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(default as f32),
                Some(v) => v
                    .as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| Error::file(&config_path, format!("{key} is not a number"))),
            }
        };
        let input_type = match declared(&path)?.into_iter().find(|(n, _)| n == "sample") {
            Some((_, Some(t @ (DType::F32 | DType::F16)))) => t,
            _ => {
                return Err(Error::file(
                    &path,
                    "no float sample input: not a VAE encoder",
                ));
            }
        };
        Ok(VaeEncoder {
            scaling_factor: number("scaling_factor", 0.18215)?,
            shift_factor: number("shift_factor", 0.0)?,
            session: Backend::open(&path, ep, &OrtOptions::default())?,
            input_type,
            path,
        })
    }

    /// Images [N, 3, H, W] in [-1, 1] → latents (z − shift)·scale, z the posterior's mean where
    /// the export outputs it (optimum's `latent_parameters`: mean and log-variance on the
    /// channels), else what it outputs (older exports' `latent_sample`, a draw from it).
    pub fn encode(&mut self, images: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let x = HostTensor::F32(images.clone());
        let x = match self.input_type {
            DType::F16 => x.float_as(DType::F16).expect("f32 to f16"),
            _ => x,
        };
        let outs = self.session.run(&[("sample".into(), x)])?;
        let found = |name: &str| {
            outs.iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| float(t))
        };
        let z = match (found("latent_parameters"), found("latent_sample")) {
            (Some(Some(p)), _) if p.ndim() == 4 && p.shape()[1] % 2 == 0 => {
                let c = p.shape()[1] / 2;
                p.slice_axis(ndarray::Axis(1), (0..c).into()).to_owned()
            }
            (None, Some(Some(z))) if z.ndim() == 4 => z,
            _ => {
                let names: Vec<&str> = outs.iter().map(|(n, _)| n.as_str()).collect();
                return Err(Error::file(
                    &self.path,
                    format!(
                        "outputs {names:?}: expected latent_parameters [N, 2C, h, w] (mean and log-variance) or latent_sample [N, C, h, w], float"
                    ),
                ));
            }
        };
        let (scale, shift) = (self.scaling_factor, self.shift_factor);
        Ok(z.mapv(|v| (v - shift) * scale))
    }
}
