//! The transformer blocks' residual adds, fused into what reads them.
//!
//! Each sublayer ends in `x + (y·W + b)`: a bias Add and a residual Add, two passes over the
//! activations, and after attention the sum is normalised next. ONNX Runtime fuses these:
//! - `LayerNorm(x + (y·W + b))` → `com.microsoft.SkipLayerNormalization(y·W, x, γ, β, b)`,
//!   which also writes the sum (output 3) for the next residual;
//! - the feed-forward's `x + (y·W + b)` → `com.microsoft.BiasAdd(y·W, b, x)` (CUDA kernel for
//!   320, 640 or 1280 channels only, the SD widths).
//!
//! Before matching, `·1` and `/1` (diffusers' `rescale_output_factor`, `output_scale_factor`)
//! are dropped where they change nothing.
use std::collections::HashSet;

use attune_compiler::analysis::Shapes;
use attune_compiler::error::Result;
use attune_compiler::ir::{Graph, Model, NodeId, ValueId};
use attune_compiler::patch::{In, Patch, attr};

use super::{MS_DOMAIN, split_bias};
use crate::cleanup::dce;

const NOT_A_SUM: &str = "its input is not a sum";

/// The channel counts ORT's CUDA BiasAdd kernel takes.
pub const BIAS_ADD_WIDTHS: &[i64] = &[320, 640, 1280];

/// Removes `x·1` and `x/1` where the constant does not broadcast `x` to a larger shape.
pub fn drop_unit_scaling(model: &mut Model) -> Result<usize> {
    let shapes = Shapes::infer(model);
    let g = &model.graph;
    let mut pairs = Vec::new();
    for n in g.topo_order()? {
        let node = g.node(n);
        let (Some(a), Some(b), Some(y)) = (g.input(n, 0), g.input(n, 1), g.output(n)) else {
            continue;
        };
        let x = match node.op() {
            "Div" if shapes.scalar(b) == Some(1.0) => a,
            "Mul" if shapes.scalar(b) == Some(1.0) => a,
            "Mul" if shapes.scalar(a) == Some(1.0) => b,
            _ => continue,
        };
        let same = shapes.shape(x).is_some_and(|s| Some(s) == shapes.shape(y));
        let same_type =
            g.value_elem_type(x) == g.value_elem_type(y) || g.value_elem_type(y).is_none();
        if same && same_type && !g.is_graph_output(y) {
            pairs.push((y, x));
        }
    }
    for &(y, x) in &pairs {
        model.graph.replace_all_uses(y, x);
    }
    dce(model);
    Ok(pairs.len())
}

/// `a + b` where one side is `p + bias` (`bias` a constant vector over the last axis): the
/// projection, the bias and the other side (the skip).
fn biased_sum(g: &Graph, shapes: &Shapes, add: NodeId) -> Option<(ValueId, ValueId, ValueId)> {
    let sum = g.output(add)?;
    let width = shapes.shape(sum)?.last()?.known()?;
    [0, 1].into_iter().find_map(|slot| {
        let biased = g.input(add, slot)?;
        let skip = g.input(add, 1 - slot)?;
        let inner = g.producer(biased).filter(|n| g.node(*n).is("Add"))?;
        if g.sole_reader(biased) != Some(add) {
            return None;
        }
        let (proj, bias) = split_bias(g, shapes, inner, Some(width))?;
        let same = |v: ValueId| shapes.shape(v) == shapes.shape(sum);
        (same(proj) && same(skip)).then_some((proj, bias, skip))
    })
}

/// `LayerNormalization(a + b)` over the last axis, with or without β (the dynamo exporter
/// omits it for affine-less norms: SD3's adaLN); the fused op writes the sum too when
/// anything else reads it.
fn skip_layer_norm(
    p: &mut Patch,
    g: &Graph,
    shapes: &Shapes,
    ln: NodeId,
) -> std::result::Result<NodeId, String> {
    let node = g.node(ln);
    let x = g.input(ln, 0).ok_or("no input")?;
    let rank = shapes.shape(x).map_or(0, <[_]>::len);
    let axis = node.attr("axis").map_or(-1, |a| a.i);
    if axis != -1 && axis != rank as i64 - 1 {
        return Err("normalises more than the last axis".into());
    }
    if rank != 3 {
        return Err(format!("its input has rank {rank}, not 3"));
    }
    let gamma = g.input(ln, 1).ok_or("no γ")?;
    let beta = g.input(ln, 2).map_or(In::None, In::Value);
    let add = g
        .producer(x)
        .filter(|n| g.node(*n).is("Add"))
        .ok_or(NOT_A_SUM)?;
    let (inp, skip, bias) = match biased_sum(g, shapes, add) {
        Some((proj, bias, skip)) => (proj, skip, Some(bias)),
        None => {
            let (a, b) = (g.input(add, 0).ok_or("")?, g.input(add, 1).ok_or("")?);
            if shapes.shape(a) != shapes.shape(x) || shapes.shape(b) != shapes.shape(x) {
                return Err("the sum broadcasts".into());
            }
            (a, b, None)
        }
    };
    let wants_sum = g.is_graph_output(x) || g.value(x).consumers.len() > 1;
    let module = node.module.clone();
    let mut inputs = vec![p.current(inp), p.current(skip), In::Value(gamma), beta];
    inputs.extend(bias.map(In::Value));
    let outs = p.node(
        "SkipLayerNormalization",
        MS_DOMAIN,
        &format!("{module}/attune_SkipLayerNormalization"),
        inputs,
        if wants_sum { 4 } else { 1 },
        vec![attr::float(
            "epsilon",
            node.attr("epsilon").map_or(1e-5, |a| a.f),
        )],
        &module,
        Some(ln),
    );
    p.replace(g.output(ln).ok_or("no output")?, In::New(outs[0].clone()));
    if wants_sum {
        p.replace(x, In::New(outs[3].clone()));
    }
    Ok(add)
}

/// A residual `x + (y·W + b)` not normalised next, with a width BiasAdd's kernel takes.
fn bias_add(p: &mut Patch, g: &Graph, shapes: &Shapes, add: NodeId) -> Option<()> {
    let sum = g.output(add)?;
    let s = shapes.shape(sum)?;
    let width = s.last()?.known()?;
    if s.len() != 3 || !BIAS_ADD_WIDTHS.contains(&width) {
        return None;
    }
    let (proj, bias, skip) = biased_sum(g, shapes, add)?;
    let module = g.node(add).module.clone();
    let out = p
        .node(
            "BiasAdd",
            MS_DOMAIN,
            &format!("{module}/attune_BiasAdd"),
            vec![In::Value(proj), In::Value(bias), p.current(skip)],
            1,
            vec![],
            &module,
            Some(add),
        )
        .remove(0);
    p.replace(sum, In::New(out));
    Some(())
}

/// What the residual fusions did.
#[derive(Default)]
pub struct Residuals {
    pub unit_scaling: usize,
    pub skip_layer_norms: usize,
    pub bias_adds: usize,
    pub skipped: Vec<(String, String)>,
}

/// SkipLayerNormalization and BiasAdd (each when asked for) after dropping unit scalings.
pub fn fuse_residuals(
    model: &mut Model,
    skip_layer_norms: bool,
    bias_adds: bool,
) -> Result<Residuals> {
    let mut done = Residuals {
        unit_scaling: drop_unit_scaling(model)?,
        ..Default::default()
    };
    let shapes = Shapes::infer(model);
    let g = &model.graph;
    let mut p = Patch::new(model);
    let mut normalised = HashSet::new();
    for n in g.topo_order()? {
        if !skip_layer_norms || !g.node(n).is("LayerNormalization") {
            continue;
        }
        match skip_layer_norm(&mut p, g, &shapes, n) {
            Ok(add) => {
                normalised.insert(add);
                done.skip_layer_norms += 1;
            }
            // A LayerNorm of anything but a sum is no candidate.
            Err(why) if why != NOT_A_SUM => done.skipped.push((g.node(n).module.clone(), why)),
            Err(_) => {}
        }
    }
    // The residual sums no LayerNorm reads (their skips may be sums fused above).
    for n in g.topo_order()? {
        if bias_adds
            && g.node(n).is("Add")
            && !normalised.contains(&n)
            && bias_add(&mut p, g, &shapes, n).is_some()
        {
            done.bias_adds += 1;
        }
    }
    p.into_parts().apply(model)?;
    dce(model);
    Ok(done)
}
