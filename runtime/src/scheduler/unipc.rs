//! UniPC, as diffusers' `UniPCMultistepScheduler` steps it: a multistep predictor (UniP) in
//! λ = log(α/σ) over the last model outputs, and at the next call a corrector (UniC) that
//! redoes the previous step with the new output, both with the B(h) of variant bh1 or bh2.
use ndarray::{ArrayD, Zip};

use super::ddim::{DdimConfig, check_steps, forward};
use super::dpm::{alpha_sigma, alphas, lambda, multistep_timesteps, spaced_sigmas};
use super::sigmas::{self, SigmaSpacing};

#[derive(Clone, Debug, PartialEq)]
pub struct UniPcConfig {
    pub schedule: DdimConfig,
    /// 1 to 3.
    pub order: usize,
    /// B(h) = e^h − 1 (bh2, the default) or h (bh1).
    pub bh2: bool,
    /// Extrapolate x̂₀ (the default) or the noise.
    pub predict_x0: bool,
    pub lower_order_final: bool,
    /// Steps whose result is not corrected.
    pub disable_corrector: Vec<usize>,
    pub sigmas: SigmaSpacing,
    /// The σ after the last step: the smallest (training, or spaced) σ, else 0.
    pub final_sigma_min: bool,
}

pub struct UniPc {
    config: UniPcConfig,
    timesteps: Vec<usize>,
    /// One per step and the final one.
    sigmas: Vec<f64>,
    /// Converted model outputs of the last steps, newest last (at most `order`).
    outputs: Vec<ArrayD<f32>>,
    /// The previous step's input and order, for the corrector.
    last: Option<(ArrayD<f32>, usize)>,
}

/// (α, σ, λ) of a noise level.
fn alpha_sigma_lambda(sigma: f64) -> (f64, f64, f64) {
    let (a, s) = alpha_sigma(sigma);
    (a, s, lambda(sigma))
}

impl UniPc {
    pub fn new(config: UniPcConfig, steps: usize) -> Result<UniPc, String> {
        let c = &config.schedule;
        let train = c.train_steps;
        let train_sigmas = sigmas::training_sigmas(&alphas(c));
        let (timesteps, mut sigmas, last) = if config.sigmas == SigmaSpacing::Timesteps {
            let timesteps = multistep_timesteps(c, steps, train)?;
            let sigmas: Vec<f64> = timesteps.iter().map(|&t| train_sigmas[t]).collect();
            (timesteps, sigmas, train_sigmas[0])
        } else {
            check_steps(steps, train)?;
            let (mut timesteps, sigmas) = spaced_sigmas(c, &train_sigmas, config.sigmas, steps);
            if config.sigmas == SigmaSpacing::Karras {
                // UniPC rounds Karras's timesteps for every beta schedule.
                timesteps = sigmas
                    .iter()
                    .map(|&s| sigmas::sigma_to_t(s, &train_sigmas).round_ties_even() as usize)
                    .collect();
            }
            let last = sigmas[sigmas.len() - 1];
            (timesteps, sigmas, last)
        };
        sigmas.push(if config.final_sigma_min { last } else { 0.0 });
        let sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        Ok(UniPc {
            config,
            timesteps,
            sigmas,
            outputs: Vec::new(),
            last: None,
        })
    }

    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// x₀ noised to step `i`'s level: α_i·x₀ + σ_i·ε.
    pub fn add_noise(&self, i: usize, x0: &ArrayD<f32>, noise: &ArrayD<f32>) -> ArrayD<f32> {
        forward(alpha_sigma(self.sigmas[i]).0.powi(2), x0, noise)
    }

    /// The model output as the solver extrapolates it: x̂₀, or the noise.
    fn convert(&self, i: usize, out: &ArrayD<f32>, x: &ArrayD<f32>) -> ArrayD<f32> {
        let (a, s, _) = alpha_sigma_lambda(self.sigmas[i]);
        let (prediction, x0) = (self.config.schedule.prediction, self.config.predict_x0);
        Zip::from(x).and(out).map_collect(|&x, &o| {
            let (x0_hat, eps) = prediction.split(x as f64, o as f64, a, s);
            (if x0 { x0_hat } else { eps }) as f32
        })
    }

    pub fn step(&mut self, i: usize, out: &ArrayD<f32>, x: &ArrayD<f32>) -> ArrayD<f32> {
        let converted = self.convert(i, out, x);
        // Correct the previous step with this output.
        let sample = match self.last.take() {
            Some((last, order)) if i > 0 && !self.config.disable_corrector.contains(&(i - 1)) => {
                self.update(i - 1, &last, order, Some(&converted))
            }
            _ => x.clone(),
        };
        self.outputs.push(converted);
        if self.outputs.len() > self.config.order {
            self.outputs.remove(0);
        }
        let n = self.timesteps.len();
        let order = if self.config.lower_order_final {
            self.config.order.min(n - i)
        } else {
            self.config.order
        }
        .min(self.outputs.len());
        let next = self.update(i, &sample, order, None);
        self.last = Some((sample, order));
        next
    }

    /// From x at step `s` (its output the newest in `outputs`) to step `s + 1`: the predictor, or with `model_t` (the output at s + 1) the
    /// corrector.
    fn update(
        &self,
        s: usize,
        x: &ArrayD<f32>,
        order: usize,
        model_t: Option<&ArrayD<f32>>,
    ) -> ArrayD<f32> {
        let predict_x0 = self.config.predict_x0;
        // The newest output is step s's (correcting runs before step s + 1's is kept).
        let outs = &self.outputs;
        let m0 = &outs[outs.len() - 1];
        let (a_t, s_t, l_t) = alpha_sigma_lambda(self.sigmas[s + 1]);
        let (a_s0, s_s0, l_s0) = alpha_sigma_lambda(self.sigmas[s]);
        let h = l_t - l_s0;
        // rk and D1 of the older outputs.
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for k in 1..order {
            let (_, _, l_k) = alpha_sigma_lambda(self.sigmas[s - k]);
            let rk = (l_k - l_s0) / h;
            rks.push(rk);
            d1s.push((&outs[outs.len() - 1 - k], rk));
        }
        rks.push(1.0);
        let hh = if predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let b_h = if self.config.bh2 { hh.exp_m1() } else { hh };
        let mut factorial = 1.0;
        let mut r = Vec::new();
        let mut b = Vec::new();
        for i in 1..=order {
            r.push(
                rks.iter()
                    .map(|rk| rk.powi(i as i32 - 1))
                    .collect::<Vec<f64>>(),
            );
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        // The weights of the D1s (and, correcting, of D1_t last).
        let rhos: Vec<f64> = match model_t {
            None if d1s.is_empty() => vec![],
            None if order == 2 => vec![0.5],
            None => solve(&r[..order - 1], &b[..order - 1], order - 1),
            Some(_) if order == 1 => vec![0.5],
            Some(_) => solve(&r, &b, order),
        };
        let (scale_x, scale_m0, scale_res) = if predict_x0 {
            (s_t / s_s0, -a_t * h_phi_1, -a_t * b_h)
        } else {
            (a_t / a_s0, -s_t * h_phi_1, -s_t * b_h)
        };
        let mut next = Zip::from(x)
            .and(m0)
            .map_collect(|&x, &m| (scale_x * x as f64 + scale_m0 * m as f64) as f32);
        for ((mi, rk), rho) in d1s.iter().zip(&rhos) {
            let w = scale_res * rho / rk;
            Zip::from(&mut next)
                .and(*mi)
                .and(m0)
                .for_each(|n, &mi, &m0| *n = (*n as f64 + w * (mi as f64 - m0 as f64)) as f32);
        }
        if let Some(model_t) = model_t {
            let w = scale_res * rhos[rhos.len() - 1];
            Zip::from(&mut next)
                .and(model_t)
                .and(m0)
                .for_each(|n, &mt, &m0| *n = (*n as f64 + w * (mt as f64 - m0 as f64)) as f32);
        }
        next
    }
}

/// Solves the n×n system rows·w = rhs (the first n columns of `rows`) by Gaussian elimination
/// with partial pivoting; n ≤ 3 here.
fn solve(rows: &[Vec<f64>], rhs: &[f64], n: usize) -> Vec<f64> {
    let mut m: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut row = rows[i][..n].to_vec();
            row.push(rhs[i]);
            row
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))
            .expect("a non-empty range");
        m.swap(col, pivot);
        let pivot_row = m[col].clone();
        for row in m.iter_mut().skip(col + 1) {
            let f = row[col] / pivot_row[col];
            for (r, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                *r -= f * p;
            }
        }
    }
    let mut w = vec![0.0; n];
    for row in (0..n).rev() {
        let dot: f64 = (row + 1..n).map(|k| m[row][k] * w[k]).sum();
        w[row] = (m[row][n] - dot) / m[row][row];
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solves_small_systems() {
        let rows = vec![vec![2.0, 1.0, 0.0], vec![1.0, 3.0, 0.0]];
        let w = solve(&rows, &[3.0, 5.0], 2);
        assert!(
            (w[0] - 0.8).abs() < 1e-12 && (w[1] - 1.4).abs() < 1e-12,
            "{w:?}"
        );
    }
}
