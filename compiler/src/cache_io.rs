//! The graph inputs and outputs a step-cached denoiser (`attune compile --step-cache`) is run
//! by: the contract between the split (attune-passes) and the sampling loop (attune-runtime).
//! Cache inputs without a fixed shape take a 0 scalar before anything is cached.

/// DeepCache: refreshed on a schedule the runtime keeps.
pub mod deepcache {
    /// bool []: true computes the deep part.
    pub const REFRESH: &str = "deepcache.refresh";
    /// The feature of an earlier refresh step (not read on refresh steps).
    pub const CACHED: &str = "deepcache.cached_feature";
    /// The feature this step used, to feed back as [`CACHED`].
    pub const FEATURE: &str = "deepcache.feature";
}

/// The first-block cache: the graph decides from the first block's residual.
pub mod fbcache {
    /// f32 [], with a default: the relative change under which the other blocks are skipped.
    pub const THRESHOLD: &str = "fbcache.threshold";
    /// The first block's residual of the last computed step.
    pub const PREV_RESIDUAL: &str = "fbcache.prev_residual";
    /// What the skipped blocks added on that step (`_1`, ... for more hidden states).
    pub const CACHED_RESIDUAL: &str = "fbcache.cached_residual";
    /// bool []: whether this step ran every block.
    pub const COMPUTED: &str = "fbcache.computed";
    pub const FIRST_RESIDUAL: &str = "fbcache.first_residual";
    pub const RESIDUAL: &str = "fbcache.residual";
}

/// TeaCache: the graph decides from the accumulated change of the modulated input.
pub mod teacache {
    pub const THRESHOLD: &str = "teacache.threshold";
    /// bool []: compute whatever the change (the first and last steps).
    pub const FORCE: &str = "teacache.force";
    /// f32 []: the sum of the changes since the last computed step.
    pub const ACCUMULATED: &str = "teacache.accumulated";
    pub const PREV_MODULATED: &str = "teacache.prev_modulated";
    pub const CACHED_RESIDUAL: &str = "teacache.cached_residual";
    pub const COMPUTED: &str = "teacache.computed";
    pub const MODULATED: &str = "teacache.modulated";
    /// The sum with this step's change (an output: the input is named [`ACCUMULATED`]).
    pub const ACCUMULATED_NEXT: &str = "teacache.accumulated_next";
    pub const RESIDUAL: &str = "teacache.residual";
}

/// `{cache}{CACHED_OUTPUT}{output}`: an extra output (an attention map) computed in the cached
/// part, fed back as it was on the last computed step.
pub const CACHED_OUTPUT: &str = ".cached_output.";

/// `base`, `base_1`, ... for the k-th cached value.
pub fn numbered(base: &str, k: usize) -> String {
    if k == 0 {
        base.to_string()
    } else {
        format!("{base}_{k}")
    }
}
