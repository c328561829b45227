//! ControlNet, as diffusers' StableDiffusionControlNetPipeline runs it: every step, before the
//! denoiser, each ControlNet reads the denoiser's latents, timestep and text with its control
//! image; its residuals, scaled, summed over the ControlNets, are the denoiser's
//! `down_block_{i}_additional_residual` and `mid_block_additional_residual` inputs. Outside a
//! ControlNet's [start, end) share of the steps its scale is 0, so it is not run.
use std::collections::BTreeMap;

use ndarray::{ArrayD, Axis, IxDyn, concatenate};

use super::{TimestepForm, as_declared, output_f32, timestep_value};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor};

pub use attune_compiler::controlnet_io::{
    IMAGE_INPUT, MERGED_SCALE, MID, SCALE_INPUT, is_residual,
};

/// One ControlNet with its control image and schedule.
pub struct ControlNet {
    /// How errors name it (its path).
    pub name: String,
    pub net: Backend,
    /// `[1, 3, H, W]` in [0, 1], at the output image's size.
    pub image: ArrayD<f32>,
    pub schedule: Schedule,
    /// Declared element type of each input.
    pub input_dtypes: BTreeMap<String, DType>,
    pub timestep: TimestepForm,
}

/// A ControlNet's conditioning scale and the share of the steps it acts on (diffusers'
/// `controlnet_conditioning_scale`, `control_guidance_start` / `_end`).
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub scale: f32,
    pub start: f64,
    pub end: f64,
}

impl Default for Schedule {
    /// diffusers' defaults: scale 1 on every step.
    fn default() -> Schedule {
        Schedule {
            scale: 1.0,
            start: 0.0,
            end: 1.0,
        }
    }
}

impl Schedule {
    /// The scale at step `i` of `n`: diffusers' `1 - (i/n < start or (i+1)/n > end)` times
    /// the conditioning scale.
    pub fn scale_at(&self, i: usize, n: usize) -> f32 {
        let outside = (i as f64 / n as f64) < self.start || ((i + 1) as f64 / n as f64) > self.end;
        if outside { 0.0 } else { self.scale }
    }
}

/// A ControlNet merged into the denoiser (`compile --merge-controlnet`): its control image
/// and schedule, fed as the `controlnet_cond` and `controlnet_scale` inputs.
pub struct Merged {
    /// `[1, 3, H, W]` in [0, 1], at the output image's size.
    pub image: ArrayD<f32>,
    pub schedule: Schedule,
}

impl Merged {
    /// The inputs at step `i` of `n` for a batch of `rows`.
    pub(super) fn inputs(
        &self,
        i: usize,
        n: usize,
        rows: usize,
    ) -> Result<Vec<(String, HostTensor)>> {
        let image = concatenate(Axis(0), &vec![self.image.view(); rows])
            .map_err(|e| Error::Inputs(format!("control image: {e}")))?;
        let scale = ArrayD::from_elem(IxDyn(&[]), self.schedule.scale_at(i, n));
        Ok(vec![
            (IMAGE_INPUT.to_string(), HostTensor::F32(image)),
            (MERGED_SCALE.to_string(), HostTensor::F32(scale)),
        ])
    }
}

/// A denoiser residual input: its name, element type and zeros that broadcast to any
/// residual of it (fixed dims as declared, symbolic ones 1: the residual is only added).
pub struct Residual {
    pub name: String,
    pub zeros: HostTensor,
}

impl Residual {
    pub fn new(name: &str, dims: &[Option<usize>], dtype: Option<DType>) -> Result<Residual> {
        let shape: Vec<usize> = dims.iter().map(|d| d.unwrap_or(1)).collect();
        let zeros = HostTensor::F32(ArrayD::zeros(IxDyn(&shape)));
        let zeros = match dtype {
            Some(d) if d != DType::F32 => zeros.float_as(d).ok_or_else(|| Error::Input {
                input: name.into(),
                msg: format!("declared {}: not a float residual", d.name()),
            })?,
            _ => zeros,
        };
        Ok(Residual {
            name: name.into(),
            zeros,
        })
    }
}

/// What every ControlNet reads at one step besides its image.
pub(super) struct Step<'a> {
    pub i: usize,
    pub n: usize,
    pub t: f64,
    pub scheduler: &'static str,
    pub rows: usize,
    pub sample: &'a ArrayD<f32>,
    /// The denoiser's inputs that stay the same every step (text embeddings, SDXL's pooled
    /// text and time ids): a ControlNet reads those it declares.
    pub fixed: &'a [(String, HostTensor)],
}

/// The denoiser's residual inputs at one step, in its declared types: the ControlNets'
/// scaled residuals summed, zeros where none acts.
pub(super) fn residuals(
    controls: &mut [ControlNet],
    wanted: &[Residual],
    dtypes: &BTreeMap<String, DType>,
    step: &Step,
) -> Result<Vec<(String, HostTensor)>> {
    let mut sums: Vec<Option<ArrayD<f32>>> = vec![None; wanted.len()];
    for c in controls.iter_mut() {
        let scale = c.schedule.scale_at(step.i, step.n);
        if scale == 0.0 {
            continue;
        }
        let image = concatenate(Axis(0), &vec![c.image.view(); step.rows])
            .map_err(|e| Error::Inputs(format!("control image: {e}")))?;
        let scaled_inside = c.input_dtypes.contains_key(SCALE_INPUT);
        let mut inputs = vec![
            (
                "timestep".to_string(),
                timestep_value(
                    c.timestep,
                    &c.input_dtypes,
                    step.t,
                    step.rows,
                    step.i,
                    step.scheduler,
                )?,
            ),
            ("sample".to_string(), HostTensor::F32(step.sample.clone())),
            (IMAGE_INPUT.to_string(), HostTensor::F32(image)),
        ];
        for (name, t) in step.fixed {
            if let (true, Some(t)) = (c.input_dtypes.contains_key(name), output_f32(t)) {
                inputs.push((name.clone(), HostTensor::F32(t.into_owned())));
            }
        }
        if scaled_inside {
            inputs.push((
                SCALE_INPUT.to_string(),
                HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), scale)),
            ));
        }
        let inputs = inputs
            .into_iter()
            .map(|(n, t)| Ok((n.clone(), as_declared(&n, t, &c.input_dtypes)?)))
            .collect::<Result<Vec<_>>>()?;
        let outputs = c.net.run(&inputs)?;
        for (k, r) in wanted.iter().enumerate() {
            let Some(out) = outputs.iter().find(|(n, _)| *n == r.name) else {
                return Err(Error::Inputs(format!(
                    "ControlNet {}: no output '{}' for the denoiser's residual input (it outputs {})",
                    c.name,
                    r.name,
                    outputs
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            let Some(mut v) = output_f32(&out.1).map(|v| v.into_owned()) else {
                return Err(Error::Inputs(format!(
                    "ControlNet {}: output '{}' is not float",
                    c.name, r.name
                )));
            };
            if !scaled_inside {
                v.mapv_inplace(|x| x * scale);
            }
            fits(&c.name, &r.name, &v, &r.zeros, step.rows)?;
            match &mut sums[k] {
                Some(acc) if acc.shape() == v.shape() => *acc += &v,
                Some(acc) => {
                    return Err(Error::Inputs(format!(
                        "ControlNet {}: residual '{}' is {:?}, another ControlNet's {:?}",
                        c.name,
                        r.name,
                        v.shape(),
                        acc.shape()
                    )));
                }
                slot => *slot = Some(v),
            }
        }
    }
    wanted
        .iter()
        .zip(sums)
        .map(|(r, sum)| match sum {
            Some(s) => Ok((
                r.name.clone(),
                as_declared(&r.name, HostTensor::F32(s), dtypes)?,
            )),
            None => Ok((r.name.clone(), r.zeros.clone())),
        })
        .collect()
}

/// A residual fits the denoiser's input: its rank, the batch, and every dim the denoiser
/// declares fixed (the zeros hold those).
fn fits(net: &str, name: &str, v: &ArrayD<f32>, zeros: &HostTensor, rows: usize) -> Result<()> {
    let declared = zeros.shape();
    let ok = v.ndim() == declared.len()
        && v.shape().first() == Some(&rows)
        && v.shape()
            .iter()
            .zip(declared)
            .skip(1)
            .all(|(got, want)| *want == 1 || got == want);
    if ok {
        return Ok(());
    }
    Err(Error::Inputs(format!(
        "ControlNet {net}: residual '{name}' is {:?}, which does not fit the denoiser's input (batch {rows}, declared {:?}, 1 = any)",
        v.shape(),
        declared
    )))
}
