//! GEGLU → `com.microsoft.BiasSplitGelu`.
//!
//! diffusers' feed-forward projects to 2·D, splits the result in halves `h, g` along the last
//! axis and returns `h * gelu(g)`. Exports spell it Add(bias) → Slice×2 (legacy, with the
//! split point computed from the shape) or Split (dynamo) → Div(√2) → Erf → Add(1) → Mul(g)
//! → Mul(½) in some order → Mul(h): eight kernels over the widest tensor of the block.
//! BiasSplitGelu reads the MatMul's output and the bias once and writes `h * gelu(g)`. Its
//! CUDA kernel exists for 2·D ∈ {2560, 5120, 10240} only (the SD hidden sizes).
use attune_compiler::analysis::Shapes;
use attune_compiler::ir::{Graph, NodeId, ValueId};
use attune_compiler::patch::{In, Patch};
use attune_compiler::pattern::{Cx, Match, Pat, alt, any, op, scalar};
use attune_compiler::rule::Rule;

use super::{MS_DOMAIN, split_bias};

/// The last-axis sizes (2·D) ORT's CUDA BiasSplitGelu kernel takes.
pub const BIAS_SPLIT_GELU_WIDTHS: &[i64] = &[2560, 5120, 10240];

/// `h * gelu(g)` with `gelu(g) = g · ½ · (1 + erf(g/√2))`, the factors in any order.
fn geglu() -> Pat {
    let gate = || any("gate");
    let scaled = alt([
        op("Div", [gate(), scalar(std::f64::consts::SQRT_2)]),
        op("Mul", [gate(), scalar(std::f64::consts::FRAC_1_SQRT_2)]).commutative(),
    ]);
    let erf = op("Erf", [scaled]).bind("erf");
    let plus_one = || op("Add", [erf.clone(), scalar(1.0)]).commutative();
    let mul = |a: Pat, b: Pat| op("Mul", [a, b]).commutative();
    let gelu = alt([
        mul(mul(plus_one(), gate()), scalar(0.5)),
        mul(mul(plus_one(), scalar(0.5)), gate()),
        mul(plus_one(), mul(gate(), scalar(0.5))),
    ]);
    op("Mul", [any("hidden"), gelu]).commutative()
}

/// One matched GEGLU.
struct Geglu {
    /// The projection's output before its bias ([B, S, 2D]) and the bias ([2D]).
    projected: ValueId,
    bias: ValueId,
}

/// A GEGLU → `com.microsoft.BiasSplitGelu`.
pub struct GegluRule;

impl Rule for GegluRule {
    fn name(&self) -> &'static str {
        "GEGLU -> com.microsoft.BiasSplitGelu"
    }

    fn anchor(&self) -> Option<&'static str> {
        Some("Erf")
    }

    fn pattern(&self) -> Pat {
        geglu()
    }

    fn check(&self, cx: &Cx, m: &Match) -> Result<(), String> {
        site(cx.g, cx.shapes, m).map(|_| ())
    }

    fn rewrite(&self, cx: &Cx, m: &Match, p: &mut Patch) -> Vec<&'static str> {
        let site = site(cx.g, cx.shapes, m).expect("checked");
        let erf = m.node("erf").expect("bound");
        let module = cx.g.node(erf).module.clone();
        let out = p
            .node(
                "BiasSplitGelu",
                MS_DOMAIN,
                &format!("{module}/attune_BiasSplitGelu"),
                vec![In::Value(site.projected), In::Value(site.bias)],
                1,
                vec![],
                &module,
                Some(erf),
            )
            .remove(0);
        p.replace(m.root.expect("matched"), In::New(out));
        vec![]
    }

    fn unmatched(&self, _cx: &Cx, _anchor: NodeId) -> Option<String> {
        Some("not h · g·½·(1 + erf(g/√2)) with nothing else reading inside it".into())
    }

    fn opset(&self) -> Option<(&'static str, i64)> {
        Some((MS_DOMAIN, 1))
    }
}

/// Which half of its input's last axis `v` is (0: first, 1: second), and that input.
fn half_of(g: &Graph, shapes: &Shapes, v: ValueId) -> Option<(ValueId, usize)> {
    let (node, slot) = g.value(v).producer?;
    let n = g.node(node);
    let x = g.input(node, 0)?;
    let xs = shapes.shape(x)?;
    let last = xs.len().checked_sub(1)?;
    let width = xs[last].known()?;
    let half = width / 2;
    let out_width = shapes.shape(v)?.get(last)?.known()?;
    if width % 2 != 0 || out_width != half {
        return None;
    }
    let is_last = |a: i64| a == -1 || a == last as i64;
    let ints = |slot: usize| -> Option<Vec<i64>> {
        shapes
            .value(g.input(node, slot)?)?
            .iter()
            .map(|n| n.as_i64())
            .collect()
    };
    match n.op() {
        "Split" if n.outputs.len() == 2 => {
            let axis = n.attr("axis").map_or(0, |a| a.i);
            is_last(axis).then_some((x, slot))
        }
        "Slice" => {
            let starts = ints(1)?;
            let axes = if n.inputs.len() > 3 {
                ints(3)?
            } else {
                vec![0]
            };
            let steps_ok = n.inputs.len() <= 4 || ints(4)? == [1];
            match (starts.as_slice(), axes.as_slice()) {
                ([s], [a]) if steps_ok && is_last(*a) && (*s == 0 || *s == half) => {
                    Some((x, usize::from(*s == half)))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// The projection and bias a matched GEGLU gates, or why BiasSplitGelu does not compute it.
fn site(g: &Graph, shapes: &Shapes, m: &Match) -> Result<Geglu, String> {
    let (gate, hidden) = (
        m.value("gate").ok_or("no gate")?,
        m.value("hidden").ok_or("no h")?,
    );
    let (Some((x, 1)), Some((x2, 0))) = (half_of(g, shapes, gate), half_of(g, shapes, hidden))
    else {
        return Err("not the second half of a tensor gating its first half".into());
    };
    if x != x2 {
        return Err("the halves come from different tensors".into());
    }
    let add = g
        .producer(x)
        .filter(|n| g.node(*n).is("Add"))
        .ok_or("the split tensor is not a projection plus bias")?;
    let xs = shapes.shape(x).ok_or("unknown shape")?;
    let width = xs.last().and_then(|d| d.known());
    let (projected, bias) =
        split_bias(g, shapes, add, width).ok_or("the bias is not a constant vector")?;
    if xs.len() != 3 {
        return Err(format!("the projection has rank {}, not 3", xs.len()));
    }
    let width = width.unwrap_or(0);
    if !BIAS_SPLIT_GELU_WIDTHS.contains(&width) {
        return Err(format!(
            "width {width}: ONNX Runtime's CUDA BiasSplitGelu takes 2560, 5120 or 10240"
        ));
    }
    Ok(Geglu { projected, bias })
}
