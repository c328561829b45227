//! Flow matching's Euler steps, as diffusers' `FlowMatchEulerDiscreteScheduler` takes them
//! (SD3, SD3.5, Flux): the model predicts a velocity, x moves by (σ_next − σ)·v.
use ndarray::ArrayD;

#[derive(Clone, Debug, PartialEq)]
pub struct FlowConfig {
    pub train_steps: usize,
    /// σ ↦ shift·σ / (1 + (shift − 1)·σ) (SD3: 3).
    pub shift: f64,
    /// Shifting by the image's token count instead (Flux-dev's `use_dynamic_shifting`).
    pub dynamic: Option<DynamicShift>,
}

/// μ grows linearly with the image tokens, from `base_shift` at `base_tokens` to `max_shift`
/// at `max_tokens`; σ ↦ e^μ / (e^μ + 1/σ − 1) (or μ / (μ + 1/σ − 1) when `linear`).
#[derive(Clone, Debug, PartialEq)]
pub struct DynamicShift {
    pub base_shift: f64,
    pub max_shift: f64,
    pub base_tokens: f64,
    pub max_tokens: f64,
    pub linear: bool,
}

impl DynamicShift {
    fn apply(&self, tokens: usize, sigma: f64) -> f64 {
        let slope = (self.max_shift - self.base_shift) / (self.max_tokens - self.base_tokens);
        let mu = self.base_shift + slope * (tokens as f64 - self.base_tokens);
        let m = if self.linear { mu } else { mu.exp() };
        m / (m + (1.0 / sigma - 1.0))
    }
}

impl Default for FlowConfig {
    /// The scheduler's own defaults.
    fn default() -> Self {
        FlowConfig {
            train_steps: 1000,
            shift: 1.0,
            dynamic: None,
        }
    }
}

/// Where the σs come from before shifting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spread {
    /// The scheduler's: evenly over its (shifted) training range (SD3's pipeline).
    Scheduler,
    /// Flux's pipeline passes its own: evenly from 1 to 1/steps.
    Flux,
}

pub struct FlowEuler {
    /// One per step and a final 0.
    sigmas: Vec<f64>,
    train_steps: usize,
}

impl FlowEuler {
    /// `tokens`: the image's token count, which dynamic shifting needs.
    pub fn new(
        config: &FlowConfig,
        steps: usize,
        spread: Spread,
        tokens: Option<usize>,
    ) -> Result<FlowEuler, String> {
        if steps == 0 {
            return Err("--steps 0: must be at least 1".into());
        }
        let train = config.train_steps as f64;
        let shift = |s: f64| config.shift * s / (1.0 + (config.shift - 1.0) * s);
        let even = |from: f64, to: f64| -> Vec<f64> {
            let step = if steps > 1 {
                (to - from) / (steps - 1) as f64
            } else {
                0.0
            };
            (0..steps).map(|i| from + step * i as f64).collect()
        };
        let base = match spread {
            // The training σs are kept in f32, shifted unless the shift is dynamic; diffusers
            // then shifts the σs spread over their range (again).
            Spread::Scheduler if config.dynamic.is_some() => even(1.0, (1.0 / train) as f32 as f64),
            Spread::Scheduler => even(shift(1.0) as f32 as f64, shift(1.0 / train) as f32 as f64),
            Spread::Flux => even(1.0, 1.0 / steps as f64),
        };
        let mut sigmas: Vec<f64> = match &config.dynamic {
            None => base.into_iter().map(shift).collect(),
            Some(d) => {
                let Some(tokens) = tokens else {
                    return Err("the scheduler config's use_dynamic_shifting shifts by the image's token count, which this model's input does not tell (its sample is not read by a patchifying convolution)".into());
                };
                base.into_iter().map(|s| d.apply(tokens, s)).collect()
            }
        };
        sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        sigmas.push(0.0);
        Ok(FlowEuler {
            sigmas,
            train_steps: config.train_steps,
        })
    }

    /// The scheduler's timesteps: σ·training steps.
    pub fn timesteps(&self) -> Vec<f64> {
        let n = self.sigmas.len() - 1;
        self.sigmas[..n]
            .iter()
            .map(|s| (*s as f32 * self.train_steps as f32) as f64)
            .collect()
    }

    /// x₀ noised to step `i`'s level: (1−σ)·x₀ + σ·ε (`FlowMatchEulerDiscreteScheduler.scale_noise`
    /// at that step index).
    pub fn add_noise(&self, i: usize, x0: &ArrayD<f32>, noise: &ArrayD<f32>) -> ArrayD<f32> {
        let s = self.sigmas[i] as f32;
        ndarray::Zip::from(x0)
            .and(noise)
            .map_collect(|&x, &e| s * e + (1.0 - s) * x)
    }

    pub fn step(&self, i: usize, velocity: &ArrayD<f32>, x: &ArrayD<f32>) -> ArrayD<f32> {
        let dt = (self.sigmas[i + 1] as f32) - (self.sigmas[i] as f32);
        ndarray::Zip::from(x)
            .and(velocity)
            .map_collect(|&x, &v| x + dt * v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timesteps(config: FlowConfig, spread: Spread, tokens: Option<usize>) -> Vec<f64> {
        FlowEuler::new(&config, 4, spread, tokens)
            .unwrap()
            .timesteps()
    }

    fn close(got: &[f64], want: &[f64]) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-3, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn schedules_are_diffusers() {
        // FlowMatchEulerDiscreteScheduler(shift=3.0).set_timesteps(4), diffusers 0.42.
        let sd3 = FlowConfig {
            shift: 3.0,
            ..FlowConfig::default()
        };
        close(
            &timesteps(sd3, Spread::Scheduler, None),
            &[1000.0, 857.6923, 602.1506, 8.9286],
        );
        // Flux-dev's config (dynamic shifting) with FluxPipeline's σs, 1024 image tokens.
        let dev = FlowConfig {
            shift: 3.0,
            dynamic: Some(DynamicShift {
                base_shift: 0.5,
                max_shift: 1.15,
                base_tokens: 256.0,
                max_tokens: 4096.0,
                linear: false,
            }),
            ..FlowConfig::default()
        };
        close(
            &timesteps(dev.clone(), Spread::Flux, Some(1024)),
            &[1000.0, 849.2348, 652.4894, 384.9447],
        );
        assert!(FlowEuler::new(&dev, 4, Spread::Flux, None).is_err());
    }
}
