//! First-block cache (ParaAttention's FBCache, for diffusion transformers): every step runs
//! the first transformer block; when its residual (output - input hidden states) differs from
//! the one of the last fully computed step by less than a threshold (mean |Δ| / mean |prev|),
//! the other blocks are skipped and their residual from that step is added instead.
//!
//! The decision is made in the graph (the first block's residual is only known inside the
//! step): inputs `fbcache.prev_residual` (the first block's residual of the last computed step;
//! a 0 scalar before there is one, which computes), `fbcache.cached_residual[_k]` and
//! `fbcache.threshold` (its default the compiled threshold); outputs `fbcache.computed`,
//! `fbcache.first_residual` and `fbcache.residual[_k]`, which the runtime keeps when computed.
use bytes::Bytes;

use attune_compiler::error::{Error, Result};
use attune_compiler::ir::{Graph, Model, NodeId, ValueId};
use attune_compiler::onnx::{self, DataType, NodeProto};
use attune_compiler::pass::PassReport;
use attune_compiler::patch::{In, Patch, attr};
use attune_compiler::weights::Tensor;

use super::region::{self, Types};

/// ParaAttention's examples use 0.08 (Flux, HunyuanVideo) to 0.12.
pub const DEFAULT_THRESHOLD: f32 = 0.08;
pub use attune_compiler::cache_io::fbcache::{
    CACHED_RESIDUAL, COMPUTED, FIRST_RESIDUAL, PREV_RESIDUAL, RESIDUAL, THRESHOLD,
};
use attune_compiler::cache_io::numbered;

/// The transformer blocks in the order they run: `transformer_blocks.*`, then Flux's
/// `single_transformer_blocks.*`.
fn blocks(g: &Graph) -> Vec<String> {
    let mut found: Vec<(usize, usize)> = Vec::new();
    for n in g.node_ids() {
        let mut parts = g.node(n).module.split('.');
        let (Some(kind), Some(k)) = (parts.next(), parts.next()) else {
            continue;
        };
        let rank = match kind {
            "transformer_blocks" => 0,
            "single_transformer_blocks" => 1,
            _ => continue,
        };
        if let Ok(k) = k.parse::<usize>()
            && !found.contains(&(rank, k))
        {
            found.push((rank, k));
        }
    }
    found.sort();
    found
        .into_iter()
        .map(|(rank, k)| match rank {
            0 => format!("transformer_blocks.{k}"),
            _ => format!("single_transformer_blocks.{k}"),
        })
        .collect()
}

fn within(module: &str, block: &str) -> bool {
    module == block || module.starts_with(&format!("{block}."))
}

/// A transformer's blocks as the caches see them.
pub(super) struct Blocks {
    /// Module paths, in the order they run.
    pub names: Vec<String>,
    /// What the first block hands on (to the other blocks).
    pub starts: Vec<ValueId>,
    /// What the last block hands to the rest of the model, in the If's output order.
    pub ends: Vec<ValueId>,
    /// The same as hidden states: the summands of a residual add the CUDA lowering fused into
    /// the next norm are one.
    pub groups: Vec<Hidden>,
    /// The hidden states entering the first block (what its norm1 reads).
    pub hidden_in: ValueId,
}

impl Blocks {
    /// `what` names the cache in errors.
    pub fn find(g: &Graph, types: &Types, what: &str) -> Result<Blocks> {
        let names = blocks(g);
        let (Some(first), Some(last)) = (names.first(), names.last()) else {
            return Err(Error::Graph(format!(
                "{what} needs a diffusion transformer (transformer_blocks.*); this graph has none"
            )));
        };
        if first != "transformer_blocks.0" || names.len() < 2 {
            return Err(Error::Graph(format!(
                "{what} needs transformer_blocks.0 and at least one block after it; the graph has {}",
                names.join(", ")
            )));
        }
        let in_block = |n: NodeId, b: &str| within(&g.node(n).module, b);
        let in_any = |n: NodeId| names.iter().any(|b| in_block(n, b));
        let order = g.topo_order()?;
        let leaving = |b: &str, outside: &dyn Fn(NodeId) -> bool| -> Vec<ValueId> {
            let mut out = Vec::new();
            for n in order.iter().copied().filter(|n| in_block(*n, b)) {
                for v in g.node(n).outputs.iter().flatten() {
                    if g.readers(*v).into_iter().any(outside) && types.elem(*v) != DataType::Int64 {
                        out.push(*v);
                    }
                }
            }
            out
        };
        let starts = leaving(first, &|r| !in_block(r, first));
        let ends = leaving(last, &|r| !in_any(r));
        if ends.is_empty() {
            return Err(Error::Graph(format!(
                "{what}: nothing leaves {last} for the rest of the model"
            )));
        }
        let norm1 = format!("{first}.norm1");
        let in_norm1: Vec<NodeId> = order
            .iter()
            .copied()
            .filter(|n| within(&g.node(*n).module, &norm1))
            .collect();
        // The CUDA lowering fuses the residual add before a norm into SkipLayerNormalization,
        // whose output 3 is the sum: the hidden states.
        let fused_sum = in_norm1.iter().find_map(|n| {
            let node = g.node(*n);
            matches!(
                node.op(),
                "SkipLayerNormalization" | "SkipSimplifiedLayerNormalization"
            )
            .then(|| node.outputs.get(3).copied().flatten())
            .flatten()
        });
        let read = in_norm1
            .iter()
            .flat_map(|n| {
                g.node(*n)
                    .inputs
                    .iter()
                    .flatten()
                    .copied()
                    .collect::<Vec<_>>()
            })
            .find(|v| {
                // Token states [batch, tokens, channels] (norm1 also reads the timestep embedding).
                types.shape(*v).is_some_and(|s| s.len() == 3)
                    && g.producer(*v).is_none_or(|p| !in_block(p, first))
                    && starts.iter().any(|s| same_shape(types, *s, *v))
            });
        let hidden_in = fused_sum.or(read).ok_or_else(|| {
            Error::Graph(format!("{what}: found no hidden states entering {norm1}"))
        })?;
        let groups = group_summands(g, &ends);
        let ends = groups.iter().flat_map(|h| h.values()).collect();
        Ok(Blocks {
            names,
            starts,
            ends,
            groups,
            hidden_in,
        })
    }

    pub fn first(&self) -> &str {
        &self.names[0]
    }

    pub fn last(&self) -> &str {
        self.names.last().expect("two or more")
    }

    /// What of `candidates` `v` continues: the one with its shape; or, where the CUDA
    /// lowering fused the residual add into the next block's SkipLayerNormalization, the sum
    /// of that node's input and skip.
    pub fn pair(
        &self,
        g: &Graph,
        types: &Types,
        candidates: &[ValueId],
        v: ValueId,
        what: &str,
    ) -> Result<Hidden> {
        let mut matches: Vec<ValueId> = candidates
            .iter()
            .copied()
            .filter(|s| same_shape(types, *s, v))
            .collect();
        if matches.len() > 1 {
            // A norm's normalised output is never the residual stream.
            matches.retain(|m| !is_normalised(g, *m));
        }
        if let [a, b] = matches[..] {
            let fused = g.readers(a).into_iter().any(|n| {
                let node = g.node(n);
                node.op().starts_with("Skip")
                    && node.inputs.first().copied().flatten() == Some(a)
                    && node.inputs.get(1).copied().flatten() == Some(b)
            });
            let fused_other = g.readers(b).into_iter().any(|n| {
                let node = g.node(n);
                node.op().starts_with("Skip")
                    && node.inputs.first().copied().flatten() == Some(b)
                    && node.inputs.get(1).copied().flatten() == Some(a)
            });
            if fused || fused_other {
                return Ok(Hidden::Sum(a, b));
            }
        }
        match matches[..] {
            [s] => Ok(Hidden::One(s)),
            _ => Err(Error::Graph(format!(
                "{what}: cannot tell which hidden states '{}' of {} continues ({} of the same shape: {}): compile without fixed sizes",
                g.value(v).name,
                self.last(),
                matches.len(),
                matches
                    .iter()
                    .map(|m| format!("'{}'", g.value(*m).name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// The region a step may skip: what only the ends need, given that `needed` stays.
    pub fn region(
        &self,
        model: &Model,
        needed: &[ValueId],
        skipped: &[String],
        what: &str,
    ) -> Result<(Vec<NodeId>, Vec<ValueId>)> {
        let (region, maps) = region::region_with_outputs(model, &self.ends, needed)?;
        let g = &model.graph;
        if !region
            .iter()
            .any(|n| skipped.iter().any(|b| within(&g.node(*n).module, b)))
        {
            return Err(Error::Graph(format!(
                "{what}: the blocks it would skip are needed by more than {}'s output",
                self.last()
            )));
        }
        Ok((region, maps))
    }
}

/// Hidden states between blocks: a value, or the two summands of a residual add the CUDA
/// lowering fused into the next norm.
#[derive(Clone, Copy, Debug)]
pub(super) enum Hidden {
    One(ValueId),
    Sum(ValueId, ValueId),
}

/// `values`, with each two that are input and skip of one Skip*Normalization node as a Sum.
fn group_summands(g: &Graph, values: &[ValueId]) -> Vec<Hidden> {
    let mut out: Vec<Hidden> = Vec::new();
    for &v in values {
        if out.iter().any(|h| h.values().contains(&v)) {
            continue;
        }
        let partner = g.readers(v).into_iter().find_map(|n| {
            let node = g.node(n);
            if !node.op().starts_with("Skip") {
                return None;
            }
            let (a, b) = (
                node.inputs.first().copied().flatten()?,
                node.inputs.get(1).copied().flatten()?,
            );
            let other = if a == v {
                b
            } else if b == v {
                a
            } else {
                return None;
            };
            values.contains(&other).then_some(other)
        });
        out.push(match partner {
            Some(w) => Hidden::Sum(v, w),
            None => Hidden::One(v),
        });
    }
    out
}

impl Hidden {
    /// The values it is made of.
    pub fn values(self) -> Vec<ValueId> {
        match self {
            Hidden::One(v) => vec![v],
            Hidden::Sum(a, b) => vec![a, b],
        }
    }

    /// A value in the graph it is computed from (its type and shape are the hidden states').
    pub fn anchor(self) -> ValueId {
        match self {
            Hidden::One(v) | Hidden::Sum(v, _) => v,
        }
    }

    /// Its name in `p`: the value's, or a new Add of the summands.
    pub fn name(self, p: &mut Patch, g: &Graph, prefix: &str) -> String {
        match self {
            Hidden::One(v) => g.value(v).name.clone(),
            Hidden::Sum(a, b) => {
                let after = g.producer(b).or(g.producer(a));
                p.op(
                    "Add",
                    &format!("{prefix}/hidden"),
                    vec![In::Value(a), In::Value(b)],
                    vec![],
                    "",
                    after,
                )
            }
        }
    }
}

/// Output 0 of a layer norm (plain, or fused with its residual add).
fn is_normalised(g: &Graph, v: ValueId) -> bool {
    g.value(v).producer.is_some_and(|(n, slot)| {
        slot == 0
            && matches!(
                g.node(n).op(),
                "LayerNormalization"
                    | "SkipLayerNormalization"
                    | "SimplifiedLayerNormalization"
                    | "SkipSimplifiedLayerNormalization"
            )
    })
}

fn same_shape(types: &Types, a: ValueId, b: ValueId) -> bool {
    types.shape(a).is_some() && types.shape(a) == types.shape(b)
}

/// `mean |prev - cur| / mean |prev|` as f32 [] (ParaAttention's and TeaCache's relative L1).
pub(super) fn relative_l1(
    p: &mut Patch,
    prev: In,
    cur: In,
    elem: DataType,
    prefix: &str,
    after: Option<NodeId>,
) -> String {
    let op = |p: &mut Patch, op: &str, inputs: Vec<In>, attrs| {
        p.op(op, &format!("{prefix}/{op}"), inputs, attrs, "", after)
    };
    let delta = op(p, "Sub", vec![prev.clone(), cur], vec![]);
    let delta = op(p, "Abs", vec![In::New(delta)], vec![]);
    let delta = op(
        p,
        "ReduceMean",
        vec![In::New(delta)],
        vec![attr::int("keepdims", 0)],
    );
    let scale = op(p, "Abs", vec![prev], vec![]);
    let scale = op(
        p,
        "ReduceMean",
        vec![In::New(scale)],
        vec![attr::int("keepdims", 0)],
    );
    let diff = op(p, "Div", vec![In::New(delta), In::New(scale)], vec![]);
    if elem == DataType::Float {
        diff
    } else {
        op(
            p,
            "Cast",
            vec![In::New(diff)],
            vec![attr::int("to", DataType::Float as i64)],
        )
    }
}

/// The reuse branch: each end's base plus its cached residual (inputs `cached_k`), then the
/// extra outputs (attention maps) as they were.
#[allow(clippy::too_many_arguments)]
pub(super) fn residual_reuse(
    p: &mut Patch,
    g: &Graph,
    types: &Types,
    groups: &[Hidden],
    bases: &[String],
    maps: &[ValueId],
    cached: &str,
    prefix: &str,
) -> attune_compiler::onnx::GraphProto {
    let mut nodes = Vec::new();
    let mut outputs = Vec::new();
    let mut node = |op: &str, input: Vec<String>, out: &str| {
        nodes.push(NodeProto {
            name: format!("{prefix}/reuse_{}", nodes.len()),
            op_type: op.into(),
            input,
            output: vec![out.to_string()],
            ..Default::default()
        });
    };
    for (k, (h, s)) in groups.iter().zip(bases).enumerate() {
        let elem = types.elem(h.anchor());
        let input = p.graph_input(onnx::tensor_info(&numbered(cached, k), elem, None), None);
        let out = p.fresh(&format!("{}_reused", numbered(cached, k)));
        node("Add", vec![s.clone(), input], &out);
        outputs.push(onnx::tensor_info(&out, elem, None));
        if let Hidden::Sum(..) = h {
            // The fused norm adds the two: the whole residual is in the first.
            let zero = p.fresh(&format!("{}_zero", numbered(cached, k)));
            node("Sub", vec![s.clone(), s.clone()], &zero);
            outputs.push(onnx::tensor_info(&zero, elem, None));
        }
    }
    let (map_nodes, map_outputs) = region::passed_outputs(p, g, types, maps, prefix);
    nodes.extend(map_nodes);
    outputs.extend(map_outputs);
    region::branch(&format!("{prefix}_reuse"), nodes, outputs)
}

/// Graph outputs `residual_k` = the k-th group's value (the If's outputs) - its base; the If
/// outputs' shapes.
#[allow(clippy::too_many_arguments)]
pub(super) fn residual_outputs(
    p: &mut Patch,
    types: &Types,
    outs: &[String],
    groups: &[Hidden],
    bases: &[String],
    residual: &str,
    module: &str,
    after: Option<NodeId>,
) -> Vec<region::Declared> {
    let mut shapes = Vec::new();
    let mut outs = outs.iter();
    for (k, (h, s)) in groups.iter().zip(bases).enumerate() {
        let mut value = None;
        for v in h.values() {
            let o = outs.next().expect("one output per value").clone();
            if let Some(d) = types.onnx_dims(v) {
                shapes.push((o.clone(), types.elem(v), d));
            }
            value = Some(match value {
                None => o,
                Some(prev) => p.op(
                    "Add",
                    &format!("{residual}/Add"),
                    vec![In::New(prev), In::New(o)],
                    vec![],
                    module,
                    after,
                ),
            });
        }
        let value = value.expect("a group has values");
        let r = p.op(
            "Sub",
            &format!("{residual}/Sub"),
            vec![In::New(value), In::New(s.clone())],
            vec![],
            module,
            after,
        );
        p.graph_output(
            In::New(r),
            &numbered(residual, k),
            types.elem(h.anchor()),
            module,
            after,
        );
    }
    shapes
}

/// The names a residual cache is run by.
pub(super) struct ResidualIo {
    pub prefix: &'static str,
    pub cached: &'static str,
    pub computed: &'static str,
    pub residual: &'static str,
}

/// Records the If on `compute` over `region`: the ends reuse their base plus a cached residual,
/// the extra outputs `maps` pass through; graph outputs the flag and each residual. Returns
/// the If outputs' shapes for [`region::apply`].
#[allow(clippy::too_many_arguments)]
pub(super) fn switch_residuals(
    p: &mut Patch,
    g: &Graph,
    types: &Types,
    b: &Blocks,
    region: &[NodeId],
    maps: &[ValueId],
    bases: &[String],
    compute: String,
    io: ResidualIo,
    after: Option<NodeId>,
) -> Result<Vec<region::Declared>> {
    let reuse = residual_reuse(p, g, types, &b.groups, bases, maps, io.cached, io.prefix);
    let cuts: Vec<ValueId> = b.ends.iter().chain(maps).copied().collect();
    let outs = region::switch(
        p,
        g,
        region,
        &cuts,
        types,
        In::New(compute.clone()),
        reuse,
        io.prefix,
    )?;
    let last = region.last().copied();
    let module = last.map(|n| g.node(n).module.clone()).unwrap_or_default();
    p.graph_output(In::New(compute), io.computed, DataType::Bool, "", after);
    Ok(residual_outputs(
        p,
        types,
        &outs,
        &b.groups,
        bases,
        io.residual,
        &module,
        last,
    ))
}

/// A scalar f32 graph input with a default.
pub(super) fn scalar_input(p: &mut Patch, name: &str, value: f32) -> String {
    let bytes = Bytes::copy_from_slice(&value.to_le_bytes());
    p.graph_input(
        onnx::tensor_info(name, DataType::Float, Some(vec![])),
        Some(Tensor::new(name, DataType::Float, vec![], bytes)),
    )
}

pub fn split(model: &mut Model, threshold: f32) -> Result<PassReport> {
    const WHAT: &str = "first-block caching";
    let types = Types::infer(model)?;
    let g = &model.graph;
    let b = Blocks::find(g, &types, WHAT)?;
    let first = b.first().to_string();
    let (starts, hidden_in) = (b.starts.clone(), b.hidden_in);
    let pairs: Vec<Hidden> = b
        .groups
        .iter()
        .map(|e| b.pair(g, &types, &starts, e.anchor(), WHAT))
        .collect::<Result<_>>()?;
    let hidden_out = b.pair(g, &types, &starts, hidden_in, WHAT)?;
    let mut needed: Vec<ValueId> = starts.clone();
    needed.push(hidden_in);
    let (region, maps) = b.region(model, &needed, &b.names[1..], WHAT)?;
    let total = g.node_count();
    let elem = types.elem(hidden_out.anchor());
    let mut p = Patch::new(model);
    let bases: Vec<String> = pairs.iter().map(|h| h.name(&mut p, g, "fbcache")).collect();
    let hidden_out_name = match pairs.iter().position(|h| h.anchor() == hidden_out.anchor()) {
        Some(k) => bases[k].clone(),
        None => hidden_out.name(&mut p, g, "fbcache"),
    };
    let thr = scalar_input(&mut p, THRESHOLD, threshold);
    // Declared without a shape: a 0 scalar stands for "no step computed yet".
    let prev = p.graph_input(onnx::tensor_info(PREV_RESIDUAL, elem, None), None);
    let after = g.producer(hidden_out.anchor());
    let op = |p: &mut Patch, op: &str, inputs: Vec<In>| {
        p.op(op, &format!("fbcache/{op}"), inputs, vec![], "", after)
    };
    let r1 = op(
        &mut p,
        "Sub",
        vec![In::New(hidden_out_name.clone()), In::Value(hidden_in)],
    );
    let diff = relative_l1(
        &mut p,
        In::New(prev),
        In::New(r1.clone()),
        elem,
        "fbcache",
        after,
    );
    let similar = op(&mut p, "Less", vec![In::New(diff), In::New(thr)]);
    let compute = op(&mut p, "Not", vec![In::New(similar)]);
    let io = ResidualIo {
        prefix: "fbcache",
        cached: CACHED_RESIDUAL,
        computed: COMPUTED,
        residual: RESIDUAL,
    };
    let shapes = switch_residuals(
        &mut p, g, &types, &b, &region, &maps, &bases, compute, io, after,
    )?;
    p.graph_output(In::New(r1), FIRST_RESIDUAL, elem, "", after);
    let names = (
        hidden_out_name,
        g.value(hidden_in).name.clone(),
        b.groups
            .iter()
            .zip(&bases)
            .map(|(e, s)| {
                let parts: Vec<String> = e
                    .values()
                    .iter()
                    .map(|v| format!("'{}'", g.value(*v).name))
                    .collect();
                format!("{} - '{s}'", parts.join(" + "))
            })
            .collect::<Vec<_>>()
            .join(", "),
    );
    let computed = region::values_of(g, &region);
    let patch = p.into_parts();
    region::apply(model, patch, computed, shapes)?;
    Ok(PassReport {
        rewritten: vec![format!(
            "first-block cache: {} of {total} nodes ({}) skipped while {first}'s residual changes by less than the threshold ({threshold} by default)",
            region.len(),
            b.names[1..].join(", ")
        )],
        notes: vec![
            format!(
                "the first block's residual: '{}' - '{}'; cached: {}",
                names.0, names.1, names.2
            ),
            format!(
                "inputs {THRESHOLD} (default {threshold}), {PREV_RESIDUAL} and {CACHED_RESIDUAL}..., outputs {COMPUTED}, {FIRST_RESIDUAL} and {RESIDUAL}...: run it with `attune sample/generate`"
            ),
        ],
        ..Default::default()
    })
}
