//! The components of a pipeline folder (diffusers/optimum ONNX layout) around the denoiser:
//! a text encoder with its tokenizer, and the VAE decoder, each an ONNX Runtime session fed
//! the element types its graph declares.
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, Axis, IxDyn};
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

/// How a pipeline's sessions are made: where they run, with which ORT options (the session
/// cache, threads).
#[derive(Clone, Debug)]
pub struct Sessions {
    pub ep: Ep,
    pub ort: OrtOptions,
}

impl Sessions {
    /// ORT's CPU provider, default options.
    pub fn cpu() -> Sessions {
        Sessions::on(Ep::Cpu)
    }

    pub fn on(ep: Ep) -> Sessions {
        Sessions {
            ep,
            ort: OrtOptions::default(),
        }
    }

    pub fn open(&self, model: &Path) -> Result<Backend> {
        Backend::open(model, self.ep, &self.ort)
    }
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
    pub fn open(
        dir: &Path,
        encoder: &str,
        tokenizer: &str,
        sessions: &Sessions,
    ) -> Result<TextEncoder> {
        let path = component(dir, encoder)?;
        let tokenizer = TextTokenizer::from_dir(&dir.join(tokenizer))?;
        let ids_type = match declared(&path)?.into_iter().find(|(n, _)| n == "input_ids") {
            Some((_, Some(t @ (DType::I64 | DType::I32)))) => t,
            Some(_) => {
                return Err(Error::file(&path, "its input_ids are not int32 or int64"));
            }
            None => return Err(Error::file(&path, "no input_ids input: not a text encoder")),
        };
        let session = sessions.open(&path)?;
        Ok(TextEncoder {
            tokenizer,
            session,
            ids_type,
            path,
        })
    }

    /// The prompts' embeddings, one row each: the last hidden states and the pooled output.
    pub fn encode(&mut self, prompts: &[&str]) -> Result<TextEmbeddings> {
        let (outs, truncated) = self.run(prompts)?;
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

    /// SDXL's use of an encoder: the penultimate layer's hidden states (`hidden_states[-2]`,
    /// before the final LayerNorm; optimum exports them as `hidden_states.0` ..
    /// `hidden_states.N`) and, where `projected`, the projection `text_embeds`
    /// (CLIPTextModelWithProjection) as the pooled output.
    pub fn encode_penultimate(
        &mut self,
        prompts: &[&str],
        projected: bool,
    ) -> Result<TextEmbeddings> {
        let (outs, truncated) = self.run(prompts)?;
        let layers: Vec<usize> = outs
            .iter()
            .filter_map(|(n, _)| n.strip_prefix("hidden_states.")?.parse().ok())
            .collect();
        let by_name = |name: &str| outs.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        let penultimate = layers
            .iter()
            .max()
            .filter(|&&n| n >= 1)
            .map(|n| format!("hidden_states.{}", n - 1));
        let hidden = penultimate
            .as_deref()
            .and_then(by_name)
            .and_then(float)
            .ok_or_else(|| {
                Error::file(
                    &self.path,
                    "no float hidden_states.N outputs: SDXL takes the penultimate layer's hidden \
                     states (export the encoder with its hidden states, as optimum does for SDXL)",
                )
            })?;
        let pooled = if projected {
            let p = by_name("text_embeds").and_then(float).ok_or_else(|| {
                Error::file(
                    &self.path,
                    "no float text_embeds output: SDXL's pooled embeddings are the second \
                     encoder's projection (CLIPTextModelWithProjection)",
                )
            })?;
            Some(p)
        } else {
            None
        };
        Ok(TextEmbeddings {
            hidden,
            pooled,
            truncated,
        })
    }

    /// The prompts' token ids through the encoder: its named outputs, and the prompts cut to fit.
    fn run(&mut self, prompts: &[&str]) -> Result<(Named, Vec<usize>)> {
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
        Ok((outs, truncated))
    }
}

/// A session's outputs by name.
type Named = Vec<(String, HostTensor)>;

fn float(t: &HostTensor) -> Option<ArrayD<f32>> {
    match t {
        HostTensor::F32(a) => Some(a.clone()),
        HostTensor::F16(a) => Some(a.mapv(half::f16::to_f32)),
        _ => None,
    }
}

/// How a pipeline class turns prompts into what its denoiser takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptEncoding {
    /// SD 1.x/2.x: `text_encoder`'s last hidden states.
    StableDiffusion,
    /// SDXL: both encoders' penultimate hidden states concatenated (text_encoder's features
    /// first), `text_encoder_2`'s projection as the pooled `text_embeds`, and time ids.
    StableDiffusionXl,
    /// SD3: both CLIP encoders' penultimate hidden states concatenated on features, padded
    /// with zeros to T5's width, then T5's (`text_encoder_3`) last hidden states after them on
    /// the tokens; pooled: both CLIP projections concatenated.
    StableDiffusion3,
    /// Flux: T5's (`text_encoder_2`) last hidden states as the prompt embeddings, CLIP's
    /// (`text_encoder`) `pooler_output` as the pooled ones; guidance-distilled, so the
    /// negative row (of "") only matters where CFG is asked for.
    Flux,
}

/// Flux's T5 length: `FluxPipeline`'s `max_sequence_length` default.
pub const FLUX_T5_TOKENS: usize = 512;

/// SD3's T5 length: `StableDiffusion3Pipeline`'s `max_sequence_length` default, whatever the
/// tokenizer's `model_max_length`.
pub const SD3_T5_TOKENS: usize = 256;

impl PromptEncoding {
    /// The encoding of a `model_index.json` class (diffusers', or optimum's/diffusers' ONNX
    /// names: `ORT…`, `Onnx…`); `None` for a class this runtime does not encode for.
    pub fn of_class(class: &str) -> Option<PromptEncoding> {
        let base = class
            .strip_prefix("ORT")
            .or_else(|| class.strip_prefix("Onnx"))
            .unwrap_or(class);
        match base {
            "StableDiffusionPipeline"
            | "LatentConsistencyModelPipeline"
            | "StableDiffusionImg2ImgPipeline"
            | "StableDiffusionInpaintPipeline"
            | "StableDiffusionControlNetPipeline" => Some(PromptEncoding::StableDiffusion),
            "StableDiffusionXLPipeline"
            | "StableDiffusionXLImg2ImgPipeline"
            | "StableDiffusionXLInpaintPipeline"
            | "StableDiffusionXLControlNetPipeline" => Some(PromptEncoding::StableDiffusionXl),
            "StableDiffusion3Pipeline" => Some(PromptEncoding::StableDiffusion3),
            "FluxPipeline" => Some(PromptEncoding::Flux),
            _ => None,
        }
    }
}

/// What the text encoders give the denoiser for a batch of prompts and one negative prompt.
pub struct Conditioning {
    /// [prompts, tokens, dim]
    pub cond: ArrayD<f32>,
    /// [1, tokens, dim]: the negative prompt, for every prompt.
    pub uncond: ArrayD<f32>,
    /// Pooled embeddings (SDXL's `text_embeds`): [prompts, dim] and [1, dim].
    pub pooled: Option<(ArrayD<f32>, ArrayD<f32>)>,
    /// Whether the denoiser takes SDXL's micro-conditioning ([`time_ids`]).
    pub time_ids: bool,
    /// Indices of the prompts (the negative one last) cut to an encoder's length.
    pub truncated: Vec<usize>,
    /// The shortest encoder length (tokens), for the warning.
    pub max_len: usize,
}

/// SDXL's micro-conditioning for an image of `height` x `width` pixels, as its pipeline
/// builds it by default: original size, crop top-left (0, 0), target size.
pub fn time_ids(height: usize, width: usize) -> [f32; 6] {
    let (h, w) = (height as f32, width as f32);
    [h, w, 0.0, 0.0, h, w]
}

/// A pipeline folder's text encoders, as its class uses them.
pub struct PromptEncoder {
    pub encoding: PromptEncoding,
    encoders: Vec<TextEncoder>,
    /// SDXL's `force_zeros_for_empty_prompt` (model_index.json; diffusers' default true): no
    /// negative prompt gives zero negative embeddings.
    force_zeros: bool,
}

impl PromptEncoder {
    /// The encoders of `dir` for a pipeline of `class` (its model_index.json's `_class_name`).
    pub fn open(dir: &Path, class: &str, sessions: &Sessions) -> Result<PromptEncoder> {
        let index_path = dir.join("model_index.json");
        let encoding = PromptEncoding::of_class(class).ok_or_else(|| {
            Error::file(
                &index_path,
                format!("pipeline class {class}: no prompt encoding for it"),
            )
        })?;
        let mut encoders = vec![TextEncoder::open(
            dir,
            "text_encoder",
            "tokenizer",
            sessions,
        )?];
        let mut force_zeros = false;
        if encoding == PromptEncoding::StableDiffusionXl {
            encoders.push(TextEncoder::open(
                dir,
                "text_encoder_2",
                "tokenizer_2",
                sessions,
            )?);
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let index: Value = serde_json::from_str(&text)
                .map_err(|e| Error::file(&index_path, format!("not JSON: {e}")))?;
            force_zeros = match index.get("force_zeros_for_empty_prompt") {
                None | Some(Value::Null) => true,
                Some(v) => v.as_bool().ok_or_else(|| {
                    Error::file(
                        &index_path,
                        "force_zeros_for_empty_prompt is not true or false",
                    )
                })?,
            };
        }
        if encoding == PromptEncoding::StableDiffusion3 {
            encoders.push(TextEncoder::open(
                dir,
                "text_encoder_2",
                "tokenizer_2",
                sessions,
            )?);
            let mut t5 = TextEncoder::open(dir, "text_encoder_3", "tokenizer_3", sessions)?;
            t5.tokenizer.max_len = SD3_T5_TOKENS;
            encoders.push(t5);
        }
        if encoding == PromptEncoding::Flux {
            let mut t5 = TextEncoder::open(dir, "text_encoder_2", "tokenizer_2", sessions)?;
            t5.tokenizer.max_len = FLUX_T5_TOKENS;
            encoders.push(t5);
        }
        Ok(PromptEncoder {
            encoding,
            encoders,
            force_zeros,
        })
    }

    /// The T5 encoder's token count (the pipeline's `max_sequence_length`): SD3's and Flux's
    /// last encoder; refused for pipelines without T5.
    pub fn set_max_sequence_length(&mut self, tokens: usize) -> Result<()> {
        let t5 = match self.encoding {
            PromptEncoding::StableDiffusion3 | PromptEncoding::Flux => self.encoders.last_mut(),
            _ => None,
        };
        match t5 {
            Some(t5) if tokens > 0 => {
                t5.tokenizer.max_len = tokens;
                Ok(())
            }
            Some(_) => Err(Error::Inputs(
                "max_sequence_length 0: T5 needs tokens".into(),
            )),
            None => Err(Error::Inputs(format!(
                "max_sequence_length: {:?} pipelines have no T5 encoder",
                self.encoding
            ))),
        }
    }

    /// `prompts` and the negative prompt, as diffusers' pipeline of this class encodes them:
    /// `None` is no negative prompt (SDXL with force_zeros_for_empty_prompt: zeros; otherwise
    /// as ""), `Some("")` an empty one, encoded.
    pub fn encode(&mut self, prompts: &[&str], negative: Option<&str>) -> Result<Conditioning> {
        let p = prompts.len();
        let zeros = negative.is_none() && self.force_zeros;
        let mut all: Vec<&str> = prompts.to_vec();
        if !zeros {
            all.push(negative.unwrap_or(""));
        }
        // The CLIP encoders' length (SD3's T5 takes more).
        let max_len = self.encoders[..self.encoders.len().min(2)]
            .iter()
            .map(|e| e.tokenizer.max_len)
            .min()
            .unwrap_or(77);
        let mut truncated = Vec::new();
        let (hidden, pooled) = match self.encoding {
            PromptEncoding::StableDiffusion => {
                let e = self.encoders[0].encode(&all)?;
                truncated = e.truncated;
                (e.hidden, None)
            }
            PromptEncoding::StableDiffusionXl => {
                let last = self.encoders.len() - 1;
                let mut parts = Vec::new();
                let mut pooled = None;
                for (k, encoder) in self.encoders.iter_mut().enumerate() {
                    let e = encoder.encode_penultimate(&all, k == last)?;
                    truncated.extend(e.truncated);
                    parts.push(e.hidden);
                    pooled = e.pooled.or(pooled);
                }
                let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
                let hidden = ndarray::concatenate(Axis(2), &views).map_err(|e| {
                    Error::Inputs(format!(
                        "the text encoders' hidden states {:?} do not concatenate: {e}",
                        parts.iter().map(|a| a.shape().to_vec()).collect::<Vec<_>>()
                    ))
                })?;
                (hidden, pooled)
            }
            PromptEncoding::StableDiffusion3 => {
                let mut clip = Vec::new();
                let mut pooled = Vec::new();
                for encoder in &mut self.encoders[..2] {
                    let e = encoder.encode_penultimate(&all, true)?;
                    truncated.extend(e.truncated);
                    clip.push(e.hidden);
                    pooled.extend(e.pooled);
                }
                let t5 = self.encoders[2].encode(&all)?;
                truncated.extend(t5.truncated);
                let joined = |parts: &[ArrayD<f32>], axis: usize, what: &str| {
                    let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
                    ndarray::concatenate(Axis(axis), &views).map_err(|e| {
                        Error::Inputs(format!(
                            "{what} {:?} do not concatenate: {e}",
                            parts.iter().map(|a| a.shape().to_vec()).collect::<Vec<_>>()
                        ))
                    })
                };
                let clip = joined(&clip, 2, "the CLIP encoders' hidden states")?;
                let (width, have) = (t5.hidden.shape()[2], clip.shape()[2]);
                if have > width || clip.shape()[0] != t5.hidden.shape()[0] {
                    return Err(Error::Inputs(format!(
                        "the CLIP encoders' hidden states {:?} do not fit text_encoder_3's {:?}: \
                         SD3 pads them with zeros to T5's width",
                        clip.shape(),
                        t5.hidden.shape()
                    )));
                }
                let mut padded = ArrayD::zeros(IxDyn(&[clip.shape()[0], clip.shape()[1], width]));
                padded
                    .slice_axis_mut(Axis(2), (0..have).into())
                    .assign(&clip);
                let hidden = joined(&[padded, t5.hidden], 1, "the CLIP and T5 hidden states")?;
                let pooled = joined(&pooled, 1, "the CLIP encoders' text_embeds")?;
                (hidden, Some(pooled))
            }
            PromptEncoding::Flux => {
                let clip = self.encoders[0].encode(&all)?;
                truncated.extend(clip.truncated);
                let pooled = clip.pooled.ok_or_else(|| {
                    Error::Inputs(
                        "text_encoder has no pooler_output: Flux's pooled embeddings are CLIP's"
                            .into(),
                    )
                })?;
                let t5 = self.encoders[1].encode(&all)?;
                truncated.extend(t5.truncated);
                (t5.hidden, Some(pooled))
            }
        };
        truncated.sort_unstable();
        truncated.dedup();
        let rows =
            |a: &ArrayD<f32>, r: std::ops::Range<usize>| a.slice_axis(Axis(0), r.into()).to_owned();
        let negative_rows = |a: &ArrayD<f32>| {
            if zeros {
                let mut shape = a.shape().to_vec();
                shape[0] = 1;
                ArrayD::zeros(IxDyn(&shape))
            } else {
                rows(a, p..p + 1)
            }
        };
        Ok(Conditioning {
            cond: rows(&hidden, 0..p),
            uncond: negative_rows(&hidden),
            pooled: pooled.map(|a| (rows(&a, 0..p), negative_rows(&a))),
            time_ids: self.encoding == PromptEncoding::StableDiffusionXl,
            truncated,
            max_len,
        })
    }
}

/// The latents' `scaling_factor` and `shift_factor` of a VAE component's `config.json`
/// (Stable Diffusion's 0.18215 and 0 where it has none).
fn latent_scaling(dir: &Path, component: &str) -> Result<(f32, f32)> {
    let path = dir.join(component).join("config.json");
    let config: Value = match std::fs::read_to_string(&path) {
        Ok(text) => {
            serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("not JSON: {e}")))?
        }
        Err(_) => Value::Null,
    };
    let number = |key: &str, default: f64| -> Result<f32> {
        match config.get(key) {
            None | Some(Value::Null) => Ok(default as f32),
            Some(v) => v
                .as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| Error::file(&path, format!("{key} is not a number"))),
        }
    };
    Ok((
        number("scaling_factor", 0.18215)?,
        number("shift_factor", 0.0)?,
    ))
}

/// The VAE decoder with its latent scaling (`vae_decoder/config.json`).
pub struct VaeDecoder {
    session: Backend,
    pub scaling_factor: f32,
    pub shift_factor: f32,
    input_type: DType,
}

impl VaeDecoder {
    pub fn open(dir: &Path, sessions: &Sessions) -> Result<VaeDecoder> {
        let path = component(dir, "vae_decoder")?;
        let (scaling_factor, shift_factor) = latent_scaling(dir, "vae_decoder")?;
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
            scaling_factor,
            shift_factor,
            session: sessions.open(&path)?,
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
    /// The export outputs a draw from the posterior (`latent_sample`, older exports), not its
    /// mean: its latents are random unless the graph fixed the draw.
    pub draws: bool,
}

impl VaeEncoder {
    pub fn open(dir: &Path, sessions: &Sessions) -> Result<VaeEncoder> {
        let path = component(dir, "vae_encoder")?;
        let (scaling_factor, shift_factor) = latent_scaling(dir, "vae_encoder")?;
        let model = attune_compiler::import::read(&path)?;
        let g = &model.graph;
        let outputs: Vec<&str> = g
            .outputs
            .iter()
            .map(|io| g.value(io.value).name.as_str())
            .collect();
        let draws = !outputs.contains(&"latent_parameters") && outputs.contains(&"latent_sample");
        let sample = input_specs(&model)
            .into_iter()
            .find(|s| s.name == "sample")
            .and_then(|s| s.dtype());
        let input_type = match sample {
            Some(t @ (DType::F32 | DType::F16)) => t,
            _ => {
                return Err(Error::file(
                    &path,
                    "no float sample input: not a VAE encoder",
                ));
            }
        };
        Ok(VaeEncoder {
            scaling_factor,
            shift_factor,
            session: sessions.open(&path)?,
            input_type,
            path,
            draws,
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
        let found = |name: &str| outs.iter().find(|(n, _)| n == name).map(|(_, t)| float(t));
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
