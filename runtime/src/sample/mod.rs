//! The sampling loop for compiled UNets and diffusion transformers: classifier-free guidance
//! with a scheduler (DDIM or flow matching's Euler, see `scheduler`), feeding attention-control
//! hooks every step from a controller and applying LocalBlend between steps.
use std::collections::BTreeMap;

use ndarray::{ArrayD, Axis, IxDyn, concatenate};

pub mod control;
mod init;
mod local_blend;
mod packed;
pub mod progress;
pub mod step_cache;

pub use init::{Init, Inpaint, first_step};

use crate::backend::Backend;
use crate::controller::Plan;
use crate::error::{Error, Result};
use crate::scheduler::Scheduler;
use crate::tensor::{DType, HostTensor};

/// What a run takes besides the UNet.
pub struct SampleRun<'a> {
    pub cond: &'a ArrayD<f32>,
    pub uncond: &'a ArrayD<f32>,
    pub latents: ArrayD<f32>,
    pub guidance: f32,
    pub scheduler: Scheduler,
    pub pooled: Option<Pooled<'a>>,
    /// SDXL's micro-conditioning (original size, crop top-left, target size), every row.
    pub time_ids: Option<[f32; 6]>,
    pub plan: Option<Plan>,
    /// The UNet's hook inputs in call order: (input name, kind).
    pub hooks: Vec<String>,
    /// Declared element type of every UNet input (an fp16 UNet takes fp16 latents, text
    /// embeddings and hook values); inputs not listed are fed as f32.
    pub input_dtypes: BTreeMap<String, DType>,
    pub timestep: TimestepForm,
    /// Classifier-free guidance: the batch holds the unconditional rows too.
    pub cfg: bool,
    /// Flux-dev's `guidance` input, per row.
    pub embedded_guidance: Option<f32>,
    /// LCM-distilled UNets' `timestep_cond`, this wide: the guidance scale's embedding.
    pub guidance_embedding: Option<usize>,
    pub layout: Layout,
    /// The input the latents go in: the layout's, or SD3's `hidden_states` [batch, channels,
    /// height, width] as optimum exports it.
    pub latents_input: &'static str,
    /// The model is fed the scheduler's timestep times this (Flux: 1/1000).
    pub timestep_scale: f64,
    /// img2img / inpainting: `latents` are then the unscaled noise, and the loop starts at the
    /// step the strength picks.
    pub init: Option<Init>,
    /// Called after every step.
    pub progress: Option<&'a mut dyn FnMut(progress::Step)>,
    /// Inputs fed as they are every step (a LoRA adapter's A and B), in the declared type.
    pub extra: Vec<(String, HostTensor)>,
    /// How a step-cached denoiser reuses work (DeepCache's schedule, the first-block cache's
    /// threshold); ignored for one not split.
    pub step_cache: step_cache::Request,
    /// Perturbed-attention guidance.
    pub pag: Option<Pag>,
    /// The denoiser's ControlNet residual inputs (zeros where no ControlNet acts).
    pub residuals: Vec<control::Residual>,
    pub controls: Vec<control::ControlNet>,
    /// A ControlNet merged into the denoiser.
    pub merged: Option<control::Merged>,
    /// IP-Adapter's image-prompt tokens: (for the conds, for the unconditional rows), each
    /// [1, tokens, width], fed as `ip_tokens` in the batch's rows like the text.
    pub ip_tokens: Option<(ArrayD<f32>, ArrayD<f32>)>,
}

/// Perturbed-attention guidance (diffusers' PAG pipelines): the batch gets P more rows, the
/// conds again, whose gated self-attention sites output V; the guided noise adds
/// `scale·(cond - perturbed)`.
pub struct Pag {
    pub scale: f32,
    /// diffusers' `pag_adaptive_scale`: the scale at timestep t is
    /// max(0, scale - adaptive_scale·(1000 - t)).
    pub adaptive_scale: f32,
    /// The model's gate inputs (`pag.<path>.gate`, one value per batch row).
    pub gates: Vec<String>,
}

impl Pag {
    fn scale_at(&self, t: f64) -> f32 {
        if self.adaptive_scale == 0.0 {
            return self.scale;
        }
        (self.scale as f64 - self.adaptive_scale as f64 * (1000.0 - t)).max(0.0) as f32
    }
}

/// What a run returns.
pub struct Sampled {
    pub latents: ArrayD<f32>,
    pub maps: Maps,
    /// A step-cached denoiser: the loop steps that computed the cached part, how many reused
    /// it, what the part is, and how many extra outputs (attention maps) it reused with it.
    pub step_cache: Option<(Vec<usize>, usize, &'static str, usize)>,
}

/// How the model takes the latents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `sample` [batch, channels, height, width].
    Image,
    /// Flux: `hidden_states` [batch, tokens, 4·channels] of 2x2 patches, with `img_ids` and
    /// `txt_ids`.
    Packed,
}

impl Layout {
    /// The input the latents go in.
    pub fn latents_input(self) -> &'static str {
        match self {
            Layout::Image => "sample",
            Layout::Packed => "hidden_states",
        }
    }
}

/// Pooled text embeddings (SD3's `pooled_projections`, SDXL's `text_embeds`): cond [P, dim],
/// uncond [1 or P, dim].
pub struct Pooled<'a> {
    pub input: &'static str,
    pub cond: &'a ArrayD<f32>,
    pub uncond: &'a ArrayD<f32>,
}

/// How the UNet takes the timestep: one per batch row (the usual `[batch]`), one for the
/// whole batch (`[1]`), or a scalar (`[]`, as some exports declare it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TimestepForm {
    #[default]
    PerRow,
    One,
    Scalar,
}

/// `t` as the element type the UNet declares for input `name` (f32 <-> f16).
fn as_declared(name: &str, t: HostTensor, dtypes: &BTreeMap<String, DType>) -> Result<HostTensor> {
    match dtypes.get(name) {
        Some(&d) if d != t.dtype() => t.float_as(d).ok_or_else(|| Error::Input {
            input: name.to_string(),
            msg: format!(
                "the UNet declares it {}, `attune sample` feeds {}",
                d.name(),
                t.dtype().name()
            ),
        }),
        _ => Ok(t),
    }
}

/// A UNet output as f32 (an fp16 UNet's noise and maps), or `None` if it is not a float.
fn output_f32(t: &HostTensor) -> Option<std::borrow::Cow<'_, ArrayD<f32>>> {
    match t {
        HostTensor::F32(a) => Some(std::borrow::Cow::Borrowed(a)),
        HostTensor::F16(a) => Some(std::borrow::Cow::Owned(a.mapv(half::f16::to_f32))),
        _ => None,
    }
}

/// Cross-attention maps summed over steps (the cond half, per captured layer).
#[derive(Default)]
pub struct Maps {
    pub sum: BTreeMap<String, ArrayD<f32>>,
}

/// Runs the loop; returns the final latents and the accumulated attention maps.
pub fn sample(unet: &mut Backend, mut run: SampleRun) -> Result<Sampled> {
    let prompts = prompt_count(&run)?;
    let mut x = std::mem::take(&mut run.latents);
    if x.shape()[0] == 1 && prompts > 1 {
        x = concatenate(Axis(0), &vec![x.view(); prompts])
            .map_err(|e| Error::Inputs(format!("latents: {e}")))?;
    }
    // The batch: [uncond x P, cond x P] with guidance, else the P conds; PAG's perturbed
    // conds last.
    let conds_at = if run.cfg { prompts } else { 0 };
    let rows = conds_at + prompts + if run.pag.is_some() { prompts } else { 0 };
    let prepared = match &run.init {
        Some(init) => {
            let (start, prepared) = init.prepare(&run.scheduler, x, rows)?;
            x = start;
            Some(prepared)
        }
        None => {
            let noise_sigma = run.scheduler.init_noise_sigma();
            if noise_sigma != 1.0 {
                x.mapv_inplace(|v| v * noise_sigma);
            }
            None
        }
    };
    if prepared.is_some() && run.layout == Layout::Packed {
        return Err(Error::Inputs(
            "img2img and inpainting run image-layout models (UNets, SD3), not Flux's packed one"
                .into(),
        ));
    }
    if run.layout == Layout::Packed && x.shape()[2..].iter().any(|s| s % 2 != 0) {
        return Err(Error::Inputs(format!(
            "latents {:?}: Flux packs 2x2 patches, so height and width must be even",
            x.shape()
        )));
    }
    let fixed = fixed_inputs(&run, rows, &x)?;
    let mut controls = std::mem::take(&mut run.controls);
    let mut residual_inputs = Vec::new();
    let mut maps = Maps::default();
    let self_gates: Vec<&String> = run
        .hooks
        .iter()
        .filter(|h| h.starts_with("masactrl."))
        .collect();
    let timesteps = run.scheduler.timesteps();
    let (first, n) = (prepared.as_ref().map_or(0, |p| p.start), timesteps.len());
    run.scheduler
        .check_noise(first, x.shape())
        .map_err(Error::Inputs)?;
    let mut cache =
        step_cache::StepCache::for_inputs(&run.input_dtypes, run.step_cache, n - first)?;
    for (i, &t) in timesteps.iter().enumerate().skip(first) {
        let began = std::time::Instant::now();
        let copies = vec![x.view(); rows / prompts];
        let sample = concatenate(Axis(0), &copies).expect("same shapes");
        let timestep = timestep_input(&run, t, rows, i)?;
        let mut inputs = vec![("timestep".to_string(), timestep)];
        let sample = run.scheduler.scale_input(i, &sample);
        let sample = match run.layout {
            Layout::Image => match &prepared {
                Some(p) => p.unet_input(sample.into_owned()),
                None => sample.into_owned(),
            },
            Layout::Packed => packed::pack(&sample),
        };
        if !run.residuals.is_empty() {
            let step = control::Step {
                i,
                n,
                t: t * run.timestep_scale,
                scheduler: run.scheduler.name(),
                rows,
                sample: &sample,
                fixed: &fixed,
            };
            let fed = control::residuals(&mut controls, &run.residuals, &run.input_dtypes, &step)?;
            residual_inputs = fed;
        }
        inputs.push((run.latents_input.to_string(), HostTensor::F32(sample)));
        if let Some(m) = &run.merged {
            inputs.extend(m.inputs(i, n, rows)?);
        }
        if let Some(plan) = &run.plan {
            inputs.extend(hook_values(plan, i, &run.hooks, &self_gates));
        }
        let mut inputs = inputs
            .into_iter()
            .map(|(n, t)| {
                let t = as_declared(&n, t, &run.input_dtypes)?;
                Ok((n, t))
            })
            .collect::<Result<Vec<_>>>()?;
        inputs.extend(fixed.iter().cloned());
        inputs.append(&mut residual_inputs);
        if let Some(cache) = &cache {
            inputs.extend(cache.inputs(i - first)?);
        }
        let outputs = unet.run(&inputs)?;
        let refreshed = match &mut cache {
            Some(cache) => Some(cache.after(i - first, &outputs)?),
            None => None,
        };
        let Some(out) = outputs
            .iter()
            .find(|(n, _)| n == "out_sample")
            .or_else(|| outputs.first())
            .and_then(|(_, t)| output_f32(t))
        else {
            return Err(Error::Inputs(
                "the UNet's first output is not float noise".into(),
            ));
        };
        let noise_shape: Vec<usize> = [rows]
            .into_iter()
            .chain(x.shape()[1..].iter().copied())
            .collect();
        let out = match run.layout {
            Layout::Packed if out.shape() == packed::token_shape(&noise_shape) => {
                std::borrow::Cow::Owned(packed::unpack(&out, &noise_shape))
            }
            _ => out,
        };
        // A model that also predicts its variance (PixArt, DeepFloyd) outputs twice the
        // channels; diffusers' pipelines keep the first half.
        let learned_sigma = out.ndim() == 4
            && out.shape()[1] == 2 * noise_shape[1]
            && out.shape()[0] == noise_shape[0]
            && out.shape()[2..] == noise_shape[2..];
        let out = if learned_sigma {
            std::borrow::Cow::Owned(
                out.slice_axis(Axis(1), (0..noise_shape[1]).into())
                    .to_owned(),
            )
        } else {
            out
        };
        if out.shape() != noise_shape {
            return Err(Error::Inputs(format!(
                "the UNet's output is {:?}, expected {noise_shape:?} (the batched sample's shape; or twice its channels, with a predicted variance)",
                out.shape()
            )));
        }
        let part = |k: usize| out.slice_axis(Axis(0), (k * prompts..(k + 1) * prompts).into());
        let c = part(conds_at / prompts);
        let mut guided = if run.cfg {
            let u = part(0);
            (&u + &((&c - &u) * run.guidance)).into_dyn()
        } else {
            c.to_owned()
        };
        if let Some(pag) = &run.pag {
            let perturbed = part(conds_at / prompts + 1);
            guided += &((&c - &perturbed) * pag.scale_at(t));
        }
        x = run.scheduler.step(i, &guided, &x).map_err(Error::Inputs)?;
        if let Some(p) = &prepared {
            x = p.blend(&run.scheduler, i, n, x);
        }
        for (name, t) in &outputs {
            if let (Some(path), Some(m)) = (name.strip_prefix("attn."), output_f32(t)) {
                let cond = cond_map(name, &m, conds_at..conds_at + prompts, rows)?;
                match maps.sum.get_mut(path) {
                    Some(acc) if acc.shape() == cond.shape() => *acc += &cond,
                    Some(acc) => {
                        return Err(Error::Inputs(format!(
                            "the UNet's output '{name}' is {:?} at step {i}, {:?} before",
                            m.shape(),
                            acc.shape()
                        )));
                    }
                    None => {
                        maps.sum.insert(path.to_string(), cond);
                    }
                }
            }
        }
        if let Some(lb) = run.plan.as_ref().and_then(|p| p.local_blend.as_ref()) {
            x = local_blend::local_blend(&x, &maps, lb, prompts)?;
        }
        if let Some(report) = run.progress.as_mut() {
            report(progress::Step {
                done: i + 1 - first,
                of: n - first,
                timestep: t,
                seconds: began.elapsed().as_secs_f64(),
                refreshed,
            });
        }
    }
    Ok(Sampled {
        latents: x,
        maps,
        step_cache: cache.map(|c| {
            let (part, maps) = (c.part(), c.reused_outputs());
            (c.computed, c.cached, part, maps)
        }),
    })
}

/// The inputs that stay the same every step: text (and pooled text) embeddings in the batch's
/// rows, SDXL's time ids, Flux's position ids and embedded guidance, as the model declares them.
fn fixed_inputs(
    run: &SampleRun,
    rows: usize,
    x: &ArrayD<f32>,
) -> Result<Vec<(String, HostTensor)>> {
    let prompts = x.shape()[0];
    // [uncond x P, cond x P] with guidance, else the P conds; PAG's perturbed conds after.
    let batch = |cond: &ArrayD<f32>, uncond: &ArrayD<f32>, what: &str| {
        let rows = if run.cfg {
            cfg_batch(cond, uncond, prompts, what)?
        } else {
            cond.clone()
        };
        match run.pag {
            Some(_) => concatenate(Axis(0), &[rows.view(), cond.view()])
                .map_err(|e| Error::Inputs(format!("{what}: {e}"))),
            None => Ok(rows),
        }
    };
    let context = batch(run.cond, run.uncond, "text embeddings")?;
    let pooled = match &run.pooled {
        Some(p) => Some((p.input, batch(p.cond, p.uncond, "pooled text embeddings")?)),
        None => None,
    };
    let mut fixed = vec![(
        "encoder_hidden_states".to_string(),
        HostTensor::F32(context),
    )];
    if let Some((cond, uncond)) = &run.ip_tokens {
        let cond = concatenate(Axis(0), &vec![cond.view(); prompts])
            .map_err(|e| Error::Inputs(format!("ip_tokens: {e}")))?;
        fixed.push((
            "ip_tokens".to_string(),
            HostTensor::F32(batch(&cond, uncond, "ip_tokens")?),
        ));
    }
    if let Some((input, p)) = pooled {
        fixed.push((input.to_string(), HostTensor::F32(p)));
    }
    if let Some(ids) = run.time_ids {
        let rows_of_ids = ArrayD::from_shape_fn(IxDyn(&[rows, 6]), |ix| ids[ix[1]]);
        fixed.push(("time_ids".to_string(), HostTensor::F32(rows_of_ids)));
    }
    if run.layout == Layout::Packed {
        let words = run.cond.shape()[1];
        fixed.push((
            "img_ids".to_string(),
            HostTensor::F32(packed::image_ids(x.shape()[2], x.shape()[3])),
        ));
        fixed.push((
            "txt_ids".to_string(),
            HostTensor::F32(ArrayD::zeros(IxDyn(&[words, 3]))),
        ));
    }
    if let Some(dim) = run.guidance_embedding {
        let w = guidance_embedding(run.guidance, dim);
        let w = concatenate(Axis(0), &vec![w.view(); rows]).expect("one shape");
        fixed.push(("timestep_cond".to_string(), HostTensor::F32(w)));
    }
    if let Some(g) = run.embedded_guidance {
        fixed.push((
            "guidance".to_string(),
            HostTensor::F32(ArrayD::from_elem(IxDyn(&[rows]), g)),
        ));
    }
    if let Some(pag) = &run.pag {
        // 1 on the perturbed rows (the last P), 0 elsewhere.
        let gate = ArrayD::from_shape_fn(IxDyn(&[rows]), |ix| {
            if ix[0] >= rows - prompts { 1.0 } else { 0.0 }
        });
        for name in &pag.gates {
            fixed.push((name.clone(), HostTensor::F32(gate.clone())));
        }
    }
    fixed.extend(run.extra.iter().cloned());
    fixed
        .into_iter()
        .map(|(n, t)| Ok((n.clone(), as_declared(&n, t, &run.input_dtypes)?)))
        .collect()
}

/// LCM's guidance embedding [1, dim] of scale `g` (`timestep_cond`): sines and cosines of
/// 1000·(g − 1) at geometric frequencies, as diffusers' `get_guidance_scale_embedding`.
fn guidance_embedding(g: f32, dim: usize) -> ArrayD<f32> {
    let half = dim / 2;
    let w = (g - 1.0) * 1000.0;
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let angles: Vec<f32> = (0..half).map(|k| w * (-(k as f32) * step).exp()).collect();
    let mut emb: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    emb.extend(angles.iter().map(|a| a.cos()));
    emb.resize(dim, 0.0);
    ArrayD::from_shape_vec(IxDyn(&[1, dim]), emb).expect("dim values")
}

/// The timestep input at step `i` (the scheduler's `t`, scaled for Flux), in the form and type
/// the model declares.
fn timestep_input(run: &SampleRun, t: f64, rows: usize, i: usize) -> Result<HostTensor> {
    let fed = t * run.timestep_scale;
    timestep_value(
        run.timestep,
        &run.input_dtypes,
        fed,
        rows,
        i,
        run.scheduler.name(),
    )
}

/// `fed` as a model's timestep input: the form and element type it declares.
fn timestep_value(
    form: TimestepForm,
    dtypes: &BTreeMap<String, DType>,
    fed: f64,
    rows: usize,
    i: usize,
    scheduler: &str,
) -> Result<HostTensor> {
    let shape: &[usize] = match form {
        TimestepForm::PerRow => &[rows],
        TimestepForm::One => &[1],
        TimestepForm::Scalar => &[],
    };
    let steps = ArrayD::from_elem(IxDyn(shape), fed as f32);
    let timestep = match dtypes.get("timestep") {
        Some(d @ (DType::I64 | DType::I32)) if fed.fract() != 0.0 => {
            return Err(Error::Input {
                input: "timestep".into(),
                msg: format!(
                    "the model declares it {}, and {scheduler} feeds fractional timesteps ({fed} at step {i})",
                    d.name(),
                ),
            });
        }
        Some(DType::I64) => HostTensor::I64(steps.mapv(|v| v as i64)),
        Some(DType::I32) => HostTensor::I32(steps.mapv(|v| v as i32)),
        _ => HostTensor::F32(steps),
    };
    Ok(timestep)
}

/// `[uncond x P, cond]`: uncond [1 or P, ...] repeated to P rows before the P conds.
fn cfg_batch(
    cond: &ArrayD<f32>,
    uncond: &ArrayD<f32>,
    prompts: usize,
    what: &str,
) -> Result<ArrayD<f32>> {
    let uncond = if uncond.shape()[0] == 1 {
        concatenate(Axis(0), &vec![uncond.view(); prompts])
    } else {
        Ok(uncond.clone())
    };
    uncond
        .and_then(|u| concatenate(Axis(0), &[u.view(), cond.view()]))
        .map_err(|e| Error::Inputs(format!("{what}: {e}")))
}

/// The prompt count P, after checking that the embeddings and latents fit together.
fn prompt_count(run: &SampleRun) -> Result<usize> {
    let (cond, uncond, x) = (run.cond.shape(), run.uncond.shape(), run.latents.shape());
    let prompts = cond.first().copied().unwrap_or(0);
    let fits = cond.len() == 3
        && prompts >= 1
        && uncond.len() == 3
        && uncond[1..] == cond[1..]
        && (uncond[0] == 1 || uncond[0] == prompts)
        && x.len() == 4
        && (x[0] == 1 || x[0] == prompts);
    if !fits {
        return Err(Error::Inputs(format!(
            "text embeddings {cond:?} (unconditional {uncond:?}) and latents {x:?} do not fit: expected [P >= 1, tokens, dim], [1 or P, tokens, dim] and [1 or P, channels, height, width]"
        )));
    }
    if let Some(p) = &run.pooled {
        let (c, u) = (p.cond.shape(), p.uncond.shape());
        let fits = c.len() == 2
            && c[0] == prompts
            && u.len() == 2
            && u[1] == c[1]
            && (u[0] == 1 || u[0] == prompts);
        if !fits {
            return Err(Error::Inputs(format!(
                "pooled text embeddings {c:?} (unconditional {u:?}) do not fit {prompts} prompts: expected [{prompts}, dim] and [1 or {prompts}, dim]"
            )));
        }
    }
    Ok(prompts)
}

/// The conds' rows of a captured attention output, checked to be [rows, queries, keys].
fn cond_map(
    name: &str,
    m: &ArrayD<f32>,
    conds: std::ops::Range<usize>,
    rows: usize,
) -> Result<ArrayD<f32>> {
    let shape = m.shape();
    if shape.len() != 3 || shape[0] != rows || shape.contains(&0) {
        return Err(Error::Inputs(format!(
            "the UNet's output '{name}' is {shape:?}, expected attention maps [{rows}, query tokens, text tokens]"
        )));
    }
    Ok(m.slice_axis(Axis(0), conds.into()).to_owned())
}

/// Every hook input's value for step `i` (inputs not named here keep their defaults).
fn hook_values(
    plan: &Plan,
    i: usize,
    hooks: &[String],
    self_gates: &[&String],
) -> Vec<(String, HostTensor)> {
    let scalar = |v: f32| HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), v));
    let mut out = Vec::new();
    for name in hooks {
        let value = if name.ends_with(".alpha") {
            Some(plan.alpha(i))
        } else if name.ends_with(".mapper") {
            plan.mapper.clone()
        } else if name.ends_with(".equalizer") {
            plan.equalizer.clone()
        } else if name.ends_with(".self_gate") {
            Some(scalar(plan.self_gate(i)))
        } else if name.starts_with("masactrl.") {
            let layer = self_gates.iter().position(|g| *g == name).expect("listed");
            Some(scalar(plan.masactrl_gate(i, layer)))
        } else {
            None
        };
        if let Some(v) = value {
            out.push((name.clone(), v));
        }
    }
    out
}

/// The side of a square grid of `tokens` query tokens.
pub fn square_side(tokens: usize) -> Option<usize> {
    let r = (tokens as f64).sqrt().round() as usize;
    (r.checked_mul(r) == Some(tokens)).then_some(r)
}
