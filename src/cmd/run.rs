use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use attune_runtime::{inputs, npy};

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

/// The file each output goes to, checked before running: two outputs whose names map to
/// one file, an output file that is an input, or an --out that is not a folder are errors.
fn output_paths(args: &Args) -> anyhow::Result<Vec<(String, PathBuf)>> {
    if args.out.exists() && !args.out.is_dir() {
        bail!("--out {}: exists and is not a folder", args.out.display());
    }
    let model = super::load(&args.model)?;
    let mut by_file: BTreeMap<PathBuf, String> = BTreeMap::new();
    let mut paths = Vec::new();
    for name in inputs::output_names(&model) {
        let path = output_file(&args.out, &name);
        if let Some(other) = by_file.get(&path) {
            bail!(
                "{}: outputs '{other}' and '{name}' would both be written to {}",
                args.model.display(),
                path.display()
            );
        }
        by_file.insert(path.clone(), name.clone());
        paths.push((name, path));
    }
    let mut read: Vec<(String, PathBuf)> = vec![("the model".into(), args.model.clone())];
    read.extend(args.exec.input.read_files()?);
    let outputs: Vec<(String, PathBuf)> = paths
        .iter()
        .map(|(name, path)| (format!("output '{name}' file"), path.clone()))
        .collect();
    super::refuse_outputs_over_inputs(&outputs, &read)?;
    Ok(paths)
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    let paths = output_paths(&args)?;
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
        let path = paths
            .iter()
            .find(|(n, _)| n == name)
            .map_or_else(|| output_file(&args.out, name), |(_, p)| p.clone());
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
