//! Latent consistency sampling, as diffusers' `LCMScheduler` steps it (LCM-distilled UNets and
//! LCM-LoRA): each step predicts the clean latents through the consistency model's boundary
//! scalings and noises them afresh to the next timestep, which is picked from the distillation's
//! `original_inference_steps` skipping schedule. `TCDScheduler` (trajectory consistency
//! distillation) picks its timesteps the same way and moves to an intermediate timestep
//! s = ⌊(1 − γ)·t_prev⌋ along the predicted noise before noising on to t_prev.
use ndarray::{ArrayD, Zip};

use super::Noise;
use super::ddim::{DdimConfig, forward};

#[derive(Clone, Debug, PartialEq)]
pub struct LcmConfig {
    /// The training schedule: betas, prediction, final ᾱ, clipping (its spacing is unused).
    pub schedule: DdimConfig,
    /// The distillation's step count, whose timesteps the inference ones are picked from.
    pub original_steps: usize,
    /// The boundary condition's timestep scale (LCM's).
    pub timestep_scaling: f64,
    /// TCD's steps instead of LCM's.
    pub tcd: bool,
}

pub struct Lcm {
    config: LcmConfig,
    /// TCD's γ (the pipeline's `eta`): the stochastic share of each step.
    pub(super) gamma: f64,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<usize>,
}

impl Lcm {
    pub fn new(config: LcmConfig, steps: usize) -> Result<Lcm, String> {
        let train = config.schedule.train_steps;
        let original = config.original_steps;
        if original == 0 || original > train {
            return Err(format!(
                "original_inference_steps {original}: must be within 1..={train} (the training steps)"
            ));
        }
        if steps == 0 || steps > original {
            return Err(format!(
                "--steps {steps}: LCM picks its steps from the distillation's original_inference_steps ({original}), so they must be within 1..={original}"
            ));
        }
        let k = train / original;
        // The distillation's timesteps, descending, and `steps` of them evenly by index.
        let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
        let timesteps = (0..steps)
            .map(|i| origin[(i as f64 * original as f64 / steps as f64).floor() as usize])
            .collect();
        Ok(Lcm {
            gamma: 0.0,
            alphas_cumprod: config.schedule.alphas_cumprod(),
            config,
            timesteps,
        })
    }

    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// Noise draws from step `from` on: one per step but the last (TCD's: none at γ = 0).
    pub fn draws(&self, from: usize) -> usize {
        if self.config.tcd && self.gamma == 0.0 {
            return 0;
        }
        self.timesteps.len().saturating_sub(from + 1)
    }

    /// x₀ noised to step `i`'s timestep (DDPM's forward process).
    pub fn add_noise(&self, i: usize, x0: &ArrayD<f32>, noise: &ArrayD<f32>) -> ArrayD<f32> {
        forward(self.alphas_cumprod[self.timesteps[i]], x0, noise)
    }

    pub fn step(
        &mut self,
        i: usize,
        out: &ArrayD<f32>,
        x: &ArrayD<f32>,
        noise: &mut Noise,
    ) -> Result<ArrayD<f32>, String> {
        if self.config.tcd {
            return self.tcd_step(i, out, x, noise);
        }
        let t = self.timesteps[i];
        let a = self.alphas_cumprod[t];
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        // c_skip, c_out of the boundary condition at σ_data = 0.5.
        let scaled = t as f64 * self.config.timestep_scaling;
        let c_skip = 0.25 / (scaled * scaled + 0.25);
        let c_out = scaled / (scaled * scaled + 0.25).sqrt();
        let (prediction, clip) = (
            self.config.schedule.prediction,
            self.config.schedule.clip_sample,
        );
        let denoised = Zip::from(x).and(out).map_collect(|&x, &o| {
            let (x, o) = (x as f64, o as f64);
            let x0 = prediction.split(x, o, sa, sb).0;
            let x0 = clip.map_or(x0, |r| x0.clamp(-r, r));
            (c_out * x0 + c_skip * x) as f32
        });
        let Some(&prev) = self.timesteps.get(i + 1) else {
            return Ok(denoised);
        };
        let ap = self.alphas_cumprod[prev];
        let (sp, sbp) = (ap.sqrt(), (1.0 - ap).sqrt());
        let eps = noise.draw(x.shape())?;
        Ok(Zip::from(&denoised)
            .and(&eps)
            .map_collect(|&d, &e| (sp * d as f64 + sbp * e as f64) as f32))
    }
}

impl Lcm {
    /// TCD's step: x̂₀ and ε̂ moved to s = ⌊(1 − γ)·t_prev⌋, then noised to t_prev with fresh noise
    /// of the remaining variance (none after the last step, or at γ = 0).
    fn tcd_step(
        &mut self,
        i: usize,
        out: &ArrayD<f32>,
        x: &ArrayD<f32>,
        noise: &mut Noise,
    ) -> Result<ArrayD<f32>, String> {
        let t = self.timesteps[i];
        let prev = self.timesteps.get(i + 1).copied().unwrap_or(0);
        let s = ((1.0 - self.gamma) * prev as f64).floor() as usize;
        let a = self.alphas_cumprod[t];
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        let a_s = self.alphas_cumprod[s];
        let (ss, ssb) = (a_s.sqrt(), (1.0 - a_s).sqrt());
        let prediction = self.config.schedule.prediction;
        let noised = Zip::from(x).and(out).map_collect(|&x, &o| {
            let (x0, eps) = prediction.split(x as f64, o as f64, sa, sb);
            (ss * x0 + ssb * eps) as f32
        });
        if self.gamma == 0.0 || i + 1 == self.timesteps.len() {
            return Ok(noised);
        }
        let ratio = self.alphas_cumprod[prev] / a_s;
        let (keep, fresh) = (ratio.sqrt(), (1.0 - ratio).sqrt());
        let eps = noise.draw(x.shape())?;
        Ok(Zip::from(&noised)
            .and(&eps)
            .map_collect(|&n, &e| (keep * n as f64 + fresh * e as f64) as f32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lcm_timesteps_are_diffusers() {
        // LCMScheduler (original_inference_steps 50), set_timesteps(4): [999, 759, 499, 259].
        let config = LcmConfig {
            schedule: DdimConfig::stable_diffusion(),
            original_steps: 50,
            timestep_scaling: 10.0,
            tcd: false,
        };
        assert_eq!(
            Lcm::new(config, 4).unwrap().timesteps(),
            [999, 759, 499, 259]
        );
    }
}
