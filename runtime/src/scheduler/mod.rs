//! The schedulers `attune sample` steps with, as diffusers computes them: DDIM (eta 0) for
//! noise-, v- and sample-predicting models, Euler steps over their noise levels (SDXL's
//! default), DPM-Solver++ multistep (PixArt's), and flow matching's Euler steps (SD3, Flux), configured
//! by default for Stable Diffusion or from a diffusers `scheduler_config.json`.
mod config;
mod ddim;
mod dpm;
mod euler;
mod flow;

use std::borrow::Cow;

use ndarray::ArrayD;

pub use config::{Kind, Schedule, read, stable_diffusion};
pub use ddim::{BetaSchedule, Betas, Ddim, DdimConfig, Prediction, Spacing};
pub use dpm::{Dpm, DpmConfig};
pub use euler::Euler;
pub use flow::{DynamicShift, FlowConfig, FlowEuler, Spread};

pub enum Scheduler {
    Ddim(Ddim),
    Dpm(Dpm),
    Euler(Euler),
    FlowEuler(FlowEuler),
}

impl Scheduler {
    /// `spread` and `tokens` (the image's token count) matter to flow matching only.
    pub fn new(
        schedule: &Schedule,
        steps: usize,
        spread: Spread,
        tokens: Option<usize>,
    ) -> Result<Scheduler, String> {
        Ok(match schedule {
            Schedule::Ddim(c) => Scheduler::Ddim(Ddim::new(c.clone(), steps)?),
            Schedule::Euler(c) => Scheduler::Euler(Euler::new(c, steps)?),
            Schedule::Dpm(c) => Scheduler::Dpm(Dpm::new(c.clone(), steps)?),
            Schedule::Flow(c) => Scheduler::FlowEuler(FlowEuler::new(c, steps, spread, tokens)?),
        })
    }

    /// The timestep the model is fed at each step.
    pub fn timesteps(&self) -> Vec<f64> {
        match self {
            Scheduler::Ddim(d) => d.timesteps().iter().map(|&t| t as f64).collect(),
            Scheduler::Euler(e) => e.timesteps().to_vec(),
            Scheduler::Dpm(d) => d.timesteps().iter().map(|&t| t as f64).collect(),
            Scheduler::FlowEuler(f) => f.timesteps(),
        }
    }

    /// x after step `i`, from the model's guided output; steps come in order (DPM-Solver's
    /// second order uses the previous one's).
    pub fn step(&mut self, i: usize, out: &ArrayD<f32>, x: &ArrayD<f32>) -> ArrayD<f32> {
        match self {
            Scheduler::Ddim(d) => d.step(i, out, x),
            Scheduler::Euler(e) => e.step(i, out, x),
            Scheduler::Dpm(d) => d.step(i, out, x),
            Scheduler::FlowEuler(f) => f.step(i, out, x),
        }
    }

    /// The clean latents `x0` noised to the level of step `i` (an index into `timesteps()`),
    /// as diffusers' `add_noise` (flow matching: `scale_noise`) does once the pipeline has
    /// set the scheduler's begin index: img2img's start, inpainting's blend.
    pub fn add_noise(&self, i: usize, x0: &ArrayD<f32>, noise: &ArrayD<f32>) -> ArrayD<f32> {
        match self {
            Scheduler::Ddim(d) => d.add_noise(i, x0, noise),
            Scheduler::Euler(e) => e.add_noise(i, x0, noise),
            Scheduler::Dpm(d) => d.add_noise(i, x0, noise),
            Scheduler::FlowEuler(f) => f.add_noise(i, x0, noise),
        }
    }

    /// The initial noise's standard deviation (Euler's σ range; 1 for the others).
    pub fn init_noise_sigma(&self) -> f32 {
        match self {
            Scheduler::Euler(e) => e.init_noise_sigma() as f32,
            _ => 1.0,
        }
    }

    /// The latents as the model is fed them at step `i` (Euler scales them to unit variance).
    pub fn scale_input<'a>(&self, i: usize, x: &'a ArrayD<f32>) -> Cow<'a, ArrayD<f32>> {
        match self {
            Scheduler::Euler(e) => Cow::Owned(e.scale_input(i, x)),
            _ => Cow::Borrowed(x),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Scheduler::Ddim(_) => "DDIM",
            Scheduler::Euler(_) => "Euler",
            Scheduler::Dpm(_) => "DPM-Solver++",
            Scheduler::FlowEuler(_) => "flow-matching Euler",
        }
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
                Schedule::Euler(sd.clone()),
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
                        s_name(&schedule)
                    );
                }
            };
            close(&x, start, "start");
            for (i, want) in (1..4).zip(steps) {
                let out = s.scale_input(i, &x).mapv(|v| 0.1 * v + 0.05);
                x = s.step(i, &out, &x);
                close(&x, want, &format!("step {i}"));
            }
        }
    }

    fn s_name(s: &Schedule) -> &'static str {
        match s {
            Schedule::Ddim(_) => "DDIM",
            Schedule::Euler(_) => "Euler",
            Schedule::Dpm(_) => "DPM",
            Schedule::Flow(_) => "flow",
        }
    }
}
