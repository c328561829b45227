//! The export corpus (models/corpus, made by models/export/corpus.py): each fixture's
//! network exported the way others export it (default initialisation with deduplicated
//! constants behind Identity nodes, no constant folding, opsets 14/17/20, dynamo, fp16,
//! ONNX Runtime's offline optimisation, onnxslim). Every variant must compile to what its
//! canonical fixture compiles to, and compute what it computed.
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use attune_compiler::import;
use common::*;

/// Ops whose count tells what the CUDA lowering fused (and what it left unfused).
const TELLING: &[&str] = &[
    "InstanceNormalization",
    "Softmax",
    "Identity",
    "LayerNormalization",
    "com.microsoft.GroupNorm",
    "com.microsoft.SkipGroupNorm",
    "com.microsoft.MultiHeadAttention",
    "com.microsoft.SkipLayerNormalization",
    "com.microsoft.BiasSplitGelu",
    "com.microsoft.BiasAdd",
    "com.microsoft.NhwcConv",
];

struct Variant {
    name: String,
    dir: PathBuf,
    /// The committed fixture it is an export of (`sd15_legacy`).
    canonical: String,
    fp16: bool,
}

fn corpus() -> Vec<Variant> {
    let root = root().join("models/corpus");
    let mut out: Vec<Variant> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("spec.json").is_file())
        .map(|dir| {
            let spec: serde_json::Value =
                serde_json::from_str(&fs::read_to_string(dir.join("spec.json")).unwrap()).unwrap();
            let canonical = spec["canonical_fixture"].as_str().unwrap();
            let canonical = canonical.trim_start_matches("models/").to_string();
            // A dynamo export is compared with the dynamo fixture where there is one.
            let twin = canonical.replace("_legacy", "_dynamo");
            let same_exporter = spec["exporter"] == "dynamo" && fixture(&twin).is_file();
            Variant {
                name: dir.file_name().unwrap().to_string_lossy().into_owned(),
                canonical: if same_exporter { twin } else { canonical },
                fp16: spec["dtype"] == "float16",
                dir,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(
        out.len() >= 15,
        "the corpus is missing: {} variants",
        out.len()
    );
    out
}

/// Node count and the telling ops of `model` compiled with `flags`.
fn compiled(
    dir: &std::path::Path,
    model: &std::path::Path,
    flags: &[&str],
) -> (usize, BTreeMap<String, usize>) {
    let (out, _) = compile_into(dir, model, flags);
    let m = import::read(&out).unwrap();
    let counts = op_counts(&m);
    let telling = TELLING
        .iter()
        .map(|op| (op.to_string(), counts.get(*op).copied().unwrap_or(0)))
        .collect();
    (m.graph.node_count(), telling)
}

const CUDA: &[&str] = &common::CUDA_FP16_FLASH;

#[test]
fn every_export_form_compiles_for_cuda_like_its_canonical_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let mut table = Vec::new();
    for v in corpus() {
        let (want_nodes, want) = compiled(dir.path(), &fixture(&v.canonical), CUDA);
        let (nodes, got) = compiled(dir.path(), &v.dir.join("unet.onnx"), CUDA);
        table.push(format!(
            "{:16} {nodes:5} nodes (canonical {want_nodes:5}) {got:?}",
            v.name
        ));
        // Every GroupNorm and every attention fused, nothing left behind Identity nodes.
        for op in ["InstanceNormalization", "Softmax", "Identity"] {
            assert_eq!(got[op], 0, "{}: {op} left: {got:?}", v.name);
        }
        assert_eq!(
            got, want,
            "{}: fused ops differ from {}'s",
            v.name, v.canonical
        );
        let off = (nodes as f64 - want_nodes as f64).abs() / want_nodes as f64;
        assert!(
            off <= 0.05,
            "{}: {nodes} nodes, {:.1}% off {}'s {want_nodes}",
            v.name,
            off * 100.0,
            v.canonical
        );
    }
    println!("{}", table.join("\n"));
}

#[test]
fn every_export_form_computes_what_it_computed() {
    // CPU target: fused attention and every canonicalisation, run on ORT CPU against the
    // variant itself (its own inputs).
    let dir = tempfile::tempdir().unwrap();
    for v in corpus() {
        let model = v.dir.join("unet.onnx");
        let (out, _) = compile_into(dir.path(), &model, &["--attention", "flash"]);
        let inputs = v.dir.join("inputs");
        let want = run_outputs(&model, &inputs, &[]);
        let got = run_outputs(&out, &inputs, &[]);
        for ((name, w), (_, g)) in want.iter().zip(&got) {
            let c = attune_runtime::compare::compare(name, w, g).unwrap();
            let tol = if v.fp16 { 2e-3 } else { 1e-5 };
            assert!(c.rel_l2 <= tol, "{} {name}: {c:?}", v.name);
        }
    }
}
