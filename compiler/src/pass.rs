//! Passes and the pass manager. A pass is a pure transformation with a name; the manager
//! owns ordering, verification after each pass, timing and the collected reports.
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::ir::Model;
use crate::verify;

/// What a pass did: sites rewritten and sites skipped with the reason.
#[derive(Debug, Default, Serialize)]
pub struct PassReport {
    pub pass: String,
    pub rewritten: Vec<String>,
    pub skipped: Vec<Skipped>,
    pub notes: Vec<String>,
    #[serde(serialize_with = "millis")]
    pub time: Duration,
}

#[derive(Debug, Serialize)]
pub struct Skipped {
    pub site: String,
    pub reason: String,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// Shared state passes may read (options that concern every pass).
#[derive(Debug, Default)]
pub struct PassCx {
    /// Verify the graph after every pass (on in debug builds and tests).
    pub verify: bool,
}

pub trait Pass {
    fn name(&self) -> &'static str;
    fn run(&self, model: &mut Model, cx: &mut PassCx) -> Result<PassReport>;
}

/// Runs passes in order.
#[derive(Default)]
pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
}

impl PassManager {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, pass: impl Pass + 'static) -> &mut Self {
        self.passes.push(Box::new(pass));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.passes.is_empty()
    }

    pub fn run(&self, model: &mut Model, cx: &mut PassCx) -> Result<Vec<PassReport>> {
        self.run_observed(model, cx, &mut |_| {})
    }

    /// [`PassManager::run`], telling `starting` each pass's name before it runs (progress).
    pub fn run_observed(
        &self,
        model: &mut Model,
        cx: &mut PassCx,
        starting: &mut dyn FnMut(&str),
    ) -> Result<Vec<PassReport>> {
        let mut reports = Vec::new();
        for pass in &self.passes {
            starting(pass.name());
            let start = Instant::now();
            let mut report = pass.run(model, cx)?;
            report.pass = pass.name().to_string();
            report.time = start.elapsed();
            if cx.verify {
                verify::verify(model)
                    .map_err(|e| Error::Graph(format!("after pass '{}': {e}", pass.name())))?;
            }
            reports.push(report);
        }
        Ok(reports)
    }
}
