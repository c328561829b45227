//! Fusions for ONNX Runtime's CUDA execution provider.
//!
//! GroupNorm: exporters write `nn.GroupNorm` as Reshape [N, G, -1] → InstanceNormalization
//! (unit scale, zero bias) → Reshape back → Mul γ → Add β, usually followed by SiLU
//! (Sigmoid, Mul). That is six kernels with the statistics in the activation type; ONNX
//! Runtime's `com.microsoft.GroupNorm` does it in one (statistics in fp32, SiLU folded in),
//! but only channels-last, so the fused op sits between Transposes.
//!
//! NhwcConv: convolutions channels-last too (`com.microsoft.NhwcConv`, weights stored
//! [M, kH, kW, C]), between Transposes; then every Transpose that undoes the one before it
//! goes, so GroupNorm → Conv chains and the transformers' own NCHW⇄NHWC permutes run without
//! layout changes.
use std::collections::HashSet;

use attune_compiler::analysis::Dim;
use attune_compiler::analysis::Shapes;
use attune_compiler::error::Result;
use attune_compiler::ir::{Graph, Model, NodeId, Use, ValueId};
use attune_compiler::onnx::{AttributeProto, DataType};
use attune_compiler::pass::{Pass, PassCx, PassReport, Skipped};
use attune_compiler::patch::{In, Patch, attr};
use attune_compiler::weights::Tensor;

mod geglu;
mod residual;

pub use geglu::BIAS_SPLIT_GELU_WIDTHS;
pub use residual::BIAS_ADD_WIDTHS;

use super::Precision;
use super::precision::{convert_tensor, data_values};
use crate::cleanup::dce;

const MS_DOMAIN: &str = "com.microsoft";

/// Fuses what ONNX Runtime's CUDA EP runs faster fused (run before the precision pass, told
/// the precision it converts to: the fused kernels exist for fp32 and fp16 only).
pub struct CudaFusions {
    pub precision: Precision,
}

/// One matched GroupNorm(+SiLU).
struct GroupNormSite {
    /// The (NCHW) input.
    x: ValueId,
    /// γ and β as the export has them ([C, 1, 1] or [1, C, 1, 1]).
    gamma: ValueId,
    beta: ValueId,
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
    per_channel: bool,
    sum: Option<ValueId>,
}

/// `x = a + b` with `b` of `x`'s shape or [N, C, 1, 1]: `a` and the skip.
fn skip_of(g: &Graph, shapes: &Shapes, x: ValueId) -> Option<(ValueId, Skip)> {
    let add = producer(g, x).filter(|n| g.node(*n).is("Add"))?;
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
    let (a, b) = (input(g, add, 0)?, input(g, add, 1)?);
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
            per_channel: broadcast,
            sum,
        },
    ))
}

/// The single node reading `v` (None if several, or a graph output).
fn sole_reader(g: &Graph, v: ValueId) -> Option<NodeId> {
    if g.is_graph_output(v) {
        return None;
    }
    match g.value(v).consumers.as_slice() {
        [Use::Input(n, _)] => Some(*n),
        _ => None,
    }
}

fn producer(g: &Graph, v: ValueId) -> Option<NodeId> {
    g.value(v).producer.map(|(n, _)| n)
}

fn input(g: &Graph, n: NodeId, slot: usize) -> Option<ValueId> {
    g.node(n).inputs.get(slot).copied().flatten()
}

fn output(g: &Graph, n: NodeId) -> Option<ValueId> {
    g.node(n).outputs.first().copied().flatten()
}

/// For a binary node reading `from`: its other input.
fn other_input(g: &Graph, n: NodeId, from: ValueId) -> Option<ValueId> {
    match (input(g, n, 0), input(g, n, 1)) {
        (Some(a), Some(b)) if a == from => Some(b),
        (Some(a), Some(b)) if b == from => Some(a),
        _ => None,
    }
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
) -> std::result::Result<GroupNormSite, String> {
    let node = g.node(norm);
    let grouped = input(g, norm, 0).ok_or("no input")?;
    let reshape_in = producer(g, grouped)
        .filter(|n| g.node(*n).is("Reshape"))
        .ok_or("its input is not a Reshape")?;
    let x = input(g, reshape_in, 0).ok_or("no Reshape input")?;
    let (scale, bias) = (
        input(g, norm, 1).ok_or("no scale")?,
        input(g, norm, 2).ok_or("no bias")?,
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
    if c % groups != 0 {
        return Err(format!("{c} channels do not split into {groups} groups"));
    }
    let normed = output(g, norm).ok_or("no output")?;
    let reshape_out = sole_reader(g, normed)
        .filter(|n| g.node(*n).is("Reshape"))
        .ok_or("its output is not only reshaped back")?;
    let back = output(g, reshape_out).ok_or("no output")?;
    if shapes.shape(back) != Some(x_shape) {
        return Err("the second Reshape does not restore the input's shape".into());
    }
    let mul = sole_reader(g, back)
        .filter(|n| g.node(*n).is("Mul"))
        .ok_or("no γ Mul")?;
    let gamma = other_input(g, mul, back)
        .filter(|v| per_channel(shapes, *v, c))
        .ok_or("γ is not per channel")?;
    let scaled = output(g, mul).ok_or("no output")?;
    let add = sole_reader(g, scaled)
        .filter(|n| g.node(*n).is("Add"))
        .ok_or("no β Add")?;
    let beta = other_input(g, add, scaled)
        .filter(|v| per_channel(shapes, *v, c))
        .ok_or("β is not per channel")?;
    for v in [gamma, beta] {
        if g.initializer(v).is_none() && producer(g, v).is_none_or(|n| !g.node(n).is("Constant")) {
            return Err("γ/β are not constants".into());
        }
    }
    let y = output(g, add).ok_or("no output")?;
    let epsilon = node.attr("epsilon").map_or(1e-5, |a| a.f);
    let (silu, out) = match silu_after(g, y) {
        Some(out) => (true, out),
        None => (false, y),
    };
    let (x, skip) = match skip_of(g, shapes, x) {
        Some((main, skip)) => (main, Some(skip)),
        None => (x, None),
    };
    Ok(GroupNormSite {
        x,
        skip,
        gamma,
        beta,
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
    let s = output(g, sig)?;
    (g.node(sig).is("Sigmoid")
        && g.node(mul).is("Mul")
        && sole_reader(g, s) == Some(mul)
        && other_input(g, mul, s) == Some(y))
    .then(|| output(g, mul))
    .flatten()
}

/// How NhwcConv weights are stored: in `low` (the precision pass's type) for the convolutions
/// of the data path, which that pass will run in `low` anyway; this halves what the compile
/// holds (the transposed weights are new tensors). `clamped` counts fp16 range clamps.
struct WeightStore {
    low: Option<DataType>,
    data: HashSet<ValueId>,
    clamped: usize,
}

/// Conv → Transpose → NhwcConv → Transpose, or why the conv stays. A conv reading another
/// conv of the same patch reads its replacement.
fn nhwc_conv(
    p: &mut Patch,
    g: &Graph,
    conv: NodeId,
    store: &mut WeightStore,
) -> std::result::Result<(), String> {
    let node = g.node(conv);
    let x = input(g, conv, 0).ok_or("no input")?;
    let w = input(g, conv, 1).ok_or("no weight")?;
    // A 4-D weight makes it a 2-D convolution of a 4-D (NCHW) input.
    let weight = g
        .initializer(w)
        .filter(|t| t.dims().len() == 4)
        .ok_or("its weight is not a 4-D initializer")?;
    if node.attr("group").is_some_and(|a| a.i != 1) {
        return Err("grouped convolution".into());
    }
    let y = output(g, conv).ok_or("no output")?;
    let dims = weight.dims().to_vec();
    let data = weight.bytes().map_err(|e| e.to_string())?;
    let dtype = DataType::try_from(weight.data_type()).map_err(|_| "unknown weight type")?;
    let module = node.module.clone();
    let after = Some(conv);
    let nhwc_dims = vec![dims[0], dims[2], dims[3], dims[1]];
    let mut stored = Tensor::new(
        format!("{}_nhwc", weight.name()),
        dtype,
        nhwc_dims,
        to_channels_last(&data, &dims).into(),
    );
    drop(data);
    weight.release();
    if let Some(low) = store
        .low
        .filter(|_| dtype == DataType::Float && store.data.contains(&x))
    {
        let (converted, clamped) =
            convert_tensor(&stored, low as i32).map_err(|e| e.to_string())?;
        store.clamped += clamped;
        stored = converted;
    }
    let bytes = stored.bytes().map_err(|e| e.to_string())?.into_owned();
    let stored_type = DataType::try_from(stored.data_type()).map_err(|_| "unknown weight type")?;
    let w_nhwc = p.constant(stored.name(), stored_type, stored.dims().to_vec(), bytes);
    let x = p.current(x);
    let mut rest = vec![In::New(w_nhwc)];
    rest.extend(input(g, conv, 2).map(In::Value));
    let attrs = node.proto.attribute.clone();
    let at = Site {
        module: &module,
        after,
    };
    let nchw = channels_last(p, &at, "NhwcConv", x, rest, attrs, 1).remove(0);
    p.replace(y, In::New(nchw));
    Ok(())
}

/// OIHW weight bytes as OHWI.
fn to_channels_last(data: &[u8], dims: &[i64]) -> Vec<u8> {
    let [m, c, kh, kw] = [dims[0], dims[1], dims[2], dims[3]].map(|d| d as usize);
    let size = data.len() / (m * c * kh * kw).max(1);
    let mut out = vec![0u8; data.len()];
    for o in 0..m {
        for i in 0..c {
            for y in 0..kh {
                for x in 0..kw {
                    let from = ((o * c + i) * kh + y) * kw + x;
                    let to = ((o * kh + y) * kw + x) * c + i;
                    out[to * size..(to + 1) * size]
                        .copy_from_slice(&data[from * size..(from + 1) * size]);
                }
            }
        }
    }
    out
}

/// Removes Transposes that undo the Transpose they read; returns how many.
fn cancel_transposes(model: &mut Model) -> Result<usize> {
    let perm = |g: &Graph, n: NodeId| g.node(n).attr("perm").map(|a| a.ints.clone());
    let mut cancelled = 0;
    for n in model.graph.topo_order()? {
        let g = &model.graph;
        if !g.contains_node(n) || !g.node(n).is("Transpose") {
            continue;
        }
        let (Some(x), Some(y)) = (input(g, n, 0), output(g, n)) else {
            continue;
        };
        let Some(first) = producer(g, x).filter(|f| g.node(*f).is("Transpose")) else {
            continue;
        };
        let (Some(p1), Some(p2), Some(src)) = (perm(g, first), perm(g, n), input(g, first, 0))
        else {
            continue;
        };
        let undoes = p1.len() == p2.len()
            && p2
                .iter()
                .enumerate()
                .all(|(i, &j)| p1.get(j as usize) == Some(&(i as i64)));
        if undoes && !g.is_graph_output(y) {
            model.graph.replace_all_uses(y, src);
            cancelled += 1;
        }
    }
    Ok(cancelled)
}

/// `Shape(Transpose(x, perm))` → `Gather(Shape(x), perm)` where a Transpose is read only for
/// its shape (the NCHW views of NhwcConv outputs whose data flows on channels-last); returns
/// how many Shapes changed.
fn shapes_without_transposes(model: &mut Model) -> Result<usize> {
    let g = &model.graph;
    let mut p = Patch::new(model);
    let mut changed = 0;
    for t in g.topo_order()? {
        let node = g.node(t);
        let (Some(x), Some(y), Some(perm)) = (input(g, t, 0), output(g, t), node.attr("perm"))
        else {
            continue;
        };
        let readers: Option<Vec<NodeId>> = g
            .value(y)
            .consumers
            .iter()
            .map(|u| match u {
                Use::Input(n, _)
                    if g.node(*n).is("Shape") && g.node(*n).proto.attribute.is_empty() =>
                {
                    Some(*n)
                }
                _ => None,
            })
            .collect();
        let Some(shapes) =
            readers.filter(|r| !r.is_empty() && node.is("Transpose") && !g.is_graph_output(y))
        else {
            continue;
        };
        for s in shapes {
            let module = g.node(s).module.clone();
            let name = format!("{module}/attune_shape_untransposed");
            let shape = p.op("Shape", &name, vec![In::Value(x)], vec![], &module, Some(s));
            let order = p.i64s(&format!("{name}_perm"), &perm.ints);
            let permuted = p.op(
                "Gather",
                &name,
                vec![In::New(shape), In::New(order)],
                vec![attr::int("axis", 0)],
                &module,
                Some(s),
            );
            p.replace(
                output(g, s).expect("Shape has an output"),
                In::New(permuted),
            );
            changed += 1;
        }
    }
    p.into_parts().apply(model)?;
    Ok(changed)
}

/// Emits Transpose → GroupNorm → Transpose for `site`.
fn fuse_group_norm(p: &mut Patch, g: &Graph, site: &GroupNormSite) {
    let module = g.node(site.norm).module.clone();
    let after = Some(site.norm);
    let name = |tag: &str| format!("{module}/attune_{tag}");
    // γ/β: the kernel wants fp32 vectors; ORT folds these constant ops at load time.
    let mut vector = |v: ValueId, tag: &str| {
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
    let gamma = vector(site.gamma, "gamma");
    let beta = vector(site.beta, "beta");
    let mut rest = vec![gamma, beta];
    let op = if let Some(skip) = &site.skip {
        rest.push(if skip.per_channel {
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

/// Every GEGLU → BiasSplitGelu; returns how many.
fn fuse_geglus(model: &mut Model, report: &mut PassReport) -> Result<usize> {
    let shapes = Shapes::infer(model);
    let g = &model.graph;
    let mut p = Patch::new(model);
    let mut fused = 0;
    for n in g.topo_order()? {
        if !g.node(n).is("Erf") {
            continue;
        }
        match geglu::match_geglu(g, &shapes, n) {
            Ok(site) => {
                geglu::fuse_geglu(&mut p, g, &site);
                fused += 1;
            }
            Err(why) => report.skipped.push(Skipped {
                site: g.node(n).module.clone(),
                reason: format!("BiasSplitGelu: {why}"),
            }),
        }
    }
    p.into_parts().apply(model)?;
    dce(model);
    Ok(fused)
}

fn report_residuals(report: &mut PassReport, r: residual::Residuals, geglus: usize) {
    if r.skip_layer_norms > 0 {
        report.rewritten.push(format!(
            "{} residual Add + LayerNormalization -> com.microsoft.SkipLayerNormalization",
            r.skip_layer_norms
        ));
    }
    if r.bias_adds > 0 {
        report.rewritten.push(format!(
            "{} bias + residual Add -> com.microsoft.BiasAdd",
            r.bias_adds
        ));
    }
    if geglus > 0 {
        report
            .rewritten
            .push(format!("{geglus} GEGLU -> com.microsoft.BiasSplitGelu"));
    }
    if r.unit_scaling > 0 {
        report.notes.push(format!(
            "{} multiplications/divisions by 1 dropped",
            r.unit_scaling
        ));
    }
    for (site, why) in r.skipped {
        report.skipped.push(Skipped {
            site,
            reason: format!("SkipLayerNormalization: {why}"),
        });
    }
}

impl Pass for CudaFusions {
    fn name(&self) -> &'static str {
        "cuda-fusions"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        let mut report = PassReport::default();
        if self.precision == Precision::Bf16 {
            report.notes.push(
                "bf16: ONNX Runtime's CUDA GroupNorm and NhwcConv have no bf16 kernels; nothing fused".into(),
            );
            return Ok(report);
        }
        let residuals = residual::fuse_residuals(model)?;
        let geglus = fuse_geglus(model, &mut report)?;
        let shapes = Shapes::infer(model);
        let g = &model.graph;
        let mut sites = Vec::new();
        for n in g.topo_order()? {
            if !g.node(n).is("InstanceNormalization") {
                continue;
            }
            match match_group_norm(g, &shapes, n) {
                Ok(site) => sites.push(site),
                Err(why) => report.skipped.push(Skipped {
                    site: g.node(n).module.clone(),
                    reason: format!("GroupNorm: {why}"),
                }),
            }
        }
        let mut p = Patch::new(model);
        let (mut with_silu, mut with_skip, n) = (0, 0, sites.len());
        for site in &sites {
            fuse_group_norm(&mut p, g, site);
            with_silu += usize::from(site.silu);
            with_skip += usize::from(site.skip.is_some());
        }
        p.into_parts().apply(model)?;
        // Convolutions read the fused GroupNorms' outputs: a second patch on the new graph.
        let g = &model.graph;
        let mut p = Patch::new(model);
        let mut convs = 0;
        let mut store = WeightStore {
            low: (self.precision == Precision::F16).then_some(DataType::Float16),
            data: data_values(g, &g.topo_order()?),
            clamped: 0,
        };
        for c in g.topo_order()? {
            if !g.node(c).is("Conv") {
                continue;
            }
            match nhwc_conv(&mut p, g, c, &mut store) {
                Ok(()) => convs += 1,
                Err(why) => report.skipped.push(Skipped {
                    site: g.node(c).module.clone(),
                    reason: format!("NhwcConv: {why}"),
                }),
            }
        }
        let fused_residuals = residuals.skip_layer_norms + residuals.bias_adds + geglus;
        report_residuals(&mut report, residuals, geglus);
        if n + convs == 0 {
            if fused_residuals > 0 {
                model.require_opset(MS_DOMAIN, 1);
            }
            return Ok(report);
        }
        p.into_parts().apply(model)?;
        model.require_opset(MS_DOMAIN, 1);
        let cancelled = cancel_transposes(model)?;
        let mut removed = dce(model).nodes; // the cancelled ones no longer read the first
        let untransposed = shapes_without_transposes(model)?;
        removed += dce(model).nodes;
        if n > 0 {
            report.rewritten.push(format!(
                "{n} GroupNorm -> com.microsoft.GroupNorm (channels-last, {with_silu} with SiLU; {with_skip} as SkipGroupNorm with the Add before)"
            ));
        }
        if convs > 0 {
            report
                .rewritten
                .push(format!("{convs} Conv -> com.microsoft.NhwcConv"));
        }
        report.notes.push(format!(
            "{cancelled} Transpose pairs cancelled, {untransposed} Shapes read before the Transpose; removed {} nodes",
            removed
        ));
        if store.clamped > 0 {
            report.notes.push(format!(
                "{} convolution weight values beyond the fp16 range were clamped to ±65504",
                store.clamped
            ));
        }
        Ok(report)
    }
}
