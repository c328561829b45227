//! A sampling loop for compiled UNets: DDIM (diffusers' formulae; scaled-linear betas
//! 0.00085-0.012 over 1000 training steps, `leading` spacing with steps_offset 1, eta 0,
//! alpha_prev of the last step = ᾱ₀) with classifier-free guidance, feeding attention-control
//! hooks every step from a controller and applying LocalBlend between steps.
use std::collections::BTreeMap;

use ndarray::{ArrayD, Axis, IxDyn, concatenate, s};

use crate::backend::Backend;
use crate::controller::Plan;
use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor};

pub struct Ddim {
    alphas_cumprod: Vec<f64>,
    pub timesteps: Vec<usize>,
    step_ratio: usize,
}

impl Ddim {
    pub fn new(steps: usize) -> Result<Ddim> {
        const TRAIN: usize = 1000;
        if steps == 0 || steps > TRAIN {
            return Err(Error::Inputs(format!(
                "--steps {steps}: must be within 1..={TRAIN}"
            )));
        }
        let (b0, b1) = (0.00085f64.sqrt(), 0.012f64.sqrt());
        let mut acc = 1.0;
        let alphas_cumprod = (0..TRAIN)
            .map(|i| {
                let beta = (b0 + (b1 - b0) * i as f64 / (TRAIN - 1) as f64).powi(2);
                acc *= 1.0 - beta;
                acc
            })
            .collect();
        let step_ratio = TRAIN / steps;
        let timesteps = (0..steps).rev().map(|i| i * step_ratio + 1).collect();
        Ok(Ddim {
            alphas_cumprod,
            timesteps,
            step_ratio,
        })
    }

    /// x_{t-1} from x_t and the predicted noise (eta = 0).
    pub fn step(&self, eps: &ArrayD<f32>, t: usize, x: &ArrayD<f32>) -> ArrayD<f32> {
        let a_t = self.alphas_cumprod[t];
        let a_prev = t
            .checked_sub(self.step_ratio)
            .map(|p| self.alphas_cumprod[p])
            .unwrap_or(self.alphas_cumprod[0]);
        let (sa, s1a) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let (sp, s1p) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
        ndarray::Zip::from(x).and(eps).map_collect(|&x, &e| {
            let x0 = (x as f64 - s1a * e as f64) / sa;
            (sp * x0 + s1p * e as f64) as f32
        })
    }
}

/// What a run takes besides the UNet.
pub struct SampleRun<'a> {
    pub cond: &'a ArrayD<f32>,
    pub uncond: &'a ArrayD<f32>,
    pub latents: ArrayD<f32>,
    pub guidance: f32,
    pub ddim: Ddim,
    pub plan: Option<Plan>,
    /// The UNet's hook inputs in call order: (input name, kind).
    pub hooks: Vec<String>,
    /// Declared element type of every UNet input (an fp16 UNet takes fp16 latents, text
    /// embeddings and hook values); inputs not listed are fed as f32.
    pub input_dtypes: BTreeMap<String, DType>,
    pub timestep: TimestepForm,
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
pub fn sample(unet: &mut Backend, run: SampleRun) -> Result<(ArrayD<f32>, Maps)> {
    let prompts = prompt_count(&run)?;
    let mut x = run.latents;
    if x.shape()[0] == 1 && prompts > 1 {
        x = concatenate(Axis(0), &vec![x.view(); prompts])
            .map_err(|e| Error::Inputs(format!("latents: {e}")))?;
    }
    let uncond = if run.uncond.shape()[0] == 1 {
        concatenate(Axis(0), &vec![run.uncond.view(); prompts])
            .map_err(|e| Error::Inputs(format!("unconditional embeddings: {e}")))?
    } else {
        run.uncond.clone()
    };
    let context = concatenate(Axis(0), &[uncond.view(), run.cond.view()])
        .map_err(|e| Error::Inputs(format!("text embeddings: {e}")))?;
    let mut maps = Maps::default();
    let self_gates: Vec<&String> = run
        .hooks
        .iter()
        .filter(|h| h.starts_with("masactrl."))
        .collect();
    for (i, &t) in run.ddim.timesteps.iter().enumerate() {
        let sample = concatenate(Axis(0), &[x.view(), x.view()]).expect("same shapes");
        let shape: &[usize] = match run.timestep {
            TimestepForm::PerRow => &[2 * prompts],
            TimestepForm::One => &[1],
            TimestepForm::Scalar => &[],
        };
        let steps = ArrayD::from_elem(IxDyn(shape), t as f32);
        let timestep = match run.input_dtypes.get("timestep") {
            Some(DType::I64) => HostTensor::I64(steps.mapv(|v| v as i64)),
            Some(DType::I32) => HostTensor::I32(steps.mapv(|v| v as i32)),
            _ => HostTensor::F32(steps),
        };
        let mut inputs = vec![
            ("sample".to_string(), HostTensor::F32(sample)),
            ("timestep".to_string(), timestep),
            (
                "encoder_hidden_states".to_string(),
                HostTensor::F32(context.clone()),
            ),
        ];
        if let Some(plan) = &run.plan {
            inputs.extend(hook_values(plan, i, &run.hooks, &self_gates));
        }
        let inputs = inputs
            .into_iter()
            .map(|(n, t)| {
                let t = as_declared(&n, t, &run.input_dtypes)?;
                Ok((n, t))
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs = unet.run(&inputs)?;
        let Some(eps) = outputs
            .iter()
            .find(|(n, _)| n == "out_sample")
            .or_else(|| outputs.first())
            .and_then(|(_, t)| output_f32(t))
        else {
            return Err(Error::Inputs(
                "the UNet's first output is not float noise".into(),
            ));
        };
        let noise_shape: Vec<usize> = [2 * prompts]
            .into_iter()
            .chain(x.shape()[1..].iter().copied())
            .collect();
        if eps.shape() != noise_shape {
            return Err(Error::Inputs(format!(
                "the UNet's noise output is {:?}, expected {noise_shape:?} (the batched sample's shape)",
                eps.shape()
            )));
        }
        let (eu, ec) = (
            eps.slice_axis(Axis(0), (0..prompts).into()),
            eps.slice_axis(Axis(0), (prompts..2 * prompts).into()),
        );
        let guided = &eu + &((&ec - &eu) * run.guidance);
        x = run.ddim.step(&guided.into_dyn(), t, &x);
        for (name, t) in &outputs {
            if let (Some(path), Some(m)) = (name.strip_prefix("attn."), output_f32(t)) {
                let cond = cond_map(name, &m, prompts)?;
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
            x = local_blend(&x, &maps, lb, prompts)?;
        }
    }
    Ok((x, maps))
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
    Ok(prompts)
}

/// The cond half of a captured attention output, checked to be [2P, queries, keys].
fn cond_map(name: &str, m: &ArrayD<f32>, prompts: usize) -> Result<ArrayD<f32>> {
    let shape = m.shape();
    if shape.len() != 3 || shape[0] != 2 * prompts || shape.contains(&0) {
        return Err(Error::Inputs(format!(
            "the UNet's output '{name}' is {shape:?}, expected attention maps [{}, query tokens, text tokens]",
            2 * prompts
        )));
    }
    let cond_half = m.slice_axis(Axis(0), (prompts..2 * prompts).into());
    Ok(cond_half.to_owned())
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

/// P2P's LocalBlend: a mask from the accumulated cross maps (at the chosen resolution) of
/// each prompt's words, max-pooled 3x3, upsampled (nearest), normalised by its max and
/// thresholded; outside the union of the source's and each edit's mask the edits take the
/// source's latents.
fn local_blend(
    x: &ArrayD<f32>,
    maps: &Maps,
    lb: &crate::controller::LocalBlend,
    prompts: usize,
) -> Result<ArrayD<f32>> {
    if lb.words.len() != prompts {
        return Err(Error::Inputs(format!(
            "local_blend: words lists {} prompts, the run has {prompts}",
            lb.words.len()
        )));
    }
    let res = lb.resolution;
    let tokens = res.checked_mul(res);
    // Maps are [P, query tokens, text tokens] with no zero dims (see `cond_map`).
    let layers: Vec<&ArrayD<f32>> = maps
        .sum
        .values()
        .filter(|m| Some(m.shape()[1]) == tokens)
        .collect();
    if layers.is_empty() {
        let have: Vec<String> = maps
            .sum
            .values()
            .map(|m| {
                square_side(m.shape()[1])
                    .map_or(format!("{} tokens", m.shape()[1]), |r| r.to_string())
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        return Err(Error::Inputs(if have.is_empty() {
            "[local_blend]: the UNet output no cross-attention maps (compile with --hooks capture)"
                .to_string()
        } else {
            format!(
                "[local_blend] resolution = {res}: no captured cross-attention maps have {res}x{res} query tokens (the UNet's maps have resolutions {})",
                have.join(", ")
            )
        }));
    }
    let words = layers[0].shape()[2];
    let (h, w) = (x.shape()[2], x.shape()[3]);
    let mut masks = Vec::new();
    for p in 0..prompts {
        // Mean over layers of the words' summed maps.
        let mut m = vec![0f32; res * res];
        for layer in &layers {
            for q in 0..res * res {
                m[q] += lb.words[p]
                    .iter()
                    .map(|&wi| layer[[p, q, wi.min(words - 1)]])
                    .sum::<f32>()
                    / layers.len() as f32;
            }
        }
        // 3x3 max pool, stride 1, padding 1.
        let pooled: Vec<f32> = (0..res * res)
            .map(|q| {
                let (r, c) = ((q / res) as isize, (q % res) as isize);
                let mut best = f32::NEG_INFINITY;
                for dr in -1..=1 {
                    for dc in -1..=1 {
                        let (rr, cc) = (r + dr, c + dc);
                        if rr >= 0 && cc >= 0 && (rr as usize) < res && (cc as usize) < res {
                            best = best.max(m[rr as usize * res + cc as usize]);
                        }
                    }
                }
                best
            })
            .collect();
        // Nearest upsampling to the latent size, normalised by the max.
        let up: Vec<f32> = (0..h * w)
            .map(|i| pooled[(i / w) * res / h * res + (i % w) * res / w])
            .collect();
        let max = up.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        masks.push(
            up.iter()
                .map(|v| v / max > lb.threshold)
                .collect::<Vec<bool>>(),
        );
    }
    let mut out = x.clone();
    let source = x.slice(s![0..1, .., .., ..]).to_owned();
    for p in 1..prompts {
        for c in 0..x.shape()[1] {
            for (i, (&in_source, &in_edit)) in masks[0].iter().zip(&masks[p]).enumerate() {
                let keep = in_source || in_edit;
                let (r, col) = (i / w, i % w);
                let src = source[[0, c, r, col]];
                out[[p, c, r, col]] = src + if keep { x[[p, c, r, col]] - src } else { 0.0 };
            }
        }
    }
    Ok(out)
}
