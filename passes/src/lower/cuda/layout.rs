//! Layout clean-up after the channels-last fusions. Each fused op sits between an NCHW→NHWC
//! and an NHWC→NCHW Transpose; the ops between two fused ops (residual Adds, the skip Concats
//! of the up path, nearest upsampling) still run NCHW. Sinking the Transposes past those ops
//! (they compute the same on NHWC data: same-shape elementwise, Concat on the channel axis,
//! Resize with its scales permuted) leaves Transposes that undo each other, which then go.
use std::collections::HashMap;

use attune_compiler::analysis::Shapes;
use attune_compiler::error::Result;
use attune_compiler::ir::{Graph, Model, NodeId, Use, ValueId};
use attune_compiler::onnx::DataType;
use attune_compiler::patch::{In, Patch, attr};

use attune_compiler::pass::{Pass, PassCx, PassReport};

use super::{MS_DOMAIN, count_line};
use crate::cleanup::dce;

const TO_NCHW: [i64; 4] = [0, 3, 1, 2];
const TO_NHWC: [i64; 4] = [0, 2, 3, 1];

fn perm_of(g: &Graph, n: NodeId) -> Option<Vec<i64>> {
    let node = g.node(n);
    node.is("Transpose")
        .then(|| node.attr("perm").map(|a| a.ints.clone()))
        .flatten()
}

/// How `n` runs on NHWC data instead of NCHW, or None when it does not. Its data inputs are
/// all NCHW views of NHWC values (rank 4, permuted alike), so elementwise ops broadcast the
/// same either way.
fn on_nhwc(g: &Graph, shapes: &Shapes, n: NodeId) -> Option<Nhwc> {
    let node = g.node(n);
    match node.op() {
        "Add" | "Sub" | "Mul" | "Div" => Some(Nhwc {
            data: vec![0, 1],
            attrs: node.proto.attribute.clone(),
            scales: None,
        }),
        "Concat" => {
            let axis = node.attr("axis").map_or(0, |a| a.i);
            matches!(axis, 1 | -3).then(|| Nhwc {
                data: (0..node.inputs.len()).collect(),
                attrs: vec![attr::int("axis", 3)],
                scales: None,
            })
        }
        "Resize" => {
            let mode = node.attr("mode").map_or(&b"nearest"[..], |a| &a.s[..]);
            let computed = g.input(n, 1).is_some() || g.input(n, 3).is_some();
            let values: Vec<f64> = shapes
                .value(g.input(n, 2)?)?
                .iter()
                .map(|v| v.as_f64())
                .collect::<Option<_>>()?;
            let axes = node.attr("axes").is_some();
            if mode != b"nearest" || computed || axes || values.len() != 4 {
                return None;
            }
            Some(Nhwc {
                data: vec![0],
                attrs: node.proto.attribute.clone(),
                scales: Some(TO_NHWC.iter().map(|&i| values[i as usize] as f32).collect()),
            })
        }
        _ => None,
    }
}

/// A node's NHWC form: which inputs carry the data (to be read NHWC), its attributes, and
/// (a Resize) its scales in NHWC order.
struct Nhwc {
    data: Vec<usize>,
    attrs: Vec<attune_compiler::onnx::AttributeProto>,
    scales: Option<Vec<f32>>,
}

/// Moves NHWC→NCHW Transposes past the ops that compute the same on NHWC data, where every
/// data input of the op is such a Transpose (or an op already moved); returns how many ops
/// now run NHWC. The Transposes left behind cancel in [`cancel_transposes`].
pub(super) fn sink_transposes(model: &mut Model) -> Result<usize> {
    let shapes = Shapes::infer(model);
    let g = &model.graph;
    let mut p = Patch::new(model);
    // NCHW values and the NHWC value they are a Transpose of.
    let mut nhwc: HashMap<ValueId, In> = HashMap::new();
    let mut moved = 0;
    for n in g.topo_order()? {
        let node = g.node(n);
        if perm_of(g, n).as_deref() == Some(&TO_NCHW[..]) {
            if let (Some(x), Some(y)) = (g.input(n, 0), g.output(n)) {
                nhwc.insert(y, In::Value(x));
            }
            continue;
        }
        let (Some(y), 1) = (g.output(n), node.outputs.len()) else {
            continue;
        };
        if g.is_graph_output(y) {
            continue;
        }
        let Some(form) = on_nhwc(g, &shapes, n) else {
            continue;
        };
        let data: Option<Vec<In>> = form
            .data
            .iter()
            .map(|&slot| nhwc.get(&g.input(n, slot)?).cloned())
            .collect();
        let Some(data) = data else { continue };
        let mut inputs: Vec<In> = node
            .inputs
            .iter()
            .map(|v| v.map_or(In::None, |v| p.current(v)))
            .collect();
        for (&slot, x) in form.data.iter().zip(data) {
            inputs[slot] = x;
        }
        let module = node.module.clone();
        if let Some(scales) = form.scales {
            let bytes = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
            let name = format!("{module}/attune_scales_nhwc");
            inputs[2] = In::New(p.constant(&name, DataType::Float, vec![4], bytes));
        }
        while matches!(inputs.last(), Some(In::None)) {
            inputs.pop();
        }
        let name = format!("{}_nhwc", node.name());
        let out = p.node(
            node.op(),
            node.domain(),
            &name,
            inputs,
            1,
            form.attrs,
            &module,
            Some(n),
        );
        let out = out.into_iter().next().expect("one output");
        let back = p.op(
            "Transpose",
            &format!("{name}_to_nchw"),
            vec![In::New(out.clone())],
            vec![attr::ints("perm", &TO_NCHW)],
            &module,
            Some(n),
        );
        p.replace(y, In::New(back));
        nhwc.insert(y, In::New(out));
        moved += 1;
    }
    p.into_parts().apply(model)?;
    Ok(moved)
}

/// Removes Transposes that undo the Transpose they read; returns how many.
pub(super) fn cancel_transposes(model: &mut Model) -> Result<usize> {
    let mut cancelled = 0;
    for n in model.graph.topo_order()? {
        let g = &model.graph;
        if !g.contains_node(n) || !g.node(n).is("Transpose") {
            continue;
        }
        let (Some(x), Some(y)) = (g.input(n, 0), g.output(n)) else {
            continue;
        };
        let Some(first) = g.producer(x).filter(|f| g.node(*f).is("Transpose")) else {
            continue;
        };
        let (Some(p1), Some(p2), Some(src)) = (perm_of(g, first), perm_of(g, n), g.input(first, 0))
        else {
            continue;
        };
        let undoes = p1.len() == p2.len()
            && p2
                .iter()
                .enumerate()
                .all(|(i, &j)| p1.get(j as usize) == Some(&(i as i64)));
        if undoes && !g.is_graph_output(y) {
            model.graph.replace_all_uses(y, src);
            cancelled += 1;
        }
    }
    Ok(cancelled)
}

/// `Shape(Transpose(x, perm))` → `Gather(Shape(x), perm)` where a Transpose is read only for
/// its shape (the NCHW views of NhwcConv outputs whose data flows on channels-last); returns
/// how many Shapes changed.
pub(super) fn shapes_without_transposes(model: &mut Model) -> Result<usize> {
    let g = &model.graph;
    let mut p = Patch::new(model);
    let mut changed = 0;
    for t in g.topo_order()? {
        let node = g.node(t);
        let (Some(x), Some(y), Some(perm)) = (g.input(t, 0), g.output(t), node.attr("perm")) else {
            continue;
        };
        let readers: Option<Vec<NodeId>> = g
            .value(y)
            .consumers
            .iter()
            .map(|u| match u {
                Use::Input(n, _)
                    if g.node(*n).is("Shape") && g.node(*n).proto.attribute.is_empty() =>
                {
                    Some(*n)
                }
                _ => None,
            })
            .collect();
        let Some(shapes) =
            readers.filter(|r| !r.is_empty() && node.is("Transpose") && !g.is_graph_output(y))
        else {
            continue;
        };
        for s in shapes {
            let module = g.node(s).module.clone();
            let name = format!("{module}/attune_shape_untransposed");
            let shape = p.op("Shape", &name, vec![In::Value(x)], vec![], &module, Some(s));
            let order = p.i64s(&format!("{name}_perm"), &perm.ints);
            let permuted = p.op(
                "Gather",
                &name,
                vec![In::New(shape), In::New(order)],
                vec![attr::int("axis", 0)],
                &module,
                Some(s),
            );
            p.replace(g.output(s).expect("Shape has an output"), In::New(permuted));
            changed += 1;
        }
    }
    p.into_parts().apply(model)?;
    Ok(changed)
}

/// The layout clean-up as a pass: it runs where channels-last fusions left Transposes.
pub(super) struct Transposes {
    /// Sink Transposes past the ops between fused ones first (`sink-transposes`).
    pub sink: bool,
}

impl Pass for Transposes {
    fn name(&self) -> &'static str {
        "transposes"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        let mut report = PassReport::default();
        let g = &model.graph;
        let channels_last = g.node_ids().any(|n| {
            let node = g.node(n);
            node.domain() == MS_DOMAIN
                && matches!(node.op(), "GroupNorm" | "SkipGroupNorm" | "NhwcConv")
        });
        if !channels_last {
            return Ok(report);
        }
        let sunk = if self.sink {
            sink_transposes(model)?
        } else {
            0
        };
        let cancelled = cancel_transposes(model)?;
        let mut removed = dce(model).nodes; // the cancelled ones no longer read the first
        let untransposed = shapes_without_transposes(model)?;
        removed += dce(model).nodes;
        count_line(
            &mut report,
            sunk,
            "residual Adds, skip Concats and upsampling Resizes -> channels-last",
        );
        report.notes.push(format!(
            "{cancelled} Transpose pairs cancelled, {untransposed} Shapes read before the Transpose; removed {removed} nodes"
        ));
        Ok(report)
    }
}
