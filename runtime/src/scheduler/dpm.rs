//! DPM-Solver++ multistep (order 1 or 2), as diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type = "dpmsolver++"` steps (PixArt's default, "DPM++ 2M"): the model's output is
//! turned into x̂₀ and each step extrapolates in λ = log(α/σ) from the last one or two.
use ndarray::{ArrayD, Zip};

use super::Noise;
use super::ddim::{BetaSchedule, Betas, DdimConfig, Spacing, check_steps, forward};
use super::sigmas::{self, SigmaSpacing};

#[derive(Clone, Debug, PartialEq)]
pub struct DpmConfig {
    /// The training schedule (DDIM's own keys do not apply).
    pub schedule: DdimConfig,
    /// 1, 2 or 3.
    pub order: usize,
    /// `sde-dpmsolver++`: fresh noise at every step.
    pub sde: bool,
    pub sigmas: SigmaSpacing,
    /// The second-order correction: midpoint (diffusers' default) or Heun.
    pub heun: bool,
    /// First order at the last step (and below 15 steps, diffusers' `lower_order_final`).
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    /// The σ after the last step: 0, else the smallest training σ.
    pub final_sigma_min: bool,
    /// Timesteps whose λ is below this are not used (`lambda_min_clipped`).
    pub lambda_min_clipped: f64,
}

pub struct Dpm {
    config: DpmConfig,
    timesteps: Vec<usize>,
    /// One per step and the final one.
    sigmas: Vec<f64>,
    /// The x̂₀ of the last steps, newest last (at most order − 1 kept).
    previous: Vec<ArrayD<f32>>,
}

/// (α, σ) of a noise level: 1/√(σ²+1), σ/√(σ²+1).
pub(super) fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let norm = (sigma * sigma + 1.0).sqrt();
    (1.0 / norm, sigma / norm)
}

/// λ = log(α/σ) of a noise level.
pub(super) fn lambda(sigma: f64) -> f64 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

/// The inference timesteps of the multistep solvers (DPM-Solver, UniPC): n + 1 points spread
/// over the first `last` training steps, the final one dropped.
pub(super) fn multistep_timesteps(
    c: &DdimConfig,
    steps: usize,
    last: usize,
) -> Result<Vec<usize>, String> {
    let train = c.train_steps;
    check_steps(steps, train)?;
    let timesteps: Vec<f64> = match c.spacing {
        Spacing::Linspace => {
            let step = (last - 1) as f64 / steps as f64;
            (1..=steps)
                .rev()
                .map(|i| (i as f64 * step).round_ties_even())
                .collect()
        }
        Spacing::Leading => (1..=steps)
            .rev()
            .map(|i| (i * (last / (steps + 1))) as f64 + c.steps_offset as f64)
            .collect(),
        Spacing::Trailing => {
            let ratio = train as f64 / steps as f64;
            (0..)
                .map(|i| last as f64 - i as f64 * ratio)
                .take_while(|&t| t > 0.0)
                .map(|t| t.round_ties_even() - 1.0)
                .collect()
        }
    };
    if let Some(t) = timesteps
        .iter()
        .find(|&&t| t > (train - 1) as f64 || t < 0.0)
    {
        return Err(format!(
            "--steps {steps} with steps_offset {} reaches timestep {t}, outside the {train} training steps",
            c.steps_offset
        ));
    }
    Ok(timesteps.into_iter().map(|t| t as usize).collect())
}

/// σs spread by `spacing` over the whole training range, and their timesteps: rounded for
/// Karras's (but for the cosine schedule), cut to whole steps for the others, as the
/// multistep solvers keep them.
pub(super) fn spaced_sigmas(
    c: &DdimConfig,
    train_sigmas: &[f64],
    spacing: SigmaSpacing,
    steps: usize,
) -> (Vec<usize>, Vec<f64>) {
    let (max, min) = (train_sigmas[train_sigmas.len() - 1], train_sigmas[0]);
    let sigmas = sigmas::spaced(spacing, max, min, steps);
    let round = spacing == SigmaSpacing::Karras
        && !matches!(
            c.betas,
            Betas::Schedule {
                kind: BetaSchedule::SquaredCos,
                ..
            }
        );
    let timesteps = sigmas
        .iter()
        .map(|&s| {
            let t = sigmas::sigma_to_t(s, train_sigmas);
            (if round { t.round_ties_even() } else { t }) as usize
        })
        .collect();
    (timesteps, sigmas)
}

/// The training ᾱ, with zero terminal SNR's last one nudged off 0 as diffusers does.
pub(super) fn alphas(c: &DdimConfig) -> Vec<f64> {
    let mut alphas = c.alphas_cumprod();
    if c.zero_terminal_snr {
        let last = alphas.len() - 1;
        alphas[last] = 2f64.powi(-24);
    }
    alphas
}

impl Dpm {
    pub fn new(config: DpmConfig, steps: usize) -> Result<Dpm, String> {
        let c = &config.schedule;
        let train = c.train_steps;
        let alphas = alphas(c);
        let train_sigmas = sigmas::training_sigmas(&alphas);
        let (timesteps, sigmas) = if config.sigmas == SigmaSpacing::Timesteps {
            // Training steps whose λ falls below the clip are left out at the noisy end.
            let clipped = alphas
                .iter()
                .filter(|&&a| (a.sqrt().ln() - (1.0 - a).sqrt().ln()) < config.lambda_min_clipped)
                .count();
            let last = train - clipped;
            if last == 0 {
                return Err("lambda_min_clipped leaves no training step".into());
            }
            let timesteps = multistep_timesteps(c, steps, last)?;
            let sigmas = timesteps.iter().map(|&t| train_sigmas[t]).collect();
            (timesteps, sigmas)
        } else {
            check_steps(steps, train)?;
            spaced_sigmas(c, &train_sigmas, config.sigmas, steps)
        };
        let mut sigmas: Vec<f64> = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        sigmas.push(if config.final_sigma_min {
            train_sigmas[0]
        } else {
            0.0
        });
        Ok(Dpm {
            config,
            timesteps,
            sigmas,
            previous: Vec::new(),
        })
    }

    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// Noise draws from step `from` on: the SDE variant's one per step.
    pub fn draws(&self, from: usize) -> usize {
        if self.config.sde {
            self.timesteps.len().saturating_sub(from)
        } else {
            0
        }
    }

    /// x₀ noised to step `i`'s level: α_i·x₀ + σ_i·ε with α = 1/√(σ²+1)
    /// (`DPMSolverMultistepScheduler.add_noise` at that step index).
    pub fn add_noise(&self, i: usize, x0: &ArrayD<f32>, noise: &ArrayD<f32>) -> ArrayD<f32> {
        forward(alpha_sigma(self.sigmas[i]).0.powi(2), x0, noise)
    }

    /// x after step `i`. Steps must come in order: the higher orders use the previous x̂₀s.
    pub fn step(
        &mut self,
        i: usize,
        out: &ArrayD<f32>,
        x: &ArrayD<f32>,
        noise: &mut Noise,
    ) -> Result<ArrayD<f32>, String> {
        let (s0, t) = (self.sigmas[i], self.sigmas[i + 1]);
        let (a_s0, sg_s0) = alpha_sigma(s0);
        let prediction = self.config.schedule.prediction;
        let x0 = Zip::from(x)
            .and(out)
            .map_collect(|&x, &o| prediction.split(x as f64, o as f64, a_s0, sg_s0).0 as f32);
        let n = self.timesteps.len();
        let c = &self.config;
        let final_first = i == n - 1
            && (c.euler_at_final || (c.lower_order_final && n < 15) || !c.final_sigma_min);
        let final_second = i + 2 == n && c.lower_order_final && n < 15;
        // The first steps run are of lower order, also when img2img starts past step 0
        // (diffusers counts `lower_order_nums` from the first call).
        let order = if final_first {
            1
        } else if final_second {
            2
        } else {
            c.order
        }
        .min(self.previous.len() + 1);
        let (a_t, sg_t) = alpha_sigma(t);
        let h = lambda(t) - lambda(s0);
        let sde = c.sde;
        // The SDE variant keeps e^(−h) of x and adds noise of σ_t·√(1 − e^(−2h)).
        let (keep, em1) = if sde {
            ((-h).exp(), (-2.0 * h).exp() - 1.0)
        } else {
            (1.0, (-h).exp() - 1.0)
        };
        let ratio = sg_t / sg_s0 * keep;
        let mut next = Zip::from(x)
            .and(&x0)
            .map_collect(|&x, &m0| (ratio * x as f64 - a_t * em1 * m0 as f64) as f32);
        let hh = if sde { 2.0 * h } else { h };
        let lam = |k: usize| lambda(self.sigmas[i - k]);
        let previous = &self.previous;
        let m = |k: usize| &previous[previous.len() - k];
        let mut add = |w: f64, a: &ArrayD<f32>, b: &ArrayD<f32>| {
            Zip::from(&mut next)
                .and(a)
                .and(b)
                .for_each(|n, &a, &b| *n = (*n as f64 + w * (a as f64 - b as f64)) as f32);
        };
        match order {
            1 => {}
            2 => {
                let r0 = (lambda(s0) - lam(1)) / h;
                // D1 = (m0 − m1)/r0, weighted by the solver's correction.
                let w = if c.heun {
                    a_t * (em1 / hh + 1.0)
                } else {
                    -0.5 * a_t * em1
                };
                add(w / r0, &x0, m(1));
            }
            _ => {
                let (r0, r1) = ((lambda(s0) - lam(1)) / h, (lam(1) - lam(2)) / h);
                // D1 = D1_0 + r0/(r0+r1)·(D1_0 − D1_1), D2 = (D1_0 − D1_1)/(r0+r1), with
                // D1_0 = (m0 − m1)/r0 and D1_1 = (m1 − m2)/r1.
                let w1 = a_t * (em1 / hh + 1.0);
                let w2 = if sde {
                    a_t * ((-em1 - hh) / (hh * hh) - 0.5)
                } else {
                    -a_t * ((em1 + h) / (h * h) - 0.5)
                };
                let (d10, d11) = (1.0 / r0, 1.0 / r1);
                let k = r0 / (r0 + r1);
                let j = 1.0 / (r0 + r1);
                // w1·D1 + w2·D2 as weights of (m0 − m1) and (m1 − m2).
                let wa = w1 * (d10 + k * d10) + w2 * j * d10;
                let wb = -w1 * k * d11 - w2 * j * d11;
                add(wa, &x0, m(1));
                add(wb, m(1), m(2));
            }
        }
        if sde {
            let eps = noise.draw(x.shape())?;
            let s = sg_t * (-(-2.0 * h).exp_m1()).max(0.0).sqrt();
            Zip::from(&mut next)
                .and(&eps)
                .for_each(|n, &e| *n = (*n as f64 + s * e as f64) as f32);
        }
        self.previous.push(x0);
        let keep = self.config.order.saturating_sub(1);
        while self.previous.len() > keep {
            self.previous.remove(0);
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timesteps(spacing: Spacing, offset: usize) -> Vec<usize> {
        let config = DpmConfig {
            schedule: DdimConfig {
                spacing,
                steps_offset: offset,
                ..DdimConfig::stable_diffusion()
            },
            order: 2,
            sde: false,
            sigmas: SigmaSpacing::Timesteps,
            heun: false,
            lower_order_final: true,
            euler_at_final: false,
            final_sigma_min: false,
            lambda_min_clipped: f64::NEG_INFINITY,
        };
        Dpm::new(config, 4).unwrap().timesteps
    }

    #[test]
    fn spacings_give_diffusers_timesteps() {
        // DPMSolverMultistepScheduler.set_timesteps(4), diffusers 0.42: n + 1 points, the
        // last dropped.
        assert_eq!(timesteps(Spacing::Linspace, 0), [999, 749, 500, 250]);
        assert_eq!(timesteps(Spacing::Leading, 1), [801, 601, 401, 201]);
        assert_eq!(timesteps(Spacing::Trailing, 0), [999, 749, 499, 249]);
    }
}
