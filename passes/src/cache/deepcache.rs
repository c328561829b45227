//! DeepCache (Ma et al. 2023): the deep part of a UNet (the down blocks below a skip branch,
//! the mid block and the up blocks up to it) changes slowly between steps, so it is computed
//! on refresh steps only; in between, the feature it hands the shallow up layers is reused
//! and only the shallow branch (conv_in, the blocks above the branch, conv_out) runs.
use attune_compiler::error::{Error, Result};
use attune_compiler::ir::{Graph, Model, ValueId};
use attune_compiler::onnx::{self, DataType, NodeProto};
use attune_compiler::pass::PassReport;
use attune_compiler::patch::{In, Patch};

use super::region::{self, Types};

pub use attune_compiler::cache_io::deepcache::{CACHED, FEATURE, REFRESH};

pub fn split(model: &mut Model, branch: usize) -> Result<PassReport> {
    let cut = deepcache_cut(&model.graph, branch)?;
    let (region, maps) = region::region_with_outputs(model, &[cut.value], &[])?;
    let g = &model.graph;
    let blocks = top_modules(g, &region);
    if !blocks.iter().any(|m| m == "mid_block") {
        return Err(Error::Graph(format!(
            "DeepCache branch {branch}: the mid block is needed by more than the feature entering {} (the graph reads it elsewhere), so there is nothing to cache",
            cut.layer
        )));
    }
    let total = g.node_count();
    let types = Types::infer(model)?;
    let elem = types.elem(cut.value);
    let mut p = Patch::new(model);
    let refresh = p.graph_input(
        onnx::tensor_info(REFRESH, DataType::Bool, Some(vec![])),
        None,
    );
    let cached = p.graph_input(
        onnx::tensor_info(CACHED, elem, types.any_dims(cut.value, CACHED)),
        None,
    );
    let passed = p.fresh(&format!("{CACHED}_passed"));
    let (mut nodes, mut outputs) = region::passed_outputs(&mut p, g, &types, &maps, "deepcache");
    nodes.insert(
        0,
        NodeProto {
            name: "deepcache/reuse".into(),
            op_type: "Identity".into(),
            input: vec![cached],
            output: vec![passed.clone()],
            ..Default::default()
        },
    );
    outputs.insert(0, onnx::tensor_info(&passed, elem, None));
    let reuse = region::branch("deepcache_reuse", nodes, outputs);
    let cuts: Vec<ValueId> = std::iter::once(cut.value)
        .chain(maps.iter().copied())
        .collect();
    let outs = region::switch(
        &mut p,
        g,
        &region,
        &cuts,
        &types,
        In::New(refresh),
        reuse,
        "deepcache",
    )?;
    let last = *region.last().expect("switch checked");
    p.graph_output(
        In::New(outs[0].clone()),
        FEATURE,
        elem,
        &g.node(last).module,
        Some(last),
    );
    let shapes = types
        .onnx_dims(cut.value)
        .map(|d| vec![(outs[0].clone(), elem, d)])
        .unwrap_or_default();
    let computed = region::values_of(g, &region);
    let patch = p.into_parts();
    region::apply(model, patch, computed, shapes)?;
    Ok(PassReport {
        rewritten: vec![format!(
            "DeepCache branch {branch}: the feature entering {} is cached; {} of {total} nodes ({}) run on refresh steps only",
            cut.layer,
            region.len(),
            blocks.join(", ")
        )],
        notes: vec![format!(
            "inputs {REFRESH} (bool: compute the deep part) and {CACHED}, output {FEATURE}: run it with `attune sample/generate --cache-interval N`"
        )],
        ..Default::default()
    })
}

/// Where DeepCache cuts: the hidden state entering an up layer (before its skip concat).
struct Cut {
    value: ValueId,
    /// The layer's module path, `up_blocks.3.resnets.0`.
    layer: String,
}

/// The feature DeepCache caches at `branch`: block `b = branch / 3` and layer `c = branch % 3`
/// counted from the outermost level, i.e. the hidden state entering the up block's resnet
/// that is `c`-th from its last, `up_blocks.{n-1-b}.resnets.{R-1-c}`.
fn deepcache_cut(g: &Graph, branch: usize) -> Result<Cut> {
    let (block, layer) = (branch / 3, branch % 3);
    let count = |prefix: &str| {
        g.node_ids()
            .filter_map(|n| {
                let rest = g.node(n).module.strip_prefix(prefix)?;
                rest.split('.').next()?.parse::<usize>().ok()
            })
            .max()
            .map_or(0, |k| k + 1)
    };
    let blocks = count("up_blocks.");
    if blocks == 0 || !has_module(g, "mid_block") {
        return Err(Error::Graph(
            "DeepCache needs a UNet (up_blocks.* and a mid_block); this graph has no such modules"
                .into(),
        ));
    }
    if block >= blocks {
        return Err(Error::Graph(format!(
            "DeepCache branch {branch} is block {block}, layer {layer}: the UNet has {blocks} up blocks (branches 0..{})",
            3 * blocks - 1
        )));
    }
    let up = blocks - 1 - block;
    let resnets = count(&format!("up_blocks.{up}.resnets."));
    if resnets == 0 {
        return Err(Error::Graph(format!(
            "DeepCache branch {branch}: up_blocks.{up} has no resnets to cut before"
        )));
    }
    // A layer past the block's first one computes the whole up block, as the helper does.
    let path = format!(
        "up_blocks.{up}.resnets.{}",
        (resnets - 1).saturating_sub(layer)
    );
    let within = |m: &str| m == path || m.starts_with(&format!("{path}."));
    // The concat of hidden state and skip that the layer reads.
    let concat = g.node_ids().find(|&n| {
        let node = g.node(n);
        node.is("Concat")
            && !within(&node.module)
            && node.inputs.len() == 2
            && node
                .outputs
                .iter()
                .flatten()
                .any(|v| g.readers(*v).iter().any(|r| within(&g.node(*r).module)))
    });
    let hidden = concat.and_then(|n| g.input(n, 0));
    let Some(value) = hidden else {
        return Err(Error::Graph(format!(
            "DeepCache branch {branch}: found no concat of hidden state and skip connection read by {path}"
        )));
    };
    Ok(Cut { value, layer: path })
}

fn has_module(g: &Graph, module: &str) -> bool {
    g.node_ids().any(|n| {
        let m = &g.node(n).module;
        m == module || m.starts_with(&format!("{module}."))
    })
}

/// The blocks (`down_blocks.2`, `mid_block`, ...) the nodes belong to, in order of first use.
pub(super) fn top_modules(g: &Graph, nodes: &[attune_compiler::ir::NodeId]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in nodes {
        let m = &g.node(*n).module;
        let mut parts = m.split('.');
        let top = match (parts.next(), parts.next()) {
            (Some(a), Some(b)) if b.parse::<usize>().is_ok() => format!("{a}.{b}"),
            (Some(a), _) => a.to_string(),
            _ => continue,
        };
        if !top.is_empty() && !out.contains(&top) {
            out.push(top);
        }
    }
    out
}
