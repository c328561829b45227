//! Element types of every value: declared where the model declares them, inferred forward
//! through the ops elsewhere (exporters rarely write `value_info` for every value).
use std::collections::HashMap;

use crate::error::Result;
use crate::ir::{Graph, Node, ValueId};
use crate::onnx::DataType;

/// Element type (`DataType as i32`) by value; values whose type cannot be told are absent.
#[derive(Debug, Default, Clone)]
pub struct ElemTypes(HashMap<ValueId, i32>);

impl ElemTypes {
    pub fn infer(g: &Graph) -> Result<ElemTypes> {
        let mut types = HashMap::new();
        for (id, _) in g.values() {
            if let Some(t) = g.value_elem_type(id) {
                types.insert(id, t);
            }
        }
        for n in g.topo_order()? {
            let node = g.node(n);
            let of = |slot: usize| {
                node.inputs
                    .get(slot)
                    .copied()
                    .flatten()
                    .and_then(|v| types.get(&v).copied())
            };
            let produced: Vec<Option<i32>> = (0..node.outputs.len())
                .map(|k| output_type(node, k, &of))
                .collect();
            for (v, t) in node.outputs.iter().zip(produced) {
                if let (Some(v), Some(t)) = (v, t) {
                    types.entry(*v).or_insert(t);
                }
            }
        }
        Ok(ElemTypes(types))
    }

    pub fn get(&self, v: ValueId) -> Option<i32> {
        self.0.get(&v).copied()
    }

    pub fn set(&mut self, v: ValueId, t: i32) {
        self.0.insert(v, t);
    }
}

/// The element type of output `k` of `node`, given its inputs' types.
fn output_type(node: &Node, k: usize, input: &dyn Fn(usize) -> Option<i32>) -> Option<i32> {
    use DataType::*;
    let int = |name: &str| node.attr(name).map(|a| a.i as i32);
    let fixed = |t: DataType| Some(t as i32);
    if !crate::onnx::is_default_domain(node.domain()) {
        // Contrib ops (attention, norms, fused activations) keep their first input's type.
        return input(0);
    }
    match (node.op(), k) {
        ("Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" | "NonMaxSuppression", _) => {
            fixed(Int64)
        }
        ("TopK" | "Unique" | "MaxPool", 1..) => fixed(Int64),
        ("Cast", _) => int("to"),
        ("CastLike", _) => input(1),
        ("Constant", _) => {
            let a = node.proto.attribute.first()?;
            match a.name.as_str() {
                "value" => a.t.as_ref().map(|t| t.data_type),
                "value_float" | "value_floats" => fixed(Float),
                "value_int" | "value_ints" => fixed(Int64),
                "value_string" | "value_strings" => fixed(String),
                _ => None,
            }
        }
        ("ConstantOfShape", _) => Some(
            node.attr("value")
                .and_then(|a| a.t.as_ref())
                .map_or(Float as i32, |t| t.data_type),
        ),
        ("EyeLike" | "RandomNormalLike" | "RandomUniformLike" | "Multinomial", _) => {
            int("dtype").filter(|t| *t != 0).or_else(|| input(0))
        }
        ("RandomNormal" | "RandomUniform", _) => Some(int("dtype").unwrap_or(Float as i32)),
        (
            "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "Not" | "And" | "Or"
            | "Xor" | "IsNaN" | "IsInf",
            _,
        ) => fixed(Bool),
        ("Dropout", 1) => fixed(Bool),
        ("LayerNormalization", 1..) => fixed(Float),
        ("Where", _) => input(1),
        ("DequantizeLinear", _) => input(1),
        ("QuantizeLinear" | "If" | "Loop" | "Scan", _) => None,
        _ => input(0),
    }
}
