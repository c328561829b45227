use std::path::PathBuf;

use attune_compiler::diff;

use super::exec::ExecArgs;
use super::numeric::{BY_DESIGN_HINT, DEFAULT_TOL, tolerance};

#[derive(clap::Args)]
pub struct Args {
    /// The model before (or a pipeline folder: each component both folders have)
    a: PathBuf,
    /// The model after
    b: PathBuf,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
    /// Also run both on the same inputs and compare the outputs
    #[arg(long)]
    numeric: bool,
    /// Largest relative L2 error that passes (--numeric exits 1 above it)
    #[arg(long, default_value_t = DEFAULT_TOL, value_parser = tolerance)]
    tol: f64,
    #[command(flatten)]
    exec: ExecArgs,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    if args.a.is_dir() && args.b.is_dir() {
        return run_folders(&args);
    }
    let (a, b) = (super::load(&args.a)?, super::load(&args.b)?);
    let d = diff::diff(&a, &b);
    drop((a, b));
    if !args.numeric {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&d)?);
        } else {
            print!("{}", d.render());
        }
        return Ok(0);
    }
    let results = super::numeric::compare_models(&args.a, &args.b, &args.exec)?;
    let (table, ok) = super::numeric::render(&results, Some(args.tol));
    if args.json {
        let v = serde_json::json!({ "structural": d, "numeric": results, "tol": args.tol, "within_tol": ok });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", d.render());
        print!("{table}");
        if !ok {
            println!("{BY_DESIGN_HINT}");
        }
    }
    Ok(if ok { 0 } else { 1 })
}

/// Two pipeline folders (one compiled from the other): each component both have, diffed.
fn run_folders(args: &Args) -> anyhow::Result<i32> {
    use attune_passes::folder::Pipeline;
    if args.numeric {
        anyhow::bail!(
            "--numeric runs one graph: give two components' models, e.g. {}/unet/model.onnx {}/unet/model.onnx",
            args.a.display(),
            args.b.display()
        );
    }
    let (a, b) = (Pipeline::read(&args.a)?, Pipeline::read(&args.b)?);
    let mut json = serde_json::Map::new();
    for ca in &a.components {
        let Some(cb) = b.components.iter().find(|c| c.name == ca.name) else {
            if !args.json {
                println!("== {}: only in {}", ca.name, args.a.display());
            }
            continue;
        };
        let d = diff::diff(&super::load(&ca.model)?, &super::load(&cb.model)?);
        if args.json {
            json.insert(ca.name.clone(), serde_json::to_value(&d)?);
        } else {
            println!("== {}", ca.name);
            print!("{}", d.render());
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        for cb in &b.components {
            if !a.components.iter().any(|c| c.name == cb.name) {
                println!("== {}: only in {}", cb.name, args.b.display());
            }
        }
    }
    Ok(0)
}
