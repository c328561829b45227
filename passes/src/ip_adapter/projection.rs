//! The IP-Adapter's image projection as its own ONNX graph: `image_embeds` [batch, embedding]
//! (the CLIP vision encoder's projected embedding) in, `ip_tokens` [batch, tokens, width] out,
//! what the denoiser's `ip_tokens` input takes. Plain IP-Adapter: diffusers' `ImageProjection`,
//! Linear, reshape to tokens, LayerNorm (eps 1e-5).
use attune_compiler::onnx::{self, DataType, tensor_shape_proto::dimension::Value as D};
use attune_compiler::patch::attr;

use super::TOKENS_INPUT;
use super::file::{Projection, Weight};

/// The projection's input.
pub const EMBEDS_INPUT: &str = "image_embeds";

impl Projection {
    pub fn tokens(&self) -> usize {
        match self {
            Projection::Plain { tokens, .. } => *tokens,
        }
    }

    /// The ONNX model (opset 17, weights inline).
    pub fn model(&self) -> onnx::ModelProto {
        let Projection::Plain {
            proj,
            proj_bias,
            norm,
            norm_bias,
            tokens,
        } = self;
        let (width, embed) = (norm.shape[0], proj.shape[1]);
        let tensor = |name: &str, dims: Vec<i64>, data: &[f32]| onnx::TensorProto {
            name: name.into(),
            data_type: DataType::Float as i32,
            dims,
            raw_data: data
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
            ..Default::default()
        };
        let w = transpose(proj);
        let initializer = vec![
            tensor(
                "proj.weight_t",
                vec![embed as i64, (tokens * width) as i64],
                &w,
            ),
            tensor("proj.bias", vec![(tokens * width) as i64], &proj_bias.data),
            tensor("norm.weight", vec![width as i64], &norm.data),
            tensor("norm.bias", vec![width as i64], &norm_bias.data),
            onnx::TensorProto {
                name: "tokens_shape".into(),
                data_type: DataType::Int64 as i32,
                dims: vec![3],
                raw_data: [-1i64, *tokens as i64, width as i64]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>()
                    .into(),
                ..Default::default()
            },
        ];
        let node = |op: &str, inputs: &[&str], output: &str, attribute| onnx::NodeProto {
            op_type: op.into(),
            name: format!("image_proj/{output}"),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            attribute,
            ..Default::default()
        };
        let nodes = vec![
            node(
                "MatMul",
                &[EMBEDS_INPUT, "proj.weight_t"],
                "projected",
                vec![],
            ),
            node("Add", &["projected", "proj.bias"], "biased", vec![]),
            node("Reshape", &["biased", "tokens_shape"], "tokens", vec![]),
            node(
                "LayerNormalization",
                &["tokens", "norm.weight", "norm.bias"],
                TOKENS_INPUT,
                vec![attr::int("axis", -1), attr::float("epsilon", 1e-5)],
            ),
        ];
        let batch = || D::DimParam("batch".into());
        let graph = onnx::GraphProto {
            name: "image_proj".into(),
            node: nodes,
            input: vec![onnx::tensor_info(
                EMBEDS_INPUT,
                DataType::Float,
                Some(vec![batch(), D::DimValue(embed as i64)]),
            )],
            output: vec![onnx::tensor_info(
                TOKENS_INPUT,
                DataType::Float,
                Some(vec![
                    batch(),
                    D::DimValue(*tokens as i64),
                    D::DimValue(width as i64),
                ]),
            )],
            initializer,
            ..Default::default()
        };
        onnx::ModelProto {
            ir_version: 8,
            producer_name: "attune".into(),
            opset_import: vec![onnx::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(graph),
            ..Default::default()
        }
    }
}

/// `w` [rows, cols] as [cols, rows], row-major.
pub(super) fn transpose(w: &Weight) -> Vec<f32> {
    let (rows, cols) = (w.shape[0], w.shape[1]);
    let mut t = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w.data[r * cols + c];
        }
    }
    t
}
