//! The schedulers `attune sample` steps with, as diffusers computes them: DDIM (eta 0) for
//! noise-, v- and sample-predicting models, and flow matching's Euler steps (SD3, Flux), configured
//! by default for Stable Diffusion or from a diffusers `scheduler_config.json`.
mod config;
mod ddim;
mod flow;

use ndarray::ArrayD;

pub use config::{Kind, Schedule, read};
pub use ddim::{BetaSchedule, Betas, Ddim, DdimConfig, Prediction, Spacing};
pub use flow::{DynamicShift, FlowConfig, FlowEuler, Spread};

pub enum Scheduler {
    Ddim(Ddim),
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
            Schedule::Flow(c) => Scheduler::FlowEuler(FlowEuler::new(c, steps, spread, tokens)?),
        })
    }

    /// The timestep the model is fed at each step.
    pub fn timesteps(&self) -> Vec<f64> {
        match self {
            Scheduler::Ddim(d) => d.timesteps().iter().map(|&t| t as f64).collect(),
            Scheduler::FlowEuler(f) => f.timesteps(),
        }
    }

    /// x after step `i`, from the model's guided output.
    pub fn step(&self, i: usize, out: &ArrayD<f32>, x: &ArrayD<f32>) -> ArrayD<f32> {
        match self {
            Scheduler::Ddim(d) => d.step(i, out, x),
            Scheduler::FlowEuler(f) => f.step(i, out, x),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Scheduler::Ddim(_) => "DDIM",
            Scheduler::FlowEuler(_) => "flow-matching Euler",
        }
    }
}
