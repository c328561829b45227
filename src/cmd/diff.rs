use std::path::PathBuf;

use attune_compiler::diff::{self, counts};

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

/// The structural diff for one screen: modules with the same change list on one line (a
/// glob of their paths and how many), and at most `list_max` names per initializer, input,
/// output and opset list (`attune diff` prints everything).
pub fn render_folded(d: &diff::Diff, list_max: usize) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    if d.is_empty() {
        s.push_str("no structural differences\n");
        return s;
    }
    let _ = writeln!(
        s,
        "nodes: {} -> {} (+{} -{} ~{})",
        d.nodes_before,
        d.nodes_after,
        d.added.len(),
        d.removed.len(),
        d.changed.len()
    );
    let (by_op, by_module) = d.tally();
    if !by_op.is_empty() {
        s.push_str("by op:\n");
        for (op, t) in &by_op {
            let _ = writeln!(s, "  {op:<28} {}", counts(*t));
        }
        // Modules grouped by their change list, in the order of each group's first module.
        let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
        for (module, ops) in &by_module {
            let total = ops
                .values()
                .fold((0, 0, 0), |a, t| (a.0 + t.0, a.1 + t.1, a.2 + t.2));
            let detail: Vec<String> = ops
                .iter()
                .map(|(op, t)| format!("{op} {}", counts(*t)))
                .collect();
            let change = format!("{} [{}]", counts(total), detail.join(", "));
            match groups.iter_mut().find(|(c, _)| *c == change) {
                Some((_, modules)) => modules.push(module),
                None => groups.push((change, vec![module])),
            }
        }
        let folded = groups.iter().filter(|(_, m)| m.len() > 1).count();
        let _ = writeln!(
            s,
            "by module ({} modules{}):",
            by_module.len(),
            if folded > 0 {
                "; those with the same changes on one line"
            } else {
                ""
            }
        );
        for (change, modules) in &groups {
            match modules.as_slice() {
                [one] => {
                    let _ = writeln!(s, "  {one}: {change}");
                }
                many => {
                    let _ = writeln!(s, "  {} (x{} modules): {change}", globs(many), many.len());
                }
            }
        }
    }
    for (title, c) in [
        ("initializers", &d.initializers),
        ("inputs", &d.inputs),
        ("outputs", &d.outputs),
        ("opsets", &d.opsets),
    ] {
        let total = c.added.len() + c.removed.len() + c.changed.len();
        if total == 0 {
            continue;
        }
        let _ = writeln!(
            s,
            "{title}: +{} -{} ~{}",
            c.added.len(),
            c.removed.len(),
            c.changed.len()
        );
        let items = [("+", &c.added), ("-", &c.removed), ("~", &c.changed)]
            .into_iter()
            .flat_map(|(mark, list)| list.iter().map(move |item| (mark, item)));
        for (mark, item) in items.take(list_max) {
            let _ = writeln!(s, "  {mark} {item}");
        }
        if total > list_max {
            let _ = writeln!(
                s,
                "  ... and {} more (`attune diff` lists them all)",
                total - list_max
            );
        }
    }
    s
}

/// Names for several module paths: one glob per last component (`*.norm1, *.norm2`), a
/// module alone by its path.
fn globs(modules: &[&str]) -> String {
    let mut by_last: Vec<(&str, Vec<&str>)> = Vec::new();
    for m in modules {
        let last = m.rsplit('.').next().unwrap_or(m);
        match by_last.iter_mut().find(|(l, _)| *l == last) {
            Some((_, ms)) => ms.push(m),
            None => by_last.push((last, vec![m])),
        }
    }
    let names: Vec<String> = by_last
        .iter()
        .map(|(_, ms)| match ms.as_slice() {
            [one] => one.to_string(),
            many => glob(many),
        })
        .collect();
    names.join(", ")
}

/// One name for several module paths: their common leading and trailing components around a
/// `*` (`*.transformer_blocks.0.attn1`, `up_blocks.1.*.norm1`).
fn glob(modules: &[&str]) -> String {
    let split: Vec<Vec<&str>> = modules.iter().map(|m| m.split('.').collect()).collect();
    let shortest = split.iter().map(Vec::len).min().unwrap_or(0);
    let at_head = |i: usize| split.iter().all(|p| p[i] == split[0][i]);
    let at_tail = |i: usize| {
        split
            .iter()
            .all(|p| p[p.len() - 1 - i] == split[0][split[0].len() - 1 - i])
    };
    let mut head = 0;
    while head < shortest && at_head(head) {
        head += 1;
    }
    let mut tail = 0;
    while head + tail < shortest && at_tail(tail) {
        tail += 1;
    }
    let first = &split[0];
    let mut parts: Vec<&str> = first[..head].to_vec();
    parts.push("*");
    parts.extend(&first[first.len() - tail..]);
    if head == 0 && tail == 0 {
        return format!("{} and others", modules[0]);
    }
    parts.join(".")
}
