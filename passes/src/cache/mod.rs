//! Step caching: the denoiser split so the runtime can reuse work across denoising steps. The
//! part a step may skip moves into an `If`; its condition and what it reuses are graph inputs
//! the runtime feeds, what it computed graph outputs the runtime keeps.
//! - `deepcache[:BRANCH]`: a UNet's deep part, refreshed on a schedule ([`deepcache`]);
//! - `first-block[:THRESHOLD]`: a transformer's blocks after the first, skipped while the
//!   first block's residual barely changes ([`first_block`]);
//! - `teacache[:THRESHOLD]`: all of a transformer's blocks, skipped while the accumulated
//!   change of the modulated input stays small ([`teacache`]).
pub mod deepcache;
pub mod first_block;
mod region;
pub mod teacache;

use attune_compiler::error::Result;
use attune_compiler::ir::Model;
use attune_compiler::pass::{Pass, PassCx, PassReport};

/// Which step cache to build.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepCache {
    /// DeepCache at `branch` (its `cache_branch_id`: block `branch / 3`, layer `branch % 3`,
    /// counted from the outermost block, as `DeepCacheSDHelper.set_params` does).
    DeepCache { branch: usize },
    /// ParaAttention's first-block cache with this default threshold (a graph input).
    FirstBlock { threshold: f32 },
    /// TeaCache with this default threshold (a graph input).
    TeaCache { threshold: f32 },
}

impl StepCache {
    /// `deepcache[:BRANCH]` or `first-block[:THRESHOLD]`.
    pub fn parse(text: &str) -> std::result::Result<StepCache, String> {
        let (kind, arg) = match text.split_once(':') {
            Some((k, a)) => (k, Some(a.trim())),
            None => (text, None),
        };
        match kind.trim().to_ascii_lowercase().as_str() {
            "deepcache" => {
                let branch = match arg {
                    None => 0,
                    Some(a) => a.parse::<usize>().map_err(|_| {
                        format!(
                            "--step-cache {text}: the branch must be a whole number >= 0, not '{a}'"
                        )
                    })?,
                };
                Ok(StepCache::DeepCache { branch })
            }
            "first-block" | "fbcache" | "teacache" => {
                let teacache = kind.trim().eq_ignore_ascii_case("teacache");
                let threshold = match arg {
                    None if teacache => teacache::DEFAULT_THRESHOLD,
                    None => first_block::DEFAULT_THRESHOLD,
                    Some(a) => a
                        .parse::<f32>()
                        .ok()
                        .filter(|t| t.is_finite() && *t >= 0.0)
                        .ok_or_else(|| {
                            format!("--step-cache {text}: the threshold must be a number >= 0, not '{a}'")
                        })?,
                };
                Ok(if teacache {
                    StepCache::TeaCache { threshold }
                } else {
                    StepCache::FirstBlock { threshold }
                })
            }
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
            StepCache::FirstBlock { threshold } => write!(f, "first-block:{threshold}"),
            StepCache::TeaCache { threshold } => write!(f, "teacache:{threshold}"),
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
        // Dead nodes (an earlier pass's leftovers) would read the values the split moves.
        attune_compiler::dce::dce(model);
        match self.cache {
            StepCache::DeepCache { branch } => deepcache::split(model, branch),
            StepCache::FirstBlock { threshold } => first_block::split(model, threshold),
            StepCache::TeaCache { threshold } => teacache::split(model, threshold),
        }
    }
}

/// An error for a pass that rewrites layers of a graph already split for step caching: the
/// layers inside the cached part are in an `If` branch it does not see.
pub fn refuse_split(model: &Model, what: &str) -> Result<()> {
    match describe(model) {
        Some(_) => Err(attune_compiler::error::Error::Graph(format!(
            "{what}: the graph is split for step caching and its cached layers are out of reach; apply it with the split instead (`compile --step-cache` runs last) or to the graph before the split"
        ))),
        None => Ok(()),
    }
}

/// How a step-cache split shows in `inspect`: the nodes a step may skip, by block, and the
/// inputs and outputs the runtime drives it by. `None` for a graph not split.
pub fn describe(model: &Model) -> Option<String> {
    let g = &model.graph;
    let switch = g.node_ids().find(|n| {
        g.node(*n).is("If") && ["deepcache/If", "fbcache/If"].contains(&g.node(*n).name())
    })?;
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
    let io = |names: Vec<&String>| {
        names
            .into_iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let kind = match g.node(switch).name() {
        "deepcache/If" => "DeepCache: run on refresh steps only",
        "fbcache/If" => {
            "first-block cache: skipped while the first block's residual barely changes"
        }
        _ => "TeaCache: skipped while the modulated input's accumulated change stays small",
    };
    let cache_io = |n: &str| {
        ["deepcache.", "fbcache.", "teacache."]
            .iter()
            .any(|p| n.starts_with(p))
    };
    Some(format!(
        "{kind}: {} nodes ({}) in If '{}'; inputs {}; outputs {}",
        branch.node.len(),
        blocks.join(", "),
        g.node(switch).name(),
        io(g.inputs
            .iter()
            .map(|i| &i.info.name)
            .filter(|n| cache_io(n))
            .collect()),
        io(g.outputs
            .iter()
            .map(|o| &o.info.name)
            .filter(|n| cache_io(n))
            .collect()),
    ))
}
