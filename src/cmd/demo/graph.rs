use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use attune_compiler::export::{self, ExportOptions};
use attune_compiler::pass::PassCx;
use attune_compiler::{diff, verify};

use super::exec::{EpArg, ExecArgs, InputArgs, OptArg, read_inputs};
use super::numeric::{BY_DESIGN_HINT, DEFAULT_TOL};
use attune_passes::pipeline::{AttentionArg, AttentionOptions, Options};
use attune_runtime::HostTensor;
use attune_runtime::inputs::{self, Dim, Dims};

#[derive(clap::Args)]
pub struct Args {
    /// The model to compile (default: the shipped SD1.x-style fixture)
    #[arg(long, default_value = "models/sd15_legacy/unet.onnx")]
    model: PathBuf,
    /// Folder for the compiled model (default: a temporary folder)
    #[arg(long)]
    out: Option<PathBuf>,
    /// Timed runs per model
    #[arg(long, default_value_t = 10, value_parser = super::bench::at_least_one)]
    iters: usize,
    /// Side of the latent the timing runs at (the model's `sample` input, if its sides are
    /// symbolic; the numeric check uses the fixture's own inputs)
    #[arg(long, value_name = "N", default_value_t = 64)]
    latent: usize,
    /// Attention substitution to show (see `attune compile --help`)
    #[arg(long, value_enum, default_value_t = AttentionArg::Flash)]
    attention: AttentionArg,
}

/// The whole product on one screen: compile, structural diff, numeric diff, timing.
pub fn run(args: Args) -> anyhow::Result<i32> {
    if !args.model.is_file() {
        bail!(
            "{} not found: run the demo from the attune repository root, or give --model",
            args.model.display()
        );
    }
    let tmp = tempfile::tempdir()?;
    let out_dir = args.out.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let compiled = out_dir.join("compiled.onnx");

    println!("== compile {}", args.model.display());
    let start = Instant::now();
    let original = super::load(&args.model)?;
    let mut model = super::load(&args.model)?;
    verify::verify(&model)?;
    let options = Options {
        attention: AttentionOptions {
            mode: args.attention,
            ..Default::default()
        },
        ..Default::default()
    };
    let reports = super::compile::build(&options)?.run(&mut model, &mut PassCx { verify: true })?;
    super::compile::print_reports(&reports);
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

    let inputs_dir = args.model.parent().unwrap_or(Path::new(".")).join("inputs");
    if !inputs_dir.is_dir() {
        bail!(
            "{} has no inputs/ folder of .npy files next to it",
            args.model.display()
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
    let results = super::numeric::compare_models(&args.model, &compiled, &exec)?;
    let (table, ok) = super::numeric::render(&results, Some(DEFAULT_TOL));
    print!("{table}");
    if !ok {
        println!("{BY_DESIGN_HINT}");
    }

    let (inputs, what) = timing_inputs(&args.model, &inputs_dir, args.latent)?;
    println!(
        "\n== timing on ONNX Runtime CPU: {what}; {} runs each after 2 warm-up runs, alternating",
        args.iters
    );
    let report = super::bench::measure(
        &[args.model.clone(), compiled.clone()],
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
    let specs = inputs::input_specs(&super::load(model)?);
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
fn render_timing(r: &super::bench::Report) -> String {
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
            super::bytes(m.session_rss_kb * 1024)
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
        super::bytes(r.peak_rss_kb * 1024)
    );
    s
}
