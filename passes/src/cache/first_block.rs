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
use std::collections::HashSet;

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

pub fn split(model: &mut Model, threshold: f32) -> Result<PassReport> {
    let g = &model.graph;
    let blocks = blocks(g);
    let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else {
        return Err(Error::Graph(
            "first-block caching needs a diffusion transformer (transformer_blocks.*); this graph has none".into(),
        ));
    };
    if first != "transformer_blocks.0" || blocks.len() < 2 {
        return Err(Error::Graph(format!(
            "first-block caching needs transformer_blocks.0 and at least one block after it; the graph has {}",
            blocks.join(", ")
        )));
    }
    let in_block = |n: NodeId, b: &str| within(&g.node(n).module, b);
    let in_any = |n: NodeId| blocks.iter().any(|b| in_block(n, b));
    let types = Types::infer(model)?;
    // What the first block hands on, and what the last block hands to the rest of the model.
    let leaving = |b: &str, outside: &dyn Fn(NodeId) -> bool| -> Vec<ValueId> {
        let mut out = Vec::new();
        for n in g
            .topo_order()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| in_block(*n, b))
        {
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
    let same_shape =
        |a: ValueId, b: ValueId| types.shape(a).is_some() && types.shape(a) == types.shape(b);
    let pair = |e: ValueId| -> Result<ValueId> {
        let matches: Vec<ValueId> = starts
            .iter()
            .copied()
            .filter(|s| same_shape(*s, e))
            .collect();
        match matches[..] {
            [s] => Ok(s),
            _ => Err(Error::Graph(format!(
                "first-block cache: cannot tell which of {}'s {} outputs '{}' of {last} continues (their shapes {}): compile without fixed sizes",
                first,
                matches.len(),
                g.value(e).name,
                if matches.is_empty() {
                    "differ"
                } else {
                    "are equal"
                }
            ))),
        }
    };
    if ends.is_empty() {
        return Err(Error::Graph(format!(
            "first-block cache: nothing leaves {last} for the rest of the model"
        )));
    }
    let bases: Vec<ValueId> = ends.iter().map(|e| pair(*e)).collect::<Result<_>>()?;
    // The hidden states entering the first block: what its norm1 reads from outside it.
    let norm1 = format!("{first}.norm1");
    let hidden_in = g
        .topo_order()?
        .into_iter()
        .filter(|n| within(&g.node(*n).module, &norm1))
        .flat_map(|n| {
            g.node(n)
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
                && starts.iter().any(|s| same_shape(*s, *v))
        })
        .ok_or_else(|| {
            Error::Graph(format!(
                "first-block cache: found no hidden states entering {norm1}"
            ))
        })?;
    let hidden_out = pair(hidden_in)?;
    let mut needed: Vec<ValueId> = starts.clone();
    needed.push(hidden_in);
    let region = region::nodes_only_for(model, &ends, &needed)?;
    let skipped: HashSet<&str> = blocks[1..].iter().map(String::as_str).collect();
    if !region
        .iter()
        .any(|n| skipped.iter().any(|b| in_block(*n, b)))
    {
        return Err(Error::Graph(format!(
            "first-block cache: the blocks after {first} are needed by more than {last}'s output"
        )));
    }
    let total = g.node_count();
    let elem = types.elem(hidden_out);
    let mut p = Patch::new(model);
    let thr_bytes = Bytes::copy_from_slice(&threshold.to_le_bytes());
    let thr = p.graph_input(
        onnx::tensor_info(THRESHOLD, DataType::Float, Some(vec![])),
        Some(Tensor::new(THRESHOLD, DataType::Float, vec![], thr_bytes)),
    );
    // Declared without a shape: a 0 scalar stands for "no step computed yet".
    let prev = p.graph_input(onnx::tensor_info(PREV_RESIDUAL, elem, None), None);
    let module = g.node(*region.last().expect("checked")).module.clone();
    let after = g.producer(hidden_out);
    let op = |p: &mut Patch, op: &str, inputs: Vec<In>, attrs| {
        p.op(op, &format!("fbcache/{op}"), inputs, attrs, "", after)
    };
    let r1 = op(
        &mut p,
        "Sub",
        vec![In::Value(hidden_out), In::Value(hidden_in)],
        vec![],
    );
    let delta = op(
        &mut p,
        "Sub",
        vec![In::New(prev.clone()), In::New(r1.clone())],
        vec![],
    );
    let delta = op(&mut p, "Abs", vec![In::New(delta)], vec![]);
    let delta = op(
        &mut p,
        "ReduceMean",
        vec![In::New(delta)],
        vec![attr::int("keepdims", 0)],
    );
    let scale = op(&mut p, "Abs", vec![In::New(prev)], vec![]);
    let scale = op(
        &mut p,
        "ReduceMean",
        vec![In::New(scale)],
        vec![attr::int("keepdims", 0)],
    );
    let mut diff = op(&mut p, "Div", vec![In::New(delta), In::New(scale)], vec![]);
    if elem != DataType::Float {
        diff = op(
            &mut p,
            "Cast",
            vec![In::New(diff)],
            vec![attr::int("to", DataType::Float as i64)],
        );
    }
    let similar = op(&mut p, "Less", vec![In::New(diff), In::New(thr)], vec![]);
    let compute = op(&mut p, "Not", vec![In::New(similar)], vec![]);
    let mut reuse_nodes = Vec::new();
    let mut reuse_outputs = Vec::new();
    for (k, (e, s)) in ends.iter().zip(&bases).enumerate() {
        let cached = p.graph_input(
            onnx::tensor_info(&numbered(CACHED_RESIDUAL, k), types.elem(*e), None),
            None,
        );
        let out = p.fresh(&format!("{}_reused", numbered(CACHED_RESIDUAL, k)));
        reuse_nodes.push(NodeProto {
            name: format!("fbcache/reuse_{k}"),
            op_type: "Add".into(),
            input: vec![g.value(*s).name.clone(), cached],
            output: vec![out.clone()],
            ..Default::default()
        });
        reuse_outputs.push(onnx::tensor_info(&out, types.elem(*e), None));
    }
    let reuse = region::branch("fbcache_reuse", reuse_nodes, reuse_outputs);
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
    let mut shapes = Vec::new();
    for (k, ((o, e), s)) in outs.iter().zip(&ends).zip(&bases).enumerate() {
        let residual = p.op(
            "Sub",
            "fbcache/residual",
            vec![In::New(o.clone()), In::Value(*s)],
            vec![],
            &module,
            last_node,
        );
        p.graph_output(
            In::New(residual),
            &numbered(RESIDUAL, k),
            types.elem(*e),
            &module,
            last_node,
        );
        if let Some(d) = types.onnx_dims(*e) {
            shapes.push((o.clone(), types.elem(*e), d));
        }
    }
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
            blocks[1..].join(", ")
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
