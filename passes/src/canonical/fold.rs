//! Constant folding: `Constant` nodes become initializers, and every node computed only from
//! constants becomes its result (weights transposed or cast at run time by exports made
//! without constant folding, `Shape → Gather → Unsqueeze → Concat` over known sizes). The
//! folded value keeps its name, so readers, graph outputs and reports are unchanged.
use std::collections::HashMap;

use attune_compiler::Result;
use attune_compiler::ir::{Graph, Model, NodeId, ValueId};
use attune_compiler::onnx::{
    self, AttributeProto, DataType, TensorProto, attribute_proto::AttributeType,
};
use attune_compiler::patch::Patch;
use attune_compiler::weights::{Tensor, TensorData};

use super::eval::{self, Const};

/// Data-movement ops whose folded result is the input's bytes under new dims: the tensor is
/// renamed, not copied (a mapped weight stays mapped).
const VIEWS: &[&str] = &["Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"];

/// `Constant` nodes of the main graph → initializers of their output's name. Constants that
/// are graph outputs or hold sparse or string values stay nodes.
pub fn constants_to_initializers(model: &mut Model) -> usize {
    let g = &model.graph;
    let found: Vec<(NodeId, ValueId, Tensor)> = g
        .node_ids()
        .filter(|&n| g.node(n).is("Constant"))
        .filter_map(|n| {
            let out = g.output(n)?;
            if g.is_graph_output(out) {
                return None;
            }
            let mut proto = constant_tensor(g.node(n).proto.attribute.first()?)?;
            proto.name = g.value(out).name.clone();
            Some((
                n,
                out,
                Tensor {
                    proto,
                    data: TensorData::Inline,
                },
            ))
        })
        .collect();
    let count = found.len();
    for (n, _, tensor) in found {
        model.graph.remove_node(n);
        model.graph.set_initializer(tensor);
    }
    count
}

/// The tensor a Constant node's (only) attribute holds.
fn constant_tensor(a: &AttributeProto) -> Option<TensorProto> {
    let t = |data_type: DataType, dims: Vec<i64>, raw: Vec<u8>| TensorProto {
        data_type: data_type as i32,
        dims,
        raw_data: raw.into(),
        ..Default::default()
    };
    match a.name.as_str() {
        "value" if a.r#type == AttributeType::Tensor as i32 => {
            let proto = a.t.clone()?;
            (proto.data_type != DataType::String as i32 && proto.external_data.is_empty())
                .then_some(proto)
        }
        "value_float" => Some(t(DataType::Float, vec![], a.f.to_le_bytes().to_vec())),
        "value_floats" => Some(t(
            DataType::Float,
            vec![a.floats.len() as i64],
            a.floats.iter().flat_map(|f| f.to_le_bytes()).collect(),
        )),
        "value_int" => Some(t(DataType::Int64, vec![], a.i.to_le_bytes().to_vec())),
        "value_ints" => Some(t(
            DataType::Int64,
            vec![a.ints.len() as i64],
            a.ints.iter().flat_map(|i| i.to_le_bytes()).collect(),
        )),
        _ => None,
    }
}

/// A constant's value for evaluation, if its type is one the evaluator reads.
fn operand(t: &Tensor) -> Option<Const> {
    let dtype = DataType::try_from(t.data_type()).ok()?;
    if eval::elem_size(dtype) == 0 || dtype == DataType::String {
        return None;
    }
    let dims = t
        .dims()
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<_>>()?;
    let data = bytes::Bytes::copy_from_slice(&t.bytes().ok()?);
    Some(Const { dtype, dims, data })
}

/// Folds every default-domain node whose inputs are all constants (chains in one sweep).
/// Returns how many nodes became constants.
pub fn fold_constant_nodes(model: &mut Model) -> Result<usize> {
    let g = &model.graph;
    let opset = model.opset("").unwrap_or(1);
    let mut p = Patch::new(model);
    // Values folded in this sweep (not yet initializers in the graph).
    let mut folded: HashMap<ValueId, Tensor> = HashMap::new();
    let mut count = 0;
    for n in g.topo_order()? {
        let node = g.node(n);
        if !node.is(node.op())
            || super::RANDOM.contains(&node.op())
            || node
                .proto
                .attribute
                .iter()
                .any(|a| a.subgraphs().next().is_some())
            || node.inputs.iter().flatten().next().is_none()
            || node.outputs.iter().flatten().any(|v| g.is_graph_output(*v))
        {
            continue;
        }
        let known = |v: ValueId| {
            folded
                .get(&v)
                .or_else(|| g.is_constant(v).then(|| g.initializer(v)).flatten())
        };
        let Some(inputs) = node
            .inputs
            .iter()
            .map(|v| match v {
                Some(v) => known(*v).map(Some),
                None => Some(None),
            })
            .collect::<Option<Vec<Option<&Tensor>>>>()
        else {
            continue;
        };
        let Some(out) = node.outputs.first().copied().flatten() else {
            continue;
        };
        if node.outputs.len() != 1 {
            continue;
        }
        let result = if VIEWS.contains(&node.op()) {
            view(node, &inputs, opset)
        } else {
            let operands: Option<Vec<Option<Const>>> = inputs
                .iter()
                .map(|t| t.map(operand).map_or(Some(None), |c| c.map(Some)))
                .collect();
            operands
                .and_then(|ops| eval::eval(node, &ops, opset))
                .and_then(|mut outs| outs.pop())
                .map(|c| {
                    Tensor::new(
                        g.value(out).name.clone(),
                        c.dtype,
                        c.dims.iter().map(|&d| d as i64).collect(),
                        c.data,
                    )
                })
        };
        let Some(tensor) = result else { continue };
        folded.insert(out, tensor.clone());
        p.fold(n, vec![(out, tensor)]);
        count += 1;
    }
    p.into_parts().apply(model)?;
    Ok(count)
}

/// Identity/Reshape/Flatten/Squeeze/Unsqueeze of a constant: the same data under the output's
/// dims (computed by the evaluator on the dims alone).
fn view(
    node: &attune_compiler::ir::Node,
    inputs: &[Option<&Tensor>],
    opset: i64,
) -> Option<Tensor> {
    let x = (*inputs.first()?)?;
    let dims: Vec<usize> = x
        .dims()
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<_>>()?;
    // The evaluator sees a zero-width stand-in of the data: only the dims matter.
    let stand_in = Const {
        dtype: DataType::Uint8,
        dims: dims.clone(),
        data: vec![0u8; dims.iter().product()].into(),
    };
    let rest: Option<Vec<Option<Const>>> = inputs[1..]
        .iter()
        .map(|t| t.map(operand).map_or(Some(None), |c| c.map(Some)))
        .collect();
    let mut operands = vec![Some(stand_in)];
    operands.extend(rest?);
    let shaped = eval::eval(node, &operands, opset)?.pop()?;
    let mut t = x.clone();
    t.proto.dims = shaped.dims.iter().map(|&d| d as i64).collect();
    (onnx::element_count(&t.proto.dims) == x.element_count()).then_some(t)
}

/// Is `v` a constant whose elements all equal one number (read from the data, any size up to
/// a million elements)?
pub fn uniform(g: &Graph, v: ValueId) -> Option<f64> {
    if !g.is_constant(v) {
        return None;
    }
    let t = g.initializer(v)?;
    if t.element_count()? > 1 << 20 {
        return None;
    }
    let values = operand(t)?.values()?;
    let first = *values.first()?;
    values.iter().all(|x| *x == first).then_some(first)
}
