//! Checks that need the values and shapes shape inference finds: sizes no backend could
//! allocate, constant inputs that make an op impossible (Slice step 0, Range delta 0,
//! negative Split sizes, integer division by zero or of the type's minimum by -1, which ONNX
//! Runtime folds with a SIGFPE), a Transpose perm that does not fit its input, and graph
//! inputs and outputs a backend cannot bind (repeated, unknown element type, negative dims).
use std::collections::HashSet;

use crate::analysis::dim::Dim;
use crate::analysis::shapes::{Num, Shapes};
use crate::ir::{Io, Model, Node};
use crate::onnx::{self, ValueInfoProto, tensor_shape_proto::dimension::Value as DimValue};
use crate::schema::{self, MAX_ELEMENTS};

/// Every problem, as sentences naming the node (or graph input/output) and what is wrong.
pub fn problems(model: &Model) -> Vec<String> {
    let g = &model.graph;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for io in &g.inputs {
        if !seen.insert(io.value) {
            out.push(format!(
                "graph input '{}' is listed more than once",
                g.value(io.value).name
            ));
        }
    }
    for (what, io) in g
        .inputs
        .iter()
        .map(|io| ("graph input", io))
        .chain(g.outputs.iter().map(|io| ("graph output", io)))
    {
        if let Err(why) = declared(&io.info) {
            out.push(format!("{what} '{}' {why}", name_of(model, io)));
        }
    }
    for info in g.value_infos() {
        if let Err(why) = declared(info) {
            out.push(format!("value '{}' {why}", info.name));
        }
    }
    for (_, t) in g.initializers() {
        if let Err(why) = schema::known_dtype(t.data_type()) {
            out.push(format!("tensor '{}' {why}", t.name()));
        }
        if t.element_count().is_some_and(|n| n > MAX_ELEMENTS) {
            out.push(format!(
                "tensor '{}' has dims {:?}, more than attune's limit of {MAX_ELEMENTS} elements",
                t.name(),
                t.dims()
            ));
        }
    }
    let shapes = Shapes::infer(model);
    for id in g.node_ids() {
        let node = g.node(id);
        if !onnx::is_default_domain(node.domain()) {
            continue;
        }
        out.extend(node_problems(&shapes, node).map(|why| format!("{}: {why}", node.describe())));
    }
    out
}

fn name_of(model: &Model, io: &Io) -> String {
    model.graph.value(io.value).name.clone()
}

/// A declared type a backend can bind: a known element type, no negative dims.
fn declared(info: &ValueInfoProto) -> Result<(), String> {
    let Some(t) = info.r#type.as_ref().and_then(onnx::tensor_type) else {
        return Ok(());
    };
    if t.elem_type != 0 {
        schema::known_dtype(t.elem_type)?;
    }
    let known: Vec<i64> = t
        .shape
        .iter()
        .flat_map(|s| &s.dim)
        .filter_map(|d| match d.value {
            Some(DimValue::DimValue(v)) => Some(v),
            _ => None,
        })
        .collect();
    if let Some(d) = known.iter().find(|v| **v < 0) {
        return Err(format!("declares a negative dim ({d})"));
    }
    // The sizes it fixes alone already too many elements.
    if onnx::element_count(&known).is_none_or(|n| n > MAX_ELEMENTS) {
        return Err(format!(
            "declares dims {known:?}, more than attune's limit of {MAX_ELEMENTS} elements"
        ));
    }
    Ok(())
}

/// The problems of one node, each without the node's name.
fn node_problems<'a>(shapes: &'a Shapes, node: &'a Node) -> impl Iterator<Item = String> + 'a {
    let input = move |i: usize| node.inputs.get(i).copied().flatten();
    let value = move |i: usize| -> Option<Vec<i64>> {
        shapes
            .value(input(i)?)?
            .iter()
            .map(Num::as_i64)
            .collect::<Option<Vec<_>>>()
    };
    let is_int = move |i: usize| {
        input(i)
            .and_then(|v| shapes.facts(v))
            .is_some_and(|f| !f.float)
    };
    let mut out: Vec<String> = Vec::new();
    match node.op() {
        "Transpose" => {
            let rank = input(0).and_then(|v| shapes.shape(v)).map(<[Dim]>::len);
            if let (Some(rank), Some(perm)) = (rank, node.attr("perm"))
                && perm.ints.len() != rank
            {
                out.push(format!(
                    "attribute 'perm' {:?} has {} entries, its input has rank {rank}",
                    perm.ints,
                    perm.ints.len()
                ));
            }
        }
        "Slice" if value(4).is_some_and(|s| s.contains(&0)) => {
            out.push("input 4 (steps) holds a step of 0".into());
        }
        "Range" => {
            let delta = input(2).and_then(|v| shapes.scalar(v));
            if delta == Some(0.0) {
                out.push("input 2 (delta) is 0: the range never ends".into());
            }
        }
        "Split" => {
            if let Some(s) = value(1).filter(|s| s.iter().any(|v| *v < 0)) {
                out.push(format!("input 1 (split) holds negative sizes {s:?}"));
            }
        }
        "Div" | "Mod" if is_int(0) && is_int(1) => {
            if let (Some(a), Some(b)) = (value(0), value(1)) {
                if b.contains(&0) {
                    out.push(format!("{} of integer constants by zero", node.op()));
                } else if b.contains(&-1)
                    && a.iter().any(|v| *v == i64::MIN || *v == i32::MIN as i64)
                {
                    out.push(format!(
                        "{} of the integer type's minimum by -1 overflows",
                        node.op()
                    ));
                }
            }
        }
        "Expand" | "ConstantOfShape" | "Tile" | "Reshape" => {
            let slot = if node.op() == "ConstantOfShape" { 0 } else { 1 };
            if node.op() != "Reshape"
                && let Some(v) = value(slot).filter(|v| v.iter().any(|d| *d < 0))
            {
                out.push(format!("input {slot} holds negative sizes {v:?}"));
            }
        }
        _ => {}
    }
    for (slot, v) in node.outputs.iter().enumerate() {
        let Some(dims) = v.and_then(|v| shapes.shape(v)) else {
            continue;
        };
        let known: Option<Vec<i64>> = dims.iter().map(Dim::known).collect();
        if let Some(known) = known
            && known.iter().all(|d| *d >= 0)
            && onnx::element_count(&known).is_none_or(|n| n > MAX_ELEMENTS)
        {
            out.push(format!(
                "output {slot} would have dims {known:?}, more than attune's limit of {MAX_ELEMENTS} elements"
            ));
        }
    }
    out.into_iter()
}
