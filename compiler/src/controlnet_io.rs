//! The graph inputs and outputs of ControlNets and of the denoisers they feed: the contract
//! between ControlNet exports, `attune compile --merge-controlnet` (attune-passes) and the
//! sampling loop (attune-runtime).

/// The denoiser's mid-block residual input (a ControlNet's output of the same name).
pub const MID: &str = "mid_block_additional_residual";
/// A ControlNet's optional scale input (without it the runtime scales its outputs).
pub const SCALE_INPUT: &str = "conditioning_scale";
/// The control image, [batch, 3, height, width] in [0, 1]: a ControlNet's input, and a
/// merged denoiser's.
pub const IMAGE_INPUT: &str = "controlnet_cond";
/// A merged denoiser's ControlNet scale (f32 [], default 1).
pub const MERGED_SCALE: &str = "controlnet_scale";

/// Whether `name` is a denoiser's ControlNet residual input (`down_block_{i}_additional_residual`
/// or `mid_block_additional_residual`), which is also the ControlNet output feeding it.
pub fn is_residual(name: &str) -> bool {
    name == MID
        || name
            .strip_prefix("down_block_")
            .and_then(|r| r.strip_suffix("_additional_residual"))
            .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether a ControlNet output declared `theirs` can feed a denoiser residual input declared
/// `ours`: the same rank, and every dim after the batch equal where both are fixed.
pub fn declared_fit(ours: &[crate::analysis::Dim], theirs: &[crate::analysis::Dim]) -> bool {
    ours.len() == theirs.len()
        && ours
            .iter()
            .zip(theirs)
            .skip(1)
            .all(|(a, b)| match (a.known(), b.known()) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            })
}
