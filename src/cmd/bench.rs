use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use attune_runtime::bench::{self, Rss, Stats};
use attune_runtime::compare::compare;
use attune_runtime::profile::{self, OpTime};
use attune_runtime::sample::step_cache::StepCache;
use attune_runtime::{Backend, Ep, HostTensor};
use serde::Serialize;

use super::exec::ExecArgs;

#[derive(clap::Args)]
pub struct Args {
    /// The .onnx model
    model: PathBuf,
    /// Models to compare against (repeatable), run in turn with the first on the same inputs
    #[arg(long)]
    vs: Vec<PathBuf>,
    #[command(flatten)]
    exec: ExecArgs,
    /// Timed runs per model
    #[arg(long, default_value_t = 20, value_parser = at_least_one)]
    iters: usize,
    /// Untimed runs per model first
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Print JSON
    #[arg(long)]
    json: bool,
    /// After timing, profile each model with ONNX Runtime (traces written to DIR) and print the
    /// time per op type side by side. On CUDA set CUDA_LAUNCH_BLOCKING=1 so nodes time kernels,
    /// not launches
    #[arg(long, value_name = "DIR")]
    profile: Option<PathBuf>,
    /// Profiled runs per model (after the warm-up runs)
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    profile_runs: usize,
    /// Run with CUDA graphs (--ep cuda; models compiled with --fix-shapes): every model, or
    /// those named by their letters in the report (e.g. B,C), so others run without in the
    /// same alternation
    #[arg(long, value_name = "MODELS", num_args = 0..=1, default_missing_value = "all")]
    cuda_graph: Option<String>,
}

/// A count of runs: 1 or more (no timed run has no statistics).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("'{s}' is not a whole number >= 1")),
    }
}

/// Models are labelled A to Z in the report.
const MAX_MODELS: usize = 26;

/// The report's letter for the model at `index` (below [`MAX_MODELS`]).
fn label(index: usize) -> char {
    (b'A' + index.min(MAX_MODELS - 1) as u8) as char
}

fn check_model_count(count: usize) -> anyhow::Result<()> {
    if count > MAX_MODELS {
        anyhow::bail!(
            "bench compares at most {MAX_MODELS} models (A to Z), but {count} are given (the model and {} --vs)",
            count - 1
        );
    }
    Ok(())
}

/// Which models (by index) run with CUDA graphs: `all`, or letters A, B, ...
fn graph_models(spec: Option<&str>, count: usize) -> anyhow::Result<Vec<bool>> {
    let Some(spec) = spec else {
        return Ok(vec![false; count]);
    };
    if spec == "all" {
        return Ok(vec![true; count]);
    }
    let mut chosen = vec![false; count];
    for item in spec.split(',').map(str::trim) {
        let index = match item.as_bytes() {
            [c @ b'A'..=b'Z'] => (c - b'A') as usize,
            _ => anyhow::bail!(
                "--cuda-graph '{item}': expected a model letter (A, B, ...) or nothing for all"
            ),
        };
        if index >= count {
            anyhow::bail!(
                "--cuda-graph {item}: there are only {count} models (A to {})",
                label(count - 1)
            );
        }
        chosen[index] = true;
    }
    Ok(chosen)
}

#[derive(Serialize)]
pub struct Report {
    ep: &'static str,
    pub models: Vec<ModelReport>,
    /// Median latency of each --vs model over the first model's, in --vs order.
    pub ratios: Vec<f64>,
    pub peak_rss_kb: u64,
    /// Time per op type of each model (with --profile), in model order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    profiles: Vec<Vec<OpTime>>,
}

#[derive(Serialize)]
pub struct ModelReport {
    model: String,
    cuda_graph: bool,
    pub session_ms: f64,
    /// Resident memory the session added (kB), measured after warm-up.
    pub session_rss_kb: u64,
    pub latency: Stats,
    /// Relative L2 distance of its first output (last timed run) from model A's; `None` for A
    /// and where the outputs do not compare (other shapes).
    rel_l2_vs_a: Option<f64>,
}

struct Timed {
    backend: Backend,
    session: Duration,
    rss: u64,
    samples: Vec<Duration>,
    /// The first output of the last run.
    last: Option<HostTensor>,
}

fn open(
    path: &Path,
    exec: &ExecArgs,
    cuda_graph: bool,
    inputs: &[(String, HostTensor)],
    warmup: usize,
) -> anyhow::Result<Timed> {
    let before = bench::rss();
    let start = Instant::now();
    let mut opts = exec.ort_options();
    opts.cuda_graph = cuda_graph;
    let mut backend = Backend::open(path, exec.ep(), &opts)
        .with_context(|| format!("cannot run {} on {}", path.display(), exec.ep().name()))?;
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
        last: None,
    })
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    let mut paths = vec![args.model.clone()];
    paths.extend(args.vs.clone());
    check_model_count(paths.len())?;
    if args.cuda_graph.is_some() && args.exec.ep() != Ep::Cuda {
        anyhow::bail!(
            "--cuda-graph: CUDA graphs need the CUDA execution provider (--ep cuda); this bench runs on {}",
            args.exec.ep().name()
        );
    }
    if let Some(cache) = step_cache_of(&args.model)? {
        return bench_step_cache(&args, cache);
    }
    let inputs = args.exec.prepare_inputs(&args.model)?;
    let graphs = graph_models(args.cuda_graph.as_deref(), paths.len())?;
    let mut report = measure(
        &paths,
        &graphs,
        &args.exec,
        &inputs,
        args.warmup,
        args.iters,
    )?;
    if let Some(dir) = &args.profile {
        report.profiles = profile_each(
            &paths,
            &args.exec,
            &inputs,
            args.warmup,
            args.profile_runs,
            dir,
        )?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
        if !report.profiles.is_empty() {
            print!("{}", render_profiles(&report.profiles, args.profile_runs));
        }
    }
    Ok(0)
}

/// The step cache of a model split by `compile --step-cache`, set up to time one computed and
/// one cached step.
fn step_cache_of(model: &Path) -> anyhow::Result<Option<StepCache>> {
    let m = super::load(model)?;
    let dtypes = attune_runtime::inputs::input_specs(&m)
        .iter()
        .filter_map(|s| Some((s.name.clone(), s.dtype()?)))
        .collect();
    Ok(StepCache::for_bench(&dtypes)?)
}

/// A step-cached model: a step that computes the cached part and one that reuses it (fed what
/// the first returned), timed alternately; the difference of their outputs is the cache's.
fn bench_step_cache(args: &Args, mut cache: StepCache) -> anyhow::Result<i32> {
    if !args.vs.is_empty() || args.cuda_graph.is_some() || args.profile.is_some() {
        anyhow::bail!(
            "{} is split for step caching: bench times its computed and its cached step against each other, alone (no --vs, --cuda-graph or --profile)",
            args.model.display()
        );
    }
    let computed = args
        .exec
        .input
        .prepare_with(&args.model, cache.inputs(0)?)?;
    let outputs = args.exec.open(&args.model)?.run(&computed)?;
    cache.after(0, &outputs)?;
    let reuse = cache.inputs(1)?;
    let cached: Vec<(String, HostTensor)> = computed
        .iter()
        .map(|(n, t)| match reuse.iter().find(|(r, _)| r == n) {
            Some(r) => r.clone(),
            None => (n.clone(), t.clone()),
        })
        .collect();
    let paths = [args.model.clone(), args.model.clone()];
    let mut report = measure_each(
        &paths,
        &[false, false],
        &args.exec,
        &[computed, cached],
        args.warmup,
        args.iters,
    )?;
    report.models[0].model += &format!(" (step computing the {})", cache.part());
    report.models[1].model += &format!(" (step reusing the {})", cache.part());
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
    graphs: &[bool],
    exec: &ExecArgs,
    inputs: &[(String, HostTensor)],
    warmup: usize,
    iters: usize,
) -> anyhow::Result<Report> {
    check_model_count(paths.len())?;
    let per_model = inputs_per_model(paths, exec, inputs)?;
    measure_each(paths, graphs, exec, &per_model, warmup, iters)
}

/// [`measure`] with each model's own inputs.
fn measure_each(
    paths: &[PathBuf],
    graphs: &[bool],
    exec: &ExecArgs,
    per_model: &[Vec<(String, HostTensor)>],
    warmup: usize,
    iters: usize,
) -> anyhow::Result<Report> {
    let mut timed = Vec::new();
    for ((p, &graph), inputs) in paths.iter().zip(graphs).zip(per_model) {
        timed.push(open(p, exec, graph, inputs, warmup)?);
    }
    // Alternate A, B, (C...), A, B... so drift on a noisy machine hits all alike.
    for _ in 0..iters {
        for ((t, inputs), p) in timed.iter_mut().zip(per_model).zip(paths) {
            let start = Instant::now();
            let outputs = t
                .backend
                .run(inputs)
                .with_context(|| format!("running {}", p.display()))?;
            t.samples.push(start.elapsed());
            t.last = outputs.into_iter().next().map(|(_, v)| v);
        }
    }
    let models: Vec<ModelReport> = paths
        .iter()
        .zip(&timed)
        .zip(graphs)
        .map(|((p, t), &cuda_graph)| ModelReport {
            model: p.display().to_string(),
            cuda_graph,
            rel_l2_vs_a: match (&timed[0].last, &t.last) {
                (Some(a), Some(b)) if !std::ptr::eq(t, &timed[0]) => {
                    compare("output", a, b).ok().map(|c| c.rel_l2)
                }
                _ => None,
            },
            session_ms: t.session.as_secs_f64() * 1e3,
            session_rss_kb: t.rss,
            latency: bench::stats(&t.samples),
        })
        .collect();
    let ratios = models[1..]
        .iter()
        .map(|m| m.latency.median_ms / models[0].latency.median_ms)
        .collect();
    let Rss { peak_kb, .. } = bench::rss();
    Ok(Report {
        ep: exec.ep().name(),
        models,
        ratios,
        peak_rss_kb: peak_kb,
        profiles: Vec::new(),
    })
}

/// The inputs of each model: `inputs` (made for the first) as they are for the first, checked
/// against each --vs model and converted to its declared types (an fp16 model takes the fp32
/// values), the inputs only it has made from --dim and --seed. Errors name the model.
fn inputs_per_model(
    paths: &[PathBuf],
    exec: &ExecArgs,
    inputs: &[(String, HostTensor)],
) -> anyhow::Result<Vec<Vec<(String, HostTensor)>>> {
    let mut out = vec![inputs.to_vec()];
    for (i, path) in paths.iter().enumerate().skip(1) {
        out.push(
            super::numeric::inputs_for(path, inputs, exec)
                .with_context(|| format!("model {} ({})", label(i), path.display()))?,
        );
    }
    Ok(out)
}

/// A fresh profiling session per model (profiling slows runs, so the timing above is not taken
/// from these): warm-up runs, then `runs` profiled runs, read back per op type.
fn profile_each(
    paths: &[PathBuf],
    exec: &ExecArgs,
    inputs: &[(String, HostTensor)],
    warmup: usize,
    runs: usize,
    dir: &Path,
) -> anyhow::Result<Vec<Vec<OpTime>>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let per_model = inputs_per_model(paths, exec, inputs)?;
    let mut out = Vec::new();
    for ((i, path), inputs) in paths.iter().enumerate().zip(&per_model) {
        let mut opts = exec.ort_options();
        opts.profile = Some(dir.join(format!("{}", label(i))));
        let mut backend = Backend::open(path, exec.ep(), &opts).with_context(|| {
            format!("cannot profile {} on {}", path.display(), exec.ep().name())
        })?;
        for _ in 0..warmup + runs.max(1) {
            backend
                .run(inputs)
                .with_context(|| format!("running {}", path.display()))?;
        }
        let trace = backend.end_profiling()?;
        out.push(profile::op_times(&trace, runs.max(1))?);
    }
    Ok(out)
}

/// Op types as rows (slowest in any model first), models as columns: ms per run and node count.
pub fn render_profiles(profiles: &[Vec<OpTime>], runs: usize) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write;
    let mut rows: BTreeMap<(String, String), Vec<Option<&OpTime>>> = BTreeMap::new();
    for (i, p) in profiles.iter().enumerate() {
        for t in p {
            rows.entry((t.op.clone(), t.provider.clone()))
                .or_insert_with(|| vec![None; profiles.len()])[i] = Some(t);
        }
    }
    let mut rows: Vec<_> = rows.into_iter().collect();
    let worst =
        |r: &Vec<Option<&OpTime>>| r.iter().flatten().map(|t| t.ms_per_run).fold(0.0, f64::max);
    rows.sort_by(|a, b| worst(&b.1).total_cmp(&worst(&a.1)));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "time per op type, ms per run (nodes), mean of {runs} profiled runs"
    );
    let _ = write!(s, "{:<34}", "op (provider)");
    for i in 0..profiles.len() {
        let _ = write!(s, " {:>16}", label(i));
    }
    let _ = writeln!(s);
    let short = |p: &str| p.trim_end_matches("ExecutionProvider").to_string();
    for ((op, provider), cells) in &rows {
        let _ = write!(s, "{:<34}", format!("{op} ({})", short(provider)));
        for c in cells {
            let cell = c.map_or("-".to_string(), |t| {
                format!("{:.3} ({:.0})", t.ms_per_run, t.nodes_per_run)
            });
            let _ = write!(s, " {cell:>16}");
        }
        let _ = writeln!(s);
    }
    let _ = write!(s, "{:<34}", "total");
    for p in profiles {
        let total: f64 = p.iter().map(|t| t.ms_per_run).sum();
        let _ = write!(s, " {total:>16.3}");
    }
    let _ = writeln!(s);
    s
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
        "{:<5} {:>10} {:>10} {:>10} {:>8} {:>12} {:>12} {:>10}  model",
        "", "median ms", "p90 ms", "min ms", "vs A", "session ms", "session RSS", "rel L2 A"
    );
    for (i, m) in r.models.iter().enumerate() {
        let l = &m.latency;
        let label = label(i);
        let ratio = if i == 0 {
            "1".to_string()
        } else {
            format!("{:.3}x", r.ratios[i - 1])
        };
        let _ = writeln!(
            s,
            "{label:<5} {:>10.2} {:>10.2} {:>10.2} {ratio:>8} {:>12.0} {:>12} {:>10}  {}{}",
            l.median_ms,
            l.p90_ms,
            l.min_ms,
            m.session_ms,
            super::bytes(m.session_rss_kb * 1024),
            m.rel_l2_vs_a
                .map_or("-".to_string(), |r| format!("{r:.1e}")),
            m.model,
            if m.cuda_graph { " (CUDA graph)" } else { "" }
        );
    }
    let _ = writeln!(
        s,
        "peak RSS of this process: {}",
        super::bytes(r.peak_rss_kb * 1024)
    );
    s
}
