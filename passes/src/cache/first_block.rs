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
pub const THRESHOLD: &str = "fbcache.threshold";
pub const PREV_RESIDUAL: &str = "fbcache.prev_residual";
pub const CACHED_RESIDUAL: &str = "fbcache.cached_residual";
pub const COMPUTED: &str = "fbcache.computed";
pub const FIRST_RESIDUAL: &str = "fbcache.first_residual";
pub const RESIDUAL: &str = "fbcache.residual";

/// `base`, `base_1`, ... for the k-th cached value.
pub fn numbered(base: &str, k: usize) -> String {
    if k == 0 {
        base.to_string()
    } else {
        format!("{base}_{k}")
    }
}

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
    /// What the last block hands to the rest of the model.
    pub ends: Vec<ValueId>,
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
        let hidden_in = order
            .iter()
            .filter(|n| within(&g.node(**n).module, &norm1))
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
            })
            .ok_or_else(|| {
                Error::Graph(format!("{what}: found no hidden states entering {norm1}"))
            })?;
        Ok(Blocks {
            names,
            starts,
            ends,
            hidden_in,
        })
    }

    pub fn first(&self) -> &str {
        &self.names[0]
    }

    pub fn last(&self) -> &str {
        self.names.last().expect("two or more")
    }

    /// The one of `candidates` with `v`'s shape.
    pub fn pair(
        &self,
        g: &Graph,
        types: &Types,
        candidates: &[ValueId],
        v: ValueId,
        what: &str,
    ) -> Result<ValueId> {
        let matches: Vec<ValueId> = candidates
            .iter()
            .copied()
            .filter(|s| same_shape(types, *s, v))
            .collect();
        match matches[..] {
            [s] => Ok(s),
            _ => Err(Error::Graph(format!(
                "{what}: cannot tell which hidden states '{}' of {} continues ({} of the same shape): compile without fixed sizes",
                g.value(v).name,
                self.last(),
                matches.len()
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
    ) -> Result<Vec<NodeId>> {
        let region = region::nodes_only_for(model, &self.ends, needed)?;
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
        Ok(region)
    }
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

/// The reuse branch: each end's base plus its cached residual (inputs `cached_k`).
pub(super) fn residual_reuse(
    p: &mut Patch,
    g: &Graph,
    types: &Types,
    ends: &[ValueId],
    bases: &[ValueId],
    cached: &str,
    prefix: &str,
) -> attune_compiler::onnx::GraphProto {
    let mut nodes = Vec::new();
    let mut outputs = Vec::new();
    for (k, (e, s)) in ends.iter().zip(bases).enumerate() {
        let input = p.graph_input(
            onnx::tensor_info(&numbered(cached, k), types.elem(*e), None),
            None,
        );
        let out = p.fresh(&format!("{}_reused", numbered(cached, k)));
        nodes.push(NodeProto {
            name: format!("{prefix}/reuse_{k}"),
            op_type: "Add".into(),
            input: vec![g.value(*s).name.clone(), input],
            output: vec![out.clone()],
            ..Default::default()
        });
        outputs.push(onnx::tensor_info(&out, types.elem(*e), None));
    }
    region::branch(&format!("{prefix}_reuse"), nodes, outputs)
}

/// Graph outputs `residual_k` = the If's k-th output - its base; the If outputs' shapes.
#[allow(clippy::too_many_arguments)]
pub(super) fn residual_outputs(
    p: &mut Patch,
    types: &Types,
    outs: &[String],
    ends: &[ValueId],
    bases: &[ValueId],
    residual: &str,
    module: &str,
    after: Option<NodeId>,
) -> Vec<region::Declared> {
    let mut shapes = Vec::new();
    for (k, ((o, e), s)) in outs.iter().zip(ends).zip(bases).enumerate() {
        let r = p.op(
            "Sub",
            &format!("{residual}/Sub"),
            vec![In::New(o.clone()), In::Value(*s)],
            vec![],
            module,
            after,
        );
        p.graph_output(
            In::New(r),
            &numbered(residual, k),
            types.elem(*e),
            module,
            after,
        );
        if let Some(d) = types.onnx_dims(*e) {
            shapes.push((o.clone(), types.elem(*e), d));
        }
    }
    shapes
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
    let (ends, starts, hidden_in) = (b.ends.clone(), b.starts.clone(), b.hidden_in);
    let bases: Vec<ValueId> = ends
        .iter()
        .map(|e| b.pair(g, &types, &starts, *e, WHAT))
        .collect::<Result<_>>()?;
    let hidden_out = b.pair(g, &types, &starts, hidden_in, WHAT)?;
    let mut needed: Vec<ValueId> = starts.clone();
    needed.push(hidden_in);
    let region = b.region(model, &needed, &b.names[1..], WHAT)?;
    let total = g.node_count();
    let elem = types.elem(hidden_out);
    let mut p = Patch::new(model);
    let thr = scalar_input(&mut p, THRESHOLD, threshold);
    // Declared without a shape: a 0 scalar stands for "no step computed yet".
    let prev = p.graph_input(onnx::tensor_info(PREV_RESIDUAL, elem, None), None);
    let module = g.node(*region.last().expect("checked")).module.clone();
    let after = g.producer(hidden_out);
    let r1 = p.op(
        "Sub",
        "fbcache/first_residual",
        vec![In::Value(hidden_out), In::Value(hidden_in)],
        vec![],
        "",
        after,
    );
    let diff = relative_l1(
        &mut p,
        In::New(prev),
        In::New(r1.clone()),
        elem,
        "fbcache",
        after,
    );
    let similar = p.op(
        "Less",
        "fbcache/Less",
        vec![In::New(diff), In::New(thr)],
        vec![],
        "",
        after,
    );
    let compute = p.op(
        "Not",
        "fbcache/Not",
        vec![In::New(similar)],
        vec![],
        "",
        after,
    );
    let reuse = residual_reuse(&mut p, g, &types, &ends, &bases, CACHED_RESIDUAL, "fbcache");
    let outs = region::switch(
        &mut p,
        g,
        &region,
        &ends,
        &types,
        In::New(compute.clone()),
        reuse,
        "fbcache",
    )?;
    let last_node = region.last().copied();
    p.graph_output(In::New(compute), COMPUTED, DataType::Bool, "", after);
    p.graph_output(In::New(r1), FIRST_RESIDUAL, elem, "", after);
    let shapes = residual_outputs(
        &mut p, &types, &outs, &ends, &bases, RESIDUAL, &module, last_node,
    );
    let names = (
        g.value(hidden_out).name.clone(),
        g.value(hidden_in).name.clone(),
        ends.iter()
            .zip(&bases)
            .map(|(e, s)| format!("'{}' - '{}'", g.value(*e).name, g.value(*s).name))
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
