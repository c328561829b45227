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

use super::{MS_DOMAIN, split_bias};

/// The last-axis sizes (2·D) ORT's CUDA BiasSplitGelu kernel takes.
pub const BIAS_SPLIT_GELU_WIDTHS: &[i64] = &[2560, 5120, 10240];

/// One matched GEGLU.
struct Geglu {
    /// The projection's output before its bias ([B, S, 2D]) and the bias ([2D]).
    projected: ValueId,
    bias: ValueId,
    /// `h * gelu(g)`, which the fused op replaces.
    out: ValueId,
    /// The Erf (its module names the site).
    erf: NodeId,
}

fn near(shapes: &Shapes, v: ValueId, want: f64) -> bool {
    shapes.scalar(v).is_some_and(|x| (x - want).abs() < 1e-4)
}

/// For an Erf: the `g` of `gelu(g) = g · ½ · (1 + erf(g/√2))` and the value of gelu(g).
fn gelu_around(g: &Graph, shapes: &Shapes, erf: NodeId) -> Option<(ValueId, ValueId)> {
    let scaled = g.input(erf, 0)?;
    let div = g.producer(scaled)?;
    let x = match g.node(div).op() {
        "Div"
            if g.input(div, 1)
                .is_some_and(|c| near(shapes, c, std::f64::consts::SQRT_2)) =>
        {
            g.input(div, 0)?
        }
        "Mul" => [0, 1].into_iter().find_map(|slot| {
            let c = g.input(div, 1 - slot)?;
            near(shapes, c, std::f64::consts::FRAC_1_SQRT_2).then(|| g.input(div, slot))?
        })?,
        _ => return None,
    };
    let e = g.output(erf)?;
    let plus_one = g.sole_reader(e).filter(|n| g.node(*n).is("Add"))?;
    if !near(shapes, g.other_input(plus_one, e)?, 1.0) {
        return None;
    }
    // The two remaining factors, g and ½, joined in either order (or as one Mul(g, ½)).
    let mut v = g.output(plus_one)?;
    let (mut has_x, mut has_half) = (false, false);
    for _ in 0..2 {
        let mul = g.sole_reader(v).filter(|n| g.node(*n).is("Mul"))?;
        let factor = g.other_input(mul, v)?;
        if factor == x {
            has_x = true;
        } else if near(shapes, factor, 0.5) {
            has_half = true;
        } else {
            let inner = g.producer(factor).filter(|n| g.node(*n).is("Mul"))?;
            let half = g.other_input(inner, x)?;
            if !near(shapes, half, 0.5) || g.sole_reader(factor) != Some(mul) {
                return None;
            }
            (has_x, has_half) = (true, true);
        }
        v = g.output(mul)?;
        if has_x && has_half {
            return Some((x, v));
        }
    }
    None
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

/// The GEGLU around `erf`, or why it is not one that BiasSplitGelu computes.
fn match_geglu(g: &Graph, shapes: &Shapes, erf: NodeId) -> Result<Geglu, String> {
    let (gate, gelu) = gelu_around(g, shapes, erf).ok_or("not an exact (erf) GELU")?;
    let mul = g
        .sole_reader(gelu)
        .filter(|n| g.node(*n).is("Mul"))
        .ok_or("the GELU is not multiplied by a value")?;
    let hidden = g.other_input(mul, gelu).ok_or("the GELU is squared")?;
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
    Ok(Geglu {
        projected,
        bias,
        out: g.output(mul).ok_or("no output")?,
        erf,
    })
}

/// The GEGLU around `erf` → BiasSplitGelu, or why it stays.
pub fn fuse(p: &mut Patch, g: &Graph, shapes: &Shapes, erf: NodeId) -> Result<(), String> {
    let site = match_geglu(g, shapes, erf)?;
    fuse_geglu(p, g, &site);
    Ok(())
}

fn fuse_geglu(p: &mut Patch, g: &Graph, site: &Geglu) {
    let module = g.node(site.erf).module.clone();
    let out = p
        .node(
            "BiasSplitGelu",
            MS_DOMAIN,
            &format!("{module}/attune_BiasSplitGelu"),
            vec![In::Value(site.projected), In::Value(site.bias)],
            1,
            vec![],
            &module,
            Some(site.erf),
        )
        .remove(0);
    p.replace(site.out, In::New(out));
}
