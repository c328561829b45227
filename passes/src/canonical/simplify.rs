//! Nodes that compute nothing: Identity, a Cast to the type it has, a Reshape to the shape it
//! has, `x·1`, `x/1`, `x+0`, `x-0`. Their readers read the input instead. An Identity of a
//! constant becomes a constant of its own (the exporter's deduplicated weights: each layer
//! gets its weight back under its own name, the data shared, not copied).
use attune_compiler::Result;
use attune_compiler::analysis::{ElemTypes, Shapes};
use attune_compiler::ir::{Graph, Model, NodeId, ValueId};
use attune_compiler::onnx::DataType;
use attune_compiler::patch::{In, Patch};

use super::fold::uniform;

/// What was dropped, by kind.
#[derive(Debug, Default)]
pub struct Simplified {
    pub identities: usize,
    /// Identities that are graph outputs passing a graph input (or another output) through:
    /// both names are fixed, so the node stays.
    pub kept: Vec<String>,
}

/// Can `y`'s readers read `x` instead? Not when `y` is a graph output whose name would have
/// to move onto a value whose name is fixed: a graph input, another output, or an
/// initializer (its tensor carries its name).
fn replaceable(g: &Graph, y: ValueId, x: ValueId) -> bool {
    !g.is_graph_output(y)
        || !(g.is_graph_output(x)
            || g.inputs.iter().any(|io| io.value == x)
            || g.initializer(x).is_some())
}

pub fn drop_identities(model: &mut Model) -> Result<Simplified> {
    let g = &model.graph;
    let mut p = Patch::new(model);
    let mut done = Simplified::default();
    // In order, each reader of a chain's end reading its start (`current`).
    for n in g.topo_order()? {
        let node = g.node(n);
        if !node.is("Identity") {
            continue;
        }
        let (Some(x), Some(y)) = (g.input(n, 0), g.output(n)) else {
            continue;
        };
        let x = resolved(&p, x);
        if g.is_constant(x) && !g.is_graph_output(y) {
            let t = g.initializer(x).expect("constant").clone();
            p.fold(n, vec![(y, t)]);
        } else if replaceable(g, y, x) {
            p.replace(y, In::Value(x));
            p.drop_node(n);
        } else {
            done.kept.push(node.describe());
            continue;
        }
        done.identities += 1;
    }
    p.into_parts().apply(model)?;
    Ok(done)
}

/// What `v` stands for after the replacements recorded so far (chains of no-ops).
fn resolved(p: &Patch, v: ValueId) -> ValueId {
    match p.current(v) {
        In::Value(r) => r,
        _ => v,
    }
}

/// Casts, Reshapes and unit arithmetic that change nothing.
pub fn drop_noops(model: &mut Model, shapes: &Shapes) -> Result<usize> {
    let g = &model.graph;
    let types = ElemTypes::infer(g)?;
    let mut p = Patch::new(model);
    let mut count = 0;
    for n in g.topo_order()? {
        let Some(x) = noop_input(g, shapes, &types, n) else {
            continue;
        };
        let Some(y) = g.output(n) else { continue };
        let x = resolved(&p, x);
        if replaceable(g, y, x) {
            p.replace(y, In::Value(x));
            p.drop_node(n);
            count += 1;
        }
    }
    p.into_parts().apply(model)?;
    Ok(count)
}

/// The input node `n` passes through unchanged, if it is a no-op.
fn noop_input(g: &Graph, shapes: &Shapes, types: &ElemTypes, n: NodeId) -> Option<ValueId> {
    let node = g.node(n);
    if node.outputs.len() != 1 || !onnx_default(node) {
        return None;
    }
    let y = g.output(n)?;
    let same_shape = |x: ValueId| shapes.shape(x).is_some_and(|s| Some(s) == shapes.shape(y));
    let same_type = |x: ValueId| types.get(x).is_some() && types.get(x) == types.get(y);
    let (a, b) = (g.input(n, 0), g.input(n, 1));
    let x = match node.op() {
        "Cast" => {
            let x = a?;
            (types.get(x) == node.attr("to").map(|t| t.i as i32)).then_some(x)?
        }
        "Reshape" => a.filter(|&x| same_shape(x))?,
        "Mul" => match (uniform(g, b?), uniform(g, a?)) {
            (Some(1.0), _) => a?,
            (_, Some(1.0)) => b?,
            _ => return None,
        },
        "Add" => match (uniform(g, b?), uniform(g, a?)) {
            (Some(0.0), _) => a?,
            (_, Some(0.0)) => b?,
            _ => return None,
        },
        "Div" | "Sub" => {
            let unit = if node.op() == "Div" { 1.0 } else { 0.0 };
            (uniform(g, b?) == Some(unit)).then_some(a?)?
        }
        _ => return None,
    };
    // The constant side must not broadcast the other to a larger shape or another type.
    (node.op() == "Cast" || (same_shape(x) && same_type(x))).then_some(x)
}

fn onnx_default(node: &attune_compiler::ir::Node) -> bool {
    node.is(node.op())
}

/// `Gelu` (opset 20; exact, not tanh) written out as exports below opset 20 write it:
/// `x · (1 + erf(x / √2)) · ½`. One form for the GEGLU fusion and the fp16 rules to match.
pub fn expand_gelu(model: &mut Model) -> Result<usize> {
    let g = &model.graph;
    let types = ElemTypes::infer(g)?;
    let mut p = Patch::new(model);
    let mut count = 0;
    for n in g.topo_order()? {
        let node = g.node(n);
        let exact = node
            .attr("approximate")
            .is_none_or(|a| a.s.is_empty() || a.s == b"none");
        let (Some(x), Some(y)) = (g.input(n, 0), g.output(n)) else {
            continue;
        };
        let dtype = types.get(x).and_then(|t| DataType::try_from(t).ok());
        let Some(
            dtype @ (DataType::Float | DataType::Float16 | DataType::Bfloat16 | DataType::Double),
        ) = dtype
        else {
            continue;
        };
        if !node.is("Gelu") || !exact {
            continue;
        }
        let module = node.module.clone();
        let mut e = crate::emit::Emitter::new(&mut p, &module, Some(n));
        let scalar = |e: &mut crate::emit::Emitter, tag: &str, v: f64| match dtype {
            DataType::Double => In::New(e.p.constant(tag, dtype, vec![], v.to_le_bytes().to_vec())),
            _ => In::New(e.p.float_scalar(tag, dtype, v as f32)),
        };
        let sqrt2 = scalar(&mut e, "gelu_sqrt2", std::f64::consts::SQRT_2);
        let one = scalar(&mut e, "gelu_one", 1.0);
        let half = scalar(&mut e, "gelu_half", 0.5);
        let scaled = e.op("Div", "gelu_div", vec![In::Value(x), sqrt2], vec![]);
        let erf = e.op("Erf", "gelu_erf", vec![scaled], vec![]);
        let plus = e.op("Add", "gelu_add", vec![erf, one], vec![]);
        let times = e.op("Mul", "gelu_mul", vec![In::Value(x), plus], vec![]);
        let out = e.op("Mul", "gelu_half", vec![times, half], vec![]);
        p.replace(y, out);
        p.drop_node(n);
        count += 1;
    }
    p.into_parts().apply(model)?;
    Ok(count)
}
