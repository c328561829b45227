use std::path::PathBuf;

use attune_compiler::diff;

use super::exec::ExecArgs;

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
    #[arg(long, default_value_t = 1e-4, value_parser = tolerance)]
    tol: f64,
    #[command(flatten)]
    exec: ExecArgs,
}

/// `--tol`: a finite number, zero or more (NaN would pass nothing, a negative one never).
fn tolerance(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!("'{s}' is not a finite number >= 0")),
    }
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
    }
    Ok(if ok { 0 } else { 1 })
}
