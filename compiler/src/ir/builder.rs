//! A small model written op by op, for the tests of patterns and rules:
//!
//! ```ignore
//! let mut b = Builder::new();
//! let x = b.input("x", &[2, 8]);
//! let w = b.constant("w", &[8], &[1.0; 8]);
//! let y = b.op("Mul", &[&x, &w]);
//! let model = b.finish(&[&y]);
//! ```
//!
//! [`Builder::proto`] gives the model as a proto without importing it, so tests can write
//! malformed models (the hardening tests craft one per class of error).
use crate::error::Result;
use crate::import;
use crate::ir::Model;
use crate::onnx::{
    self, AttributeProto, DataType, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    TensorProto, tensor_shape_proto::dimension::Value as DimValue,
};
use crate::weights::ExternalData;

/// Builds a float32 model at opset 17.
#[derive(Default)]
pub struct Builder {
    graph: GraphProto,
}

impl Builder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A float graph input of fixed dims.
    pub fn input(&mut self, name: &str, dims: &[i64]) -> String {
        let dims = dims.iter().map(|&d| DimValue::DimValue(d)).collect();
        self.graph
            .input
            .push(onnx::tensor_info(name, DataType::Float, Some(dims)));
        name.to_string()
    }

    /// A graph input of any element type and fixed dims (negative ones included).
    pub fn input_typed(&mut self, name: &str, elem_type: DataType, dims: &[i64]) -> String {
        let dims = dims.iter().map(|&d| DimValue::DimValue(d)).collect();
        self.graph
            .input
            .push(onnx::tensor_info(name, elem_type, Some(dims)));
        name.to_string()
    }

    /// An int64 initializer.
    pub fn ints(&mut self, name: &str, dims: &[i64], values: &[i64]) -> String {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, DataType::Int64, dims, bytes)
    }

    fn initializer(&mut self, name: &str, ty: DataType, dims: &[i64], bytes: Vec<u8>) -> String {
        self.graph.initializer.push(TensorProto {
            name: name.into(),
            data_type: ty as i32,
            dims: dims.to_vec(),
            raw_data: bytes.into(),
            ..Default::default()
        });
        name.to_string()
    }

    /// A node as given (its outputs named by the caller, any attributes, no checks).
    pub fn node(&mut self, node: NodeProto) {
        self.graph.node.push(node);
    }

    /// A float initializer.
    pub fn constant(&mut self, name: &str, dims: &[i64], values: &[f32]) -> String {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, DataType::Float, dims, bytes)
    }

    /// A single-output node; returns its output's name (`<op>_<k>`).
    pub fn op(&mut self, op: &str, inputs: &[&str]) -> String {
        self.op_with(op, inputs, vec![])
    }

    /// [`Builder::op`] with attributes.
    pub fn op_with(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let k = self.graph.node.len();
        let out = format!("{op}_{k}");
        self.graph.node.push(NodeProto {
            op_type: op.into(),
            name: format!("/{op}_{k}"),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    /// The model with these graph outputs (their shapes left to inference).
    pub fn finish(self, outputs: &[&str]) -> Result<Model> {
        import::from_proto(
            self.proto(outputs),
            &mut ExternalData::new(std::path::Path::new(".")),
        )
    }

    /// [`Builder::finish`] as a proto, not imported (nothing checked).
    pub fn proto(mut self, outputs: &[&str]) -> ModelProto {
        self.graph.name = "built".into();
        self.graph.output = outputs
            .iter()
            .map(|o| onnx::tensor_info(o, DataType::Float, None))
            .collect();
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(self.graph),
            ..Default::default()
        }
    }
}
