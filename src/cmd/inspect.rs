use std::collections::BTreeMap;
use std::path::PathBuf;

use attune_compiler::summary::{self, Summary};
use attune_passes::layer_norm;

#[derive(clap::Args)]
pub struct Args {
    /// The .onnx model, or a pipeline folder (each component's summary)
    model: PathBuf,
    /// Print JSON (keys documented in README)
    #[arg(long)]
    json: bool,
    /// Levels of the module tree to show in text output
    #[arg(long, default_value_t = 2)]
    depth: usize,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    if args.model.is_dir() {
        return run_folder(&args);
    }
    let model = super::load(&args.model)?;
    let s = summary::summarize(&model);
    let written_out = layer_norm::written_out(&model);
    let step_cache = attune_passes::cache::describe(&model);
    if args.json {
        let mut v = serde_json::to_value(&s)?;
        v["layer_norms_written_out"] = written_out.into();
        v["step_cache"] = step_cache.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(&args.model, &s, args.depth));
        if let Some(split) = step_cache {
            println!("step cache  {split}");
        }
        if written_out > 0 {
            println!(
                "note: {written_out} LayerNorms are written out (opset {}: no LayerNormalization op); \
                 compile fuses them back for --tome, --hooks, --target cuda and --precision, \
                 whose transformer blocks are found by their norms",
                model.opset("").unwrap_or(0)
            );
        }
    }
    Ok(0)
}

fn render(path: &std::path::Path, s: &Summary, depth: usize) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let opsets: Vec<String> = s.opsets.iter().map(|(d, v)| format!("{d} {v}")).collect();
    let _ = writeln!(o, "model       {}", path.display());
    let _ = writeln!(
        o,
        "exporter    {} ({}), IR {}, opsets {}",
        s.exporter,
        s.producer,
        s.ir_version,
        opsets.join(", ")
    );
    for (title, list) in [("inputs", &s.inputs), ("outputs", &s.outputs)] {
        for (i, io) in list.iter().enumerate() {
            let head = if i == 0 { title } else { "" };
            let _ = writeln!(
                o,
                "{head:<11} {} {}[{}]",
                io.name,
                io.dtype,
                io.shape.join(",")
            );
        }
    }
    let p = &s.parameters;
    let _ = writeln!(o, "nodes       {}", s.nodes);
    let _ = writeln!(
        o,
        "parameters  {} in {} tensors ({})",
        super::count(p.count),
        p.tensors,
        super::bytes(p.bytes)
    );
    if !s.data_files.is_empty() {
        let _ = writeln!(o, "data files  {}", s.data_files.join(", "));
    }
    let mut ops: Vec<(&String, &usize)> = s.ops.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let ops: Vec<String> = ops.iter().map(|(op, n)| format!("{op} {n}")).collect();
    let _ = writeln!(o, "ops         {}", ops.join(", "));
    if !s.attention.is_empty() {
        let _ = writeln!(
            o,
            "attention   {} sites in {} transformer blocks",
            s.attention.len(),
            s.transformer_blocks
        );
        let _ = writeln!(
            o,
            "  {:<58} {:<5} {:>5} {:>8} {:>9} {:>22} {:>10}",
            "path", "kind", "heads", "head dim", "scale", "query tokens", "key tokens"
        );
        let text = |d: &Option<attune_compiler::analysis::Dim>| {
            d.as_ref()
                .map(|d| d.to_string())
                .unwrap_or_else(|| "?".into())
        };
        for a in &s.attention {
            let _ = writeln!(
                o,
                "  {:<58} {:<5} {:>5} {:>8} {:>9.6} {:>22} {:>10}",
                a.path,
                a.kind.name(),
                a.heads,
                a.head_dim,
                a.scale,
                text(&a.query_tokens),
                text(&a.key_tokens)
            );
        }
    }
    for u in &s.unrecognised_attention {
        let _ = writeln!(
            o,
            "unrecognised attention-like Softmax at {} ({}): {}",
            u.path, u.node, u.reason
        );
    }
    let wrapper = if s.module_prefix.is_empty() {
        String::new()
    } else {
        format!(" (wrapper '{}' stripped)", s.module_prefix)
    };
    let _ = writeln!(o, "modules{wrapper}");
    for (path, params) in module_tree(s, depth) {
        let level = levels(&path).len().max(1);
        let _ = writeln!(
            o,
            "  {:indent$}{path:<width$} {}",
            "",
            super::count(params),
            indent = 2 * (level - 1),
            width = 48 - 2 * (level - 1)
        );
    }
    o
}

/// Module path levels, a list index kept with its list: `down_blocks.0.attentions.0` →
/// [`down_blocks.0`, `attentions.0`].
fn levels(path: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        match out.last_mut() {
            Some(last) if part.bytes().all(|c| c.is_ascii_digit()) => {
                last.push('.');
                last.push_str(part);
            }
            _ => out.push(part.to_string()),
        }
    }
    out
}

/// Parameter totals of every module up to `depth` levels, in tree order.
fn module_tree(s: &Summary, depth: usize) -> BTreeMap<String, u64> {
    let mut tree = BTreeMap::new();
    for m in &s.modules {
        let lv = levels(&m.path);
        if lv.is_empty() {
            *tree.entry("<root>".to_string()).or_insert(0) += m.parameters;
        }
        for k in 1..=lv.len().min(depth.max(1)) {
            *tree.entry(lv[..k].join(".")).or_insert(0) += m.parameters;
        }
    }
    tree
}

/// A pipeline folder: its class, then each ONNX component's summary.
fn run_folder(args: &Args) -> anyhow::Result<i32> {
    let p = attune_passes::folder::Pipeline::read(&args.model)?;
    let mut json = serde_json::Map::new();
    if !args.json {
        println!("pipeline    {} ({})", p.class, p.dir.display());
    }
    for c in &p.components {
        let s = summary::summarize(&super::load(&c.model)?);
        if args.json {
            json.insert(c.name.clone(), serde_json::to_value(&s)?);
        } else {
            println!("\n== {} ({})", c.name, c.role.name());
            print!("{}", render(&c.model, &s, args.depth));
        }
    }
    if args.json {
        let v = serde_json::json!({ "class": p.class, "components": json, "notes": p.notes });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for n in &p.notes {
            println!("note: {n}");
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn levels_keep_list_indices() {
        assert_eq!(
            super::levels("down_blocks.0.attentions.0.proj_in"),
            ["down_blocks.0", "attentions.0", "proj_in"]
        );
        assert_eq!(super::levels("conv_in"), ["conv_in"]);
    }
}
