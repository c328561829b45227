//! The IP-Adapter's image projection as its own ONNX graph: `image_embeds` in (the CLIP
//! vision encoder's projected embedding [batch, dim] for the plain IP-Adapter, its penultimate
//! hidden states [batch, tokens, dim] for Plus and Full Face), `ip_tokens` [batch, tokens,
//! width] out, what the denoiser's `ip_tokens` input takes. LayerNorms have eps 1e-5 and GELU
//! is exact (erf), as torch's defaults the published models were trained with.
use attune_compiler::onnx::{self, DataType, tensor_shape_proto::dimension::Value as D};
use attune_compiler::patch::attr;

use super::TOKENS_INPUT;
use super::file::{Affine, Projection, ResamplerBlock, Weight};

/// The projection's input.
pub const EMBEDS_INPUT: &str = "image_embeds";

/// Heads of the Resampler's attention are 64 wide.
const HEAD: usize = 64;

impl Projection {
    /// The tokens it makes (`None`: one per image-encoder token, Full Face).
    pub fn tokens(&self) -> Option<usize> {
        match self {
            Projection::Plain { tokens, .. } => Some(*tokens),
            Projection::Mlp { .. } => None,
            Projection::Resampler { latents, .. } => Some(latents.shape[1]),
        }
    }

    /// The width of its tokens (the denoiser's cross-attention width).
    pub fn width(&self) -> usize {
        match self {
            Projection::Plain { norm, .. } => norm.shape[0],
            Projection::Mlp { norm, .. } => norm.weight.shape[0],
            Projection::Resampler { norm_out, .. } => norm_out.weight.shape[0],
        }
    }

    /// Whether it reads the image encoder's penultimate hidden states (else `image_embeds`).
    pub fn reads_hidden_states(&self) -> bool {
        !matches!(self, Projection::Plain { .. })
    }

    /// The ONNX model (opset 17, weights inline).
    pub fn model(&self) -> onnx::ModelProto {
        let mut b = Builder::default();
        let batch = || D::DimParam("batch".into());
        // Plus and Full Face read [batch, image-encoder tokens, dim].
        let hidden = |dim: usize| {
            vec![
                batch(),
                D::DimParam("image_tokens".into()),
                D::DimValue(dim as i64),
            ]
        };
        let (input_dims, out) = match self {
            Projection::Plain {
                proj,
                proj_bias,
                norm,
                norm_bias,
                tokens,
            } => {
                let width = norm.shape[0];
                let x = b.linear(EMBEDS_INPUT, proj, Some(proj_bias));
                let shape = b.i64s(&[-1, *tokens as i64, width as i64]);
                let x = b.op("Reshape", &[&x, &shape], vec![]);
                let affine = Affine {
                    weight: norm.clone(),
                    bias: Some(norm_bias.clone()),
                };
                let out = b.layer_norm(&x, &affine);
                (vec![batch(), D::DimValue(proj.shape[1] as i64)], out)
            }
            Projection::Mlp {
                first,
                second,
                norm,
            } => {
                let x = b.affine(EMBEDS_INPUT, first);
                let x = b.gelu(&x);
                let x = b.affine(&x, second);
                let out = b.layer_norm(&x, norm);
                (hidden(first.weight.shape[1]), out)
            }
            Projection::Resampler {
                latents,
                proj_in,
                blocks,
                proj_out,
                norm_out,
            } => {
                let x = b.affine(EMBEDS_INPUT, proj_in);
                // The learned queries, one copy per image.
                let l = b.init(&latents.shape, &latents.data);
                let shape = b.op("Shape", &[EMBEDS_INPUT], vec![attr::int("end", 1)]);
                let rest = b.i64s(&[latents.shape[1] as i64, latents.shape[2] as i64]);
                let shape = b.op("Concat", &[&shape, &rest], vec![attr::int("axis", 0)]);
                let mut lat = b.op("Expand", &[&l, &shape], vec![]);
                for block in blocks {
                    lat = b.perceiver(&x, &lat, block);
                }
                let y = b.affine(&lat, proj_out);
                let out = b.layer_norm(&y, norm_out);
                (hidden(proj_in.weight.shape[1]), out)
            }
        };
        let out_tokens = match self.tokens() {
            Some(t) => D::DimValue(t as i64),
            None => D::DimParam("image_tokens".into()),
        };
        b.nodes.push(onnx::NodeProto {
            op_type: "Identity".into(),
            name: "image_proj/output".into(),
            input: vec![out],
            output: vec![TOKENS_INPUT.into()],
            ..Default::default()
        });
        let graph = onnx::GraphProto {
            name: "image_proj".into(),
            node: b.nodes,
            input: vec![onnx::tensor_info(
                EMBEDS_INPUT,
                DataType::Float,
                Some(input_dims),
            )],
            output: vec![onnx::tensor_info(
                TOKENS_INPUT,
                DataType::Float,
                Some(vec![batch(), out_tokens, D::DimValue(self.width() as i64)]),
            )],
            initializer: b.inits,
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

/// Nodes and initializers of the projection graph, with fresh names.
#[derive(Default)]
struct Builder {
    nodes: Vec<onnx::NodeProto>,
    inits: Vec<onnx::TensorProto>,
    n: usize,
}

impl Builder {
    fn fresh(&mut self, base: &str) -> String {
        self.n += 1;
        format!("{base}_{}", self.n)
    }

    fn init(&mut self, dims: &[usize], data: &[f32]) -> String {
        let name = self.fresh("w");
        self.inits.push(onnx::TensorProto {
            name: name.clone(),
            data_type: DataType::Float as i32,
            dims: dims.iter().map(|d| *d as i64).collect(),
            raw_data: data
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
            ..Default::default()
        });
        name
    }

    fn i64s(&mut self, values: &[i64]) -> String {
        let name = self.fresh("shape");
        self.inits.push(onnx::TensorProto {
            name: name.clone(),
            data_type: DataType::Int64 as i32,
            dims: vec![values.len() as i64],
            raw_data: values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
            ..Default::default()
        });
        name
    }

    fn op(&mut self, op: &str, inputs: &[&str], attribute: Vec<onnx::AttributeProto>) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.nodes.push(onnx::NodeProto {
            op_type: op.into(),
            name: format!("image_proj/{out}"),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            attribute,
            ..Default::default()
        });
        out
    }

    /// A torch Linear with its bias.
    fn affine(&mut self, x: &str, a: &Affine) -> String {
        self.linear(x, &a.weight, a.bias.as_ref())
    }

    /// `x·wᵀ (+ b)` for a torch Linear weight [out, in].
    fn linear(&mut self, x: &str, w: &Weight, b: Option<&Weight>) -> String {
        let wt = self.init(&[w.shape[1], w.shape[0]], &transpose(w));
        let y = self.op("MatMul", &[x, &wt], vec![]);
        match b {
            Some(b) => {
                let b = self.init(&b.shape, &b.data);
                self.op("Add", &[&y, &b], vec![])
            }
            None => y,
        }
    }

    fn layer_norm(&mut self, x: &str, a: &Affine) -> String {
        let w = self.init(&a.weight.shape, &a.weight.data);
        let zeros = vec![0f32; a.weight.data.len()];
        let b = match &a.bias {
            Some(b) => self.init(&b.shape, &b.data),
            None => self.init(&a.weight.shape, &zeros),
        };
        let eps = attr::float("epsilon", 1e-5);
        self.op(
            "LayerNormalization",
            &[x, &w, &b],
            vec![attr::int("axis", -1), eps],
        )
    }

    /// Exact GELU: x·(1 + erf(x/√2))/2.
    fn gelu(&mut self, x: &str) -> String {
        let r = self.init(&[], &[std::f32::consts::FRAC_1_SQRT_2]);
        let (one, half) = (self.init(&[], &[1.0]), self.init(&[], &[0.5]));
        let s = self.op("Mul", &[x, &r], vec![]);
        let e = self.op("Erf", &[&s], vec![]);
        let e = self.op("Add", &[&e, &one], vec![]);
        let y = self.op("Mul", &[x, &e], vec![]);
        self.op("Mul", &[&y, &half], vec![])
    }

    /// One Resampler block: latents += attention(latents over [x; latents]); latents +=
    /// feed-forward(latents).
    fn perceiver(&mut self, x: &str, latents: &str, b: &ResamplerBlock) -> String {
        let inner = b.to_q.shape[0];
        let heads = inner / HEAD;
        let xn = self.layer_norm(x, &b.norm1);
        let ln = self.layer_norm(latents, &b.norm2);
        let q = self.linear(&ln, &b.to_q, None);
        let kv_in = self.op("Concat", &[&xn, &ln], vec![attr::int("axis", 1)]);
        let half = |w: &Weight, k: usize| Weight {
            shape: vec![inner, w.shape[1]],
            data: w.data[k * inner * w.shape[1]..(k + 1) * inner * w.shape[1]].to_vec(),
        };
        let k = self.linear(&kv_in, &half(&b.to_kv, 0), None);
        let v = self.linear(&kv_in, &half(&b.to_kv, 1), None);
        let split = self.i64s(&[0, -1, heads as i64, HEAD as i64]);
        let mut per_head = |t: &str, perm: &[i64]| {
            let r = self.op("Reshape", &[t, &split], vec![]);
            self.op("Transpose", &[&r], vec![attr::ints("perm", perm)])
        };
        let q = per_head(&q, &[0, 2, 1, 3]);
        let k = per_head(&k, &[0, 2, 3, 1]);
        let v = per_head(&v, &[0, 2, 1, 3]);
        let scores = self.op("MatMul", &[&q, &k], vec![]);
        let scale = self.init(&[], &[1.0 / (HEAD as f32).sqrt()]);
        let scores = self.op("Mul", &[&scores, &scale], vec![]);
        let probs = self.op("Softmax", &[&scores], vec![attr::int("axis", -1)]);
        let o = self.op("MatMul", &[&probs, &v], vec![]);
        let o = self.op("Transpose", &[&o], vec![attr::ints("perm", &[0, 2, 1, 3])]);
        let merged = self.i64s(&[0, -1, inner as i64]);
        let o = self.op("Reshape", &[&o, &merged], vec![]);
        let o = self.linear(&o, &b.to_out, None);
        let lat = self.op("Add", &[&o, latents], vec![]);
        let f = self.layer_norm(&lat, &b.ff_norm);
        let f = self.linear(&f, &b.ff_in, None);
        let f = self.gelu(&f);
        let f = self.linear(&f, &b.ff_out, None);
        self.op("Add", &[&f, &lat], vec![])
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
