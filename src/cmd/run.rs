use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use attune_runtime::npy;

use super::exec::{ExecArgs, output_file};

#[derive(clap::Args)]
pub struct Args {
    /// The .onnx model
    model: PathBuf,
    #[command(flatten)]
    exec: ExecArgs,
    /// Folder for the outputs, one DIR/<output name>.npy each
    #[arg(long, default_value = "out")]
    out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    let inputs = args.exec.prepare_inputs(&args.model)?;
    let start = Instant::now();
    let mut backend = args.exec.open(&args.model)?;
    let created = start.elapsed();
    let start = Instant::now();
    let outputs = backend
        .run(&inputs)
        .with_context(|| format!("running {}", args.model.display()))?;
    let ran = start.elapsed();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    for (name, t) in &outputs {
        let path = output_file(&args.out, name);
        npy::write(&path, t)?;
        println!(
            "{name}: {} {:?} -> {}",
            t.dtype().name(),
            t.shape(),
            path.display()
        );
    }
    for (ep, n) in backend.placement() {
        println!("placement: {n} nodes on {ep}");
    }
    println!(
        "{}: session {:.0} ms, run {:.1} ms",
        args.exec.ep().name(),
        created.as_secs_f64() * 1e3,
        ran.as_secs_f64() * 1e3
    );
    Ok(0)
}
