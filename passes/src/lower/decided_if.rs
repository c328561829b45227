//! `If`s that fixed sizes decide: torch traces `if x.shape[0] == 1: x = x.squeeze(0)` as an
//! `If` on a size computed at run time. Once the sizes are fixed the condition is a constant,
//! and the branch taken becomes plain nodes: no control flow is left for ONNX Runtime to run
//! on the CPU, or for CUDA graph capture to refuse.
use std::collections::{HashMap, HashSet};

use attune_compiler::error::Result;
use attune_compiler::ir::{Graph, Model, NodeId};
use attune_compiler::onnx::{DataType, GraphProto};
use attune_compiler::patch::{In, Patch};

/// Inlines every `If` whose condition is a constant; returns how many.
pub fn inline(model: &mut Model) -> Result<usize> {
    let g = &model.graph;
    let mut p = Patch::new(model);
    let mut inlined = 0;
    for n in g.topo_order()? {
        if let Some(branch) = taken_branch(g, n) {
            inline_branch(&mut p, g, n, branch);
            inlined += 1;
        }
    }
    p.into_parts().apply(model)?;
    Ok(inlined)
}

/// The branch an `If` takes, when its condition is a constant (not an input a caller may
/// feed) and the branch can stand in the graph: no nested subgraph or initializer of its own,
/// every name it reads defined, and no graph output to rename.
fn taken_branch(g: &Graph, n: NodeId) -> Option<&GraphProto> {
    let node = g.node(n);
    if !node.is("If") || node.outputs.iter().flatten().any(|v| g.is_graph_output(*v)) {
        return None;
    }
    let cond = node.inputs.first().copied().flatten()?;
    let t = g.initializer(cond)?;
    if g.inputs.iter().any(|io| io.value == cond)
        || t.data_type() != DataType::Bool as i32
        || t.element_count() != Some(1)
    {
        return None;
    }
    let taken = t.bytes().ok()?.first().copied()? != 0;
    let name = if taken { "then_branch" } else { "else_branch" };
    let branch = node.attr(name)?.g.as_ref()?;
    let nested = branch
        .node
        .iter()
        .any(|b| b.attribute.iter().any(|a| a.subgraphs().next().is_some()));
    if nested || !branch.initializer.is_empty() {
        return None;
    }
    let mut defined: HashSet<&str> = HashSet::new();
    for b in &branch.node {
        let reads = b.input.iter().filter(|i| !i.is_empty());
        if reads
            .into_iter()
            .any(|i| !defined.contains(i.as_str()) && g.value_id(i).is_none())
        {
            return None;
        }
        defined.extend(b.output.iter().map(String::as_str));
    }
    let outputs_defined = branch
        .output
        .iter()
        .all(|o| defined.contains(o.name.as_str()) || g.value_id(&o.name).is_some());
    outputs_defined.then_some(branch)
}

fn inline_branch(p: &mut Patch, g: &Graph, n: NodeId, branch: &GraphProto) {
    let node = g.node(n);
    let mut names: HashMap<&str, String> = HashMap::new();
    let resolve = |names: &HashMap<&str, String>, name: &str| match names.get(name) {
        _ if name.is_empty() => In::None,
        Some(new) => In::New(new.clone()),
        None => In::Value(g.value_id(name).expect("checked by taken_branch")),
    };
    for b in &branch.node {
        let inputs = b.input.iter().map(|i| resolve(&names, i)).collect();
        let label = if b.name.is_empty() {
            &b.op_type
        } else {
            &b.name
        };
        let outs = p.node(
            &b.op_type,
            &b.domain,
            &format!("{}/{}", node.name(), label.trim_start_matches('/')),
            inputs,
            b.output.len(),
            b.attribute.clone(),
            &node.module,
            Some(n),
        );
        for (o, new) in b.output.iter().zip(outs) {
            names.insert(o.as_str(), new);
        }
    }
    for (out, declared) in node.outputs.iter().zip(&branch.output) {
        if let Some(out) = out {
            p.replace(*out, resolve(&names, &declared.name));
        }
    }
    p.drop_node(n);
}
