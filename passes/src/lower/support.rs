//! The target check: every node of the output must be something the target execution
//! provider can run, at the model's opset and in the type it computes in. Run last, it
//! refuses (naming the node) instead of writing a model the EP rejects at session start.
//!
//! ORT CPU: its kernel registry (`ort_cpu_kernels.tsv`, generated from the pinned ONNX
//! Runtime by `models/export/ort_kernels.py`) plus the ONNX ops it runs by inlining their
//! function bodies. An fp16 node with only an fp32 kernel runs: ORT wraps it in Casts.
//! ORT CUDA: the contrib ops attune emits, with their CUDA types and width limits; every
//! other op against ORT's CUDA kernel list (`ort_cuda_ops.tsv`, from its OperatorKernels.md).
//! What CUDA lacks ORT places on the CPU, so it needs a CPU kernel, and the report names it:
//! each such node costs copies between the devices and rules out CUDA graphs.
use std::collections::HashMap;
use std::sync::OnceLock;

use attune_compiler::analysis::{ElemTypes, Shapes};
use attune_compiler::error::{Error, Result};
use attune_compiler::ir::{Model, Node, NodeId};
use attune_compiler::onnx::{self, DataType};
use attune_compiler::pass::{Pass, PassCx, PassReport};

use super::cuda::{BIAS_ADD_WIDTHS, BIAS_SPLIT_GELU_WIDTHS};
use super::precision::reducing_scatter;
use crate::attention::Target;

/// One kernel (or function) row: opset range and the float types it takes.
#[derive(Debug)]
struct Row {
    since: i64,
    until: Option<i64>,
    /// `None`: an ONNX function, inlined into ops of any type.
    floats: Option<Vec<String>>,
}

type Table = HashMap<(String, String), Vec<Row>>;

fn parse_table(tsv: &str) -> Table {
    let mut t: Table = HashMap::new();
    for line in tsv.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let row = Row {
            since: f[2].parse().expect("generated table"),
            until: (!f[3].is_empty()).then(|| f[3].parse().expect("generated table")),
            floats: (f[4] != "function").then(|| f[4].split(',').map(str::to_string).collect()),
        };
        t.entry((f[0].to_string(), f[1].to_string()))
            .or_default()
            .push(row);
    }
    t
}

fn cpu_table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| parse_table(include_str!("ort_cpu_kernels.tsv")))
}

/// ONNX Runtime's CUDA kernels (`ort_cuda_ops.tsv`, from its OperatorKernels.md).
fn cuda_table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| parse_table(include_str!("ort_cuda_ops.tsv")))
}

/// Contrib ops with CUDA kernels, and their float types (ORT 1.31 OperatorKernels.md).
const CUDA_CONTRIB: &[(&str, &[&str])] = &[
    ("MultiHeadAttention", &["f32", "f16", "bf16"]),
    ("Attention", &["f32", "f16", "bf16"]),
    ("GroupNorm", &["f32", "f16"]),
    ("SkipGroupNorm", &["f32", "f16"]),
    ("SkipLayerNormalization", &["f32", "f16", "bf16"]),
    ("BiasSplitGelu", &["f32", "f16"]),
    ("BiasAdd", &["f32", "f16"]),
    ("BiasGelu", &["f32", "f16", "bf16", "f64"]),
    ("FastGelu", &["f32", "f16", "bf16", "f64"]),
    ("Gelu", &["f32", "f16", "bf16", "f64"]),
    ("QuickGelu", &["f32", "f16", "bf16", "f64"]),
    ("NhwcConv", &["f32", "f16"]),
];

/// Contrib kernels that take only some widths (the last axis of a rank-3 input): ORT's
/// diffusion kernels are instantiated for Stable Diffusion's sizes alone.
const CUDA_WIDTHS: &[(&str, &[i64])] = &[
    ("BiasSplitGelu", BIAS_SPLIT_GELU_WIDTHS),
    ("BiasAdd", BIAS_ADD_WIDTHS),
];

fn check_width(node: &Node, shapes: &Shapes) -> std::result::Result<(), String> {
    let Some((op, widths)) = CUDA_WIDTHS.iter().find(|(op, _)| *op == node.op()) else {
        return Ok(());
    };
    let shape = node
        .inputs
        .first()
        .copied()
        .flatten()
        .and_then(|v| shapes.shape(v));
    let width = shape.filter(|s| s.len() == 3).and_then(|s| s[2].known());
    match width {
        Some(w) if widths.contains(&w) => Ok(()),
        _ => {
            let dims = shape.map_or("unknown".to_string(), |s| {
                let d: Vec<String> = s.iter().map(|d| d.to_string()).collect();
                format!("[{}]", d.join(", "))
            });
            let allowed: Vec<String> = widths.iter().map(i64::to_string).collect();
            Err(format!(
                "its {op} kernel takes a [batch, sequence, width] input with width {}; this input is {dims}",
                allowed.join(", ")
            ))
        }
    }
}

/// Checks that the model runs on `target`.
pub struct SupportCheck {
    pub target: Target,
}

fn domain_key(domain: &str) -> &str {
    if onnx::is_default_domain(domain) {
        "ai.onnx"
    } else {
        domain
    }
}

/// The CPU row for `op` at `version`: a kernel whose range holds it, or a function.
fn cpu_row(domain: &str, op: &str, version: i64) -> Option<&'static Row> {
    row_in(cpu_table(), domain, op, version)
}

/// Does ONNX Runtime's CUDA EP have a kernel for `op` at `version` computing in `dtype`?
fn on_cuda(domain: &str, op: &str, version: i64, dtype: Option<&str>) -> bool {
    row_in(cuda_table(), domain, op, version).is_some_and(|r| {
        let floats = r.floats.as_deref().unwrap_or_default();
        dtype.is_none_or(|t| floats.iter().any(|f| f == t))
    })
}

fn row_in<'t>(table: &'t Table, domain: &str, op: &str, version: i64) -> Option<&'t Row> {
    let rows = table.get(&(domain.to_string(), op.to_string()))?;
    rows.iter()
        .find(|r| r.floats.is_some() && r.since <= version && r.until.is_none_or(|u| version <= u))
        .or_else(|| {
            rows.iter()
                .filter(|r| r.floats.is_none() && r.since <= version)
                .max_by_key(|r| r.since)
        })
}

/// The float type a node computes in: its first typed float input, else its first float output.
fn compute_type(model: &Model, types: &ElemTypes, n: NodeId) -> Option<i32> {
    let node = model.graph.node(n);
    let float = |t: &i32| {
        matches!(
            DataType::try_from(*t),
            Ok(DataType::Float | DataType::Float16 | DataType::Bfloat16 | DataType::Double)
        )
    };
    let typed_inputs = node
        .inputs
        .iter()
        .enumerate()
        .filter(|(slot, _)| !super::precision_typeless_slot(node.op(), *slot))
        .filter_map(|(_, v)| *v);
    typed_inputs
        .chain(node.outputs.iter().flatten().copied())
        .filter_map(|v| types.get(v))
        .find(float)
}

impl Pass for SupportCheck {
    fn name(&self) -> &'static str {
        "check-target"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        let g = &model.graph;
        let types = ElemTypes::infer(g)?;
        let shapes = Shapes::infer(model);
        let ep = match self.target {
            Target::Cpu => "ONNX Runtime's CPU execution provider",
            Target::Cuda => "ONNX Runtime's CUDA execution provider",
        };
        let mut via_casts = 0;
        let mut on_cpu: std::collections::BTreeMap<String, usize> = Default::default();
        for n in g.topo_order()? {
            let node = g.node(n);
            let domain = domain_key(node.domain());
            let fail = |msg: String| Error::Node {
                node: node.describe(),
                msg,
            };
            let version = model
                .opset(node.domain())
                .ok_or_else(|| fail(format!("the model imports no opset for domain '{domain}'")))?;
            let dtype = compute_type(model, &types, n).map(onnx::type_name);
            if self.target == Target::Cuda
                && domain != "ai.onnx"
                && let Some((_, floats)) = CUDA_CONTRIB
                    .iter()
                    .find(|(op, _)| domain == "com.microsoft" && *op == node.op())
            {
                if let Some(t) = &dtype
                    && !floats.contains(&t.as_str())
                {
                    return Err(fail(format!(
                        "{ep} has no {t} kernel for {domain}.{} (it has {})",
                        node.op(),
                        floats.join(", ")
                    )));
                }
                check_width(node, &shapes).map_err(|msg| fail(format!("{ep}: {msg}")))?;
                continue;
            }
            if domain == "ai.onnx" && node.op() == "Constant" {
                continue; // ORT makes constants initializers before placing nodes
            }
            let Some(row) = cpu_row(domain, node.op(), version) else {
                let cpu = if self.target == Target::Cuda {
                    " (nor a CPU kernel to fall back to)"
                } else {
                    ""
                };
                return Err(fail(format!(
                    "{ep} cannot run {domain}.{} at opset {version}{cpu}",
                    node.op()
                )));
            };
            if self.target == Target::Cuda {
                // ORT runs it on CUDA, or places it on the CPU (an ONNX function is expanded
                // into ops that have their own kernels).
                let function = row.floats.is_none();
                if !function && !on_cuda(domain, node.op(), version, dtype.as_deref()) {
                    *on_cpu.entry(format!("{domain}.{}", node.op())).or_default() += 1;
                }
                continue;
            }
            let (Some(t), Some(floats)) = (&dtype, &row.floats) else {
                continue;
            };
            if matches!(t.as_str(), "f16" | "bf16") && reducing_scatter(node) {
                return Err(fail(format!(
                    "{ep} implements {domain}.{} with a reduction only for f32, f64 and integers, not {t}",
                    node.op()
                )));
            }
            if floats.contains(t) {
                continue;
            }
            if t == "f16" && floats.iter().any(|f| f == "f32") {
                via_casts += 1;
                continue;
            }
            let has = floats
                .iter()
                .filter(|f| *f != "-")
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            return Err(fail(format!(
                "{ep} has no {t} kernel for {domain}.{} (it has {has}); use --precision fp32 or --target cuda",
                node.op()
            )));
        }
        let mut report = PassReport::default();
        if via_casts > 0 {
            report.notes.push(format!(
                "{via_casts} fp16 nodes have only fp32 CPU kernels: ONNX Runtime computes them in fp32 between Casts it inserts (correct, not fast)"
            ));
        }
        if !on_cpu.is_empty() {
            let ops: Vec<String> = on_cpu.iter().map(|(op, n)| format!("{op} x{n}")).collect();
            report.notes.push(format!(
                "no CUDA kernel in ONNX Runtime for {}: they run on its CPU EP, with copies to and from the GPU around them (and no CUDA graph)",
                ops.join(", ")
            ));
        }
        Ok(report)
    }
}
