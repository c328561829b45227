//! Step caching: the denoiser split so the runtime can reuse work across denoising steps.
//!
//! DeepCache (Ma et al. 2023): the deep part of a UNet (the down blocks below a skip branch,
//! the mid block and the up blocks up to it) changes slowly between steps, so it is computed
//! on refresh steps only; in between, the feature it hands the shallow up layers is reused
//! and only the shallow branch (conv_in, the blocks above the branch, conv_out) runs.
mod region;

use attune_compiler::error::{Error, Result};
use attune_compiler::ir::{Graph, Model, ValueId};
use attune_compiler::pass::{Pass, PassCx, PassReport};

pub use region::CacheIo;

/// The inputs and output of a DeepCache-split UNet.
pub const DEEPCACHE_IO: CacheIo = CacheIo {
    refresh: "deepcache.refresh",
    cached: "deepcache.cached_feature",
    value: "deepcache.feature",
};

/// Which step cache to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepCache {
    /// DeepCache at `branch` (its `cache_branch_id`: block `branch / 3`, layer `branch % 3`,
    /// counted from the outermost block, as `DeepCacheSDHelper.set_params` does).
    DeepCache { branch: usize },
}

impl StepCache {
    /// `deepcache[:BRANCH]`.
    pub fn parse(text: &str) -> std::result::Result<StepCache, String> {
        let (kind, arg) = match text.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (text, None),
        };
        match kind.trim().to_ascii_lowercase().as_str() {
            "deepcache" => {
                let branch = match arg {
                    None => 0,
                    Some(a) => a.trim().parse::<usize>().map_err(|_| {
                        format!(
                            "--step-cache {text}: the branch must be a whole number >= 0, not '{a}'"
                        )
                    })?,
                };
                Ok(StepCache::DeepCache { branch })
            }
            "first-block" | "teacache" => Err(format!(
                "--step-cache {text}: {kind} is not implemented yet (deepcache is)"
            )),
            _ => Err(format!(
                "--step-cache {text}: '{kind}' is not one of deepcache, first-block, teacache"
            )),
        }
    }
}

impl std::fmt::Display for StepCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepCache::DeepCache { branch } => write!(f, "deepcache:{branch}"),
        }
    }
}

/// Splits the denoiser for a step cache. Runs last, so every other pass sees one graph.
pub struct StepCachePass {
    pub cache: StepCache,
}

impl Pass for StepCachePass {
    fn name(&self) -> &'static str {
        "step-cache"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        let StepCache::DeepCache { branch } = self.cache;
        let cut = deepcache_cut(&model.graph, branch)?;
        let region = region::nodes_only_for(model, cut.value)?;
        let deep_modules = top_modules(&model.graph, &region);
        if !deep_modules.iter().any(|m| m == "mid_block") {
            return Err(Error::Graph(format!(
                "DeepCache branch {branch}: the mid block is needed by more than the feature entering {} (the graph reads it elsewhere), so there is nothing to cache",
                cut.layer
            )));
        }
        let total = model.graph.node_count();
        region::make_switchable(model, &region, cut.value, DEEPCACHE_IO)?;
        Ok(PassReport {
            rewritten: vec![format!(
                "DeepCache branch {branch}: the feature entering {} is cached; {} of {total} nodes ({}) run on refresh steps only",
                cut.layer,
                region.len(),
                deep_modules.join(", ")
            )],
            notes: vec![format!(
                "inputs {} (bool: compute the deep part) and {}, output {}: run it with `attune sample/generate --cache-interval N`",
                DEEPCACHE_IO.refresh, DEEPCACHE_IO.cached, DEEPCACHE_IO.value
            )],
            ..Default::default()
        })
    }
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
fn top_modules(g: &Graph, nodes: &[attune_compiler::ir::NodeId]) -> Vec<String> {
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

/// How a step-cache split shows in `inspect`: the nodes that run on refresh steps only, by
/// block, and the inputs and output the runtime drives it by. `None` for a graph not split.
pub fn describe(model: &Model) -> Option<String> {
    let g = &model.graph;
    let refresh = g.value_id(DEEPCACHE_IO.refresh)?;
    let switch = g.readers(refresh).into_iter().find(|n| g.node(*n).is("If"))?;
    let branch = g.node(switch).attr("then_branch")?.g.as_ref()?;
    let strip = model
        .module_prefix
        .split('.')
        .filter(|c| !c.is_empty())
        .count();
    let mut blocks: Vec<String> = Vec::new();
    for n in &branch.node {
        let scope = attune_compiler::module_path::scope(n).unwrap_or_default();
        if let Some(top) = scope.get(strip)
            && !blocks.contains(top)
        {
            blocks.push(top.clone());
        }
    }
    Some(format!(
        "DeepCache: {} nodes ({}) run on refresh steps only, in If '{}'; inputs {} and {}, output {}",
        branch.node.len(),
        blocks.join(", "),
        g.node(switch).name(),
        DEEPCACHE_IO.refresh,
        DEEPCACHE_IO.cached,
        DEEPCACHE_IO.value
    ))
}
