//! Steps over the noise levels σ = √((1−ᾱ)/ᾱ) of a DDPM-trained model, as diffusers'
//! `EulerDiscreteScheduler` (SDXL's default; no churn), `EulerAncestralDiscreteScheduler`,
//! `HeunDiscreteScheduler` and `DPMSolverSDEScheduler` take them: the model is fed
//! x/√(σ²+1), x moves along d = (x − x̂₀)/σ. Ancestral steps go down to σ_down and add fresh
//! noise of σ_up; Heun's evaluate the model again at the step's end and average the two
//! slopes; DPM++ SDE's take an ancestral half step in log σ, evaluate the model there and redo
//! the step from its x̂₀, with Brownian noise over both intervals.
use ndarray::{ArrayD, Zip};

use super::Noise;
use super::ddim::{DdimConfig, Prediction, Spacing, spaced_timesteps};
use super::sigmas::{self, SigmaSpacing};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Euler,
    Ancestral,
    Heun,
    /// DPM++ SDE (`DPMSolverSDEScheduler`): second order, stochastic.
    DpmSde,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EulerConfig {
    /// The training schedule (DDIM's own keys do not apply).
    pub schedule: DdimConfig,
    pub variant: Variant,
    pub sigmas: SigmaSpacing,
    /// The σ after the last step: the smallest training σ, else 0 (Euler's `final_sigmas_type`).
    pub final_sigma_min: bool,
    /// Clamp x̂₀ to ±this (Heun's `clip_sample`).
    pub clip_sample: Option<f64>,
}

impl EulerConfig {
    pub fn new(schedule: DdimConfig, variant: Variant) -> EulerConfig {
        EulerConfig {
            schedule,
            variant,
            sigmas: SigmaSpacing::Timesteps,
            final_sigma_min: false,
            clip_sample: None,
        }
    }
}

pub struct Euler {
    variant: Variant,
    /// The model's timestep per call (not rounded; Heun's repeated for its second call).
    timesteps: Vec<f64>,
    /// One per call and a final one (Heun's: σ₀, σ₁, σ₁, σ₂, σ₂, …, 0).
    sigmas: Vec<f64>,
    /// The σ the model's input is scaled by at each call (DPM++ SDE's second: the midpoint's).
    input_sigmas: Vec<f64>,
    prediction: Prediction,
    clip_sample: Option<f64>,
    init_noise_sigma: f64,
    /// Heun's first evaluation: its slope, step and start (DPM++ SDE's: the start, and the
    /// seeded draw over the first interval).
    first: Option<(ArrayD<f32>, f32, ArrayD<f32>)>,
}

/// DPM++ SDE's midpoint in t = −log σ between σ and σ_next.
fn midpoint(sigma: f64, next: f64) -> f64 {
    (-(0.5 * (-sigma.ln() + -next.ln()))).exp()
}

impl Euler {
    pub fn new(config: &EulerConfig, steps: usize) -> Result<Euler, String> {
        let c = &config.schedule;
        let train = c.train_steps;
        // np.linspace in f32, unrounded.
        let mut timesteps: Vec<f64> = spaced_timesteps(c, steps)?
            .into_iter()
            .map(|t| t as f32 as f64)
            .collect();
        let mut alphas = c.alphas_cumprod();
        if c.zero_terminal_snr {
            // As diffusers: ᾱ = 0 would make σ infinite.
            alphas[train - 1] = 2f64.powi(-24);
        }
        let train_sigmas = sigmas::training_sigmas(&alphas);
        let mut sigmas = sigmas::interpolate(&train_sigmas, &timesteps);
        if config.sigmas != SigmaSpacing::Timesteps {
            let (max, min) = (sigmas[0], sigmas[sigmas.len() - 1]);
            sigmas = sigmas::spaced(config.sigmas, max, min, steps);
            timesteps = sigmas
                .iter()
                .map(|&s| sigmas::sigma_to_t(s, &train_sigmas) as f32 as f64)
                .collect();
        }
        let mut sigmas: Vec<f64> = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        let max = sigmas.iter().cloned().fold(0.0, f64::max);
        let init_noise_sigma = match c.spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        };
        sigmas.push(if config.final_sigma_min {
            train_sigmas[0]
        } else {
            0.0
        });
        let mut input_sigmas = sigmas[..sigmas.len() - 1].to_vec();
        if matches!(config.variant, Variant::Heun | Variant::DpmSde) {
            // Each σ but the first and the final 0 twice: the second call ends the step there.
            let last = sigmas.len() - 1;
            let doubled: Vec<f64> = std::iter::once(sigmas[0])
                .chain(sigmas[1..last].iter().flat_map(|&s| [s, s]))
                .chain([sigmas[last]])
                .collect();
            timesteps = std::iter::once(timesteps[0])
                .chain(timesteps[1..].iter().flat_map(|&t| [t, t]))
                .collect();
            input_sigmas = doubled[..doubled.len() - 1].to_vec();
            if config.variant == Variant::DpmSde {
                // The second call of a step is at the midpoint: its σ and timestep.
                for k in 0..last - 1 {
                    let mid = midpoint(sigmas[k], sigmas[k + 1]);
                    input_sigmas[2 * k + 1] = mid as f32 as f64;
                    timesteps[2 * k + 1] = sigmas::sigma_to_t(mid, &train_sigmas);
                }
            }
            sigmas = doubled;
        }
        if config.variant != Variant::Heun && c.prediction == Prediction::Sample {
            return Err(
                "prediction_type sample: diffusers' Euler schedulers do not implement it".into(),
            );
        }
        Ok(Euler {
            variant: config.variant,
            timesteps,
            sigmas,
            input_sigmas,
            prediction: c.prediction,
            clip_sample: config.clip_sample,
            init_noise_sigma,
            first: None,
        })
    }

    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// Model calls per step: Heun's and DPM++ SDE's 2.
    pub fn order(&self) -> usize {
        match self.variant {
            Variant::Heun | Variant::DpmSde => 2,
            _ => 1,
        }
    }

    /// The initial noise's standard deviation: unit noise is scaled by it.
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    /// Noise draws from call `from` on: the ancestral sampler's one per step, DPM++ SDE's one
    /// per call but the last.
    pub fn draws(&self, from: usize) -> usize {
        match self.variant {
            Variant::Ancestral => self.timesteps.len().saturating_sub(from),
            Variant::DpmSde => self.timesteps.len().saturating_sub(from + 1),
            _ => 0,
        }
    }

    /// x₀ noised to call `i`'s level: x₀ + σ_i·ε (`add_noise` at that step index).
    pub fn add_noise(&self, i: usize, x0: &ArrayD<f32>, noise: &ArrayD<f32>) -> ArrayD<f32> {
        let s = self.sigmas[i] as f32;
        Zip::from(x0).and(noise).map_collect(|&x, &e| x + e * s)
    }

    /// What the model is fed at call `i`: x/√(σ²+1).
    pub fn scale_input(&self, i: usize, x: &ArrayD<f32>) -> ArrayD<f32> {
        let s = self.input_sigmas[i] as f32;
        let scale = (s * s + 1.0).sqrt();
        x.mapv(|v| v / scale)
    }

    /// x̂₀ from the model's output at noise level σ.
    fn denoised(&self, sigma: f32, out: &ArrayD<f32>, x: &ArrayD<f32>) -> ArrayD<f32> {
        let prediction = self.prediction;
        let clip = self.clip_sample.map(|r| r as f32);
        Zip::from(x).and(out).map_collect(|&x, &o| {
            let x0 = match prediction {
                Prediction::Epsilon => x - sigma * o,
                Prediction::V => {
                    o * (-sigma / (sigma * sigma + 1.0).sqrt()) + x / (sigma * sigma + 1.0)
                }
                Prediction::Sample => o,
            };
            clip.map_or(x0, |r| x0.clamp(-r, r))
        })
    }

    pub fn step(
        &mut self,
        i: usize,
        out: &ArrayD<f32>,
        x: &ArrayD<f32>,
        noise: &mut Noise,
    ) -> Result<ArrayD<f32>, String> {
        let (sigma, next) = (self.sigmas[i] as f32, self.sigmas[i + 1] as f32);
        match self.variant {
            Variant::Euler => {
                let x0 = self.denoised(sigma, out, x);
                Ok(Zip::from(x)
                    .and(&x0)
                    .map_collect(|&x, &x0| x + (x - x0) / sigma * (next - sigma)))
            }
            Variant::Ancestral => {
                let x0 = self.denoised(sigma, out, x);
                let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
                let down = (next * next - up * up).sqrt();
                let eps = noise.draw(x.shape())?;
                Ok(Zip::from(x)
                    .and(&x0)
                    .and(&eps)
                    .map_collect(|&x, &x0, &e| x + (x - x0) / sigma * (down - sigma) + e * up))
            }
            Variant::DpmSde => self.dpm_sde(i, out, x, noise),
            Variant::Heun => Ok(match self.first.take() {
                None => {
                    let x0 = self.denoised(sigma, out, x);
                    let slope = Zip::from(x)
                        .and(&x0)
                        .map_collect(|&x, &x0| (x - x0) / sigma);
                    let dt = next - sigma;
                    let end = Zip::from(x).and(&slope).map_collect(|&x, &d| x + d * dt);
                    // The last step (to σ = 0) has no second call.
                    if i + 1 < self.timesteps.len() {
                        self.first = Some((slope, dt, x.clone()));
                    }
                    end
                }
                Some((slope, dt, start)) => {
                    // Called at the step's end, σ_i: average the two slopes from the start.
                    let x0 = self.denoised(sigma, out, x);
                    Zip::from(&start)
                        .and(&slope)
                        .and(x)
                        .and(&x0)
                        .map_collect(|&s, &d0, &x, &x0| s + (d0 + (x - x0) / sigma) / 2.0 * dt)
                }
            }),
        }
    }

    /// DPM++ SDE's call `i`: the first of a step goes from σ to the midpoint, the second redoes
    /// the step from its start with the midpoint's x̂₀; each adds Brownian noise over its
    /// interval. The last step (to σ = 0) is one Euler call.
    fn dpm_sde(
        &mut self,
        i: usize,
        out: &ArrayD<f32>,
        x: &ArrayD<f32>,
        noise: &mut Noise,
    ) -> Result<ArrayD<f32>, String> {
        let first = self.first.take();
        let (sigma, next) = match first {
            None => (self.sigmas[i], self.sigmas[i + 1]),
            Some(_) => (self.sigmas[i - 1], self.sigmas[i]),
        };
        let x0 = self.denoised(self.input_sigmas[i] as f32, out, x);
        if next == 0.0 {
            let (s, n) = (sigma as f32, next as f32);
            return Ok(Zip::from(x)
                .and(&x0)
                .map_collect(|&x, &x0| x + (x - x0) / s * (n - s)));
        }
        let mid = midpoint(sigma, next);
        let (to, start) = match &first {
            None => (mid, x),
            Some((_, _, start)) => (next, start),
        };
        let up = to.min((to * to * (sigma * sigma - to * to) / (sigma * sigma)).sqrt());
        let down = (to * to - up * up).sqrt();
        let ratio = down / sigma;
        let eps = noise.draw(x.shape())?;
        // Seeded draws follow one Brownian path: the second interval [σ_next, σ] contains the
        // first [σ_mid, σ], so its normalised increment shares the first one's part.
        let eps = match (&first, noise.is_seeded()) {
            (Some((z1, _, _)), true) => {
                let (a, b) = (sigma - mid, mid - next);
                let (wa, wb) = ((a / (a + b)).sqrt() as f32, (b / (a + b)).sqrt() as f32);
                Zip::from(z1)
                    .and(&eps)
                    .map_collect(|&z1, &z2| wa * z1 + wb * z2)
            }
            _ => eps,
        };
        let next_x = Zip::from(start)
            .and(&x0)
            .and(&eps)
            .map_collect(|&s, &x0, &e| {
                (ratio * s as f64 - (ratio - 1.0) * x0 as f64 + up * e as f64) as f32
            });
        if first.is_none() {
            self.first = Some((eps, 0.0, x.clone()));
        }
        Ok(next_x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_schedule_is_diffusers() {
        // EulerDiscreteScheduler with SDXL's config, set_timesteps(4), diffusers 0.42.
        let c = EulerConfig::new(DdimConfig::stable_diffusion(), Variant::Euler);
        let e = Euler::new(&c, 4).unwrap();
        assert_eq!(e.timesteps(), [751.0, 501.0, 251.0, 1.0]);
        let want = [4.1167, 1.6237, 0.6984, 0.0413, 0.0];
        for (got, want) in e.sigmas.iter().zip(want) {
            assert!((got - want).abs() < 1e-3, "{:?}", e.sigmas);
        }
        assert!((e.init_noise_sigma() - 4.2364).abs() < 1e-3);
    }

    #[test]
    fn heun_calls_the_model_twice_per_step_but_the_last() {
        let c = EulerConfig::new(DdimConfig::stable_diffusion(), Variant::Heun);
        let e = Euler::new(&c, 3).unwrap();
        assert_eq!(e.timesteps().len(), 5);
        assert_eq!(e.sigmas.len(), 6);
        assert_eq!(e.sigmas[1], e.sigmas[2]);
        assert_eq!(e.sigmas[5], 0.0);
    }
}
