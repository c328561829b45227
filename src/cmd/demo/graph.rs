use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use attune_compiler::export::{self, ExportOptions};
use attune_compiler::pass::PassCx;
use attune_compiler::{diff, verify};

use super::Args;
use crate::cmd::exec::{EpArg, ExecArgs, InputArgs, OptArg, read_inputs};
use crate::cmd::numeric::{BY_DESIGN_HINT, DEFAULT_TOL};
use attune_passes::pipeline::{AttentionOptions, Options};
use attune_runtime::HostTensor;
use attune_runtime::inputs::{self, Dim, Dims};

/// One graph on one screen: compile, structural diff, numeric diff, timing.
pub fn run(args: &Args, path: &Path) -> anyhow::Result<i32> {
    if !path.is_file() {
        bail!("{} not found", path.display());
    }
    let tmp = tempfile::tempdir()?;
    let out_dir = args.out.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let compiled = out_dir.join("compiled.onnx");

    println!("== compile {}", path.display());
    let start = Instant::now();
    let original = crate::cmd::load(path)?;
    let mut model = crate::cmd::load(path)?;
    verify::verify(&model)?;
    let options = Options {
        attention: AttentionOptions {
            mode: args.attention,
            ..Default::default()
        },
        ..Default::default()
    };
    let reports =
        crate::cmd::compile::build(&options)?.run(&mut model, &mut PassCx { verify: true })?;
    crate::cmd::compile::print_reports(&reports);
    export::write(&model, &compiled, &ExportOptions::default())?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    match &args.out {
        Some(_) => println!("wrote {} in {ms:.0} ms", compiled.display()),
        None => println!(
            "compiled in {ms:.0} ms (into a temporary folder, removed at exit; --out DIR keeps the model)"
        ),
    }

    println!("\n== structural diff");
    print!(
        "{}",
        diff::diff(&original, &model).render_with(true, Some(DIFF_LIST_MAX))
    );
    drop((original, model));

    let inputs_dir = path.parent().unwrap_or(Path::new(".")).join("inputs");
    if !inputs_dir.is_dir() {
        bail!(
            "{} has no inputs/ folder of .npy files next to it",
            path.display()
        );
    }
    println!(
        "\n== numeric diff on ONNX Runtime CPU (the fixture's inputs, {})",
        inputs_dir.display()
    );
    let exec = ExecArgs {
        ep: EpArg::Cpu,
        input: InputArgs {
            inputs: vec![inputs_dir.display().to_string()],
            ..Default::default()
        },
        threads: None,
        opt_level: OptArg::All,
        session_cache: false,
    };
    let results = crate::cmd::numeric::compare_models(path, &compiled, &exec)?;
    let (table, ok) = crate::cmd::numeric::render(&results, Some(DEFAULT_TOL));
    print!("{table}");
    if !ok {
        println!("{BY_DESIGN_HINT}");
    }

    let (inputs, what) = timing_inputs(path, &inputs_dir, args.latent)?;
    println!(
        "\n== timing on ONNX Runtime CPU: {what}; {} runs each after 2 warm-up runs, alternating",
        args.iters
    );
    let report = crate::cmd::bench::measure(
        &[path.to_path_buf(), compiled.clone()],
        &[false, false],
        &exec,
        &inputs,
        2,
        args.iters,
    )?;
    print!("{}", render_timing(&report));
    Ok(if ok { 0 } else { 1 })
}

/// Names listed per initializer/input/output/opset change list in the structural diff.
const DIFF_LIST_MAX: usize = 5;

/// The inputs to time on: the fixture's, with the latent (`sample`) redrawn, seeded, at
/// `side` x `side` when its sides are symbolic (`height`, or a dynamo export's `8*height`);
/// and what they are, for the heading.
fn timing_inputs(
    model: &Path,
    dir: &Path,
    side: usize,
) -> anyhow::Result<(Vec<(String, HostTensor)>, String)> {
    let specs = inputs::input_specs(&crate::cmd::load(model)?);
    let mut given: Vec<(String, HostTensor)> = read_inputs(&[dir.display().to_string()])?
        .into_iter()
        .map(|g| (g.name, g.tensor))
        .collect();
    let mut dims = Vec::new();
    if let Some(sample) = specs
        .iter()
        .find(|s| s.name == "sample" && s.dims.len() == 4)
    {
        for d in &sample.dims[2..] {
            if let Dim::Symbol(expr) = d
                && let Some((sym, k)) = inputs::linear_symbol(expr)
                && k > 0
                && side.is_multiple_of(k as usize)
            {
                dims.push(format!("{sym}={}", side / k as usize));
            }
        }
    }
    let redrawn = dims.len() == 2;
    if redrawn {
        given.retain(|(n, _)| n != "sample");
    }
    let inputs = inputs::prepare(&specs, given, &Dims::parse(&dims)?, 0)
        .with_context(|| format!("timing inputs of {}", model.display()))?;
    let shape = inputs
        .iter()
        .find(|(n, _)| n == "sample")
        .map(|(_, t)| format!("{:?}", t.shape()))
        .unwrap_or_default();
    let what = if redrawn {
        format!(
            "a {side}x{side} latent (sample {shape} seeded, --dim {})",
            dims.join(" --dim ")
        )
    } else {
        format!("the fixture's inputs (sample {shape}: its sides are not symbolic)")
    };
    Ok((inputs, what))
}

/// Median, spread (min..max) and session memory of the original (A) and the compiled model
/// (B), and whether the difference is more than the runs' spread.
fn render_timing(r: &crate::cmd::bench::Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<10} {:>10} {:>22} {:>11} {:>12}",
        "", "median ms", "spread (min..max) ms", "session ms", "session RSS"
    );
    for (name, m) in ["original", "compiled"].iter().zip(&r.models) {
        let l = &m.latency;
        let _ = writeln!(
            s,
            "{name:<10} {:>10.1} {:>22} {:>11.0} {:>12}",
            l.median_ms,
            format!("{:.1}..{:.1}", l.min_ms, l.max_ms),
            m.session_ms,
            crate::cmd::bytes(m.session_rss_kb * 1024)
        );
    }
    if let ([a, b], [ratio]) = (r.models.as_slice(), r.ratios.as_slice()) {
        let (a, b) = (&a.latency, &b.latency);
        let overlap = a.min_ms <= b.max_ms && b.min_ms <= a.max_ms;
        let verdict = if overlap {
            "within noise: the spreads overlap"
        } else if ratio < &1.0 {
            "faster beyond the spread of the runs"
        } else {
            "slower beyond the spread of the runs"
        };
        let _ = writeln!(s, "compiled/original: {ratio:.3}x (medians), {verdict}");
    }
    let _ = writeln!(
        s,
        "peak RSS of this process: {}",
        crate::cmd::bytes(r.peak_rss_kb * 1024)
    );
    s
}
