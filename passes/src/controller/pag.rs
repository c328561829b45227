//! Perturbed-attention guidance (Ahn et al. 2024; diffusers' `PAGIdentitySelfAttnProcessor`):
//! a self-attention site takes `pag.<path>.gate` [rows] (default [0]); where a row's gate is
//! 1 its attention output is V (the identity attention map), so the guidance's perturbed rows
//! run in the same batch as the others. `Where`, not a blend: exact at both gate values.
use attune_compiler::ir::{Graph, Model, NodeId, ValueId};
use attune_compiler::patch::{In, Patch};

use super::{input, input_name};
use crate::emit::Emitter;

/// The gate input of the self-attention module `path`.
pub fn gate_input(path: &str) -> String {
    input_name("pag", path, "gate")
}

/// The first node of module `module` in graph order, and the value it reads first.
fn entry(g: &Graph, order: &[NodeId], module: &str) -> Option<ValueId> {
    let n = order.iter().find(|n| g.node(**n).module == module)?;
    g.node(*n).inputs.first().copied().flatten()
}

/// What the output projection `module` reads from outside itself: the attention's merged
/// heads [batch, tokens, channels], fused or not.
fn attention_output(g: &Graph, order: &[NodeId], module: &str) -> Option<ValueId> {
    order
        .iter()
        .filter(|n| g.node(**n).module == module)
        .flat_map(|n| g.node(*n).inputs.iter().flatten())
        .copied()
        .find(|v| {
            g.value(*v)
                .producer
                .is_some_and(|(p, _)| g.node(p).module != module)
        })
}

/// Gates the self-attention module `path` (its `to_q`, `to_v` and `to_out.0` as diffusers
/// names them): `out ← Where(gate > 1/2, V, out)` before the output projection.
pub fn gate(p: &mut Patch, model: &Model, path: &str) -> std::result::Result<(), String> {
    let g = &model.graph;
    let order = g.topo_order().map_err(|e| e.to_string())?;
    let module = |leaf: &str| format!("{path}.{leaf}");
    let (Some(q_in), Some(v_in)) = (
        entry(g, &order, &module("to_q")),
        entry(g, &order, &module("to_v")),
    ) else {
        return Err(format!("no {path}.to_q and {path}.to_v projections"));
    };
    if q_in != v_in {
        return Err("not self-attention: to_v reads another input than to_q".into());
    }
    let v = super::projection(g, &order, &module("to_v"))
        .ok_or(format!("no {path}.to_v projection"))?;
    let out = attention_output(g, &order, &module("to_out.0")).ok_or(format!(
        "no {path}.to_out.0 projection reading the attention"
    ))?;
    let after = g.value(out).producer.map(|(n, _)| n);
    let readers = g.input_uses(out);
    let mut e = Emitter::new(p, path, after);
    let gate = input(
        e.p,
        &gate_input(path),
        &[None],
        "pag_rows",
        vec![1],
        vec![0.0],
    );
    let rows = e.i64s("pag_gate_shape", &[-1, 1, 1]);
    let gate = e.op("Reshape", "pag_gate_rows", vec![gate, rows], vec![]);
    let half = In::New(e.p.f32_scalar("pag_half", 0.5));
    let perturbed = e.op("Greater", "pag_perturbed", vec![gate, half], vec![]);
    let gated = e.op(
        "Where",
        "pag_identity",
        vec![perturbed, In::Value(v), In::Value(out)],
        vec![],
    );
    let In::New(name) = gated else {
        unreachable!("ops make new values")
    };
    e.p.rewire_inputs(readers, name);
    Ok(())
}
