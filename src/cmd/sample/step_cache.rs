//! `--cache-interval` and friends: when a DeepCache-split UNet computes its deep part.
use anyhow::bail;
use attune_runtime::sample::step_cache::{Request, Schedule};

#[derive(Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheMode {
    /// Steps 0, N, 2N, ... (DeepCacheSDHelper's skip_mode='uniform')
    #[default]
    Uniform,
    /// ⌈steps/N⌉ refresh steps crowded around --cache-center (DeepCache's own pipelines'
    /// uniform=False, sample_from_quad_center; the helper's non-uniform mode is broken in
    /// deepcache 0.1.1)
    NonUniform,
}

#[derive(Clone, Default, clap::Args)]
pub struct StepCacheArgs {
    /// With a UNet compiled with --step-cache deepcache: compute its deep part every N steps
    /// and reuse it in between [default: 1, every step]
    #[arg(long, value_name = "N")]
    pub cache_interval: Option<usize>,
    /// How the refresh steps are spread
    #[arg(long, value_enum, default_value_t, requires = "cache_interval")]
    pub cache_mode: CacheMode,
    /// non-uniform: the step the refresh steps crowd around (DeepCache's `center`)
    #[arg(long, value_name = "STEP", default_value_t = 15)]
    pub cache_center: usize,
    /// non-uniform: the spacing's starting power, > 1 (DeepCache's `pow`)
    #[arg(long, value_name = "P", default_value_t = 1.4)]
    pub cache_pow: f64,
    /// With a model compiled with --step-cache first-block: skip the blocks after the first
    /// while its residual changes by less than this (relative mean absolute difference; 0
    /// computes every step) [default: the threshold it was compiled with]
    #[arg(long, value_name = "T")]
    pub cache_threshold: Option<f32>,
}

impl StepCacheArgs {
    pub fn request(&self) -> anyhow::Result<Request> {
        Ok(Request {
            schedule: self.schedule()?,
            threshold: self.cache_threshold,
        })
    }

    fn schedule(&self) -> anyhow::Result<Option<Schedule>> {
        let Some(interval) = self.cache_interval else {
            return Ok(None);
        };
        if interval == 0 {
            bail!("--cache-interval 0: the deep part must be computed at least every step (1)");
        }
        Ok(Some(match self.cache_mode {
            CacheMode::Uniform => Schedule::Uniform { interval },
            CacheMode::NonUniform => {
                if !(self.cache_pow > 1.0 && self.cache_pow.is_finite()) {
                    bail!("--cache-pow {}: must be a number above 1", self.cache_pow);
                }
                Schedule::NonUniform {
                    interval,
                    center: self.cache_center,
                    pow: self.cache_pow,
                }
            }
        }))
    }
}
