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
    /// Stop after the pass of this name (bisecting a pipeline).
    pub stop_after: Option<String>,
    /// Hand the graph to this function after each pass named in `dump_after`.
    pub dump_after: Vec<String>,
}

/// Called with a pass name and the graph after it (see [`PassManager::dump_after`]).
pub type Dump<'a> = dyn FnMut(&str, &Model) -> Result<()> + 'a;

impl PassManager {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, pass: impl Pass + 'static) -> &mut Self {
        self.passes.push(Box::new(pass));
        self
    }

    pub fn add_boxed(&mut self, pass: Box<dyn Pass>) -> &mut Self {
        self.passes.push(pass);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.passes.is_empty()
    }

    /// The passes' names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Refuses `stop_after`/`dump_after` names of passes this pipeline does not run.
    pub fn check_names(&self) -> Result<()> {
        let names = self.names();
        for want in self.stop_after.iter().chain(&self.dump_after) {
            if !names.contains(&want.as_str()) {
                return Err(Error::Graph(format!(
                    "no pass '{want}' in this pipeline; it runs: {}",
                    names.join(", ")
                )));
            }
        }
        Ok(())
    }

    pub fn run(&self, model: &mut Model, cx: &mut PassCx) -> Result<Vec<PassReport>> {
        self.run_observed(model, cx, &mut |_| {}, &mut |_, _| Ok(()))
    }

    /// [`PassManager::run`], telling `starting` each pass's name before it runs (progress),
    /// and giving `dump` the graph after each pass of `dump_after`.
    pub fn run_observed(
        &self,
        model: &mut Model,
        cx: &mut PassCx,
        starting: &mut dyn FnMut(&str),
        dump: &mut Dump,
    ) -> Result<Vec<PassReport>> {
        self.check_names()?;
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
            if self.dump_after.iter().any(|d| d == pass.name()) {
                dump(pass.name(), model)?;
            }
            if self.stop_after.as_deref() == Some(pass.name()) {
                break;
            }
        }
        Ok(reports)
    }
}
