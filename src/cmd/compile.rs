use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use attune_compiler::export::{self, ExportOptions, WeightsMode};
use attune_compiler::pass::{PassCx, PassManager};
use attune_compiler::verify;

#[derive(clap::Args)]
pub struct Args {
    /// The .onnx model to compile
    model: PathBuf,
    /// Output .onnx path (its data file is written next to it)
    #[arg(short, long)]
    output: PathBuf,
    /// copy: one self-contained data file; link: hard-link the original data, write only changed tensors
    #[arg(long, value_enum, default_value_t = Weights::Copy)]
    weights: Weights,
    /// Write all tensors inside the .onnx (models under 2 GB)
    #[arg(long)]
    inline: bool,
    /// Verify the graph after every pass (always on in debug builds)
    #[arg(long)]
    verify: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Weights {
    Copy,
    Link,
}

/// The passes `compile` runs, in order (later issues add theirs).
pub fn pipeline() -> PassManager {
    PassManager::new()
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    let start = Instant::now();
    let mut model = super::load(&args.model)?;
    verify::verify(&model).with_context(|| format!("input model {}", args.model.display()))?;
    let loaded = start.elapsed();
    let passes = pipeline();
    let mut cx = PassCx {
        verify: args.verify || cfg!(debug_assertions),
    };
    let reports = passes.run(&mut model, &mut cx)?;
    for r in &reports {
        println!(
            "{}: {} rewritten, {} skipped ({:.1} ms)",
            r.pass,
            r.rewritten.len(),
            r.skipped.len(),
            r.time.as_secs_f64() * 1e3
        );
    }
    let weights = match args.weights {
        Weights::Copy => WeightsMode::Copy,
        Weights::Link => WeightsMode::Link,
    };
    let written = export::write(
        &model,
        &args.output,
        &ExportOptions {
            weights,
            inline: args.inline,
        },
    )
    .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!("wrote {}", written.model.display());
    if let Some((path, size)) = &written.data_file {
        println!("  data   {} ({})", path.display(), super::bytes(*size));
    }
    for (path, hard) in &written.linked {
        println!(
            "  {}   {}",
            if *hard { "linked" } else { "copied" },
            path.display()
        );
    }
    println!(
        "  load {:.0} ms, total {:.0} ms",
        loaded.as_secs_f64() * 1e3,
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok(0)
}
