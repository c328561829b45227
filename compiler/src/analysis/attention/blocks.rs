//! Transformer blocks around the attention sites: norms, residual adds, token counts.
use super::{AttentionSite, TransformerBlock};
use crate::analysis::shapes::Shapes;
use crate::ir::{Graph, NodeId};

/// Groups sites into transformer blocks by module path (`….transformer_blocks.0.attn1`).
/// Transformer blocks: every module with a `norm1` normalisation, an `attn1` and residual
/// adds (found from the graph itself, so blocks whose attention was already rewritten are
/// found too), with the sites of their `attn1`/`attn2` attached.
pub(super) fn blocks(
    g: &Graph,
    shapes: &Shapes,
    sites: &mut [AttentionSite],
) -> Vec<TransformerBlock> {
    let order = g.topo_order().unwrap_or_else(|_| g.node_ids().collect());
    let mut paths: Vec<String> = Vec::new();
    for &n in &order {
        let node = g.node(n);
        let is_norm = matches!(
            node.op(),
            "LayerNormalization" | "GroupNormalization" | "InstanceNormalization"
        );
        if let Some(parent) = node.module.strip_suffix(".norm1").filter(|_| is_norm)
            && !paths.iter().any(|p| p == parent)
        {
            paths.push(parent.to_string());
        }
    }
    let has_attn1 = |p: &str| {
        let prefix = format!("{p}.attn1");
        order.iter().any(|n| {
            g.node(*n).module == prefix || g.node(*n).module.starts_with(&format!("{prefix}."))
        })
    };
    paths.retain(|p| has_attn1(p));
    let mut out: Vec<TransformerBlock> = paths
        .iter()
        .map(|p| block(g, shapes, p))
        .filter(|b| !b.residual_adds.is_empty())
        .collect();
    for (i, site) in sites.iter_mut().enumerate() {
        let Some((parent, leaf)) = site.path.rsplit_once('.') else {
            continue;
        };
        let Some(b) = out.iter_mut().find(|b| b.path == parent) else {
            continue;
        };
        match leaf {
            "attn1" => b.attn1 = Some(i),
            "attn2" => b.attn2 = Some(i),
            _ => continue,
        }
        site.block = Some(parent.to_string());
    }
    out
}

fn block(g: &Graph, shapes: &Shapes, path: &str) -> TransformerBlock {
    let order = g.topo_order().unwrap_or_default();
    let mut norms = Vec::new();
    let mut residual_adds = Vec::new();
    for &n in &order {
        let node = g.node(n);
        if let Some(leaf) = node
            .module
            .strip_prefix(path)
            .and_then(|r| r.strip_prefix('.'))
        {
            if leaf.starts_with("norm")
                && matches!(
                    node.op(),
                    "LayerNormalization" | "GroupNormalization" | "InstanceNormalization"
                )
            {
                norms.push((leaf.to_string(), n));
            }
        } else if node.module == path && node.is("Add") && is_residual(g, n) {
            residual_adds.push(n);
        }
    }
    let input = norms
        .iter()
        .find(|(l, _)| l == "norm1")
        .and_then(|(_, n)| g.node(*n).inputs.first().copied().flatten());
    let tokens = input
        .and_then(|v| shapes.shape(v))
        .and_then(|s| s.get(1).cloned());
    TransformerBlock {
        path: path.to_string(),
        attn1: None,
        attn2: None,
        input,
        norms,
        residual_adds,
        tokens,
    }
}

/// An Add whose operands have the same shape (stream + sublayer), not a bias add.
fn is_residual(g: &Graph, add: NodeId) -> bool {
    g.node(add)
        .inputs
        .iter()
        .flatten()
        .all(|v| g.initializer(*v).is_none())
}
