//! DDIM with eta 0, as diffusers' `DDIMScheduler` computes it: its betas, timestep spacings,
//! predictions, `clip_sample` and zero-terminal-SNR rescaling.
use ndarray::ArrayD;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    /// Linear in √β (Stable Diffusion's).
    ScaledLinear,
    /// The cosine ᾱ of improved DDPM, β capped at 0.999.
    SquaredCos,
}

/// What the model's output is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    /// v = √ᾱ·ε − √(1−ᾱ)·x₀ (SD 2.x 768 px).
    V,
    Sample,
}

impl Prediction {
    /// (x̂₀, ε̂) from the model's output `o` at `x`, where x = α·x₀ + σ·ε (√ᾱ and √(1−ᾱ) of a
    /// timestep, or 1/√(σ²+1) and σ/√(σ²+1) of a noise level).
    pub(super) fn split(self, x: f64, o: f64, alpha: f64, sigma: f64) -> (f64, f64) {
        match self {
            Prediction::Epsilon => ((x - sigma * o) / alpha, o),
            Prediction::V => (alpha * x - sigma * o, alpha * o + sigma * x),
            Prediction::Sample => (o, (x - alpha * o) / sigma),
        }
    }
}

/// How the inference timesteps are spread over the training ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// A DDPM-trained model's schedule (betas, prediction, spacing), which Euler reads too, and
/// DDIM's own settings (final ᾱ, clipping).
#[derive(Clone, Debug, PartialEq)]
pub struct DdimConfig {
    pub train_steps: usize,
    pub betas: Betas,
    pub prediction: Prediction,
    pub spacing: Spacing,
    pub steps_offset: usize,
    /// ᾱ after the last step: 1, else ᾱ₀.
    pub set_alpha_to_one: bool,
    /// Clamp the predicted x₀ to ±this.
    pub clip_sample: Option<f64>,
    pub zero_terminal_snr: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Betas {
    Schedule {
        kind: BetaSchedule,
        start: f64,
        end: f64,
    },
    /// `trained_betas`: one per training step.
    Given(Vec<f64>),
}

impl DdimConfig {
    /// Stable Diffusion's schedule (scaled-linear betas 0.00085-0.012 over 1000 steps,
    /// `leading` spacing with offset 1, ᾱ after the last step = ᾱ₀, no clipping): what
    /// `attune sample` runs without a scheduler config.
    pub fn stable_diffusion() -> DdimConfig {
        DdimConfig {
            train_steps: 1000,
            betas: Betas::Schedule {
                kind: BetaSchedule::ScaledLinear,
                start: 0.00085,
                end: 0.012,
            },
            prediction: Prediction::Epsilon,
            spacing: Spacing::Leading,
            steps_offset: 1,
            set_alpha_to_one: false,
            clip_sample: None,
            zero_terminal_snr: false,
        }
    }

    /// `DDIMScheduler`'s own defaults: what a config's absent keys mean.
    pub fn diffusers_defaults() -> DdimConfig {
        DdimConfig {
            betas: Betas::Schedule {
                kind: BetaSchedule::Linear,
                start: 0.0001,
                end: 0.02,
            },
            spacing: Spacing::Leading,
            steps_offset: 0,
            set_alpha_to_one: true,
            clip_sample: Some(1.0),
            ..DdimConfig::stable_diffusion()
        }
    }

    /// ᾱ per training step, in f32 as diffusers keeps them.
    pub(super) fn alphas_cumprod(&self) -> Vec<f64> {
        let n = self.train_steps;
        let betas: Vec<f32> = match &self.betas {
            Betas::Given(b) => b.iter().map(|&b| b as f32).collect(),
            Betas::Schedule { kind, start, end } => match kind {
                BetaSchedule::Linear => linspace(*start, *end, n),
                BetaSchedule::ScaledLinear => linspace(start.sqrt(), end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect(),
                BetaSchedule::SquaredCos => {
                    let abar = |t: f64| {
                        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                            .cos()
                            .powi(2)
                    };
                    (0..n)
                        .map(|i| {
                            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                            (1.0 - abar(t2) / abar(t1)).min(0.999) as f32
                        })
                        .collect()
                }
            },
        };
        // torch.cumprod on the CPU accumulates f32 in f64.
        let mut acc = 1f64;
        let mut cumprod: Vec<f32> = betas
            .iter()
            .map(|&b| {
                acc *= (1.0 - b) as f64;
                acc as f32
            })
            .collect();
        if self.zero_terminal_snr {
            // √ᾱ shifted so that the last is 0 and scaled so that the first stays.
            let sqrt: Vec<f32> = cumprod.iter().map(|a| a.sqrt()).collect();
            let (first, last) = (sqrt[0], sqrt[n - 1]);
            cumprod = sqrt
                .iter()
                .map(|s| {
                    let r = (s - last) * (first / (first - last));
                    r * r
                })
                .collect();
        }
        cumprod.into_iter().map(f64::from).collect()
    }
}

/// torch.linspace in f32.
fn linspace(start: f64, end: f64, n: usize) -> Vec<f32> {
    let step = if n > 1 {
        (end - start) / (n - 1) as f64
    } else {
        0.0
    };
    (0..n).map(|i| (start + step * i as f64) as f32).collect()
}

/// `steps` within 1..=`train` (a scheduler's inference steps over its training steps).
pub(super) fn check_steps(steps: usize, train: usize) -> Result<(), String> {
    if steps == 0 || steps > train {
        return Err(format!(
            "--steps {steps}: must be within 1..={train} (the schedule's training steps)"
        ));
    }
    Ok(())
}

/// x₀ noised to ᾱ = `a`: √a·x₀ + √(1−a)·ε (DDPM's forward process; `add_noise`).
pub(super) fn forward(a: f64, x0: &ArrayD<f32>, noise: &ArrayD<f32>) -> ArrayD<f32> {
    let (sa, s1a) = (a.sqrt(), (1.0 - a).sqrt());
    ndarray::Zip::from(x0)
        .and(noise)
        .map_collect(|&x, &e| (sa * x as f64 + s1a * e as f64) as f32)
}

/// The inference timesteps `steps` spread over the training steps as the spacing says (not
/// rounded for `linspace`), checked to lie within them.
pub(super) fn spaced_timesteps(config: &DdimConfig, steps: usize) -> Result<Vec<f64>, String> {
    let train = config.train_steps;
    check_steps(steps, train)?;
    let timesteps: Vec<f64> = match config.spacing {
        Spacing::Linspace => {
            let step = (train - 1) as f64 / (steps - 1).max(1) as f64;
            (0..steps).rev().map(|i| i as f64 * step).collect()
        }
        Spacing::Leading => (0..steps)
            .rev()
            .map(|i| (i * (train / steps)) as f64 + config.steps_offset as f64)
            .collect(),
        Spacing::Trailing => {
            let ratio = train as f64 / steps as f64;
            (0..steps)
                .map(|i| (train as f64 - i as f64 * ratio).round_ties_even() - 1.0)
                .collect()
        }
    };
    if let Some(t) = timesteps.iter().find(|&&t| t > (train - 1) as f64) {
        return Err(format!(
            "--steps {steps} with steps_offset {} reaches timestep {t}, beyond the {train} training steps",
            config.steps_offset
        ));
    }
    Ok(timesteps)
}

pub struct Ddim {
    config: DdimConfig,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<usize>,
    /// The distance to the previous timestep (`train_steps / steps`, whatever the spacing).
    step_ratio: usize,
    /// The share of the step's variance taken as fresh noise (the pipeline's `eta`; 0: DDIM's
    /// deterministic steps).
    pub(super) eta: f64,
}

impl Ddim {
    pub fn new(config: DdimConfig, steps: usize) -> Result<Ddim, String> {
        let train = config.train_steps;
        let timesteps: Vec<usize> = spaced_timesteps(&config, steps)?
            .into_iter()
            .map(|t| t.round_ties_even() as usize)
            .collect();
        let alphas_cumprod = config.alphas_cumprod();
        if config.prediction == Prediction::Epsilon && alphas_cumprod[timesteps[0]] <= 0.0 {
            return Err(format!(
                "timestep {} has ᾱ = 0 (zero terminal SNR): a noise prediction cannot give x₀ there; such schedules need prediction_type v_prediction",
                timesteps[0]
            ));
        }
        Ok(Ddim {
            eta: 0.0,
            step_ratio: train / steps,
            config,
            alphas_cumprod,
            timesteps,
        })
    }

    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// x₀ noised to step `i`'s timestep t: √ᾱ_t·x₀ + √(1−ᾱ_t)·ε (`DDIMScheduler.add_noise`).
    pub fn add_noise(&self, i: usize, x0: &ArrayD<f32>, noise: &ArrayD<f32>) -> ArrayD<f32> {
        forward(self.alphas_cumprod[self.timesteps[i]], x0, noise)
    }

    /// Noise draws from step `from` on: one per step with eta above 0.
    pub fn draws(&self, from: usize) -> usize {
        if self.eta > 0.0 {
            self.timesteps.len().saturating_sub(from)
        } else {
            0
        }
    }

    /// x at the previous timestep from x at step `i`'s and the model's (guided) output.
    pub fn step(
        &self,
        i: usize,
        out: &ArrayD<f32>,
        x: &ArrayD<f32>,
        noise: &mut super::Noise,
    ) -> Result<ArrayD<f32>, String> {
        let t = self.timesteps[i];
        let a_t = self.alphas_cumprod[t];
        let a_prev = match t.checked_sub(self.step_ratio) {
            Some(p) => self.alphas_cumprod[p],
            None if self.config.set_alpha_to_one => 1.0,
            None => self.alphas_cumprod[0],
        };
        let (sa, s1a) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        // σ_t of DDIM's generalized step: eta·√((1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev)).
        let std = self.eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).sqrt();
        let (sp, dir) = (a_prev.sqrt(), (1.0 - a_prev - std * std).sqrt());
        let (prediction, clip) = (self.config.prediction, self.config.clip_sample);
        let mut next = ndarray::Zip::from(x).and(out).map_collect(|&x, &o| {
            let (x0, eps) = prediction.split(x as f64, o as f64, sa, s1a);
            let x0 = clip.map_or(x0, |r| x0.clamp(-r, r));
            (sp * x0 + dir * eps) as f32
        });
        if self.eta > 0.0 {
            let eps = noise.draw(x.shape())?;
            ndarray::Zip::from(&mut next)
                .and(&eps)
                .for_each(|n, &e| *n = (*n as f64 + std * e as f64) as f32);
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(config: DdimConfig, n: usize) -> Vec<usize> {
        Ddim::new(config, n).unwrap().timesteps
    }

    #[test]
    fn spacings_give_diffusers_timesteps() {
        // DDIMScheduler.set_timesteps(4 / 3) with each spacing (values printed by diffusers 0.42).
        let sd = DdimConfig::stable_diffusion();
        assert_eq!(steps(sd.clone(), 4), [751, 501, 251, 1]);
        let trailing = DdimConfig {
            spacing: Spacing::Trailing,
            ..sd.clone()
        };
        assert_eq!(steps(trailing, 3), [999, 666, 332]);
        let linspace = DdimConfig {
            spacing: Spacing::Linspace,
            ..sd.clone()
        };
        assert_eq!(steps(linspace, 3), [999, 500, 0]);
    }

    #[test]
    fn steps_beyond_the_schedule_are_errors() {
        let sd = DdimConfig::stable_diffusion();
        assert!(Ddim::new(sd.clone(), 0).is_err());
        assert!(Ddim::new(sd.clone(), 1001).is_err());
        // leading spacing at 1000 steps with offset 1 would reach timestep 1000
        let e = Ddim::new(sd, 1000).err().unwrap();
        assert!(e.contains("timestep 1000"), "{e}");
    }

    #[test]
    fn zero_terminal_snr_ends_at_zero_and_refuses_noise_prediction() {
        let config = DdimConfig {
            zero_terminal_snr: true,
            spacing: Spacing::Trailing,
            ..DdimConfig::stable_diffusion()
        };
        let a = config.alphas_cumprod();
        assert_eq!(a[999], 0.0);
        assert!((a[0] - DdimConfig::stable_diffusion().alphas_cumprod()[0]).abs() < 1e-6);
        let e = Ddim::new(config.clone(), 4).err().unwrap();
        assert!(e.contains("v_prediction"), "{e}");
        let v = DdimConfig {
            prediction: Prediction::V,
            ..config
        };
        assert!(Ddim::new(v, 4).is_ok());
    }
}
