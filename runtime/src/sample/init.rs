//! Sampling from an image (img2img) or repainting part of one (inpainting), as diffusers'
//! `StableDiffusionImg2ImgPipeline` and `StableDiffusionInpaintPipeline` do: the strength
//! picks the first step, the encoded image noised to that step's level is where the loop
//! starts, and a mask either feeds a 9-channel inpainting UNet or blends the known part back
//! after every step.
use ndarray::{ArrayD, Axis, concatenate};

use crate::error::{Error, Result};
use crate::scheduler::Scheduler;

/// An image to start from, and what to repaint of it.
pub struct Init {
    /// How much of the schedule runs, in [0, 1] (diffusers: 0.8 for img2img, 1 for inpainting).
    pub strength: f64,
    /// The encoded image [1 or P, C, h, w]: the VAE encoder's mean, (mean − shift)·scale.
    pub image_latents: ArrayD<f32>,
    pub mask: Option<Inpaint>,
}

/// What inpainting adds.
pub struct Inpaint {
    /// [1, 1, h, w] of 0 and 1 at the latents' size (1: repaint).
    pub mask: ArrayD<f32>,
    /// A 9-channel UNet's extra input [1 or P, C, h, w] (the encoded image with the repainted
    /// part black), fed after the mask; `None`: a plain UNet, whose latents are blended with
    /// the noised image after every step instead.
    pub masked_image_latents: Option<ArrayD<f32>>,
}

/// The index of the first step run of `steps` at `strength`, as diffusers' `get_timesteps`
/// computes it: `steps − min(⌊steps·strength⌋, steps)` (Heun's model calls: twice that). A
/// strength outside [0, 1] or one that runs no step is an error (diffusers' inpaint pipeline
/// raises there; its img2img one returns no image).
pub fn first_step(steps: usize, strength: f64) -> Result<usize> {
    if !(0.0..=1.0).contains(&strength) {
        return Err(Error::Inputs(format!(
            "--strength {strength}: must be within [0, 1] (the share of the schedule that runs)"
        )));
    }
    let run = ((steps as f64 * strength).floor() as usize).min(steps);
    if run == 0 {
        return Err(Error::Inputs(format!(
            "--strength {strength} runs int({steps} * {strength}) = 0 of the {steps} steps: nothing to denoise (raise --strength or --steps)"
        )));
    }
    Ok(steps - run)
}

/// `a` [1 or P, ...] as P rows.
pub(super) fn rows(a: &ArrayD<f32>, p: usize, what: &str) -> Result<ArrayD<f32>> {
    match a.shape()[0] {
        n if n == p => Ok(a.clone()),
        1 => concatenate(Axis(0), &vec![a.view(); p])
            .map_err(|e| Error::Inputs(format!("{what}: {e}"))),
        n => Err(Error::Inputs(format!(
            "{what} {:?}: batch {n}, expected 1 or {p}",
            a.shape()
        ))),
    }
}

/// The prepared start: checked shapes, rows per prompt, and the loop's first step.
pub(super) struct Prepared {
    pub start: usize,
    pub image_latents: ArrayD<f32>,
    pub noise: ArrayD<f32>,
    pub mask: Option<ArrayD<f32>>,
    /// Batch rows (CFG doubled) of the 9-channel UNet's extra channels: mask, masked image.
    pub extra: Option<ArrayD<f32>>,
}

impl Init {
    /// Checks the shapes against the noise `noise` [P, C, h, w] and returns the start latents
    /// with what the loop needs; `rows` is the UNet batch (P, or 2P with guidance).
    pub(super) fn prepare(
        &self,
        scheduler: &Scheduler,
        noise: ArrayD<f32>,
        batch_rows: usize,
    ) -> Result<(ArrayD<f32>, Prepared)> {
        let start = scheduler.first_call(first_step(scheduler.steps(), self.strength)?);
        let p = noise.shape()[0];
        let image_latents = rows(&self.image_latents, p, "the image latents")?;
        if image_latents.shape() != noise.shape() {
            return Err(Error::Inputs(format!(
                "the image's latents {:?} and the noise {:?} differ in shape (give --latents of the image's latent size)",
                image_latents.shape(),
                noise.shape()
            )));
        }
        let (h, w) = (noise.shape()[2], noise.shape()[3]);
        let (mask, extra) = match &self.mask {
            None => (None, None),
            Some(m) => {
                if m.mask.shape() != [1, 1, h, w] {
                    return Err(Error::Inputs(format!(
                        "the mask {:?} is not [1, 1, {h}, {w}] (the latents' size)",
                        m.mask.shape()
                    )));
                }
                let extra = match &m.masked_image_latents {
                    None => None,
                    Some(masked) => {
                        let masked = rows(masked, batch_rows, "the masked image's latents")?;
                        if masked.shape()[2..] != [h, w] {
                            return Err(Error::Inputs(format!(
                                "the masked image's latents {:?} are not {h}x{w} (the latents' size)",
                                masked.shape()
                            )));
                        }
                        let mask = rows(&m.mask, batch_rows, "the mask")?;
                        Some(
                            concatenate(Axis(1), &[mask.view(), masked.view()])
                                .expect("same rows and size"),
                        )
                    }
                };
                (Some(m.mask.clone()), extra)
            }
        };
        // Inpainting at full strength starts from pure noise, as txt2img does (diffusers'
        // `is_strength_max`); otherwise from the image noised to the first step's level,
        // without `init_noise_sigma`.
        let x = if self.mask.is_some() && self.strength == 1.0 {
            noise.mapv(|v| v * scheduler.init_noise_sigma())
        } else {
            scheduler.add_noise(start, &image_latents, &noise)
        };
        Ok((
            x,
            Prepared {
                start,
                image_latents,
                noise,
                mask,
                extra,
            },
        ))
    }
}

impl Prepared {
    /// A plain UNet's inpainting after step `i` (of `n`): the known part replaced by the image
    /// noised to the next step's level (the image itself after the last step).
    pub(super) fn blend(
        &self,
        scheduler: &Scheduler,
        i: usize,
        n: usize,
        x: ArrayD<f32>,
    ) -> ArrayD<f32> {
        let (Some(mask), None) = (&self.mask, &self.extra) else {
            return x;
        };
        let known = if i + 1 < n {
            scheduler.add_noise(i + 1, &self.image_latents, &self.noise)
        } else {
            self.image_latents.clone()
        };
        // mask [1, 1, h, w] broadcasts over rows and channels.
        let mask = mask
            .broadcast(x.raw_dim())
            .expect("the mask was checked to be [1, 1, h, w]");
        ndarray::Zip::from(&x)
            .and(&known)
            .and(&mask)
            .map_collect(|&x, &k, &m| (1.0 - m) * k + m * x)
    }

    /// The UNet's input at a step: the scaled latents, then a 9-channel UNet's mask and
    /// masked-image latents.
    pub(super) fn unet_input(&self, sample: ArrayD<f32>) -> ArrayD<f32> {
        match &self.extra {
            Some(extra) => {
                concatenate(Axis(1), &[sample.view(), extra.view()]).expect("rows and size checked")
            }
            None => sample,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_picks_the_first_step_as_diffusers() {
        // get_timesteps: 4 steps at 0.75 run the last 3; 0.8 of 50 runs 40.
        assert_eq!(first_step(4, 0.75).unwrap(), 1);
        assert_eq!(first_step(50, 0.8).unwrap(), 10);
        assert_eq!(first_step(4, 1.0).unwrap(), 0);
        assert!(
            first_step(4, 0.2)
                .unwrap_err()
                .to_string()
                .contains("0 of the 4")
        );
        assert!(first_step(4, 0.0).is_err());
        for s in [-0.1, 1.5, f64::NAN] {
            let e = first_step(4, s).unwrap_err().to_string();
            assert!(e.contains("within [0, 1]"), "{e}");
        }
    }
}
