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

pub use config::{Kind, Schedule, read};
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
