//! Reads ONNX Runtime's profile (the JSON trace `SessionOptions.EnableProfiling` writes) into
//! time per op type and run, for `attune bench --profile`.
//!
//! ORT times a node on the host: on the CUDA provider that is the kernel launch, not the kernel,
//! unless launches are made synchronous (`CUDA_LAUNCH_BLOCKING=1`).
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    cat: String,
    name: String,
    ts: f64,
    dur: f64,
    #[serde(default)]
    args: Args,
}

#[derive(Deserialize, Default)]
struct Args {
    #[serde(default)]
    op_name: String,
    #[serde(default)]
    provider: String,
}

/// One op type on one provider: nodes run and milliseconds spent, per model run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OpTime {
    pub op: String,
    pub provider: String,
    pub nodes_per_run: f64,
    pub ms_per_run: f64,
}

/// Per-op-type times averaged over the last `runs` model runs of the trace (earlier runs are
/// warm-up: the first CUDA run also searches convolution algorithms). Slowest first.
pub fn op_times(trace: &Path, runs: usize) -> Result<Vec<OpTime>> {
    let text = std::fs::read_to_string(trace)
        .map_err(|e| Error::Ort(format!("profile {}: {e}", trace.display())))?;
    let events: Vec<Event> = serde_json::from_str(&text)
        .map_err(|e| Error::Ort(format!("profile {}: {e}", trace.display())))?;
    let mut windows: Vec<(f64, f64)> = events
        .iter()
        .filter(|e| e.cat == "Session" && e.name == "model_run")
        .map(|e| (e.ts, e.ts + e.dur))
        .collect();
    windows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let counted = &windows[windows.len().saturating_sub(runs)..];
    if counted.is_empty() {
        return Err(Error::Ort(format!(
            "profile {}: no model run recorded",
            trace.display()
        )));
    }
    let mut by_op: BTreeMap<(String, String), (usize, f64)> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e.cat == "Node" && e.name.ends_with("_kernel_time"))
        .filter(|e| counted.iter().any(|&(a, b)| e.ts >= a && e.ts <= b))
    {
        let slot = by_op
            .entry((e.args.op_name.clone(), e.args.provider.clone()))
            .or_default();
        slot.0 += 1;
        slot.1 += e.dur;
    }
    let n = counted.len() as f64;
    let mut out: Vec<OpTime> = by_op
        .into_iter()
        .map(|((op, provider), (count, us))| OpTime {
            op,
            provider,
            nodes_per_run: count as f64 / n,
            ms_per_run: us / 1e3 / n,
        })
        .collect();
    out.sort_by(|a, b| b.ms_per_run.total_cmp(&a.ms_per_run));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_the_last_runs_per_op_type() {
        // Two runs: the first (warm-up) is slow and left out.
        let trace = r#"[
          {"cat":"Session","name":"model_run","ts":0,"dur":100,"args":{}},
          {"cat":"Node","name":"conv_kernel_time","ts":10,"dur":90,"args":{"op_name":"Conv","provider":"CUDAExecutionProvider"}},
          {"cat":"Session","name":"model_run","ts":200,"dur":50,"args":{}},
          {"cat":"Node","name":"conv_fence_before","ts":205,"dur":1,"args":{"op_name":"Conv"}},
          {"cat":"Node","name":"conv_kernel_time","ts":210,"dur":30,"args":{"op_name":"Conv","provider":"CUDAExecutionProvider"}},
          {"cat":"Node","name":"add_kernel_time","ts":240,"dur":6,"args":{"op_name":"Add","provider":"CUDAExecutionProvider"}},
          {"cat":"Node","name":"add2_kernel_time","ts":246,"dur":4,"args":{"op_name":"Add","provider":"CUDAExecutionProvider"}}
        ]"#;
        let dir = std::env::temp_dir().join(format!("attune-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("trace.json");
        std::fs::write(&path, trace).unwrap();
        let times = op_times(&path, 1).unwrap();
        assert_eq!(times.len(), 2);
        assert_eq!(times[0].op, "Conv");
        assert!((times[0].ms_per_run - 0.030).abs() < 1e-12);
        assert_eq!(times[1].op, "Add");
        assert_eq!(times[1].nodes_per_run, 2.0);
        assert!((times[1].ms_per_run - 0.010).abs() < 1e-12);
        std::fs::write(&path, "[]").unwrap();
        assert!(op_times(&path, 1).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
