use std::path::PathBuf;

use attune_compiler::diff;

use super::exec::ExecArgs;
use super::numeric::{BY_DESIGN_HINT, DEFAULT_TOL, tolerance};

#[derive(clap::Args)]
pub struct Args {
    /// The model before
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
