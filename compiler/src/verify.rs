//! Graph invariants, checked after every pass in debug builds and tests (and on every
//! imported model by `compile`). Each problem names the node and its module path.
use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::ir::{Model, Use};
use crate::onnx;

/// At most this many problems are listed in one error.
const MAX_LISTED: usize = 20;

/// Required inputs of the standard ops the analyses and passes read (ONNX's schemas, at the
/// opsets exporters use; Reshape and Slice take one where opsets before 5/10 read attributes);
/// every one of them has a required first output too.
const REQUIRED_INPUTS: &[(&str, usize)] = &[
    ("Add", 2),
    ("Sub", 2),
    ("Mul", 2),
    ("Div", 2),
    ("Pow", 2),
    ("Equal", 2),
    ("MatMul", 2),
    ("Gemm", 2),
    ("Conv", 2),
    ("Reshape", 1),
    ("Expand", 2),
    ("Gather", 2),
    ("Where", 3),
    ("Slice", 1),
    ("LayerNormalization", 2),
    ("GroupNormalization", 3),
    ("InstanceNormalization", 3),
    ("Softmax", 1),
    ("Transpose", 1),
    ("Cast", 1),
    ("Shape", 1),
    ("Concat", 1),
    ("Split", 1),
    ("Unsqueeze", 1),
    ("Squeeze", 1),
    ("Sigmoid", 1),
    ("Erf", 1),
    ("Sqrt", 1),
    ("Resize", 1),
    ("ReduceMean", 1),
];

/// The attributes a Constant holds its value in (exactly one of them).
const CONSTANT_VALUES: &[&str] = &[
    "value",
    "value_float",
    "value_floats",
    "value_int",
    "value_ints",
    "value_string",
    "value_strings",
    "sparse_value",
];

/// Constants without exactly one value attribute (ONNX Runtime crashes on them rather than
/// refusing them, so import checks every model for these).
pub fn malformed_constants(model: &Model) -> Vec<String> {
    let g = &model.graph;
    g.node_ids()
        .map(|id| g.node(id))
        .filter(|node| node.domain().is_empty() && node.is("Constant"))
        .filter_map(|node| {
            let names: Vec<&str> = node.proto.attribute.iter().map(|a| a.name.as_str()).collect();
            let values = names.iter().filter(|n| CONSTANT_VALUES.contains(n)).count();
            (values != 1 || names.len() != 1).then(|| {
                format!(
                    "{}: a Constant holds its value in exactly one attribute of {}, this one has {names:?}",
                    node.describe(),
                    CONSTANT_VALUES.join("/"),
                )
            })
        })
        .collect()
}

/// Checks the model; the error lists what is wrong.
pub fn verify(model: &Model) -> Result<()> {
    report(problems(model))
}

/// [`verify`] plus what shape inference can tell (sizes no backend can allocate, constant
/// inputs that make an op impossible, graph inputs a backend cannot bind): what every model
/// attune reads from a user passes before any command works on it or a backend opens it.
pub fn verify_model(model: &Model) -> Result<()> {
    let mut all = problems(model);
    if all.is_empty() {
        all = crate::feasible::problems(model);
    }
    report(all)
}

fn report(problems: Vec<String>) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    let more = problems.len().saturating_sub(MAX_LISTED);
    let mut msg = format!(
        "invalid graph ({} problem{}):",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems.iter().take(MAX_LISTED) {
        msg.push_str("\n  - ");
        msg.push_str(p);
    }
    if more > 0 {
        msg.push_str(&format!("\n  ... and {more} more"));
    }
    Err(Error::Graph(msg))
}

/// Every invariant that does not hold, as sentences.
pub fn problems(model: &Model) -> Vec<String> {
    let g = &model.graph;
    let mut out = Vec::new();
    if let Err(e) = g.topo_order() {
        out.push(e.to_string());
    }
    out.extend(malformed_constants(model));
    for id in g.node_ids() {
        out.extend(crate::schema::node_problems(model, g.node(id)));
    }
    let mut node_names: HashMap<&str, String> = HashMap::new();
    for id in g.node_ids() {
        let node = g.node(id);
        if !node.name().is_empty()
            && let Some(first) = node_names.insert(node.name(), node.describe())
        {
            out.push(format!("{} has the same name as {first}", node.describe()));
        }
        if model.opset(node.domain()).is_none() {
            let domain = if node.domain().is_empty() {
                "ai.onnx"
            } else {
                node.domain()
            };
            out.push(format!(
                "{}: domain '{domain}' has no opset import",
                node.describe()
            ));
        }
        if let Some(&(_, n)) = REQUIRED_INPUTS
            .iter()
            .find(|(op, _)| node.domain().is_empty() && node.op() == *op)
        {
            let present = node.inputs.iter().take(n).flatten().count();
            if present < n {
                out.push(format!(
                    "{}: {} needs {n} input{}, has {present}",
                    node.describe(),
                    node.op(),
                    if n == 1 { "" } else { "s" }
                ));
            }
            if node.outputs.first().copied().flatten().is_none() {
                out.push(format!("{}: {} has no output", node.describe(), node.op()));
            }
        }
        for (slot, input) in node.inputs.iter().enumerate() {
            let Some(v) = input else { continue };
            let value = g.value(*v);
            if value.producer.is_none() && !g.is_graph_defined(*v) {
                out.push(format!(
                    "{}: input {slot} '{}' is not defined by any node, input or initializer",
                    node.describe(),
                    value.name
                ));
            }
            if !value.consumers.contains(&Use::Input(id, slot)) {
                out.push(format!(
                    "{}: def-use link of input '{}' is missing",
                    node.describe(),
                    value.name
                ));
            }
        }
        for v in &node.implicit_inputs {
            let value = g.value(*v);
            if value.producer.is_none() && !g.is_graph_defined(*v) {
                out.push(format!(
                    "{}: its subgraph reads '{}', which nothing defines",
                    node.describe(),
                    value.name
                ));
            }
        }
        for (slot, output) in node.outputs.iter().enumerate() {
            let Some(v) = output else { continue };
            let value = g.value(*v);
            if value.producer != Some((id, slot)) {
                out.push(format!(
                    "{}: output '{}' is linked to another producer",
                    node.describe(),
                    value.name
                ));
            }
            if g.is_graph_defined(*v) {
                out.push(format!(
                    "{}: output '{}' is also a graph input or initializer",
                    node.describe(),
                    value.name
                ));
            }
        }
    }
    for io in &g.outputs {
        let value = g.value(io.value);
        if value.producer.is_none() && !g.is_graph_defined(io.value) {
            out.push(format!("graph output '{}' is not defined", value.name));
        }
    }
    for (id, t) in g.initializers() {
        if let Err(e) = t.check_len() {
            out.push(e.to_string());
        }
        if let Some(declared) = g.value_type(id).and_then(onnx::tensor_type) {
            if declared.elem_type != 0 && declared.elem_type != t.data_type() {
                out.push(format!(
                    "tensor '{}': declared {} but holds {}",
                    t.name(),
                    onnx::type_name(declared.elem_type),
                    onnx::type_name(t.data_type())
                ));
            }
            if let Some(shape) = &declared.shape {
                let dims: Vec<Option<i64>> = shape
                    .dim
                    .iter()
                    .map(|d| match d.value {
                        Some(onnx::tensor_shape_proto::dimension::Value::DimValue(v)) => Some(v),
                        _ => None,
                    })
                    .collect();
                let fits = dims.len() == t.dims().len()
                    && dims
                        .iter()
                        .zip(t.dims())
                        .all(|(d, a)| d.is_none_or(|d| d == *a));
                if !fits {
                    out.push(format!(
                        "tensor '{}': declared shape {:?} but holds dims {:?}",
                        t.name(),
                        dims,
                        t.dims()
                    ));
                }
            }
        }
    }
    // Values whose declared element type disagrees with an initializer or between declarations.
    for (id, _) in g.values() {
        let decls: Vec<i32> = g
            .inputs
            .iter()
            .chain(&g.outputs)
            .filter(|io| io.value == id)
            .filter_map(|io| io.info.r#type.as_ref())
            .chain(g.value(id).info.as_ref().and_then(|i| i.r#type.as_ref()))
            .filter_map(|t| onnx::tensor_type(t).map(|t| t.elem_type))
            .filter(|t| *t != 0)
            .collect();
        if decls.windows(2).any(|w| w[0] != w[1]) {
            out.push(format!(
                "value '{}' is declared with different element types",
                g.value(id).name
            ));
        }
    }
    out
}
