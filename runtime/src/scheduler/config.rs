//! A diffusers `scheduler_config.json` read as the DDIM or flow-matching schedule it gives,
//! the way `DDIMScheduler.from_config` / `FlowMatchEulerDiscreteScheduler.from_config` read
//! it: absent keys take the scheduler's defaults, other schedulers' keys are ignored (and
//! reported), and a setting attune does not implement is an error naming the key.
use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Map, Value};

use super::ddim::{BetaSchedule, Betas, DdimConfig, Prediction, Spacing};
use super::dpm::DpmConfig;
use super::euler::{EulerConfig, Variant};
use super::flow::{DynamicShift, FlowConfig};
use super::lcm::LcmConfig;
use super::sigmas::SigmaSpacing;
use super::unipc::UniPcConfig;
use crate::error::{Error, Result};

/// The noise-level spacings diffusers' σ-based schedulers offer.
const SIGMA_SPACINGS: [SigmaSpacing; 3] = [
    SigmaSpacing::Karras,
    SigmaSpacing::Exponential,
    SigmaSpacing::Beta,
];

/// Far above any real schedule's 1000; DDIM keeps one ᾱ per training step.
const MAX_TRAIN_STEPS: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ddim,
    Pndm,
    Euler,
    EulerAncestral,
    Heun,
    Dpm,
    /// `DPMSolverSDEScheduler`.
    DpmSde,
    UniPc,
    Lcm,
    Tcd,
    FlowEuler,
}

/// The diffusers classes attune runs, and what it runs them as.
const CLASSES: [(&str, Kind); 10] = [
    ("DDIMScheduler", Kind::Ddim),
    ("PNDMScheduler", Kind::Pndm),
    ("EulerDiscreteScheduler", Kind::Euler),
    ("EulerAncestralDiscreteScheduler", Kind::EulerAncestral),
    ("HeunDiscreteScheduler", Kind::Heun),
    ("DPMSolverMultistepScheduler", Kind::Dpm),
    ("DPMSolverSDEScheduler", Kind::DpmSde),
    ("UniPCMultistepScheduler", Kind::UniPc),
    ("LCMScheduler", Kind::Lcm),
    ("TCDScheduler", Kind::Tcd),
];

#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    Ddim(DdimConfig),
    Pndm(DdimConfig),
    Euler(EulerConfig),
    Dpm(DpmConfig),
    UniPc(UniPcConfig),
    Lcm(LcmConfig),
    Flow(FlowConfig),
}

impl Schedule {
    /// How reports name it.
    pub fn name(&self) -> &'static str {
        match self {
            Schedule::Ddim(_) => "DDIM",
            Schedule::Pndm(_) => "PLMS (PNDM)",
            Schedule::Euler(c) => match c.variant {
                Variant::Euler => "Euler",
                Variant::Ancestral => "Euler ancestral",
                Variant::Heun => "Heun",
                Variant::DpmSde => "DPM++ SDE",
            },
            Schedule::Dpm(c) => match (c.sde, c.order) {
                (false, 3) => "DPM-Solver++ 3M",
                (true, 3) => "DPM-Solver++ 3M SDE",
                (false, _) => "DPM-Solver++",
                (true, _) => "DPM-Solver++ SDE",
            },
            Schedule::UniPc(_) => "UniPC",
            Schedule::Lcm(c) if c.tcd => "TCD",
            Schedule::Lcm(_) => "LCM",
            Schedule::Flow(_) => "flow-matching Euler",
        }
    }
}

/// The schedule in `path` for `kind` (else the one its `_class_name` names), with
/// `overrides` (keys set by flags) put over its keys, and the keys that schedule does not use.
/// An override the schedule does not use is an error.
pub fn read(
    path: &Path,
    kind: Option<Kind>,
    overrides: &Map<String, Value>,
) -> Result<(Schedule, Vec<String>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: Value = serde_json::from_str(&without_non_finite(&text))
        .map_err(|e| Error::file(path, format!("not a JSON scheduler config: {e}")))?;
    let Value::Object(mut map) = value else {
        return Err(Error::file(path, "not a JSON object"));
    };
    map.extend(overrides.clone());
    let (schedule, ignored) = from_map(&map, path, kind)?;
    refuse_unused_overrides(&schedule, &ignored, overrides, path)?;
    Ok((schedule, ignored))
}

/// `kind` (DDIM if none) over Stable Diffusion's training schedule, as its pipeline folders
/// ship it (scaled-linear betas 0.00085-0.012, `leading` spacing with offset 1): what
/// `attune sample --scheduler K` runs without a config; the scheduler's other settings are
/// diffusers' defaults for it, but for `overrides`.
pub fn stable_diffusion(kind: Option<Kind>, overrides: &Map<String, Value>) -> Result<Schedule> {
    let map = serde_json::json!({
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "set_alpha_to_one": false,
        "clip_sample": false,
        "skip_prk_steps": true,
    });
    let Value::Object(mut map) = map else {
        unreachable!("a JSON object literal")
    };
    map.extend(overrides.clone());
    let path = Path::new("<Stable Diffusion's schedule>");
    let (schedule, ignored) = from_map(&map, path, kind)?;
    refuse_unused_overrides(&schedule, &ignored, overrides, path)?;
    Ok(schedule)
}

fn refuse_unused_overrides(
    schedule: &Schedule,
    ignored: &[String],
    overrides: &Map<String, Value>,
    path: &Path,
) -> Result<()> {
    let set = overrides.iter().filter(|(_, v)| !v.is_null());
    match set.map(|(k, _)| k).find(|k| ignored.contains(k)) {
        Some(key) => Err(Error::file(
            path,
            format!("{} has no setting '{key}'", schedule.name()),
        )),
        None => Ok(()),
    }
}

fn from_map(
    map: &serde_json::Map<String, Value>,
    path: &Path,
    kind: Option<Kind>,
) -> Result<(Schedule, Vec<String>)> {
    let mut keys = Keys {
        map,
        path,
        used: BTreeSet::new(),
    };
    let class = keys.string("_class_name")?.unwrap_or_default();
    let flow_class = class.starts_with("FlowMatch");
    let named = CLASSES.iter().find(|(c, _)| *c == class).map(|c| c.1);
    // A class attune does not run is an error, not a silent DDIM run, unless --scheduler
    // says what to run on its schedule.
    let known = class.is_empty() || flow_class || named.is_some();
    if kind.is_none() && !known {
        let names: Vec<&str> = CLASSES.iter().map(|c| c.0).collect();
        return Err(Error::file(
            path,
            format!(
                "_class_name {class}: attune runs {} and flow matching's Euler steps, not {class}; give --scheduler to run one of them on this config's schedule (it is not what the config asks for)",
                names.join(", ")
            ),
        ));
    }
    let kind = kind.unwrap_or(if flow_class {
        Kind::FlowEuler
    } else {
        named.unwrap_or(Kind::Ddim)
    });
    let schedule = match kind {
        Kind::FlowEuler if flow_class || class.is_empty() => Schedule::Flow(keys.flow()?),
        Kind::FlowEuler => {
            return Err(Error::file(
                path,
                format!(
                    "_class_name {class} is not a flow-matching schedule (FlowMatchEulerDiscreteScheduler's)"
                ),
            ));
        }
        _ if flow_class => {
            return Err(Error::file(
                path,
                format!(
                    "_class_name {class} is a flow-matching schedule: it has no betas for DDPM-trained schedulers (use --scheduler flow-euler)"
                ),
            ));
        }
        Kind::Ddim => Schedule::Ddim(keys.ddim()?),
        Kind::Pndm => Schedule::Pndm(keys.pndm()?),
        Kind::Euler => Schedule::Euler(keys.euler()?),
        Kind::EulerAncestral => Schedule::Euler(keys.euler_ancestral()?),
        Kind::Heun => Schedule::Euler(keys.heun(Variant::Heun)?),
        Kind::DpmSde => Schedule::Euler(keys.heun(Variant::DpmSde)?),
        Kind::Dpm => Schedule::Dpm(keys.dpm()?),
        Kind::UniPc => Schedule::UniPc(keys.unipc()?),
        Kind::Lcm => Schedule::Lcm(keys.lcm(false)?),
        Kind::Tcd => Schedule::Lcm(keys.lcm(true)?),
    };
    let ignored = map
        .keys()
        .filter(|k| !k.starts_with('_') && !keys.used.contains(*k))
        .cloned()
        .collect();
    Ok((schedule, ignored))
}

/// Python's json writes ±Infinity and NaN (a DPMSolver config's `lambda_min_clipped`), which
/// JSON has not: as null, outside strings.
fn without_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string {
            let word = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|w| rest.starts_with(w));
            if let Some(w) = word {
                out.push_str("null");
                rest = &rest[w.len()..];
                continue;
            }
        }
        if in_string && !escaped && c == '\\' {
            escaped = true;
        } else {
            if c == '"' && !escaped {
                in_string = !in_string;
            }
            escaped = false;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Typed reads of a config's keys, remembering which were read; null is absent.
struct Keys<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
    used: BTreeSet<String>,
}

impl Keys<'_> {
    fn get(&mut self, key: &str) -> Option<&Value> {
        self.used.insert(key.to_string());
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn bad(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        let value = self.map.get(key).map_or("absent".into(), Value::to_string);
        Error::file(self.path, format!("key '{key}' = {value}: {msg}"))
    }

    /// The key's value read by `read`, `default` when absent, else an error saying `expected`.
    fn typed<T>(
        &mut self,
        key: &str,
        default: T,
        expected: &str,
        read: impl Fn(&Value) -> Option<T>,
    ) -> Result<T> {
        match self.get(key).cloned() {
            None => Ok(default),
            Some(v) => read(&v).ok_or_else(|| self.bad(key, expected)),
        }
    }

    fn float(&mut self, key: &str, default: f64) -> Result<f64> {
        self.typed(key, default, "expected a number", |v| {
            v.as_f64().filter(|x| x.is_finite())
        })
    }

    fn count(&mut self, key: &str, default: usize) -> Result<usize> {
        self.typed(key, default, "expected a whole number", |v| {
            v.as_u64().and_then(|n| usize::try_from(n).ok())
        })
    }

    fn flag(&mut self, key: &str, default: bool) -> Result<bool> {
        self.typed(key, default, "expected true or false", Value::as_bool)
    }

    fn string(&mut self, key: &str) -> Result<Option<String>> {
        self.typed(key, None, "expected a string", |v| {
            v.as_str().map(|s| Some(s.to_string()))
        })
    }

    /// One of `choices` (config spelling, value), else an error listing them.
    fn choice<T: Copy>(&mut self, key: &str, choices: &[(&str, T)], default: T) -> Result<T> {
        let Some(s) = self.string(key)? else {
            return Ok(default);
        };
        choices
            .iter()
            .find(|(name, _)| *name == s)
            .map(|c| c.1)
            .ok_or_else(|| {
                let names: Vec<&str> = choices.iter().map(|c| c.0).collect();
                self.bad(
                    key,
                    format!("attune's schedulers take {}", names.join(", ")),
                )
            })
    }

    /// Settings attune does not implement, (key, what), refused unless off.
    fn refuse_on(&mut self, settings: &[(&str, &str)]) -> Result<()> {
        for (key, what) in settings {
            self.unsupported(key, false, what)?;
        }
        Ok(())
    }

    /// Dynamic thresholding off, and its parameters read as unused by design.
    fn no_thresholding(&mut self) -> Result<()> {
        self.unsupported("thresholding", false, "dynamic thresholding")?;
        for key in ["dynamic_thresholding_ratio", "sample_max_value"] {
            self.get(key);
        }
        Ok(())
    }

    /// A setting attune does not implement, refused unless it is off.
    fn unsupported(&mut self, key: &str, off: bool, what: &str) -> Result<()> {
        match self.get(key).cloned() {
            None => Ok(()),
            Some(v) if v == Value::Bool(off) => Ok(()),
            Some(_) => Err(self.bad(key, format!("{what} is not implemented"))),
        }
    }

    /// The keys DDIM and Euler share: training steps, betas, prediction, spacing, offset and
    /// zero-SNR rescaling; absent ones take `d`'s.
    fn training(&mut self, d: DdimConfig) -> Result<DdimConfig> {
        let train_steps = self.count("num_train_timesteps", d.train_steps)?;
        if !(2..=MAX_TRAIN_STEPS).contains(&train_steps) {
            return Err(self.bad(
                "num_train_timesteps",
                format!("must be within 2..={MAX_TRAIN_STEPS}"),
            ));
        }
        let Betas::Schedule { start, end, kind } = d.betas else {
            unreachable!("the defaults are a schedule")
        };
        let kinds = [
            ("linear", BetaSchedule::Linear),
            ("scaled_linear", BetaSchedule::ScaledLinear),
            ("squaredcos_cap_v2", BetaSchedule::SquaredCos),
        ];
        let schedule = Betas::Schedule {
            kind: self.choice("beta_schedule", &kinds, kind)?,
            start: self.float("beta_start", start)?,
            end: self.float("beta_end", end)?,
        };
        let betas = match self.get("trained_betas").cloned() {
            None => schedule,
            Some(v) => {
                let betas: Option<Vec<f64>> = v
                    .as_array()
                    .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<_>>());
                match betas {
                    Some(b) if b.len() == train_steps && b.iter().all(|b| *b > 0.0 && *b < 1.0) => {
                        Betas::Given(b)
                    }
                    _ => {
                        return Err(self.bad(
                            "trained_betas",
                            format!(
                                "expected {train_steps} numbers in (0, 1) (num_train_timesteps); a zero beta leaves a step without noise"
                            ),
                        ));
                    }
                }
            }
        };
        if let Betas::Schedule { start, end, .. } = &betas
            && !(0.0 < *start && start <= end && *end < 1.0)
        {
            return Err(self.bad(
                "beta_end",
                format!("betas {start}..{end} must satisfy 0 < start <= end < 1"),
            ));
        }
        let predictions = [
            ("epsilon", Prediction::Epsilon),
            ("v_prediction", Prediction::V),
            ("sample", Prediction::Sample),
        ];
        let spacings = [
            ("leading", Spacing::Leading),
            ("trailing", Spacing::Trailing),
            ("linspace", Spacing::Linspace),
        ];
        Ok(DdimConfig {
            train_steps,
            betas,
            prediction: self.choice("prediction_type", &predictions, d.prediction)?,
            spacing: self.choice("timestep_spacing", &spacings, d.spacing)?,
            steps_offset: self.count("steps_offset", d.steps_offset)?,
            zero_terminal_snr: self.flag("rescale_betas_zero_snr", false)?,
            ..d
        })
    }

    fn ddim(&mut self) -> Result<DdimConfig> {
        let d = self.training(DdimConfig::diffusers_defaults())?;
        let clip = self.flag("clip_sample", true)?;
        let range = self.float("clip_sample_range", 1.0)?;
        self.no_thresholding()?;
        Ok(DdimConfig {
            set_alpha_to_one: self.flag("set_alpha_to_one", d.set_alpha_to_one)?,
            clip_sample: clip.then_some(range),
            ..d
        })
    }

    /// `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas`: at most one on.
    fn sigma_spacing(&mut self) -> Result<SigmaSpacing> {
        let mut on = SigmaSpacing::Timesteps;
        for spacing in SIGMA_SPACINGS {
            if self.flag(spacing.key(), false)? {
                if on != SigmaSpacing::Timesteps {
                    return Err(self.bad(
                        spacing.key(),
                        format!("only one of the sigma spacings can be on ({} is)", on.key()),
                    ));
                }
                on = spacing;
            }
        }
        Ok(on)
    }

    /// `final_sigmas_type`: whether the last step ends at the smallest σ rather than 0.
    fn final_sigma_min(&mut self) -> Result<bool> {
        self.choice(
            "final_sigmas_type",
            &[("zero", false), ("sigma_min", true)],
            false,
        )
    }

    /// Keys that only matter to settings attune refuses elsewhere: absent or null, else refused.
    fn refuse_set(&mut self, keys: &[(&str, &str)]) -> Result<()> {
        for (key, what) in keys {
            if self.get(key).is_some() {
                return Err(self.bad(key, format!("{what} are not implemented")));
            }
        }
        Ok(())
    }

    /// A scheduler's training keys over its own defaults: `spacing` and `betas` where they
    /// differ from DDIM's.
    fn training_with(&mut self, spacing: Spacing, betas: Option<Betas>) -> Result<DdimConfig> {
        let d = DdimConfig::diffusers_defaults();
        self.training(DdimConfig {
            spacing,
            betas: betas.unwrap_or(d.betas.clone()),
            ..d
        })
    }

    /// `EulerDiscreteScheduler`'s keys, its defaults (`linspace` spacing) for absent ones.
    fn euler(&mut self) -> Result<EulerConfig> {
        let schedule = self.training_with(Spacing::Linspace, None)?;
        self.choice("interpolation_type", &[("linear", ())], ())?;
        self.choice("timestep_type", &[("discrete", ())], ())?;
        self.refuse_set(&[
            ("sigma_min", "custom sigma bounds"),
            ("sigma_max", "custom sigma bounds"),
        ])?;
        Ok(EulerConfig {
            sigmas: self.sigma_spacing()?,
            final_sigma_min: self.final_sigma_min()?,
            ..EulerConfig::new(schedule, Variant::Euler)
        })
    }

    /// `EulerAncestralDiscreteScheduler`'s keys (the training schedule only).
    fn euler_ancestral(&mut self) -> Result<EulerConfig> {
        let schedule = self.training_with(Spacing::Linspace, None)?;
        Ok(EulerConfig::new(schedule, Variant::Ancestral))
    }

    /// `HeunDiscreteScheduler`'s keys, or `DPMSolverSDEScheduler`'s (their defaults: linear
    /// betas 0.00085-0.012, `linspace`).
    fn heun(&mut self, variant: Variant) -> Result<EulerConfig> {
        let betas = Betas::Schedule {
            kind: BetaSchedule::Linear,
            start: 0.00085,
            end: 0.012,
        };
        let schedule = self.training_with(Spacing::Linspace, Some(betas))?;
        let clip_sample = match variant {
            Variant::Heun => {
                let clip = self.flag("clip_sample", false)?;
                clip.then_some(self.float("clip_sample_range", 1.0)?)
            }
            _ => {
                // Its Brownian tree's seed: attune's noise comes from --seed or --noise-file.
                self.get("noise_sampler_seed");
                None
            }
        };
        Ok(EulerConfig {
            sigmas: self.sigma_spacing()?,
            clip_sample,
            ..EulerConfig::new(schedule, variant)
        })
    }

    /// `PNDMScheduler`'s keys: PLMS only (`skip_prk_steps`).
    fn pndm(&mut self) -> Result<DdimConfig> {
        let d = self.training(DdimConfig {
            set_alpha_to_one: false,
            ..DdimConfig::diffusers_defaults()
        })?;
        if !self.flag("skip_prk_steps", false)? {
            return Err(self.bad(
                "skip_prk_steps",
                "PNDM's Runge-Kutta warm-up steps are not implemented; PLMS needs skip_prk_steps true (Stable Diffusion's configs set it)",
            ));
        }
        Ok(DdimConfig {
            set_alpha_to_one: self.flag("set_alpha_to_one", false)?,
            clip_sample: None,
            ..d
        })
    }

    /// `LCMScheduler`'s keys, or `TCDScheduler`'s (their defaults: scaled-linear betas
    /// 0.00085-0.012, final ᾱ 1).
    fn lcm(&mut self, tcd: bool) -> Result<LcmConfig> {
        let betas = Betas::Schedule {
            kind: BetaSchedule::ScaledLinear,
            start: 0.00085,
            end: 0.012,
        };
        let d = self.training_with(Spacing::Leading, Some(betas))?;
        let clip = self.flag("clip_sample", false)?;
        let range = self.float("clip_sample_range", 1.0)?;
        self.no_thresholding()?;
        let original_steps = self.count("original_inference_steps", 50)?;
        let timestep_scaling = self.float("timestep_scaling", 10.0)?;
        Ok(LcmConfig {
            schedule: DdimConfig {
                set_alpha_to_one: self.flag("set_alpha_to_one", true)?,
                clip_sample: clip.then_some(range),
                ..d
            },
            original_steps,
            timestep_scaling,
            tcd,
        })
    }

    /// `DPMSolverMultistepScheduler`'s keys (its defaults: `linspace` spacing, order 2,
    /// DPM-Solver++ with the midpoint correction).
    fn dpm(&mut self) -> Result<DpmConfig> {
        let schedule = self.training_with(Spacing::Linspace, None)?;
        let order = self.count("solver_order", 2)?;
        if !(1..=3).contains(&order) {
            return Err(self.bad("solver_order", "orders 1, 2 and 3 are implemented"));
        }
        let sde = self.choice(
            "algorithm_type",
            &[("dpmsolver++", false), ("sde-dpmsolver++", true)],
            false,
        )?;
        let heun = self.choice("solver_type", &[("midpoint", false), ("heun", true)], false)?;
        let final_sigma_min = self.final_sigma_min()?;
        let lambda_min_clipped = match self.get("lambda_min_clipped").cloned() {
            // null: Python's -inf, written by json as -Infinity
            None => f64::NEG_INFINITY,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.bad("lambda_min_clipped", "expected a number"))?,
        };
        if self.get("variance_type").is_some() {
            return Err(self.bad(
                "variance_type",
                "a learned variance in the output is not implemented",
            ));
        }
        self.no_thresholding()?;
        let sigmas = self.sigma_spacing()?;
        self.refuse_on(&[
            ("use_lu_lambdas", "Lu's lambdas"),
            ("use_flow_sigmas", "flow sigmas"),
            ("use_dynamic_shifting", "dynamic shifting"),
        ])?;
        for key in ["flow_shift", "time_shift_type"] {
            self.get(key); // flow sigmas', which are off
        }
        Ok(DpmConfig {
            schedule,
            order,
            sde,
            sigmas,
            heun,
            lower_order_final: self.flag("lower_order_final", true)?,
            euler_at_final: self.flag("euler_at_final", false)?,
            final_sigma_min,
            lambda_min_clipped,
        })
    }

    /// `UniPCMultistepScheduler`'s keys (its defaults: `linspace` spacing, order 2, bh2,
    /// predicting x̂₀, the corrector on every step).
    fn unipc(&mut self) -> Result<UniPcConfig> {
        let schedule = self.training_with(Spacing::Linspace, None)?;
        let order = self.count("solver_order", 2)?;
        if !(1..=3).contains(&order) {
            return Err(self.bad("solver_order", "orders 1, 2 and 3 are implemented"));
        }
        // diffusers runs the DPM-Solver names as bh2.
        let bh2 = self.choice(
            "solver_type",
            &[
                ("bh2", true),
                ("bh1", false),
                ("midpoint", true),
                ("heun", true),
                ("logrho", true),
            ],
            true,
        )?;
        let disable_corrector = match self.get("disable_corrector").cloned() {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|s| s.as_u64().map(|s| s as usize))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| self.bad("disable_corrector", "expected a list of step indices"))?,
        };
        self.no_thresholding()?;
        let sigmas = self.sigma_spacing()?;
        self.refuse_on(&[
            ("use_flow_sigmas", "flow sigmas"),
            ("use_dynamic_shifting", "dynamic shifting"),
        ])?;
        self.refuse_set(&[
            ("sigma_min", "custom sigma bounds"),
            ("sigma_max", "custom sigma bounds"),
            ("shift_terminal", "terminal shifts"),
            ("solver_p", "other schedulers as the predictor"),
        ])?;
        for key in ["flow_shift", "time_shift_type"] {
            self.get(key); // flow sigmas', which are off
        }
        Ok(UniPcConfig {
            schedule,
            order,
            bh2,
            predict_x0: self.flag("predict_x0", true)?,
            lower_order_final: self.flag("lower_order_final", true)?,
            disable_corrector,
            sigmas,
            final_sigma_min: self.final_sigma_min()?,
        })
    }

    fn flow(&mut self) -> Result<FlowConfig> {
        let d = FlowConfig::default();
        let train_steps = self.count("num_train_timesteps", d.train_steps)?;
        if !(1..=MAX_TRAIN_STEPS).contains(&train_steps) {
            return Err(self.bad(
                "num_train_timesteps",
                format!("must be within 1..={MAX_TRAIN_STEPS}"),
            ));
        }
        let shift = self.float("shift", d.shift)?;
        if shift <= 0.0 {
            return Err(self.bad("shift", "must be positive"));
        }
        let dynamic = if self.flag("use_dynamic_shifting", false)? {
            let kinds = [("exponential", false), ("linear", true)];
            let dynamic = DynamicShift {
                base_shift: self.float("base_shift", 0.5)?,
                max_shift: self.float("max_shift", 1.15)?,
                base_tokens: self.count("base_image_seq_len", 256)? as f64,
                max_tokens: self.count("max_image_seq_len", 4096)? as f64,
                linear: self.choice("time_shift_type", &kinds, false)?,
            };
            if dynamic.max_tokens == dynamic.base_tokens {
                return Err(self.bad("max_image_seq_len", "must differ from base_image_seq_len"));
            }
            Some(dynamic)
        } else {
            for key in [
                "base_shift",
                "max_shift",
                "base_image_seq_len",
                "max_image_seq_len",
                "time_shift_type",
            ] {
                self.get(key); // dynamic shifting's, which is off
            }
            None
        };
        for spacing in SIGMA_SPACINGS {
            self.unsupported(spacing.key(), false, "spaced sigmas")?;
        }
        self.refuse_on(&[
            ("invert_sigmas", "inverted sigmas"),
            ("stochastic_sampling", "stochastic sampling"),
        ])?;
        if self.get("shift_terminal").is_some() {
            return Err(self.bad(
                "shift_terminal",
                "a stretched terminal shift is not implemented",
            ));
        }
        Ok(FlowConfig {
            train_steps,
            shift,
            dynamic,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_class_attune_does_not_run_is_an_error_unless_a_scheduler_is_named() {
        let map = serde_json::json!({
            "_class_name": "LMSDiscreteScheduler",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
        });
        let Value::Object(map) = map else {
            unreachable!("an object literal")
        };
        let path = Path::new("scheduler_config.json");
        let err = from_map(&map, path, None).unwrap_err().to_string();
        assert!(
            err.contains("LMSDiscreteScheduler") && err.contains("--scheduler"),
            "{err}"
        );
        assert!(from_map(&map, path, Some(Kind::Ddim)).is_ok());
    }

    #[test]
    fn python_non_finite_numbers_read_as_null_outside_strings() {
        let text = r#"{"a": -Infinity, "b": "NaN \" Infinity", "c": [NaN, Infinity]}"#;
        assert_eq!(
            without_non_finite(text),
            r#"{"a": null, "b": "NaN \" Infinity", "c": [null, null]}"#
        );
    }
}
