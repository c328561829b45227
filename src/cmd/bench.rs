use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use attune_runtime::bench::{self, Rss, Stats};
use attune_runtime::{Backend, HostTensor};
use serde::Serialize;

use super::exec::ExecArgs;

#[derive(clap::Args)]
pub struct Args {
    /// The .onnx model
    model: PathBuf,
    /// A second model to compare against, run alternately with the first on the same inputs
    #[arg(long)]
    vs: Option<PathBuf>,
    #[command(flatten)]
    exec: ExecArgs,
    /// Timed runs per model
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed runs per model first
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
pub struct Report {
    ep: &'static str,
    models: Vec<ModelReport>,
    /// Median latency of --vs over the first model.
    ratio: Option<f64>,
    peak_rss_kb: u64,
}

#[derive(Serialize)]
struct ModelReport {
    model: String,
    session_ms: f64,
    /// Resident memory the session added (kB), measured after warm-up.
    session_rss_kb: u64,
    latency: Stats,
}

struct Timed {
    backend: Backend,
    session: Duration,
    rss: u64,
    samples: Vec<Duration>,
}

fn open(
    path: &Path,
    exec: &ExecArgs,
    inputs: &[(String, HostTensor)],
    warmup: usize,
) -> anyhow::Result<Timed> {
    let before = bench::rss();
    let start = Instant::now();
    let mut backend = exec.open(path)?;
    let session = start.elapsed();
    for _ in 0..warmup {
        backend
            .run(inputs)
            .with_context(|| format!("running {}", path.display()))?;
    }
    let rss = bench::rss().current_kb.saturating_sub(before.current_kb);
    Ok(Timed {
        backend,
        session,
        rss,
        samples: Vec::new(),
    })
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    let inputs = args.exec.prepare_inputs(&args.model)?;
    let mut paths = vec![args.model.clone()];
    paths.extend(args.vs.clone());
    let report = measure(&paths, &args.exec, &inputs, args.warmup, args.iters)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(0)
}

/// Opens every model, warms each up, then times them alternately on the same inputs.
pub fn measure(
    paths: &[PathBuf],
    exec: &ExecArgs,
    inputs: &[(String, HostTensor)],
    warmup: usize,
    iters: usize,
) -> anyhow::Result<Report> {
    let mut timed = Vec::new();
    for p in paths {
        timed.push(open(p, exec, inputs, warmup)?);
    }
    // Alternate A, B, A, B... so drift on a noisy machine hits both alike.
    for _ in 0..iters {
        for t in timed.iter_mut() {
            let start = Instant::now();
            t.backend.run(inputs)?;
            t.samples.push(start.elapsed());
        }
    }
    let models: Vec<ModelReport> = paths
        .iter()
        .zip(&timed)
        .map(|(p, t)| ModelReport {
            model: p.display().to_string(),
            session_ms: t.session.as_secs_f64() * 1e3,
            session_rss_kb: t.rss,
            latency: bench::stats(&t.samples),
        })
        .collect();
    let ratio =
        (models.len() == 2).then(|| models[1].latency.median_ms / models[0].latency.median_ms);
    let Rss { peak_kb, .. } = bench::rss();
    Ok(Report {
        ep: exec.ep().name(),
        models,
        ratio,
        peak_rss_kb: peak_kb,
    })
}

pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} iterations on {}, alternating",
        r.models[0].latency.iters, r.ep
    );
    let _ = writeln!(
        s,
        "{:<5} {:>10} {:>10} {:>10} {:>12} {:>12}  model",
        "", "median ms", "p90 ms", "min ms", "session ms", "session RSS"
    );
    for (label, m) in ["A", "B"].iter().zip(&r.models) {
        let l = &m.latency;
        let _ = writeln!(
            s,
            "{label:<5} {:>10.2} {:>10.2} {:>10.2} {:>12.0} {:>12}  {}",
            l.median_ms,
            l.p90_ms,
            l.min_ms,
            m.session_ms,
            super::bytes(m.session_rss_kb * 1024),
            m.model
        );
    }
    if let Some(ratio) = r.ratio {
        let _ = writeln!(s, "B/A median latency: {ratio:.3}x");
    }
    let _ = writeln!(
        s,
        "peak RSS of this process: {}",
        super::bytes(r.peak_rss_kb * 1024)
    );
    s
}
