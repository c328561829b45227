//! DPM-Solver++ multistep (order 1 or 2), as diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type = "dpmsolver++"` steps (PixArt's default, "DPM++ 2M"): the model's output is
//! turned into x̂₀ and each step extrapolates in λ = log(α/σ) from the last one or two.
use ndarray::{ArrayD, Zip};

use super::ddim::{DdimConfig, Prediction, Spacing};

#[derive(Clone, Debug, PartialEq)]
pub struct DpmConfig {
    /// The training schedule (DDIM's own keys do not apply).
    pub schedule: DdimConfig,
    /// 1 or 2.
    pub order: usize,
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
    /// The x̂₀ of the previous step, for the second order.
    previous: Option<ArrayD<f32>>,
}

/// (α, σ) of a noise level: 1/√(σ²+1), σ/√(σ²+1).
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let norm = (sigma * sigma + 1.0).sqrt();
    (1.0 / norm, sigma / norm)
}

fn lambda(sigma: f64) -> f64 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

impl Dpm {
    pub fn new(config: DpmConfig, steps: usize) -> Result<Dpm, String> {
        let c = &config.schedule;
        let train = c.train_steps;
        if steps == 0 || steps > train {
            return Err(format!(
                "--steps {steps}: must be within 1..={train} (the schedule's training steps)"
            ));
        }
        let mut alphas = c.alphas_cumprod();
        if c.zero_terminal_snr {
            alphas[train - 1] = 2f64.powi(-24);
        }
        // Training steps whose λ falls below the clip are left out at the noisy end.
        let clipped = alphas
            .iter()
            .filter(|&&a| (a.sqrt().ln() - (1.0 - a).sqrt().ln()) < config.lambda_min_clipped)
            .count();
        let last = train - clipped;
        if last == 0 {
            return Err("lambda_min_clipped leaves no training step".into());
        }
        // n + 1 points, the last (0) dropped.
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
        let timesteps: Vec<usize> = timesteps.into_iter().map(|t| t as usize).collect();
        let sigma_of = |a: f64| ((1.0 - a) / a).sqrt();
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| sigma_of(alphas[t]) as f32 as f64)
            .collect();
        sigmas.push(if config.final_sigma_min {
            sigma_of(alphas[0]) as f32 as f64
        } else {
            0.0
        });
        Ok(Dpm {
            config,
            timesteps,
            sigmas,
            previous: None,
        })
    }

    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// x₀ noised to step `i`'s level: α_i·x₀ + σ_i·ε with α = 1/√(σ²+1)
    /// (`DPMSolverMultistepScheduler.add_noise` at that step index).
    pub fn add_noise(&self, i: usize, x0: &ArrayD<f32>, noise: &ArrayD<f32>) -> ArrayD<f32> {
        let (a, s) = alpha_sigma(self.sigmas[i]);
        Zip::from(x0)
            .and(noise)
            .map_collect(|&x, &e| (a * x as f64 + s * e as f64) as f32)
    }

    /// x after step `i`. Steps must come in order: the second order uses the previous x̂₀.
    pub fn step(&mut self, i: usize, out: &ArrayD<f32>, x: &ArrayD<f32>) -> ArrayD<f32> {
        let (s0, t) = (self.sigmas[i], self.sigmas[i + 1]);
        let (a_s0, sg_s0) = alpha_sigma(s0);
        let prediction = self.config.schedule.prediction;
        let x0 = Zip::from(x).and(out).map_collect(|&x, &o| {
            let (x, o) = (x as f64, o as f64);
            (match prediction {
                Prediction::Epsilon => (x - sg_s0 * o) / a_s0,
                Prediction::V => a_s0 * x - sg_s0 * o,
                Prediction::Sample => o,
            }) as f32
        });
        let n = self.timesteps.len();
        let last = i == n - 1;
        // The first step run is first order, also when img2img starts past step 0
        // (diffusers counts `lower_order_nums` from the first call).
        let first_order = self.config.order == 1
            || self.previous.is_none()
            || (last
                && (self.config.euler_at_final
                    || (self.config.lower_order_final && n < 15)
                    || !self.config.final_sigma_min));
        let (a_t, sg_t) = alpha_sigma(t);
        let h = lambda(t) - lambda(s0);
        // exp(−h) − 1 (−1 when σ_t = 0: λ_t is infinite).
        let em1 = (-h).exp() - 1.0;
        let ratio = sg_t / sg_s0;
        let previous = self.previous.replace(x0.clone());
        let d1 = match (&previous, first_order) {
            (Some(m1), false) => {
                let r0 = (lambda(s0) - lambda(self.sigmas[i - 1])) / h;
                let weight = if self.config.heun {
                    -a_t * (em1 / h + 1.0)
                } else {
                    0.5 * a_t * em1
                };
                Some((m1, weight / r0))
            }
            _ => None,
        };
        let mut next = Zip::from(x)
            .and(&x0)
            .map_collect(|&x, &m0| (ratio * x as f64 - a_t * em1 * m0 as f64) as f32);
        if let Some((m1, w)) = d1 {
            Zip::from(&mut next)
                .and(&x0)
                .and(m1)
                .for_each(|n, &m0, &m1| *n = (*n as f64 - w * (m0 as f64 - m1 as f64)) as f32);
        }
        next
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
