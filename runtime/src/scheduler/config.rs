//! A diffusers `scheduler_config.json` read as the DDIM or flow-matching schedule it gives,
//! the way `DDIMScheduler.from_config` / `FlowMatchEulerDiscreteScheduler.from_config` read
//! it: absent keys take the scheduler's defaults, other schedulers' keys are ignored (and
//! reported), and a setting attune does not implement is an error naming the key.
use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Map, Value};

use super::ddim::{BetaSchedule, Betas, DdimConfig, Prediction, Spacing};
use super::dpm::DpmConfig;
use super::flow::{DynamicShift, FlowConfig};
use crate::error::{Error, Result};

/// Noise-level spacings diffusers' Euler, DPM-Solver and flow schedulers offer.
const SIGMA_SPACINGS: [(&str, &str); 3] = [
    ("use_karras_sigmas", "Karras sigmas"),
    ("use_exponential_sigmas", "exponential sigmas"),
    ("use_beta_sigmas", "beta sigmas"),
];

/// Far above any real schedule's 1000; DDIM keeps one ᾱ per training step.
const MAX_TRAIN_STEPS: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ddim,
    Dpm,
    Euler,
    FlowEuler,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    Ddim(DdimConfig),
    Dpm(DpmConfig),
    Euler(DdimConfig),
    Flow(FlowConfig),
}

/// The schedule in `path` for `kind` (else the one its `_class_name` names), and the keys
/// that schedule does not use.
pub fn read(path: &Path, kind: Option<Kind>) -> Result<(Schedule, Vec<String>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: Value = serde_json::from_str(&without_non_finite(&text))
        .map_err(|e| Error::file(path, format!("not a JSON scheduler config: {e}")))?;
    let Value::Object(map) = value else {
        return Err(Error::file(path, "not a JSON object"));
    };
    from_map(&map, path, kind)
}

/// `kind` (DDIM if none) over Stable Diffusion's training schedule, as its pipeline folders
/// ship it (scaled-linear betas 0.00085-0.012, `leading` spacing with offset 1): what
/// `attune sample --scheduler K` runs without a config; the scheduler's other settings are
/// diffusers' defaults for it.
pub fn stable_diffusion(kind: Option<Kind>) -> Result<Schedule> {
    let map = serde_json::json!({
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "set_alpha_to_one": false,
        "clip_sample": false,
    });
    let Value::Object(map) = map else {
        unreachable!("a JSON object literal")
    };
    Ok(from_map(&map, Path::new("<Stable Diffusion's schedule>"), kind)?.0)
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
    // A class attune does not run is an error, not a silent DDIM run, unless --scheduler
    // says what to run on its schedule. PNDM (SD1.5's folders) is read as DDIM, as before.
    let known = class.is_empty()
        || flow_class
        || [
            "DDIMScheduler",
            "PNDMScheduler",
            "EulerDiscreteScheduler",
            "DPMSolverMultistepScheduler",
        ]
        .contains(&class.as_str());
    if kind.is_none() && !known {
        return Err(Error::file(
            path,
            format!(
                "_class_name {class}: attune runs DDIM, Euler, DPM-Solver++ (2M) and flow matching's Euler steps, not {class}; give --scheduler ddim|euler|dpm|flow-euler to run one of them on this config's schedule (it is not what the config asks for)"
            ),
        ));
    }
    let kind = kind.unwrap_or(if flow_class {
        Kind::FlowEuler
    } else if class == "EulerDiscreteScheduler" {
        Kind::Euler
    } else if class == "DPMSolverMultistepScheduler" {
        Kind::Dpm
    } else {
        Kind::Ddim
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
                    "_class_name {class} is a flow-matching schedule: it has no betas for DDIM or Euler (use --scheduler flow-euler)"
                ),
            ));
        }
        Kind::Ddim => Schedule::Ddim(keys.ddim()?),
        Kind::Euler => Schedule::Euler(keys.euler()?),
        Kind::Dpm => Schedule::Dpm(keys.dpm()?),
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

    /// `EulerDiscreteScheduler`'s keys, its defaults (`linspace` spacing) for absent ones.
    fn euler(&mut self) -> Result<DdimConfig> {
        let d = self.training(DdimConfig {
            spacing: Spacing::Linspace,
            ..DdimConfig::diffusers_defaults()
        })?;
        self.choice("interpolation_type", &[("linear", ())], ())?;
        self.choice("timestep_type", &[("discrete", ())], ())?;
        self.choice("final_sigmas_type", &[("zero", ())], ())?;
        self.refuse_on(&SIGMA_SPACINGS)?;
        for key in ["sigma_min", "sigma_max"] {
            if self.get(key).is_some() {
                return Err(self.bad(key, "custom Karras sigma bounds are not implemented"));
            }
        }
        Ok(d)
    }

    /// `DPMSolverMultistepScheduler`'s keys (its defaults: `linspace` spacing, order 2,
    /// DPM-Solver++ with the midpoint correction).
    fn dpm(&mut self) -> Result<DpmConfig> {
        let schedule = self.training(DdimConfig {
            spacing: Spacing::Linspace,
            ..DdimConfig::diffusers_defaults()
        })?;
        let order = self.count("solver_order", 2)?;
        if !(1..=2).contains(&order) {
            return Err(self.bad("solver_order", "orders 1 and 2 are implemented"));
        }
        self.choice("algorithm_type", &[("dpmsolver++", ())], ())?;
        let heun = self.choice("solver_type", &[("midpoint", false), ("heun", true)], false)?;
        let final_sigma_min = self.choice(
            "final_sigmas_type",
            &[("zero", false), ("sigma_min", true)],
            false,
        )?;
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
        self.refuse_on(&SIGMA_SPACINGS)?;
        self.refuse_on(&[
            ("use_lu_lambdas", "Lu's lambdas"),
            ("use_flow_sigmas", "flow sigmas"),
        ])?;
        Ok(DpmConfig {
            schedule,
            order,
            heun,
            lower_order_final: self.flag("lower_order_final", true)?,
            euler_at_final: self.flag("euler_at_final", false)?,
            final_sigma_min,
            lambda_min_clipped,
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
        self.refuse_on(&SIGMA_SPACINGS)?;
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
            "_class_name": "UniPCMultistepScheduler",
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
            err.contains("UniPCMultistepScheduler") && err.contains("--scheduler"),
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
