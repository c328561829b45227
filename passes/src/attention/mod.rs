//! Attention substitution: each recognised scaled-dot-product attention becomes one fused
//! op (ONNX Runtime's `com.microsoft.MultiHeadAttention`, or the standard opset-23
//! `Attention`), or linear attention built from standard ops. The projections stay; the
//! head split, scores, softmax and merge are replaced, and DCE drops what only fed them.
mod opset;

pub(crate) use opset::upgrade_default as upgrade_default_opset;

use attune_compiler::Result;
use attune_compiler::analysis::Shapes;
use attune_compiler::analysis::attention::{self, AttentionSite, Kind, Operand};
use attune_compiler::ir::{Model, NodeId};
use attune_compiler::onnx::{self, DataType};
use attune_compiler::pass::{Pass, PassCx, PassReport, Skipped};
use attune_compiler::patch::{In, Patch, attr};

use crate::cleanup;
use crate::emit::Emitter;
use crate::glob::Globs;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No change.
    Keep,
    /// `com.microsoft.MultiHeadAttention` (flash kernels on CUDA fp16, tiled flash on CPU fp32).
    Flash,
    /// The standard opset-23 `Attention` op.
    Onnx,
    /// `φ(Q)(φ(K)ᵀV) / (φ(Q) Σ φ(K))`: O(N) memory; changes the model's function.
    Linear(FeatureMap),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureMap {
    Relu,
    /// elu(x) + 1
    Elu1,
}

/// The execution provider the output is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Cpu,
    Cuda,
}

pub struct AttentionPass {
    pub mode: Mode,
    pub target: Target,
    /// Only sites whose module path matches (all when `None`).
    pub layers: Option<Globs>,
    /// Cross-attention sites that must stay unfused (hooks read their probabilities; self
    /// sites are controlled through their projections and fuse).
    pub keep_unfused: Option<Globs>,
    /// Joint sites among those stay unfused too (capture reads their probabilities).
    pub keep_joint_unfused: bool,
}

const MS_DOMAIN: &str = "com.microsoft";
/// Denominator guard of linear attention (relu features can all be zero).
const LINEAR_EPS: f32 = 1e-6;

impl Pass for AttentionPass {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        let shapes = Shapes::infer(model);
        let found = attention::analyze(model, &shapes);
        let mut report = PassReport::default();
        for u in &found.unrecognised {
            report.skipped.push(Skipped {
                site: u.path.clone(),
                reason: format!(
                    "unrecognised attention-like Softmax ({}): {}",
                    u.node, u.reason
                ),
            });
        }
        if found.sites.is_empty() {
            report
                .notes
                .push("no attention found in the graph: nothing to do".into());
            return Ok(report);
        }
        if self.mode == Mode::Keep {
            report.notes.push(format!(
                "--attention keep: {} sites left as exported",
                found.sites.len()
            ));
            return Ok(report);
        }
        let mut todo = Vec::new();
        for site in found.sites {
            match self.check(model, &site) {
                Ok(()) => todo.push(site),
                Err(reason) => report.skipped.push(Skipped {
                    site: site.path.clone(),
                    reason,
                }),
            }
        }
        if self.mode == Mode::Onnx && !todo.is_empty() {
            match opset::upgrade_default(model, 23) {
                Ok(notes) => report.notes.extend(notes),
                Err(why) => {
                    for s in todo.drain(..) {
                        report.skipped.push(Skipped {
                            site: s.path,
                            reason: format!("cannot raise the opset to 23: {why}"),
                        });
                    }
                }
            }
        }
        for site in &todo {
            let mut patch = Patch::new(model);
            self.rewrite(&mut patch, model, site);
            patch.into_parts().apply(model)?;
            report.rewritten.push(format!(
                "{} ({}, {} heads x {}, scale {:.6}{}) -> {}",
                site.path,
                site.kind.name(),
                site.heads,
                site.head_dim,
                site.scale,
                if site.mask.is_some() {
                    ", additive mask as the attention bias"
                } else {
                    ""
                },
                self.op_name()
            ));
        }
        if self.mode == Mode::Flash && !todo.is_empty() {
            model.require_opset(MS_DOMAIN, 1);
        }
        let removed = cleanup::dce(model);
        report.notes.push(format!(
            "dce: removed {} nodes, {} initializers",
            removed.nodes, removed.initializers
        ));
        Ok(report)
    }
}

impl AttentionPass {
    fn op_name(&self) -> &'static str {
        match self.mode {
            Mode::Flash => "com.microsoft.MultiHeadAttention",
            Mode::Onnx => "Attention (opset 23)",
            Mode::Linear(FeatureMap::Relu) => "linear attention (relu)",
            Mode::Linear(FeatureMap::Elu1) => "linear attention (elu+1)",
            Mode::Keep => "unchanged",
        }
    }

    /// Why a site cannot be rewritten in this mode for this target, if it cannot.
    fn check(&self, model: &Model, site: &AttentionSite) -> std::result::Result<(), String> {
        if let Some(globs) = &self.layers
            && !globs.matches(&site.path)
        {
            return Err(format!("not selected by --attention-layers {globs}"));
        }
        let hooked = self
            .keep_unfused
            .as_ref()
            .is_some_and(|g| g.matches(&site.path))
            && matches!(self.mode, Mode::Flash | Mode::Onnx);
        if hooked && site.kind == Kind::Cross {
            return Err(
                "hooked by --hooks (capture/p2p read the cross-attention probabilities): kept unfused"
                    .into(),
            );
        }
        if hooked && site.kind == Kind::Joint && self.keep_joint_unfused {
            return Err(
                "hooked by --hooks capture (it reads the joint attention's probabilities): kept unfused"
                    .into(),
            );
        }
        if let (Some((mask, _)), Mode::Linear(_)) = (site.mask, self.mode) {
            return Err(format!(
                "linear attention cannot apply the additive mask '{}' on the scores (a causal or padding mask): kept as exported",
                model.graph.value(mask).name
            ));
        }
        let dtype = site_type(model, site);
        let fused = matches!(self.mode, Mode::Flash | Mode::Onnx);
        match dtype {
            Some(t) if t == DataType::Float as i32 => {}
            Some(t) if fused && self.target == Target::Cpu => {
                return Err(format!(
                    "the CPU execution provider's kernel needs float32; this site is {}",
                    onnx::type_name(t)
                ));
            }
            Some(t)
                if !matches!(
                    DataType::try_from(t),
                    Ok(DataType::Float16 | DataType::Bfloat16)
                ) =>
            {
                return Err(format!("unsupported element type {}", onnx::type_name(t)));
            }
            _ => {}
        }
        Ok(())
    }

    fn rewrite(&self, p: &mut Patch, model: &Model, site: &AttentionSite) {
        let after = Some(site.softmax);
        let module = site.path.as_str();
        let name = |op: &str| format!("{}/attune_{op}", site.path);
        // Q, K, V, then the mask as the attention bias at `slot` (empty inputs before it).
        let qkv = |p: &mut Patch, slot: usize| {
            let mut e = Emitter::new(p, module, after);
            let mut inputs = [0, 1, 2].map(|i| tokens(&mut e, site, i)).to_vec();
            if let Some(b) = attention_bias(&mut e, model, site) {
                inputs.resize(slot, In::None);
                inputs.push(b);
            }
            inputs
        };
        let out = match self.mode {
            Mode::Flash => {
                let attrs = vec![
                    attr::int("num_heads", site.heads),
                    attr::float("scale", site.scale as f32),
                ];
                // query, key, value, bias, key_padding_mask, attention_bias
                let inputs = qkv(p, 5);
                p.node(
                    "MultiHeadAttention",
                    MS_DOMAIN,
                    &name("MultiHeadAttention"),
                    inputs,
                    1,
                    attrs,
                    module,
                    after,
                )
                .remove(0)
            }
            Mode::Onnx => {
                let attrs = vec![
                    attr::int("q_num_heads", site.heads),
                    attr::int("kv_num_heads", site.heads),
                    attr::float("scale", site.scale as f32),
                ];
                // Q, K, V, attn_mask (a float mask is added to the scores)
                let inputs = qkv(p, 3);
                p.node(
                    "Attention",
                    "",
                    &name("Attention"),
                    inputs,
                    1,
                    attrs,
                    module,
                    after,
                )
                .remove(0)
            }
            Mode::Linear(map) => linear(p, model, site, map, after),
            Mode::Keep => unreachable!("keep rewrites nothing"),
        };
        p.replace(site.output, In::New(out));
    }
}

/// Q, K or V (`i`) as [batch, tokens, heads·head_dim], the form the fused ops read.
fn tokens(e: &mut Emitter, site: &AttentionSite, i: usize) -> In {
    let tag = ["q", "k", "v"][i];
    match site.operands[i] {
        Operand::Tokens(x) => In::Value(x),
        Operand::Joint(image, text) => e.concat(
            &format!("{tag}_joint"),
            vec![In::Value(image), In::Value(text)],
            1,
        ),
        Operand::Heads(x) => {
            let t = e.op(
                "Transpose",
                &format!("{tag}_heads_Transpose"),
                vec![In::Value(x)],
                vec![attr::ints("perm", &[0, 2, 1, 3])],
            );
            let merge = e.i64s(
                &format!("{tag}_heads_merge"),
                &[0, 0, site.heads * site.head_dim],
            );
            e.op(
                "Reshape",
                &format!("{tag}_heads_Reshape"),
                vec![t, merge],
                vec![],
            )
        }
    }
}

/// The site's additive mask as the fused ops' bias: 4-D ([batch|1, heads|1, query, key]),
/// in the site's element type.
fn attention_bias(e: &mut Emitter, model: &Model, site: &AttentionSite) -> Option<In> {
    let (mask, rank) = site.mask?;
    let mut b = In::Value(mask);
    if rank < 4 {
        let axes: Vec<i64> = (0..(4 - rank) as i64).collect();
        b = if model.opset("").unwrap_or(13) >= 13 {
            let axes = e.i64s("mask_unsqueeze_axes", &axes);
            e.unsqueeze("mask_Unsqueeze", b, &axes)
        } else {
            e.op(
                "Unsqueeze",
                "mask_Unsqueeze",
                vec![b],
                vec![attr::ints("axes", &axes)],
            )
        };
    }
    let (want, have) = (site_type(model, site), model.graph.value_elem_type(mask));
    if let (Some(want), Some(have)) = (want, have)
        && want != have
        && let Ok(t) = DataType::try_from(want)
    {
        b = e.cast("mask_Cast", b, t);
    }
    Some(b)
}

/// The element type the site computes in (its query, or the query projection's weight).
fn site_type(model: &Model, site: &AttentionSite) -> Option<i32> {
    model.graph.value_elem_type(site.q.output).or_else(|| {
        let w = model
            .graph
            .node(site.q.matmul)
            .inputs
            .get(1)
            .copied()
            .flatten()?;
        model.graph.value_elem_type(w)
    })
}

/// Linear attention from standard ops, heads kept separate:
/// out = φ(Q)·(φ(K)ᵀ·V) / (φ(Q)·Σₙφ(K) + ε).
fn linear(
    p: &mut Patch,
    model: &Model,
    site: &AttentionSite,
    map: FeatureMap,
    after: Option<NodeId>,
) -> String {
    let (h, d) = (site.heads, site.head_dim);
    let split = In::New(p.i64s("linear_attention_split", &[0, -1, h, d]));
    let merge = In::New(p.i64s("linear_attention_merge", &[0, -1, h * d]));
    let dtype = site_type(model, site)
        .and_then(|t| DataType::try_from(t).ok())
        .unwrap_or(DataType::Float);
    let one = In::New(p.float_scalar("linear_attention_one", dtype, 1.0));
    let eps = In::New(p.float_scalar("linear_attention_eps", dtype, LINEAR_EPS));
    let token_axis = (model.opset("").unwrap_or(13) >= 13)
        .then(|| In::New(p.i64s("linear_attention_token_axis", &[2])));
    let mut s = Emitter::new(p, &site.path, after);
    let perm = |v: &[i64]| vec![attr::ints("perm", v)];
    let heads = |s: &mut Emitter, i: usize, tag: &str| {
        if let Operand::Heads(x) = site.operands[i] {
            return In::Value(x);
        }
        let x = tokens(s, site, i);
        let r = s.op(
            "Reshape",
            &format!("{tag}_Reshape"),
            vec![x, split.clone()],
            vec![],
        );
        s.op(
            "Transpose",
            &format!("{tag}_Transpose"),
            vec![r],
            perm(&[0, 2, 1, 3]),
        )
    };
    let (qh, kh, vh) = (
        heads(&mut s, 0, "q"),
        heads(&mut s, 1, "k"),
        heads(&mut s, 2, "v"),
    );
    let phi = |s: &mut Emitter, x: In, tag: &str| match map {
        FeatureMap::Relu => s.op("Relu", &format!("{tag}_Relu"), vec![x], vec![]),
        FeatureMap::Elu1 => {
            let e = s.op(
                "Elu",
                &format!("{tag}_Elu"),
                vec![x],
                vec![attr::float("alpha", 1.0)],
            );
            s.op(
                "Add",
                &format!("{tag}_EluPlus1"),
                vec![e, one.clone()],
                vec![],
            )
        }
    };
    let (fq, fk) = (phi(&mut s, qh, "q"), phi(&mut s, kh, "k"));
    let fk_t = s.op("Transpose", "k_T", vec![fk.clone()], perm(&[0, 1, 3, 2]));
    let kv = s.op("MatMul", "KV", vec![fk_t, vh], vec![]);
    let num = s.op("MatMul", "Numerator", vec![fq.clone(), kv], vec![]);
    let ksum = match token_axis {
        Some(axes) => s.op(
            "ReduceSum",
            "KSum",
            vec![fk, axes],
            vec![attr::int("keepdims", 1)],
        ),
        None => s.op(
            "ReduceSum",
            "KSum",
            vec![fk],
            vec![attr::ints("axes", &[2]), attr::int("keepdims", 1)],
        ),
    };
    let ksum_t = s.op("Transpose", "KSum_T", vec![ksum], perm(&[0, 1, 3, 2]));
    let den = s.op("MatMul", "Denominator", vec![fq, ksum_t], vec![]);
    let den = s.op("Add", "DenominatorEps", vec![den, eps], vec![]);
    let o = s.op("Div", "Normalize", vec![num, den], vec![]);
    let o = s.op("Transpose", "out_Transpose", vec![o], perm(&[0, 2, 1, 3]));
    match s.op("Reshape", "out_Reshape", vec![o, merge], vec![]) {
        In::New(name) => name,
        _ => unreachable!("op returns a new value"),
    }
}
