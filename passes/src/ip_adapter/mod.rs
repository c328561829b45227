//! IP-Adapter (Ye et al. 2023; diffusers' `IPAdapterAttnProcessor2_0`): decoupled
//! cross-attention. Every cross-attention site gets a second attention of its queries over the
//! image-prompt tokens, `out + scale·softmax(q·k_ipᵀ·s)·v_ip` with `k_ip`, `v_ip` the file's
//! `to_k_ip`/`to_v_ip` projections of the new graph input `ip_tokens` [batch, tokens, width],
//! and `scale` the site's input `ip_adapter.<path>.scale` (f32 [], default 1: diffusers' scale
//! after `load_ip_adapter`; per site, so IP-Adapter's layer-wise scales are inputs too). It
//! runs before attention fusion, which fuses the second attention like the first. The image
//! projection (image embedding -> tokens) is its own graph ([`projection`]).
pub mod file;
pub mod projection;
mod torch_file;

use std::path::PathBuf;

use attune_compiler::analysis::attention::{self, AttentionSite, Kind};
use attune_compiler::analysis::{ElemTypes, Shapes};
use attune_compiler::ir::Model;
use attune_compiler::onnx::{self, DataType, tensor_shape_proto::dimension::Value as D};
use attune_compiler::pass::{Pass, PassCx, PassReport};
use attune_compiler::patch::{In, Patch, attr};
use attune_compiler::weights::Tensor;
use attune_compiler::{Error, Result};

use crate::emit::Emitter;
use file::{IpAdapterFile, Weight};

/// The image-prompt tokens input.
pub const TOKENS_INPUT: &str = "ip_tokens";

/// A site's scale input.
pub fn scale_input(path: &str) -> String {
    format!("ip_adapter.{path}.scale")
}

pub struct IpAdapterPass {
    pub path: PathBuf,
}

/// diffusers' attention-processor order: down blocks, up blocks, mid block last, then by
/// position (numbers compared as numbers).
fn processor_order(path: &str) -> (u8, Vec<(String, u64)>) {
    let group = match path.split('.').next() {
        Some("down_blocks") => 0,
        Some("up_blocks") => 1,
        Some("mid_block") => 2,
        _ => 3,
    };
    let parts = path
        .split('.')
        .map(|p| match p.parse::<u64>() {
            Ok(n) => (String::new(), n),
            Err(_) => (p.to_string(), 0),
        })
        .collect();
    (group, parts)
}

impl Pass for IpAdapterPass {
    fn name(&self) -> &'static str {
        "ip-adapter"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        crate::cache::refuse_split(model, "IP-Adapter attention")?;
        let ip = IpAdapterFile::read(&self.path)?;
        let bad = |msg: String| Error::Model {
            path: self.path.clone(),
            msg,
        };
        let shapes = Shapes::infer(model);
        let types = ElemTypes::infer(&model.graph)?;
        let found = attention::analyze(model, &shapes);
        let mut sites: Vec<&AttentionSite> = found
            .sites
            .iter()
            .filter(|s| s.kind == Kind::Cross)
            .collect();
        sites.sort_by_key(|s| processor_order(&s.path));
        if sites.len() != ip.layers.len() {
            return Err(bad(format!(
                "{} ip_adapter layers for the {} cross-attention sites of this denoiser (a file for another model?)",
                ip.layers.len(),
                sites.len()
            )));
        }
        let mut report = PassReport::default();
        let mut patch = Patch::new(model);
        let info = onnx::tensor_info(
            TOKENS_INPUT,
            DataType::Float,
            Some(vec![
                D::DimParam("batch".into()),
                D::DimParam("ip_tokens".into()),
                D::DimValue(ip.width as i64),
            ]),
        );
        let tokens = In::New(patch.graph_input(info, None));
        for (k, (site, (n, (wk, wv)))) in sites.iter().zip(&ip.layers).enumerate() {
            if *n != 2 * k + 1 {
                return Err(bad(format!(
                    "ip_adapter.{n}: expected ip_adapter.{} for cross-attention site {k} ({}), as diffusers numbers them (1, 3, 5, ...)",
                    2 * k + 1,
                    site.path
                )));
            }
            let width = site
                .k
                .weight
                .as_ref()
                .and_then(|w| model.graph.value_id(w))
                .and_then(|w| model.graph.initializer(w))
                .map(|t| t.dims().first().copied().unwrap_or(0) as usize);
            if let Some(w) = width.filter(|w| *w != ip.width) {
                return Err(bad(format!(
                    "key 'ip_adapter.{n}.to_k_ip.weight' reads cross-attention width {}, but {} reads {w} (a file for another model)",
                    ip.width, site.path
                )));
            }
            let hidden = (site.heads * site.head_dim) as usize;
            if wk.shape[0] != hidden || wv.shape[0] != hidden {
                return Err(bad(format!(
                    "key 'ip_adapter.{n}.to_k_ip.weight' is {:?}, {} has {hidden} channels",
                    wk.shape, site.path
                )));
            }
            if float_type(&types, site.q.output) != DataType::Float {
                return Err(bad(format!(
                    "{} is not float32: compile the fp32 export with --precision fp16 (IP-Adapter is added first)",
                    site.path
                )));
            }
            decoupled(&mut patch, model, site, tokens.clone(), (wk, wv));
            report
                .rewritten
                .push(format!("{} (cross): ip_adapter.{n}", site.path));
        }
        patch.into_parts().apply(model)?;
        let tokens = ip
            .projection
            .tokens()
            .map_or("one image token per image-encoder token".into(), |t| {
                format!("{t} image tokens")
            });
        report.notes.push(format!(
            "{}: {tokens} of width {} in '{TOKENS_INPUT}' (the image projection is its own graph)",
            ip.path.display(),
            ip.width
        ));
        Ok(report)
    }
}

fn float_type(types: &ElemTypes, v: attune_compiler::ir::ValueId) -> DataType {
    types
        .get(v)
        .and_then(|t| DataType::try_from(t).ok())
        .unwrap_or(DataType::Float)
}

/// `w` [out, in] as the [in, out] initializer a MatMul reads.
fn transposed(p: &mut Patch, name: &str, w: &Weight) -> In {
    let (rows, cols) = (w.shape[0], w.shape[1]);
    let bytes: Vec<u8> = projection::transpose(w)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    In::New(p.tensor(Tensor::new(
        name,
        DataType::Float,
        vec![cols as i64, rows as i64],
        bytes.into(),
    )))
}

/// The site's second attention, added to its merged heads before `to_out`.
fn decoupled(
    p: &mut Patch,
    model: &Model,
    site: &AttentionSite,
    tokens: In,
    (wk, wv): (&Weight, &Weight),
) {
    let g = &model.graph;
    let out = site.output;
    let readers = g.input_uses(out);
    let after = g.value(out).producer.map(|(n, _)| n);
    let module = format!("{}.ip", site.path);
    let wk = transposed(p, &format!("{module}.to_k_ip.weight"), wk);
    let wv = transposed(p, &format!("{module}.to_v_ip.weight"), wv);
    let mut e = Emitter::new(p, &module, after);
    let (h, d) = (site.heads, site.head_dim);
    let heads = e.i64s("ip_heads_shape", &[0, -1, h, d]);
    let merged = e.i64s("ip_merged_shape", &[0, -1, h * d]);
    let split = |e: &mut Emitter, x: In, tag: &str, perm: &[i64]| {
        let r = e.op(
            "Reshape",
            &format!("{tag}_heads"),
            vec![x, heads.clone()],
            vec![],
        );
        e.op(
            "Transpose",
            &format!("{tag}_t"),
            vec![r],
            vec![attr::ints("perm", perm)],
        )
    };
    let k = e.op("MatMul", "to_k_ip", vec![tokens.clone(), wk], vec![]);
    let v = e.op("MatMul", "to_v_ip", vec![tokens, wv], vec![]);
    let q = split(&mut e, In::Value(site.q.output), "ip_q", &[0, 2, 1, 3]);
    let k = split(&mut e, k, "ip_k", &[0, 2, 3, 1]);
    let v = split(&mut e, v, "ip_v", &[0, 2, 1, 3]);
    let scores = e.op("MatMul", "ip_scores", vec![q, k], vec![]);
    let s = e.f32("ip_softmax_scale", site.scale as f32);
    let scores = e.op("Mul", "ip_scaled_scores", vec![scores, s], vec![]);
    let probs = e.op(
        "Softmax",
        "ip_probs",
        vec![scores],
        vec![attr::int("axis", -1)],
    );
    let o = e.op("MatMul", "ip_values", vec![probs, v], vec![]);
    let o = e.op(
        "Transpose",
        "ip_out_t",
        vec![o],
        vec![attr::ints("perm", &[0, 2, 1, 3])],
    );
    let o = e.op("Reshape", "ip_out", vec![o, merged], vec![]);
    let scale = {
        let info = onnx::tensor_info(&scale_input(&site.path), DataType::Float, Some(vec![]));
        let default = Tensor::new(
            scale_input(&site.path),
            DataType::Float,
            vec![],
            1f32.to_le_bytes().to_vec().into(),
        );
        In::New(e.p.graph_input(info, Some(default)))
    };
    let o = e.op("Mul", "ip_scaled", vec![o, scale], vec![]);
    let total = e.op("Add", "ip_added", vec![In::Value(out), o], vec![]);
    let In::New(name) = total else {
        unreachable!("ops make new values")
    };
    e.p.rewire_inputs(readers, name);
}
