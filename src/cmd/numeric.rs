//! Running two models on the same inputs and comparing their outputs.
use std::path::Path;

use anyhow::{Context, bail};
use attune_runtime::HostTensor;
use attune_runtime::compare::{self, Comparison};
use attune_runtime::inputs::{self, Dims};

use super::exec::ExecArgs;

/// Largest relative L2 error that passes a numeric check unless `--tol` says otherwise
/// (`diff --numeric`, `sample --reference`, the demo's check).
pub const DEFAULT_TOL: f64 = 1e-4;

/// What a failed check says on the next line: some compiles change the outputs on purpose.
pub const BY_DESIGN_HINT: &str = "note: a compile with token merging (--tome, --tome-mode todo) or --attention linear changes the outputs by design; --tol sets what is accepted";

/// `--tol`: a finite number, zero or more (NaN would pass nothing, a negative one never).
pub fn tolerance(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!("'{s}' is not a finite number >= 0")),
    }
}

/// Runs `a` and `b` on the same inputs (made for `a`); one comparison per output of `a`.
pub fn compare_models(a: &Path, b: &Path, exec: &ExecArgs) -> anyhow::Result<Vec<Comparison>> {
    let inputs = exec.prepare_inputs(a)?;
    compare_on(a, b, exec, &inputs)
}

/// [`compare_models`] on given inputs.
pub fn compare_on(
    a: &Path,
    b: &Path,
    exec: &ExecArgs,
    inputs: &[(String, HostTensor)],
) -> anyhow::Result<Vec<Comparison>> {
    let inputs = inputs.to_vec();
    let out_a = exec
        .open(a)?
        .run(&inputs)
        .with_context(|| format!("running {}", a.display()))?;
    // The same values in b's declared types (an fp16 model compared with its fp32 source).
    let inputs_b = inputs_for(b, &inputs, exec)?;
    let out_b = exec
        .open(b)?
        .run(&inputs_b)
        .with_context(|| format!("running {}", b.display()))?;
    let mut result = Vec::new();
    for (name, ta) in &out_a {
        let Some((_, tb)) = out_b.iter().find(|(n, _)| n == name) else {
            bail!("{} has no output '{name}'", b.display());
        };
        result.push(compare::compare(name, ta, tb).map_err(anyhow::Error::msg)?);
    }
    Ok(result)
}

/// `inputs` (made for another model) checked against `model` and converted to its declared
/// types (an fp16 model takes the fp32 values); inputs only `model` has are made from `--dim`
/// and `--seed` like any random input. Errors name the model.
pub fn inputs_for(
    model: &Path,
    inputs: &[(String, HostTensor)],
    exec: &ExecArgs,
) -> anyhow::Result<Vec<(String, HostTensor)>> {
    let specs = inputs::input_specs(&super::load(model)?);
    let dims = Dims::parse(&exec.input.dims)?;
    inputs::prepare(&specs, inputs.to_vec(), &dims, exec.input.seed)
        .with_context(|| format!("inputs of {}", model.display()))
}

/// A table of the comparisons, with a pass/fail column when `tol` is given; `true` when
/// all are within it (relative L2).
pub fn render(results: &[Comparison], tol: Option<f64>) -> (String, bool) {
    use std::fmt::Write;
    let mut s = String::new();
    let verdict_head = tol.map(|t| format!("  within {t:e}")).unwrap_or_default();
    let _ = writeln!(
        s,
        "{:<24} {:>12} {:>12} {:>12}{verdict_head}",
        "output", "max abs", "rel L2", "cosine"
    );
    let mut ok = true;
    for c in results {
        let verdict = match tol {
            Some(t) => {
                ok &= c.within(t);
                if c.within(t) { "  yes" } else { "  NO" }
            }
            None => "",
        };
        let _ = writeln!(
            s,
            "{:<24} {:>12.3e} {:>12.3e} {:>12.8}{verdict}",
            c.name, c.max_abs, c.rel_l2, c.cosine
        );
    }
    (s, ok)
}
