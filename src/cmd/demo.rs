use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use attune_compiler::export::{self, ExportOptions};
use attune_compiler::pass::PassCx;
use attune_compiler::{diff, verify};

use super::compile::{AttentionArg, CompileOptions};
use super::exec::{EpArg, ExecArgs, InputArgs, OptArg};

#[derive(clap::Args)]
pub struct Args {
    /// The model to compile (default: the shipped SD1.x-style fixture)
    #[arg(long, default_value = "models/sd15_legacy/unet.onnx")]
    model: PathBuf,
    /// Folder for the compiled model (default: a temporary folder)
    #[arg(long)]
    out: Option<PathBuf>,
    /// Timed runs per model
    #[arg(long, default_value_t = 10)]
    iters: usize,
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
    let options = CompileOptions {
        attention: args.attention,
        ..Default::default()
    };
    let reports = options
        .pipeline()?
        .run(&mut model, &mut PassCx { verify: true })?;
    super::compile::print_reports(&reports);
    export::write(&model, &compiled, &ExportOptions::default())?;
    println!(
        "wrote {} in {:.0} ms",
        compiled.display(),
        start.elapsed().as_secs_f64() * 1e3
    );

    println!("\n== structural diff");
    print!("{}", diff::diff(&original, &model).render());
    drop((original, model));

    println!("\n== numeric diff on ONNX Runtime CPU");
    let exec = ExecArgs {
        ep: EpArg::Cpu,
        input: InputArgs {
            inputs: fixture_inputs(&args.model)?,
            ..Default::default()
        },
        threads: None,
        opt_level: OptArg::All,
    };
    let results = super::numeric::compare_models(&args.model, &compiled, &exec)?;
    let (table, ok) = super::numeric::render(&results, Some(1e-5));
    print!("{table}");

    println!("\n== timing (ONNX Runtime CPU, alternating)");
    let inputs = exec.prepare_inputs(&args.model)?;
    let report = super::bench::measure(
        &[args.model.clone(), compiled.clone()],
        &[false, false],
        &exec,
        &inputs,
        2,
        args.iters,
    )?;
    print!("{}", super::bench::render(&report));
    Ok(if ok { 0 } else { 1 })
}

/// `NAME=FILE` items for the `.npy` files in the fixture's `inputs/` folder.
fn fixture_inputs(model: &Path) -> anyhow::Result<Vec<String>> {
    let dir = model.parent().unwrap_or(Path::new(".")).join("inputs");
    let entries = std::fs::read_dir(&dir)
        .with_context(|| format!("{} has no inputs/ folder of .npy files", model.display()))?;
    let mut items: Vec<String> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "npy"))
        .map(|p| {
            format!(
                "{}={}",
                p.file_stem().unwrap().to_string_lossy(),
                p.display()
            )
        })
        .collect();
    items.sort();
    Ok(items)
}
