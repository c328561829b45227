//! Raising the default-domain opset (for the opset-23 `Attention` op), only where the rest
//! of the graph keeps its meaning.
use attune_compiler::ir::{Model, NodeId};
use attune_compiler::onnx::{self, DataType};
use attune_compiler::patch::Patch;

/// Ops whose schema changed incompatibly at a version: (op, version, what to do).
/// Reductions moved `axes` from an attribute to an input at 18 (rewritten here);
/// GroupNormalization changed its scale/bias from per-group to per-channel at 21 and DFT
/// its inputs at 20 (refused: the meaning would change).
const REDUCTIONS: &[&str] = &[
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
];
const REFUSED: &[(&str, i64)] = &[("GroupNormalization", 21), ("DFT", 20)];

/// The IR version that opset `v` needs (ONNX's release table).
fn min_ir_version(opset: i64) -> i64 {
    match opset {
        ..=15 => 8,
        16..=18 => 8,
        19..=20 => 9,
        21 => 10,
        22..=23 => 11,
        _ => 12,
    }
}

/// Raises the default opset to at least `to`. Returns notes, or why it cannot.
pub fn upgrade_default(model: &mut Model, to: i64) -> Result<Vec<String>, String> {
    let from = model.opset("").unwrap_or(1);
    if from >= to {
        return Ok(Vec::new());
    }
    let g = &model.graph;
    for id in g.node_ids() {
        let n = g.node(id);
        for (op, at) in REFUSED {
            if n.is(op) && from < *at && *at <= to {
                return Err(format!(
                    "{} would change meaning at opset {at} (the model is at {from})",
                    n.describe()
                ));
            }
        }
    }
    let mut notes = vec![format!("default opset {from} -> {to}")];
    if from < 18 && to >= 18 {
        let reductions: Vec<NodeId> = g
            .node_ids()
            .filter(|id| {
                REDUCTIONS.iter().any(|op| g.node(*id).is(op)) && g.node(*id).attr("axes").is_some()
            })
            .collect();
        if !reductions.is_empty() {
            notes.push(format!(
                "{} reductions: axes attribute moved to an input (opset 18)",
                reductions.len()
            ));
        }
        for id in reductions {
            let axes = model
                .graph
                .node(id)
                .attr("axes")
                .map(|a| a.ints.clone())
                .unwrap_or_default();
            let mut patch = Patch::new(model);
            let name = patch.constant(
                &format!("{}_axes", model.graph.node(id).name()),
                DataType::Int64,
                vec![axes.len() as i64],
                axes.iter().flat_map(|a| a.to_le_bytes()).collect(),
            );
            let applied = patch.into_parts();
            applied.apply(model).map_err(|e| e.to_string())?;
            let axes_value = model.graph.value_id(&name).expect("just added");
            model
                .graph
                .node_proto_mut(id)
                .attribute
                .retain(|a| a.name != "axes");
            model.graph.push_input(id, Some(axes_value));
        }
    }
    for o in model
        .proto
        .opset_import
        .iter_mut()
        .filter(|o| onnx::is_default_domain(&o.domain))
    {
        o.version = to;
    }
    let ir = min_ir_version(to);
    if model.proto.ir_version < ir {
        notes.push(format!("IR version {} -> {ir}", model.proto.ir_version));
        model.proto.ir_version = ir;
    }
    Ok(notes)
}
