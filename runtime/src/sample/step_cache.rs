//! Step caching at run time: on which steps a step-cached denoiser computes the part it may
//! skip (DeepCache: on a schedule; first-block cache: the graph decides), and what it
//! reuses in between.
use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor};

// The graph's cache inputs and outputs (`attune compile --step-cache`).
pub use attune_compiler::cache_io::deepcache::{
    CACHED as CACHED_INPUT, FEATURE as FEATURE_OUTPUT, REFRESH as REFRESH_INPUT,
};
pub use attune_compiler::cache_io::fbcache::{
    CACHED_RESIDUAL, COMPUTED, FIRST_RESIDUAL, PREV_RESIDUAL, RESIDUAL, THRESHOLD,
};
pub use attune_compiler::cache_io::teacache as tea;
use attune_compiler::cache_io::{CACHED_OUTPUT, numbered};

/// When the deep part is recomputed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// Steps 0, N, 2N, ... (`DeepCacheSDHelper.set_params(cache_interval=N, skip_mode='uniform')`).
    Uniform { interval: usize },
    /// The refresh steps of DeepCache's own pipelines (`uniform=False`): ⌈steps / N⌉ of them,
    /// denser around step `center` (`sample_from_quad_center`).
    NonUniform {
        interval: usize,
        center: usize,
        pow: f64,
    },
}

impl Schedule {
    /// The loop steps (0-based, of `steps`) that compute the deep part.
    pub fn refresh_steps(&self, steps: usize) -> Result<Vec<usize>> {
        match *self {
            Schedule::Uniform { interval } | Schedule::NonUniform { interval, .. }
                if interval == 0 =>
            {
                Err(Error::Inputs("--cache-interval must be at least 1".into()))
            }
            Schedule::Uniform { interval } => Ok((0..steps).step_by(interval).collect()),
            Schedule::NonUniform { interval: 1, .. } => Ok((0..steps).collect()),
            Schedule::NonUniform {
                interval,
                center,
                pow,
            } => quad_center(steps, steps.div_ceil(interval), center, pow),
        }
    }
}

/// DeepCache's `sample_from_quad_center`: `samples` step indices, 0 first, spaced as
/// `x^pow` for x evenly spaced over [(-center)^(1/pow), (steps-center)^(1/pow)], so they
/// crowd around `center`; `pow` drops by 0.02 until the indices are distinct. As in Python,
/// (-center)^(1/pow) is complex (principal branch) and the indices are the real parts,
/// truncated.
fn quad_center(steps: usize, samples: usize, center: usize, mut pow: f64) -> Result<Vec<usize>> {
    if center > steps {
        return Err(Error::Inputs(format!(
            "--cache-center {center} is past the {steps} steps"
        )));
    }
    let c = center as f64;
    while pow > 1.0 {
        // a = (-c)^(1/pow), the principal complex root; b = (steps - c)^(1/pow), real.
        let (a_mod, a_arg) = (
            c.powf(1.0 / pow),
            if c > 0.0 {
                std::f64::consts::PI / pow
            } else {
                0.0
            },
        );
        let (ar, ai) = (a_mod * a_arg.cos(), a_mod * a_arg.sin());
        let b = (steps as f64 - c).powf(1.0 / pow);
        let mut ints: Vec<i64> = (0..=samples)
            .map(|k| {
                // np.linspace: a + k·(b - a)/n, the last point exactly b.
                let (re, im) = if k == samples {
                    (b, 0.0)
                } else {
                    let f = k as f64 / samples as f64;
                    (ar + f * (b - ar), ai - f * ai)
                };
                let (m, arg) = (re.hypot(im), im.atan2(re));
                let real = if m == 0.0 {
                    0.0
                } else {
                    m.powf(pow) * (pow * arg).cos()
                };
                real.trunc() as i64
            })
            .collect();
        ints.sort_unstable();
        ints.dedup();
        let inner = ints.get(1..ints.len().saturating_sub(1)).unwrap_or(&[]);
        let indices: Vec<i64> = std::iter::once(0)
            .chain(inner.iter().map(|x| x + center as i64))
            .collect();
        if indices.len() == samples {
            let mut out: Vec<usize> = indices.into_iter().map(|i| i.max(0) as usize).collect();
            out.sort_unstable();
            return Ok(out);
        }
        pow -= 0.02;
    }
    Err(Error::Inputs(format!(
        "--cache-mode non-uniform: no power above 1 gives {samples} distinct refresh steps of {steps} around --cache-center {center} (DeepCache's sample_from_quad_center fails the same way): lower the center or the interval"
    )))
}

/// What a step-cached denoiser carries between steps, decided per step.
pub struct StepCache {
    kind: Kind,
    /// Extra outputs computed in the cached part (attention maps): fed back as they were on
    /// the last computed step, as `<cache>.cached_output.<output>`.
    outputs: Vec<CachedOutput>,
    /// The loop steps that computed the cached part.
    pub computed: Vec<usize>,
    /// How many steps reused it.
    pub cached: usize,
}

enum Kind {
    /// DeepCache: refreshed on a schedule; the feature of the last refresh.
    Deep {
        refresh: Vec<bool>,
        feature: Option<HostTensor>,
        feature_type: DType,
    },
    /// First-block cache: the graph decides; the first block's residual and the skipped
    /// blocks' residuals of the last computed step.
    FirstBlock {
        threshold: Option<f32>,
        prev: Option<HostTensor>,
        residuals: Vec<Option<HostTensor>>,
        types: Vec<DType>,
    },
    /// TeaCache: the graph decides from the accumulated change of the modulated input; the
    /// runtime forces the first and last steps.
    Tea {
        threshold: Option<f32>,
        steps: usize,
        accumulated: f32,
        prev: Option<HostTensor>,
        residuals: Vec<Option<HostTensor>>,
        types: Vec<DType>,
    },
}

struct CachedOutput {
    output: String,
    input: String,
    dtype: DType,
    value: Option<HostTensor>,
}

/// How the run asks for caching (the CLI's `--cache-*` flags).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Request {
    pub schedule: Option<Schedule>,
    pub threshold: Option<f32>,
}

impl StepCache {
    /// The cache of a denoiser with these inputs (name, declared type), for a loop of `steps`
    /// steps; `None` for one that is not split. Caching asked of a graph split otherwise, or
    /// not at all, is an error.
    pub fn for_inputs(
        inputs: &std::collections::BTreeMap<String, DType>,
        request: Request,
        steps: usize,
    ) -> Result<Option<StepCache>> {
        let deep = inputs.contains_key(REFRESH_INPUT);
        let first_block =
            inputs.contains_key(PREV_RESIDUAL) || inputs.contains_key(tea::PREV_MODULATED);
        let residual_types = |base: &str| -> Vec<DType> {
            (0..)
                .map_while(|k| inputs.get(&numbered(base, k)).copied())
                .collect()
        };
        let kind = match (deep, first_block) {
            (true, _) => {
                if request.threshold.is_some() {
                    return Err(Error::Inputs(
                        "--cache-threshold is for first-block caches; this UNet is split for DeepCache (--cache-interval)".into(),
                    ));
                }
                let schedule = request
                    .schedule
                    .unwrap_or(Schedule::Uniform { interval: 1 });
                let mut refresh = vec![false; steps];
                for s in schedule.refresh_steps(steps)? {
                    if let Some(r) = refresh.get_mut(s) {
                        *r = true;
                    }
                }
                Kind::Deep {
                    refresh,
                    feature: None,
                    feature_type: inputs.get(CACHED_INPUT).copied().unwrap_or(DType::F32),
                }
            }
            (false, true) => {
                if request.schedule.is_some() {
                    return Err(Error::Inputs(
                        "--cache-interval/--cache-mode are for DeepCache; this model has a first-block cache or TeaCache, which decides by --cache-threshold".into(),
                    ));
                }
                if let Some(t) = request.threshold
                    && !(t >= 0.0 && t.is_finite())
                {
                    return Err(Error::Inputs(format!(
                        "--cache-threshold {t}: must be a number >= 0 (0 computes every step)"
                    )));
                }
                if inputs.contains_key(tea::PREV_MODULATED) {
                    let types = residual_types(tea::CACHED_RESIDUAL);
                    Kind::Tea {
                        threshold: request.threshold,
                        steps,
                        accumulated: 0.0,
                        prev: None,
                        residuals: vec![None; types.len()],
                        types,
                    }
                } else {
                    let types = residual_types(CACHED_RESIDUAL);
                    Kind::FirstBlock {
                        threshold: request.threshold,
                        prev: None,
                        residuals: vec![None; types.len()],
                        types,
                    }
                }
            }
            (false, false) if request != Request::default() => {
                return Err(Error::Inputs(format!(
                    "--cache-interval/--cache-threshold need a model split for step caching (inputs {REFRESH_INPUT}, {PREV_RESIDUAL} or {}): compile it with --step-cache deepcache[:BRANCH], first-block[:THRESHOLD] or teacache[:THRESHOLD]",
                    tea::PREV_MODULATED
                )));
            }
            (false, false) => return Ok(None),
        };
        let outputs = inputs
            .iter()
            .filter_map(|(name, dtype)| {
                let (_, output) = name.split_once(CACHED_OUTPUT)?;
                Some(CachedOutput {
                    output: output.to_string(),
                    input: name.clone(),
                    dtype: *dtype,
                    value: None,
                })
            })
            .collect();
        Ok(Some(StepCache {
            kind,
            outputs,
            computed: Vec::new(),
            cached: 0,
        }))
    }

    /// For timing one computed and one cached step (`attune bench`): step 0 computes, step 1
    /// reuses it (an interval or threshold no step reaches).
    pub fn for_bench(
        inputs: &std::collections::BTreeMap<String, DType>,
    ) -> Result<Option<StepCache>> {
        let request = if inputs.contains_key(REFRESH_INPUT) {
            Request {
                schedule: Some(Schedule::Uniform {
                    interval: usize::MAX,
                }),
                threshold: None,
            }
        } else {
            Request {
                schedule: None,
                threshold: Some(f32::MAX),
            }
        };
        match StepCache::for_inputs(inputs, request, 3) {
            Ok(c) => Ok(c),
            // Not split: nothing to time apart.
            Err(_)
                if !inputs.contains_key(PREV_RESIDUAL)
                    && !inputs.contains_key(tea::PREV_MODULATED) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// What the report calls the cached part.
    pub fn part(&self) -> &'static str {
        match self.kind {
            Kind::Deep { .. } => "deep part",
            Kind::FirstBlock { .. } => "blocks after the first",
            Kind::Tea { .. } => "transformer blocks",
        }
    }

    /// The cache inputs for loop step `k`.
    pub fn inputs(&self, k: usize) -> Result<Vec<(String, HostTensor)>> {
        let mut inputs = self.kind_inputs(k)?;
        for o in &self.outputs {
            let v = match &o.value {
                Some(v) => v.clone(),
                None => zero(o.dtype, &o.input)?,
            };
            inputs.push((o.input.clone(), v));
        }
        Ok(inputs)
    }

    /// Extra outputs (attention maps) a skipped step reuses from the last computed one.
    pub fn reused_outputs(&self) -> usize {
        self.outputs.len()
    }

    fn kind_inputs(&self, k: usize) -> Result<Vec<(String, HostTensor)>> {
        Ok(match &self.kind {
            Kind::Deep {
                refresh,
                feature,
                feature_type,
            } => {
                let fresh = feature.is_none() || refresh.get(k).copied().unwrap_or(true);
                let flag = HostTensor::Bool(ArrayD::from_elem(IxDyn(&[]), fresh));
                let cached = match (feature, fresh) {
                    (Some(f), false) => f.clone(),
                    // Not read on refresh steps: an empty tensor of the declared type.
                    _ => {
                        HostTensor::from_le_bytes(*feature_type, &[0, 0, 0, 0], &[], CACHED_INPUT)?
                    }
                };
                vec![(REFRESH_INPUT.into(), flag), (CACHED_INPUT.into(), cached)]
            }
            Kind::FirstBlock {
                threshold,
                prev,
                residuals,
                types,
            } => {
                // A 0 scalar before the first computed step: its difference is not finite, so
                // the step computes (and what it reuses is not read).
                let prev = match prev {
                    Some(p) => p.clone(),
                    None => zero(types.first().copied().unwrap_or(DType::F32), PREV_RESIDUAL)?,
                };
                let mut inputs = vec![(PREV_RESIDUAL.to_string(), prev)];
                for (k, (r, t)) in residuals.iter().zip(types).enumerate() {
                    let name = numbered(CACHED_RESIDUAL, k);
                    let r = match r {
                        Some(r) => r.clone(),
                        None => zero(*t, &name)?,
                    };
                    inputs.push((name, r));
                }
                if let Some(t) = threshold {
                    inputs.push((
                        THRESHOLD.into(),
                        HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), *t)),
                    ));
                }
                inputs
            }
            Kind::Tea {
                threshold,
                steps,
                accumulated,
                prev,
                residuals,
                types,
            } => {
                let scalar = |v: f32| HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), v));
                // TeaCache computes its first and last steps whatever the change.
                let force = prev.is_none() || k == 0 || k + 1 >= *steps;
                let prev = match prev {
                    Some(p) => p.clone(),
                    None => zero(
                        types.first().copied().unwrap_or(DType::F32),
                        tea::PREV_MODULATED,
                    )?,
                };
                let mut inputs = vec![
                    (
                        tea::FORCE.to_string(),
                        HostTensor::Bool(ArrayD::from_elem(IxDyn(&[]), force)),
                    ),
                    (tea::ACCUMULATED.to_string(), scalar(*accumulated)),
                    (tea::PREV_MODULATED.to_string(), prev),
                ];
                for (k, (r, t)) in residuals.iter().zip(types).enumerate() {
                    let name = numbered(tea::CACHED_RESIDUAL, k);
                    let r = match r {
                        Some(r) => r.clone(),
                        None => zero(*t, &name)?,
                    };
                    inputs.push((name, r));
                }
                if let Some(t) = threshold {
                    inputs.push((tea::THRESHOLD.into(), scalar(*t)));
                }
                inputs
            }
        })
    }

    /// Keeps what step `k` computed; returns whether it computed the cached part.
    pub fn after(&mut self, k: usize, outputs: &[(String, HostTensor)]) -> Result<bool> {
        let output = |name: &str| {
            outputs.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone()).ok_or_else(|| {
                Error::Inputs(format!(
                    "the model takes step-cache inputs but has no output {name}: compile it again with --step-cache"
                ))
            })
        };
        let fresh = match &mut self.kind {
            Kind::Deep {
                refresh, feature, ..
            } => {
                let fresh = feature.is_none() || refresh.get(k).copied().unwrap_or(true);
                if fresh {
                    *feature = Some(output(FEATURE_OUTPUT)?);
                }
                fresh
            }
            Kind::FirstBlock {
                prev, residuals, ..
            } => {
                let fresh = match output(COMPUTED)? {
                    HostTensor::Bool(b) => b.iter().next().copied().unwrap_or(true),
                    _ => true,
                };
                // Only computed steps update the cache (ParaAttention's buffers).
                if fresh {
                    *prev = Some(output(FIRST_RESIDUAL)?);
                    for (j, r) in residuals.iter_mut().enumerate() {
                        *r = Some(output(&numbered(RESIDUAL, j))?);
                    }
                }
                fresh
            }
            Kind::Tea {
                accumulated,
                prev,
                residuals,
                ..
            } => {
                let fresh = match output(tea::COMPUTED)? {
                    HostTensor::Bool(b) => b.iter().next().copied().unwrap_or(true),
                    _ => true,
                };
                // The modulated input is kept every step; the sum restarts when computed.
                *prev = Some(output(tea::MODULATED)?);
                *accumulated = match output(tea::ACCUMULATED_NEXT)? {
                    HostTensor::F32(a) if !fresh => a.iter().next().copied().unwrap_or(0.0),
                    _ => 0.0,
                };
                if fresh {
                    for (j, r) in residuals.iter_mut().enumerate() {
                        *r = Some(output(&numbered(tea::RESIDUAL, j))?);
                    }
                }
                fresh
            }
        };
        if fresh {
            for o in &mut self.outputs {
                o.value = Some(output(&o.output)?);
            }
            self.computed.push(k);
        } else {
            self.cached += 1;
        }
        Ok(fresh)
    }
}

/// A 0 scalar of type `t`: what a cache input takes before anything is cached (the graph
/// declares those inputs without a shape, and does not read them on computed steps).
fn zero(t: DType, what: &str) -> Result<HostTensor> {
    HostTensor::from_le_bytes(t, &[], &vec![0; t.size()], what)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DeepCache's `sample_from_quad_center(steps, n, center, pow)` as its pipelines call it
    /// (run with deepcache 0.1.1 and numpy, models/export/deepcache_ref.py's copy of it).
    #[test]
    fn non_uniform_steps_are_deepcache_pipelines() {
        let cases: &[(usize, usize, usize, f64, &[usize])] = &[
            (10, 4, 4, 1.4, &[0, 3, 4, 7]),
            (50, 10, 15, 1.4, &[0, 5, 9, 13, 17, 21, 26, 31, 37, 43]),
            (
                50,
                17,
                15,
                1.4,
                &[
                    0, 3, 6, 8, 11, 13, 15, 17, 20, 22, 25, 28, 32, 35, 38, 42, 46,
                ],
            ),
            (20, 7, 5, 1.4, &[0, 3, 5, 6, 9, 12, 16]),
            (20, 10, 10, 1.2, &[0, 3, 5, 7, 9, 10, 11, 13, 15, 17]),
            (25, 5, 0, 1.4, &[0, 2, 6, 12, 18]),
            (
                100,
                20,
                30,
                1.5,
                &[
                    0, 5, 9, 13, 17, 21, 25, 29, 33, 37, 42, 47, 52, 57, 63, 68, 74, 80, 86, 93,
                ],
            ),
            (20, 4, 15, 1.4, &[0, 7, 12, 16]),
            (8, 4, 4, 1.4, &[0, 3, 4, 5]),
        ];
        for &(steps, n, center, pow, want) in cases {
            let got = quad_center(steps, n, center, pow).unwrap();
            assert_eq!(
                got, want,
                "steps {steps}, n {n}, center {center}, pow {pow}"
            );
        }
        let err = quad_center(10, 9, 4, 1.4).unwrap_err().to_string();
        assert!(err.contains("no power above 1"), "{err}");
    }

    #[test]
    fn uniform_steps_are_every_nth_and_interval_zero_is_refused() {
        let s = Schedule::Uniform { interval: 3 };
        assert_eq!(s.refresh_steps(10).unwrap(), vec![0, 3, 6, 9]);
        let every = Schedule::Uniform { interval: 1 };
        assert_eq!(every.refresh_steps(4).unwrap(), vec![0, 1, 2, 3]);
        assert!(Schedule::Uniform { interval: 0 }.refresh_steps(4).is_err());
    }
}
