//! Euler steps over the noise levels σ = √((1−ᾱ)/ᾱ) of a DDPM-trained model, as diffusers'
//! `EulerDiscreteScheduler` takes them (SDXL's default; no churn): the model is fed x/√(σ²+1),
//! x moves by (σ_next − σ)·(x − x̂₀)/σ.
use ndarray::ArrayD;

use super::ddim::{DdimConfig, Prediction, Spacing, spaced_timesteps};

pub struct Euler {
    /// The model's timestep per step (not rounded for `linspace` spacing).
    timesteps: Vec<f64>,
    /// One per step and a final 0.
    sigmas: Vec<f64>,
    prediction: Prediction,
    init_noise_sigma: f64,
}

impl Euler {
    /// The schedule's betas, spacing and prediction (DDIM's own keys do not apply).
    pub fn new(config: &DdimConfig, steps: usize) -> Result<Euler, String> {
        let train = config.train_steps;
        // np.linspace in f32, unrounded.
        let timesteps: Vec<f64> = spaced_timesteps(config, steps)?
            .into_iter()
            .map(|t| t as f32 as f64)
            .collect();
        let mut alphas = config.alphas_cumprod();
        if config.zero_terminal_snr {
            // As diffusers: ᾱ = 0 would make σ infinite.
            alphas[train - 1] = 2f64.powi(-24);
        }
        let train_sigmas: Vec<f64> = alphas
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt() as f32 as f64)
            .collect();
        // Linear interpolation between the training σs at fractional timesteps.
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| {
                let (lo, frac) = (t.floor() as usize, t - t.floor());
                let hi = (lo + 1).min(train - 1);
                let s = train_sigmas[lo] + frac * (train_sigmas[hi] - train_sigmas[lo]);
                s as f32 as f64
            })
            .collect();
        let max = sigmas.iter().cloned().fold(0.0, f64::max);
        let init_noise_sigma = match config.spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        };
        sigmas.push(0.0);
        Ok(Euler {
            timesteps,
            sigmas,
            prediction: config.prediction,
            init_noise_sigma,
        })
    }

    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The initial noise's standard deviation: unit noise is scaled by it.
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    /// x₀ noised to step `i`'s level: x₀ + σ_i·ε (`EulerDiscreteScheduler.add_noise` at that
    /// step index).
    pub fn add_noise(&self, i: usize, x0: &ArrayD<f32>, noise: &ArrayD<f32>) -> ArrayD<f32> {
        let s = self.sigmas[i] as f32;
        ndarray::Zip::from(x0)
            .and(noise)
            .map_collect(|&x, &e| x + e * s)
    }

    /// What the model is fed at step `i`: x/√(σ²+1).
    pub fn scale_input(&self, i: usize, x: &ArrayD<f32>) -> ArrayD<f32> {
        let s = self.sigmas[i] as f32;
        let scale = (s * s + 1.0).sqrt();
        x.mapv(|v| v / scale)
    }

    pub fn step(&self, i: usize, out: &ArrayD<f32>, x: &ArrayD<f32>) -> ArrayD<f32> {
        let (sigma, next) = (self.sigmas[i] as f32, self.sigmas[i + 1] as f32);
        let prediction = self.prediction;
        ndarray::Zip::from(x).and(out).map_collect(|&x, &o| {
            let x0 = match prediction {
                Prediction::Epsilon => x - sigma * o,
                Prediction::V => {
                    o * (-sigma / (sigma * sigma + 1.0).sqrt()) + x / (sigma * sigma + 1.0)
                }
                Prediction::Sample => o,
            };
            x + (x - x0) / sigma * (next - sigma)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_schedule_is_diffusers() {
        // EulerDiscreteScheduler with SDXL's config, set_timesteps(4), diffusers 0.42.
        let e = Euler::new(&DdimConfig::stable_diffusion(), 4).unwrap();
        assert_eq!(e.timesteps(), [751.0, 501.0, 251.0, 1.0]);
        let want = [4.1167, 1.6237, 0.6984, 0.0413, 0.0];
        for (got, want) in e.sigmas.iter().zip(want) {
            assert!((got - want).abs() < 1e-3, "{:?}", e.sigmas);
        }
        assert!((e.init_noise_sigma() - 4.2364).abs() < 1e-3);
    }
}
