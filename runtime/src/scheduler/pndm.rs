//! Pseudo linear multistep (PLMS), as diffusers' `PNDMScheduler` takes it with
//! `skip_prk_steps` (Stable Diffusion 1.x's folders): a linear multistep combination of up to
//! four past noise predictions moved by PNDM's transfer. The first step is taken twice, as a
//! second-order pair, so `steps` steps call the model `steps + 1` times.
use ndarray::{ArrayD, Zip};

use super::ddim::{DdimConfig, Prediction, Spacing, check_steps, forward};

pub struct Pndm {
    alphas_cumprod: Vec<f64>,
    final_alpha: f64,
    prediction: Prediction,
    /// The model's timestep per call: t₀, t₀, t₁, …, t_{n−1}.
    timesteps: Vec<usize>,
    /// `train_steps / steps`, the distance to the previous timestep (whatever the spacing).
    ratio: usize,
    /// Past noise predictions, newest last (at most 4).
    ets: Vec<ArrayD<f32>>,
    /// The first call's sample and prediction, for the second.
    first: Option<(ArrayD<f32>, ArrayD<f32>)>,
    calls: usize,
}

impl Pndm {
    pub fn new(c: &DdimConfig, steps: usize) -> Result<Pndm, String> {
        let train = c.train_steps;
        check_steps(steps, train)?;
        if c.prediction == Prediction::Sample {
            return Err("prediction_type sample: PNDM takes epsilon or v_prediction".into());
        }
        // Ascending, as PNDMScheduler keeps them before reversing.
        let ascending: Vec<usize> = match c.spacing {
            Spacing::Linspace => (0..steps)
                .map(|i| {
                    let step = (train - 1) as f64 / (steps - 1).max(1) as f64;
                    (i as f64 * step).round_ties_even() as usize
                })
                .collect(),
            Spacing::Leading => (0..steps)
                .map(|i| i * (train / steps) + c.steps_offset)
                .collect(),
            Spacing::Trailing => {
                let ratio = train as f64 / steps as f64;
                let mut t: Vec<usize> = (0..steps)
                    .map(|i| ((train as f64 - i as f64 * ratio).round_ties_even() as usize) - 1)
                    .collect();
                t.reverse();
                t
            }
        };
        if let Some(t) = ascending.iter().find(|&&t| t >= train) {
            return Err(format!(
                "--steps {steps} with steps_offset {} reaches timestep {t}, beyond the {train} training steps",
                c.steps_offset
            ));
        }
        // [..n−1], the second to last again, the last; reversed.
        let n = ascending.len();
        let mut timesteps: Vec<usize> = ascending[..n - 1].to_vec();
        if n >= 2 {
            timesteps.push(ascending[n - 2]);
        }
        timesteps.push(ascending[n - 1]);
        timesteps.reverse();
        let alphas_cumprod = c.alphas_cumprod();
        Ok(Pndm {
            final_alpha: if c.set_alpha_to_one {
                1.0
            } else {
                alphas_cumprod[0]
            },
            alphas_cumprod,
            prediction: c.prediction,
            timesteps,
            ratio: train / steps,
            ets: Vec::new(),
            first: None,
            calls: 0,
        })
    }

    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn alpha(&self, t: isize) -> f64 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else {
            self.final_alpha
        }
    }

    /// x₀ noised to call `i`'s timestep (`add_noise`: DDPM's forward process).
    pub fn add_noise(&self, i: usize, x0: &ArrayD<f32>, noise: &ArrayD<f32>) -> ArrayD<f32> {
        forward(self.alphas_cumprod[self.timesteps[i]], x0, noise)
    }

    pub fn step(&mut self, i: usize, out: &ArrayD<f32>, x: &ArrayD<f32>) -> ArrayD<f32> {
        let t = self.timesteps[i] as isize;
        let ratio = self.ratio as isize;
        let second = self.calls == 1;
        // The second call re-evaluates the first step's end: it steps from the first's start.
        let (from, to) = if second {
            (t + ratio, t)
        } else {
            (t, t - ratio)
        };
        if !second {
            if self.ets.len() == 4 {
                self.ets.remove(0);
            }
            self.ets.push(out.clone());
        }
        let e = &self.ets;
        let k = e.len();
        let (eps, sample) = match (k, second) {
            (1, false) => {
                self.first = Some((x.clone(), out.clone()));
                (out.clone(), x.clone())
            }
            (1, true) => {
                let (start, _) = self.first.take().expect("the first call came first");
                ((out + &e[0]) / 2.0, start)
            }
            (2, _) => ((&e[1] * 3.0 - &e[0]) / 2.0, x.clone()),
            (3, _) => (
                (&e[2] * 23.0 - &e[1] * 16.0 + &e[0] * 5.0) / 12.0,
                x.clone(),
            ),
            _ => (
                (&e[3] * 55.0 - &e[2] * 59.0 + &e[1] * 37.0 - &e[0] * 9.0) / 24.0,
                x.clone(),
            ),
        };
        self.calls += 1;
        let (a, ap) = (self.alpha(from), self.alpha(to));
        let (b, bp) = (1.0 - a, 1.0 - ap);
        let prediction = self.prediction;
        let sample_coeff = (ap / a).sqrt();
        let denom = a * bp.sqrt() + (a * b * ap).sqrt();
        Zip::from(&sample).and(&eps).map_collect(|&x, &o| {
            let (x, o) = (x as f64, o as f64);
            let o = prediction.split(x, o, a.sqrt(), b.sqrt()).1;
            (sample_coeff * x - (ap - a) * o / denom) as f32
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plms_timesteps_are_diffusers() {
        // PNDMScheduler(skip_prk_steps=True), SD1.5's config, set_timesteps(4).
        let p = Pndm::new(&DdimConfig::stable_diffusion(), 4).unwrap();
        assert_eq!(p.timesteps(), [751, 501, 501, 251, 1]);
    }
}
