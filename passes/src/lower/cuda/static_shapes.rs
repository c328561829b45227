//! Reshape targets without the exporters' shape arithmetic. Exporters compute most Reshape
//! targets at run time (`Shape → Gather → Unsqueeze → Concat`, a dozen small nodes that ONNX
//! Runtime places on the CPU between the CUDA kernels). Where every target element is a known
//! size, the input's own size at that axis (written 0) or the one remaining size (written -1),
//! the target is a constant; where it is exactly the shape of a tensor computed earlier (the
//! NHWC block input a transformer reshapes its tokens back to), it is that tensor's `Shape`.
use std::collections::HashMap;

use attune_compiler::analysis::{Dim, Num, Shapes};
use attune_compiler::error::Result;
use attune_compiler::ir::{Model, NodeId, ValueId};
use attune_compiler::pass::{Pass, PassCx, PassReport};
use attune_compiler::patch::{In, Patch};

use super::count_line;
use crate::cleanup::dce;

/// The value of a Reshape's target when it is computed at run time and inferred exactly.
fn target_dims(model: &Model, shapes: &Shapes, reshape: NodeId) -> Option<Vec<Dim>> {
    let g = &model.graph;
    let target = g.input(reshape, 1)?;
    let computed = g.initializer(target).is_none()
        && g.value(target)
            .producer
            .is_some_and(|(p, _)| !g.node(p).is("Constant") && !g.node(p).is("Shape"));
    if !computed || g.node(reshape).attr("allowzero").is_some_and(|a| a.i != 0) {
        return None;
    }
    shapes
        .value(target)?
        .iter()
        .map(|n| match n {
            Num::I(d) if !d.is_unknown() && d.known().is_none_or(|v| v > 0) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

/// The constant form of the target of `reshape`, if it has one.
fn constant_target(model: &Model, shapes: &Shapes, reshape: NodeId) -> Option<Vec<i64>> {
    let g = &model.graph;
    let dims = target_dims(model, shapes, reshape)?;
    let from = shapes.shape(g.input(reshape, 0)?)?;
    let mut out = Vec::with_capacity(dims.len());
    let mut inferred = false;
    for (i, d) in dims.iter().enumerate() {
        match d.known() {
            Some(v) => out.push(v),
            None if from.get(i) == Some(d) => out.push(0),
            None if !inferred => {
                inferred = true;
                out.push(-1);
            }
            None => return None,
        }
    }
    Some(out)
}

/// Reshape targets made constant, and read from an equal-shaped tensor.
#[derive(Default)]
pub struct Targets {
    pub constant: usize,
    pub shape_of: usize,
}

/// Gives every run-time Reshape target its simplest form.
pub fn static_reshape_targets(model: &mut Model) -> Result<Targets> {
    let shapes = Shapes::infer(model);
    let g = &model.graph;
    let mut p = Patch::new(model);
    let mut done = Targets::default();
    // Fully inferred shapes of what is computed so far (in order, so reading one adds no cycle).
    let mut computed: HashMap<Vec<Dim>, ValueId> = HashMap::new();
    for io in &g.inputs {
        if let Some(s) = shapes
            .shape(io.value)
            .filter(|s| !s.iter().any(Dim::is_unknown))
        {
            computed.entry(s.to_vec()).or_insert(io.value);
        }
    }
    for n in g.topo_order()? {
        let node = g.node(n);
        if node.is("Reshape") {
            let module = &node.module;
            if let Some(target) = constant_target(model, &shapes, n) {
                let name = p.i64s(&format!("{module}/attune_target"), &target);
                p.rewire_inputs(vec![(n, 1)], name);
                done.constant += 1;
            } else if let Some(v) = target_dims(model, &shapes, n).and_then(|d| computed.get(&d)) {
                let name = format!("{module}/attune_target_shape");
                let shape = p.op("Shape", &name, vec![In::Value(*v)], vec![], module, Some(n));
                p.rewire_inputs(vec![(n, 1)], shape);
                done.shape_of += 1;
            }
        }
        for &v in node.outputs.iter().flatten() {
            if let Some(s) = shapes.shape(v).filter(|s| !s.iter().any(Dim::is_unknown)) {
                computed.entry(s.to_vec()).or_insert(v);
            }
        }
    }
    p.into_parts().apply(model)?;
    dce(model);
    Ok(done)
}

/// Run-time Reshape targets in their simplest form, as a pass.
pub(super) struct StaticReshapes;

impl Pass for StaticReshapes {
    fn name(&self) -> &'static str {
        "static-reshapes"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        let mut report = PassReport::default();
        let t = static_reshape_targets(model)?;
        count_line(
            &mut report,
            t.constant,
            "Reshape targets computed at run time -> constants",
        );
        count_line(
            &mut report,
            t.shape_of,
            "Reshape targets computed at run time -> the Shape of an equal-shaped tensor",
        );
        Ok(report)
    }
}
