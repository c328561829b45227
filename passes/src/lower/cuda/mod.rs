//! Fusions for ONNX Runtime's CUDA execution provider, each in its module: GroupNorm and
//! SkipGroupNorm (`group_norm`), NhwcConv (`conv`), the transformer residuals
//! (SkipLayerNormalization, BiasAdd: `residual`), GEGLU (BiasSplitGelu: `geglu`) and packed
//! attention projections (`packed`). The channels-last ops sit between Transposes; then every
//! Transpose that undoes the one before it goes, so GroupNorm → Conv chains, the residual
//! stream and the transformers' own NCHW⇄NHWC permutes run without layout changes.
use attune_compiler::analysis::Shapes;
use attune_compiler::error::Result;
use attune_compiler::ir::{Graph, Model, NodeId, ValueId};
use attune_compiler::onnx::{AttributeProto, DataType};
use attune_compiler::pass::{Pass, PassCx, PassReport, Skipped};
use attune_compiler::patch::{In, Patch, attr};
use attune_compiler::rule::{self, Rule, RulePass};

mod conv;
mod geglu;
mod group_norm;
mod layout;
mod packed;
mod residual;
mod static_shapes;

pub use geglu::BIAS_SPLIT_GELU_WIDTHS;
pub use residual::BIAS_ADD_WIDTHS;

use super::Precision;
use super::precision::data_values;
use crate::cleanup::dce;

const MS_DOMAIN: &str = "com.microsoft";

/// `p + bias` for an Add with a constant vector `bias` of `width` elements: (p, bias).
fn split_bias(
    g: &Graph,
    shapes: &Shapes,
    add: NodeId,
    width: Option<i64>,
) -> Option<(ValueId, ValueId)> {
    [0, 1].into_iter().find_map(|slot| {
        let bias = g.input(add, 1 - slot)?;
        let b = shapes.shape(bias)?;
        (b.len() == 1 && b[0].known() == width && g.initializer(bias).is_some())
            .then(|| Some((g.input(add, slot)?, bias)))?
    })
}

/// Where emitted nodes go: their module path, and the node they follow in the exported order.
struct Site<'a> {
    module: &'a str,
    after: Option<NodeId>,
}

/// `com.microsoft.<op>` on channels-last data between Transposes: reads NCHW `x` (then
/// `rest`), returns the names of its first `outputs` outputs, NCHW.
fn channels_last(
    p: &mut Patch,
    at: &Site,
    op: &str,
    x: In,
    rest: Vec<In>,
    attrs: Vec<AttributeProto>,
    outputs: usize,
) -> Vec<String> {
    let name = |tag: &str| format!("{}/attune_{tag}", at.module);
    let transpose = |p: &mut Patch, x: In, tag: &str, perm: &[i64]| {
        p.op(
            "Transpose",
            &name(tag),
            vec![x],
            vec![attr::ints("perm", perm)],
            at.module,
            at.after,
        )
    };
    let nhwc = transpose(p, x, &format!("{op}_to_nhwc"), &[0, 2, 3, 1]);
    let inputs = std::iter::once(In::New(nhwc)).chain(rest).collect();
    let outs = p.node(
        op,
        MS_DOMAIN,
        &name(op),
        inputs,
        outputs,
        attrs,
        at.module,
        at.after,
    );
    outs.into_iter()
        .map(|out| transpose(p, In::New(out), &format!("{op}_to_nchw"), &[0, 3, 1, 2]))
        .collect()
}

/// One patch applying `fuse` to every `op` node (`com.microsoft.` prefixed for contrib ops):
/// what each fused, and why the others stay (reported as skipped under `label`).
fn fuse_each<T>(
    model: &mut Model,
    report: &mut PassReport,
    op: &str,
    label: &str,
    mut fuse: impl FnMut(&mut Patch, &Graph, &Shapes, NodeId) -> std::result::Result<T, String>,
) -> Result<Vec<T>> {
    let shapes = Shapes::infer(model);
    let g = &model.graph;
    let mut p = Patch::new(model);
    let mut fused = Vec::new();
    for n in g.topo_order()? {
        let node = g.node(n);
        let is_op = match op.strip_prefix("com.microsoft.") {
            Some(contrib) => node.domain() == MS_DOMAIN && node.op() == contrib,
            None => node.is(op),
        };
        if !is_op {
            continue;
        }
        match fuse(&mut p, g, &shapes, n) {
            Ok(t) => fused.push(t),
            Err(why) => report.skipped.push(Skipped {
                site: g.node(n).module.clone(),
                reason: format!("{label}: {why}"),
            }),
        }
    }
    p.into_parts().apply(model)?;
    dce(model);
    Ok(fused)
}

/// The fusions, each of which can be switched (`--disable-fusions`, `--enable-fusions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum CudaFusion {
    GroupNorm,
    SkipGroupNorm,
    NhwcConv,
    SkipLayerNorm,
    BiasAdd,
    BiasSplitGelu,
    PackedQkv,
    StaticReshapes,
    SinkTransposes,
}

impl CudaFusion {
    /// Every fusion with its command-line name.
    pub const NAMES: &[(CudaFusion, &str)] = &[
        (CudaFusion::GroupNorm, "group-norm"),
        (CudaFusion::SkipGroupNorm, "skip-group-norm"),
        (CudaFusion::NhwcConv, "nhwc-conv"),
        (CudaFusion::SkipLayerNorm, "skip-layer-norm"),
        (CudaFusion::BiasAdd, "bias-add"),
        (CudaFusion::BiasSplitGelu, "bias-split-gelu"),
        (CudaFusion::PackedQkv, "packed-qkv"),
        (CudaFusion::StaticReshapes, "static-reshapes"),
        (CudaFusion::SinkTransposes, "sink-transposes"),
    ];

    pub fn parse(name: &str) -> std::result::Result<CudaFusion, String> {
        Self::NAMES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(f, _)| *f)
            .ok_or_else(|| {
                let all: Vec<&str> = Self::NAMES.iter().map(|(_, n)| *n).collect();
                format!("'{name}' is not one of {}", all.join(", "))
            })
    }

    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(f, _)| *f == self)
            .map_or("?", |(_, n)| n)
    }

    /// On unless disabled. Packed QKV/KV is opt-in: on an H100 with ONNX Runtime 1.31 it made
    /// the SD1.5 UNet 1-2% slower (its flash kernel unpacks the heads first), see the README.
    pub const DEFAULT: &[CudaFusion] = &[
        CudaFusion::GroupNorm,
        CudaFusion::SkipGroupNorm,
        CudaFusion::NhwcConv,
        CudaFusion::SkipLayerNorm,
        CudaFusion::BiasAdd,
        CudaFusion::BiasSplitGelu,
        CudaFusion::StaticReshapes,
        CudaFusion::SinkTransposes,
    ];
}

impl TryFrom<String> for CudaFusion {
    type Error = String;
    fn try_from(name: String) -> std::result::Result<Self, String> {
        CudaFusion::parse(&name)
    }
}

impl From<CudaFusion> for String {
    fn from(f: CudaFusion) -> String {
        f.name().to_string()
    }
}

fn count_line(report: &mut PassReport, n: usize, what: &str) {
    if n > 0 {
        report.rewritten.push(format!("{n} {what}"));
    }
}

/// The CUDA fusions `fusions` as passes, in order, for a model the precision pass then
/// converts to `precision` (the fused kernels exist for fp32 and fp16 only: none for bf16).
/// Each is a pass of its own (reported, dumped, bisected by its name); the rule-driven ones
/// run on the one rule engine.
pub fn passes(fusions: &[CudaFusion], precision: Precision) -> Vec<Box<dyn Pass>> {
    if precision == Precision::Bf16 {
        return vec![Box::new(NoBf16Kernels)];
    }
    let on = |f: CudaFusion| fusions.contains(&f);
    let mut passes: Vec<Box<dyn Pass>> = Vec::new();
    let mut rules = |name: &'static str, rule: Box<dyn Rule>| {
        passes.push(Box::new(RulePass {
            name,
            rules: vec![rule],
        }))
    };
    if on(CudaFusion::SkipLayerNorm) {
        rules("skip-layer-norm", Box::new(residual::SkipLayerNormRule));
    }
    if on(CudaFusion::BiasAdd) {
        rules("bias-add", Box::new(residual::BiasAddRule));
    }
    if on(CudaFusion::BiasSplitGelu) {
        rules("bias-split-gelu", Box::new(geglu::GegluRule));
    }
    if on(CudaFusion::GroupNorm) {
        rules(
            "group-norm",
            Box::new(group_norm::GroupNormRule {
                with_skip: on(CudaFusion::SkipGroupNorm),
            }),
        );
    }
    if on(CudaFusion::PackedQkv) {
        passes.push(Box::new(PackedProjections));
    }
    if on(CudaFusion::NhwcConv) {
        passes.push(Box::new(NhwcConvs {
            low: (precision == Precision::F16).then_some(DataType::Float16),
        }));
    }
    if on(CudaFusion::GroupNorm) || on(CudaFusion::NhwcConv) {
        passes.push(Box::new(layout::Transposes {
            sink: on(CudaFusion::SinkTransposes),
        }));
    }
    if on(CudaFusion::StaticReshapes) {
        passes.push(Box::new(static_shapes::StaticReshapes));
    }
    passes
}

/// Packed projections for MultiHeadAttention (opt-in).
struct PackedProjections;

impl Pass for PackedProjections {
    fn name(&self) -> &'static str {
        "packed-qkv"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        let mut report = PassReport::default();
        let packed = fuse_each(
            model,
            &mut report,
            "com.microsoft.MultiHeadAttention",
            "packed projections",
            |p, g, _, n| packed::pack_attention(p, g, n),
        )?;
        let qkv = packed.iter().filter(|k| **k == "QKV").count();
        count_line(
            &mut report,
            qkv,
            "self-attention Q/K/V projections -> one packed-QKV MatMul",
        );
        count_line(
            &mut report,
            packed.len() - qkv,
            "cross-attention K/V projections -> one packed-KV MatMul",
        );
        Ok(report)
    }
}

/// Conv → NhwcConv, weights stored in `low` for the data path.
struct NhwcConvs {
    low: Option<DataType>,
}

impl Pass for NhwcConvs {
    fn name(&self) -> &'static str {
        "nhwc-conv"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        let mut report = PassReport::default();
        let clamped = std::rc::Rc::new(std::cell::Cell::new(0));
        let rule = conv::NhwcConvRule {
            low: self.low,
            data: data_values(&model.graph, &model.graph.topo_order()?),
            clamped: clamped.clone(),
        };
        rule::apply(model, &[Box::new(rule)], &mut report)?;
        if clamped.get() > 0 {
            report.notes.push(format!(
                "{} convolution weight values beyond the fp16 range were clamped to ±65504",
                clamped.get()
            ));
        }
        Ok(report)
    }
}

/// Stands where the fusions would run, to say why none does in bf16.
struct NoBf16Kernels;

impl Pass for NoBf16Kernels {
    fn name(&self) -> &'static str {
        "cuda-fusions"
    }

    fn run(&self, _model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        Ok(PassReport {
            notes: vec!["bf16: ONNX Runtime's CUDA fused kernels (GroupNorm, NhwcConv, BiasAdd, ...) have no bf16 kernels; nothing fused".into()],
            ..Default::default()
        })
    }
}
