//! The schedulers `attune sample` steps with, as diffusers computes them: DDIM (eta 0), PLMS
//! (PNDM's), Euler, Euler ancestral and Heun over the noise levels (SDXL's default), DPM-Solver++
//! multistep (orders 1-3, ODE and SDE), UniPC, LCM, and flow matching's Euler steps (SD3,
//! Flux), configured by default for Stable Diffusion or from a diffusers
//! `scheduler_config.json`. Stochastic steps draw from a seeded generator or a noise file.
mod config;
mod ddim;
mod dpm;
mod euler;
mod flow;
mod lcm;
mod noise;
mod pndm;
mod sigmas;
mod unipc;

use std::borrow::Cow;

use ndarray::ArrayD;

pub use config::{Kind, Schedule, read, stable_diffusion};
pub use ddim::{BetaSchedule, Betas, Ddim, DdimConfig, Prediction, Spacing};
pub use dpm::{Dpm, DpmConfig};
pub use euler::{Euler, EulerConfig, Variant};
pub use flow::{DynamicShift, FlowConfig, FlowEuler, Spread};
pub use lcm::{Lcm, LcmConfig};
pub use noise::Noise;
pub use pndm::Pndm;
pub use sigmas::SigmaSpacing;
pub use unipc::{UniPc, UniPcConfig};

enum Stepper {
    Ddim(Ddim),
    Pndm(Pndm),
    Dpm(Dpm),
    Euler(Euler),
    Lcm(Lcm),
    UniPc(UniPc),
    FlowEuler(FlowEuler),
}

/// A scheduler set to its steps, with the noise its stochastic steps draw.
pub struct Scheduler {
    stepper: Stepper,
    name: &'static str,
    /// Inference steps (the model may be called more often: Heun, PLMS).
    steps: usize,
    noise: Noise,
}

impl Scheduler {
    /// `spread` and `tokens` (the image's token count) matter to flow matching only. Its
    /// stochastic steps draw from `Noise::seeded(0)` unless `with_noise` says otherwise.
    pub fn new(
        schedule: &Schedule,
        steps: usize,
        spread: Spread,
        tokens: Option<usize>,
    ) -> Result<Scheduler, String> {
        let stepper = match schedule {
            Schedule::Ddim(c) => Stepper::Ddim(Ddim::new(c.clone(), steps)?),
            Schedule::Pndm(c) => Stepper::Pndm(Pndm::new(c, steps)?),
            Schedule::Euler(c) => Stepper::Euler(Euler::new(c, steps)?),
            Schedule::Dpm(c) => Stepper::Dpm(Dpm::new(c.clone(), steps)?),
            Schedule::Lcm(c) => Stepper::Lcm(Lcm::new(c.clone(), steps)?),
            Schedule::UniPc(c) => Stepper::UniPc(UniPc::new(c.clone(), steps)?),
            Schedule::Flow(c) => Stepper::FlowEuler(FlowEuler::new(c, steps, spread, tokens)?),
        };
        Ok(Scheduler {
            stepper,
            name: schedule.name(),
            steps,
            noise: Noise::seeded(0),
        })
    }

    /// The noise stochastic steps draw.
    pub fn with_noise(self, noise: Noise) -> Scheduler {
        Scheduler { noise, ..self }
    }

    /// The timestep the model is fed at each call.
    pub fn timesteps(&self) -> Vec<f64> {
        let whole = |t: &[usize]| t.iter().map(|&t| t as f64).collect();
        match &self.stepper {
            Stepper::Ddim(d) => whole(d.timesteps()),
            Stepper::Pndm(p) => whole(p.timesteps()),
            Stepper::Euler(e) => e.timesteps().to_vec(),
            Stepper::Dpm(d) => whole(d.timesteps()),
            Stepper::Lcm(l) => whole(l.timesteps()),
            Stepper::UniPc(u) => whole(u.timesteps()),
            Stepper::FlowEuler(f) => f.timesteps(),
        }
    }

    /// The inference steps it was set to.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The model call that step `step` starts at (img2img's first): Heun calls it twice per
    /// step, as diffusers' `timesteps[t_start * order:]`.
    pub fn first_call(&self, step: usize) -> usize {
        match &self.stepper {
            Stepper::Euler(e) => step * e.order(),
            _ => step,
        }
    }

    /// The pipeline's `eta`: DDIM's share of fresh noise per step, TCD's γ; in [0, 1].
    pub fn with_eta(mut self, eta: f64) -> Result<Scheduler, String> {
        if !(0.0..=1.0).contains(&eta) {
            return Err(format!("--eta {eta}: must be within [0, 1]"));
        }
        match &mut self.stepper {
            Stepper::Ddim(d) => d.eta = eta,
            Stepper::Lcm(l) if self.name == "TCD" => l.gamma = eta,
            _ if eta == 0.0 => {}
            _ => {
                return Err(format!(
                    "--eta {eta}: {} takes no eta (DDIM and TCD do)",
                    self.name
                ));
            }
        }
        Ok(self)
    }

    /// The noise draws the calls from `from` on take.
    pub fn draws(&self, from: usize) -> usize {
        match &self.stepper {
            Stepper::Ddim(d) => d.draws(from),
            Stepper::Euler(e) => e.draws(from),
            Stepper::Dpm(d) => d.draws(from),
            Stepper::Lcm(l) => l.draws(from),
            _ => 0,
        }
    }

    /// Checks that the noise holds the draws of the calls from `from` on, of latents `shape`.
    pub fn check_noise(&self, from: usize, shape: &[usize]) -> Result<(), String> {
        self.noise.check(self.draws(from), shape, self.name)
    }

    /// x after call `i`, from the model's guided output; calls come in order (the multistep
    /// solvers use the previous ones').
    pub fn step(
        &mut self,
        i: usize,
        out: &ArrayD<f32>,
        x: &ArrayD<f32>,
    ) -> Result<ArrayD<f32>, String> {
        let noise = &mut self.noise;
        match &mut self.stepper {
            Stepper::Ddim(d) => d.step(i, out, x, noise),
            Stepper::Pndm(p) => Ok(p.step(i, out, x)),
            Stepper::Euler(e) => e.step(i, out, x, noise),
            Stepper::Dpm(d) => d.step(i, out, x, noise),
            Stepper::Lcm(l) => l.step(i, out, x, noise),
            Stepper::UniPc(u) => Ok(u.step(i, out, x)),
            Stepper::FlowEuler(f) => Ok(f.step(i, out, x)),
        }
    }

    /// The clean latents `x0` noised to the level of call `i` (an index into `timesteps()`),
    /// as diffusers' `add_noise` (flow matching: `scale_noise`) does once the pipeline has
    /// set the scheduler's begin index: img2img's start, inpainting's blend.
    pub fn add_noise(&self, i: usize, x0: &ArrayD<f32>, noise: &ArrayD<f32>) -> ArrayD<f32> {
        match &self.stepper {
            Stepper::Ddim(d) => d.add_noise(i, x0, noise),
            Stepper::Pndm(p) => p.add_noise(i, x0, noise),
            Stepper::Euler(e) => e.add_noise(i, x0, noise),
            Stepper::Dpm(d) => d.add_noise(i, x0, noise),
            Stepper::Lcm(l) => l.add_noise(i, x0, noise),
            Stepper::UniPc(u) => u.add_noise(i, x0, noise),
            Stepper::FlowEuler(f) => f.add_noise(i, x0, noise),
        }
    }

    /// The initial noise's standard deviation (the σ-based schedulers' σ range; 1 for the
    /// others).
    pub fn init_noise_sigma(&self) -> f32 {
        match &self.stepper {
            Stepper::Euler(e) => e.init_noise_sigma() as f32,
            _ => 1.0,
        }
    }

    /// The latents as the model is fed them at call `i` (the σ-based schedulers scale them to
    /// unit variance).
    pub fn scale_input<'a>(&self, i: usize, x: &'a ArrayD<f32>) -> Cow<'a, ArrayD<f32>> {
        match &self.stepper {
            Stepper::Euler(e) => Cow::Owned(e.scale_input(i, x)),
            _ => Cow::Borrowed(x),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    /// img2img on every scheduler: x0 = [1, −0.5] noised with ε = [0.5, 1.5] to step 1 of 4,
    /// then steps 1..4 with a model that answers 0.1·(its input) + 0.05; diffusers 0.42.1's
    /// `add_noise`/`scale_noise` after `set_begin_index(1)` and its steps printed these.
    #[test]
    fn starting_past_step_0_is_diffusers_img2img() {
        let sd = DdimConfig::stable_diffusion();
        let dpm = DpmConfig {
            schedule: sd.clone(),
            order: 2,
            sde: false,
            sigmas: SigmaSpacing::Timesteps,
            heun: false,
            lower_order_final: true,
            euler_at_final: false,
            final_sigma_min: false,
            lambda_min_clipped: f64::NEG_INFINITY,
        };
        let flow = FlowConfig {
            shift: 3.0,
            ..FlowConfig::default()
        };
        type Case = (Schedule, [f32; 2], [[f32; 2]; 3]);
        let cases: [Case; 4] = [
            (
                Schedule::Ddim(sd.clone()),
                [0.950_138_3, 1.015_003_3],
                [
                    [1.375_431_4, 1.471_920_4],
                    [1.553_109_4, 1.664_365_6],
                    [1.551_280_7, 1.662_449_4],
                ],
            ),
            (
                Schedule::Euler(EulerConfig::new(sd.clone(), Variant::Euler)),
                [1.811_846_5, 1.935_539_5],
                [
                    [1.677_666, 1.795_357_1],
                    [1.554_434_4, 1.665_785_3],
                    [1.545_952_1, 1.656_843_3],
                ],
            ),
            (
                Schedule::Dpm(dpm),
                [0.858_078, 1.175_037_9],
                [
                    [1.296_484_7, 1.788_892],
                    [1.624_579_2, 2.251_14],
                    [1.751_266_4, 2.437_757_3],
                ],
            ),
            (
                Schedule::Flow(flow),
                [0.571_153_9, 1.215_384_6],
                [
                    [0.543_781_4, 1.171_549_3],
                    [0.481_862, 1.072_389_4],
                    [0.480_985_3, 1.070_985_4],
                ],
            ),
        ];
        let v = |a: [f32; 2]| ArrayD::from_shape_vec(IxDyn(&[1, 1, 1, 2]), a.to_vec()).unwrap();
        for (schedule, start, steps) in cases {
            let mut s = Scheduler::new(&schedule, 4, Spread::Scheduler, None).unwrap();
            let mut x = s.add_noise(1, &v([1.0, -0.5]), &v([0.5, 1.5]));
            let close = |got: &ArrayD<f32>, want: [f32; 2], what: &str| {
                for (g, w) in got.iter().zip(want) {
                    assert!(
                        (g - w).abs() < 2e-5,
                        "{} {what}: {got} vs {want:?}",
                        schedule.name()
                    );
                }
            };
            close(&x, start, "start");
            for (i, want) in (1..4).zip(steps) {
                let out = s.scale_input(i, &x).mapv(|v| 0.1 * v + 0.05);
                x = s.step(i, &out, &x).unwrap();
                close(&x, want, &format!("step {i}"));
            }
        }
    }
}
