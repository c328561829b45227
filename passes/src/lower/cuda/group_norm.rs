//! GroupNorm(+SiLU) → `com.microsoft.GroupNorm` / `SkipGroupNorm`, channels-last.
//!
//! Exporters write `nn.GroupNorm` as Reshape [N, G, -1] → InstanceNormalization (unit scale,
//! zero bias) → Reshape back → Mul γ → Add β, usually followed by SiLU (Sigmoid, Mul): six
//! kernels with the statistics in the activation type. ONNX Runtime's GroupNorm does it in
//! one (statistics in fp32, SiLU folded in), channels-last only, so the fused op sits between
//! Transposes. When the input is a sum (a residual, or the resnets' time embedding added per
//! channel) the Add folds in too: SkipGroupNorm, which also writes the sum when it is read.
use attune_compiler::analysis::{Dim, Shapes};
use attune_compiler::ir::{Graph, NodeId, Use, ValueId};
use attune_compiler::onnx::DataType;
use attune_compiler::patch::{In, Patch, attr};

use super::{Site, channels_last};

/// One matched GroupNorm(+SiLU).
struct GroupNormSite {
    /// The (NCHW) input.
    x: ValueId,
    /// γ and β as the export has them ([C, 1, 1] or [1, C, 1, 1]); `None` where the export
    /// has none (a unit affine, canonicalised away): 1 and 0.
    gamma: Option<ValueId>,
    beta: Option<ValueId>,
    channels: i64,
    groups: i64,
    epsilon: f32,
    silu: bool,
    /// The value the fused op replaces (the Add, or the SiLU's Mul).
    out: ValueId,
    /// `x` is `x + skip` folded into the op (SkipGroupNorm): the skip, whether it broadcasts
    /// as [N, C, 1, 1], and the sum when anything else reads it.
    skip: Option<Skip>,
    /// The InstanceNormalization (its module names the site).
    norm: NodeId,
}

struct Skip {
    value: ValueId,
    /// For a [N, C, 1, 1] skip: the [N, C] value it unsqueezes, if there is one.
    per_channel: Option<Option<ValueId>>,
    sum: Option<ValueId>,
}

/// The [N, C] value a [N, C, 1, 1] `v` is made from by Unsqueezes (the time embedding).
fn unsqueezed_from(g: &Graph, shapes: &Shapes, v: ValueId) -> Option<ValueId> {
    let want = shapes.shape(v)?.get(..2)?;
    let mut at = v;
    while let Some(n) = g.producer(at).filter(|n| g.node(*n).is("Unsqueeze")) {
        at = g.input(n, 0)?;
        if shapes.shape(at) == Some(want) {
            return Some(at);
        }
    }
    None
}

/// `x = a + b` with `b` of `x`'s shape or [N, C, 1, 1]: `a` and the skip.
fn skip_of(g: &Graph, shapes: &Shapes, x: ValueId) -> Option<(ValueId, Skip)> {
    let add = g.producer(x).filter(|n| g.node(*n).is("Add"))?;
    let xs = shapes.shape(x)?;
    let per_channel = |v: ValueId| {
        shapes.shape(v).is_some_and(|s| {
            s.len() == 4
                && s[0] == xs[0]
                && s[1] == xs[1]
                && s[2..].iter().all(|d| d.known() == Some(1))
        })
    };
    let full = |v: ValueId| shapes.shape(v) == Some(xs);
    let (a, b) = (g.input(add, 0)?, g.input(add, 1)?);
    let (main, skip, broadcast) = if full(a) && (full(b) || per_channel(b)) {
        (a, b, !full(b))
    } else if full(b) && per_channel(a) {
        (b, a, true)
    } else {
        return None;
    };
    // Only the GroupNorm's own Reshape reads the sum, or the sum is written out too.
    let sum = (g.is_graph_output(x) || g.value(x).consumers.len() > 1).then_some(x);
    Some((
        main,
        Skip {
            value: skip,
            per_channel: broadcast.then(|| unsqueezed_from(g, shapes, skip)),
            sum,
        },
    ))
}

/// A per-channel parameter of an NCHW tensor with `c` channels: shape [C,1,1] or [1,C,1,1].
fn per_channel(shapes: &Shapes, v: ValueId, c: i64) -> bool {
    let Some(s) = shapes.shape(v) else {
        return false;
    };
    let dims: Vec<Option<i64>> = s.iter().map(Dim::known).collect();
    matches!(dims.as_slice(), [Some(a), Some(1), Some(1)] | [Some(1), Some(a), Some(1), Some(1)] if *a == c)
}

/// The GroupNorm whose InstanceNormalization is `norm`, or why it is not one.
fn match_group_norm(
    g: &Graph,
    shapes: &Shapes,
    norm: NodeId,
    with_skip: bool,
) -> std::result::Result<GroupNormSite, String> {
    let node = g.node(norm);
    let grouped = g.input(norm, 0).ok_or("no input")?;
    let reshape_in = g
        .producer(grouped)
        .filter(|n| g.node(*n).is("Reshape"))
        .ok_or("its input is not a Reshape")?;
    let x = g.input(reshape_in, 0).ok_or("no Reshape input")?;
    let (scale, bias) = (
        g.input(norm, 1).ok_or("no scale")?,
        g.input(norm, 2).ok_or("no bias")?,
    );
    if shapes.scalar(scale) != Some(1.0) || shapes.scalar(bias) != Some(0.0) {
        return Err("its scale/bias are not the constant 1/0 a GroupNorm export has".into());
    }
    let groups = shapes
        .shape(scale)
        .and_then(|s| s.first()?.known())
        .ok_or("the group count is unknown")?;
    let x_shape = shapes.shape(x).ok_or("the input's shape is unknown")?;
    if x_shape.len() != 4 {
        return Err(format!(
            "the input has rank {}, not 4 (NCHW)",
            x_shape.len()
        ));
    }
    // Normalised per (sample, group): the Reshape must be [N, G, -1].
    let grouped_by_sample = shapes
        .shape(grouped)
        .is_some_and(|s| s.len() == 3 && s[0] == x_shape[0]);
    if !grouped_by_sample {
        return Err("its Reshape is not [N, groups, -1]".into());
    }
    let c = x_shape[1].known().ok_or("the channel count is unknown")?;
    if groups <= 0 || c % groups != 0 {
        return Err(format!("{c} channels do not split into {groups} groups"));
    }
    let normed = g.output(norm).ok_or("no output")?;
    let reshape_out = g
        .sole_reader(normed)
        .filter(|n| g.node(*n).is("Reshape"))
        .ok_or("its output is not only reshaped back")?;
    let back = g.output(reshape_out).ok_or("no output")?;
    if shapes.shape(back) != Some(x_shape) {
        return Err("the second Reshape does not restore the input's shape".into());
    }
    // γ Mul and β Add, each optional: canonicalisation drops `·1` and `+0`.
    let affine = |v: ValueId, op: &str| {
        let n = g.sole_reader(v).filter(|n| g.node(*n).is(op))?;
        let p = g.other_input(n, v).filter(|p| per_channel(shapes, *p, c))?;
        let constant = g.is_constant(p) || g.producer(p).is_some_and(|k| g.node(k).is("Constant"));
        constant.then_some((p, g.output(n)?))
    };
    let (gamma, scaled) = match affine(back, "Mul") {
        Some((p, out)) => (Some(p), out),
        None => (None, back),
    };
    let (beta, y) = match affine(scaled, "Add") {
        Some((p, out)) => (Some(p), out),
        None => (None, scaled),
    };
    let epsilon = node.attr("epsilon").map_or(1e-5, |a| a.f);
    let (silu, out) = match silu_after(g, y) {
        Some(out) => (true, out),
        None => (false, y),
    };
    let (x, skip) = match skip_of(g, shapes, x).filter(|_| with_skip) {
        Some((main, skip)) => (main, Some(skip)),
        None => (x, None),
    };
    Ok(GroupNormSite {
        x,
        skip,
        gamma,
        beta,
        channels: c,
        groups,
        epsilon,
        silu,
        out,
        norm,
    })
}

/// `y * Sigmoid(y)` when that is all that reads `y`: the SiLU's output.
fn silu_after(g: &Graph, y: ValueId) -> Option<ValueId> {
    if g.is_graph_output(y) {
        return None;
    }
    let readers: Vec<NodeId> = g
        .value(y)
        .consumers
        .iter()
        .map(|u| match u {
            Use::Input(n, _) => Some(*n),
            Use::Subgraph(_) => None,
        })
        .collect::<Option<_>>()?;
    let [a, b] = readers.as_slice() else {
        return None;
    };
    let (sig, mul) = if g.node(*a).is("Sigmoid") {
        (*a, *b)
    } else {
        (*b, *a)
    };
    let s = g.output(sig)?;
    (g.node(sig).is("Sigmoid")
        && g.node(mul).is("Mul")
        && g.sole_reader(s) == Some(mul)
        && g.other_input(mul, s) == Some(y))
    .then(|| g.output(mul))
    .flatten()
}

/// What one fused GroupNorm folded in.
pub struct Fused {
    pub silu: bool,
    pub skip: bool,
}

/// The GroupNorm(+SiLU) whose InstanceNormalization is `norm` → GroupNorm (SkipGroupNorm
/// when `with_skip` and its input is a sum), or why it stays.
pub fn fuse(
    p: &mut Patch,
    g: &Graph,
    shapes: &Shapes,
    norm: NodeId,
    with_skip: bool,
) -> Result<Fused, String> {
    let site = match_group_norm(g, shapes, norm, with_skip)?;
    fuse_group_norm(p, g, &site);
    Ok(Fused {
        silu: site.silu,
        skip: site.skip.is_some(),
    })
}

/// Emits Transpose → GroupNorm → Transpose for `site`.
fn fuse_group_norm(p: &mut Patch, g: &Graph, site: &GroupNormSite) {
    let module = g.node(site.norm).module.clone();
    let after = Some(site.norm);
    let name = |tag: &str| format!("{module}/attune_{tag}");
    // γ/β: the kernel wants fp32 vectors.
    let mut vector = |v: Option<ValueId>, unit: f32, tag: &str| {
        // A constant γ/β (or the unit one the export left out): an fp32 [C] initializer.
        let mut vector_of = |values: Vec<f32>| {
            let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
            In::New(p.constant(&name(tag), DataType::Float, vec![site.channels], bytes))
        };
        let Some(v) = v else {
            return vector_of(vec![unit; site.channels as usize]);
        };
        let constant = g.initializer(v).filter(|_| g.is_constant(v)).and_then(|t| {
            let dtype = DataType::try_from(t.data_type()).ok()?;
            crate::lora::decode(&t.bytes().ok()?, dtype)
        });
        if let Some(values) = constant.filter(|x| x.len() == site.channels as usize) {
            return vector_of(values);
        }
        let flat = p.i64s(&name("flat"), &[-1]);
        let r = p.op(
            "Reshape",
            &name(tag),
            vec![In::Value(v), In::New(flat)],
            vec![],
            &module,
            after,
        );
        if g.value_elem_type(v)
            .is_some_and(|t| t != DataType::Float as i32)
            || g.initializer(v)
                .is_some_and(|t| t.data_type() != DataType::Float as i32)
        {
            In::New(p.op(
                "Cast",
                &name(&format!("{tag}_f32")),
                vec![In::New(r)],
                vec![attr::int("to", DataType::Float as i64)],
                &module,
                after,
            ))
        } else {
            In::New(r)
        }
    };
    let gamma = vector(site.gamma, 1.0, "gamma");
    let beta = vector(site.beta, 0.0, "beta");
    let mut rest = vec![gamma, beta];
    let op = if let Some(skip) = &site.skip {
        rest.push(if let Some(Some(nc)) = skip.per_channel {
            p.current(nc)
        } else if skip.per_channel.is_some() {
            // [N, C, 1, 1] → [N, C], a broadcast the kernel takes.
            let flat = p.i64s(&name("skip_nc"), &[0, -1]);
            In::New(p.op(
                "Reshape",
                &name("skip_nc"),
                vec![p.current(skip.value), In::New(flat)],
                vec![],
                &module,
                after,
            ))
        } else {
            In::New(p.op(
                "Transpose",
                &name("skip_to_nhwc"),
                vec![p.current(skip.value)],
                vec![attr::ints("perm", &[0, 2, 3, 1])],
                &module,
                after,
            ))
        });
        "SkipGroupNorm"
    } else {
        "GroupNorm"
    };
    let outputs = if site.skip.as_ref().is_some_and(|s| s.sum.is_some()) {
        2
    } else {
        1
    };
    let attrs = vec![
        attr::int("activation", i64::from(site.silu)),
        attr::int("channels_last", 1),
        attr::float("epsilon", site.epsilon),
        attr::int("groups", site.groups),
    ];
    let at = Site {
        module: &module,
        after,
    };
    let x = p.current(site.x);
    let nchw = channels_last(p, &at, op, x, rest, attrs, outputs);
    p.replace(site.out, In::New(nchw[0].clone()));
    if let Some(sum) = site.skip.as_ref().and_then(|s| s.sum) {
        p.replace(sum, In::New(nchw[1].clone()));
    }
}
