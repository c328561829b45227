//! P2P's LocalBlend between sampling steps.
use ndarray::{ArrayD, s};

use super::{Maps, square_side};
use crate::error::{Error, Result};

/// P2P's LocalBlend: a mask from the accumulated cross maps (at the chosen resolution) of
/// each prompt's words, max-pooled 3x3, upsampled (nearest), normalised by its max and
/// thresholded; outside the union of the source's and each edit's mask the edits take the
/// source's latents.
pub(super) fn local_blend(
    x: &ArrayD<f32>,
    maps: &Maps,
    lb: &crate::controller::LocalBlend,
    prompts: usize,
) -> Result<ArrayD<f32>> {
    if lb.words.len() != prompts {
        return Err(Error::Inputs(format!(
            "local_blend: words lists {} prompts, the run has {prompts}",
            lb.words.len()
        )));
    }
    let res = lb.resolution;
    let tokens = res.checked_mul(res);
    // Maps are [P, query tokens, text tokens] with no zero dims (see `cond_map`).
    let layers: Vec<&ArrayD<f32>> = maps
        .sum
        .values()
        .filter(|m| Some(m.shape()[1]) == tokens)
        .collect();
    if layers.is_empty() {
        let have: Vec<String> = maps
            .sum
            .values()
            .map(|m| {
                square_side(m.shape()[1])
                    .map_or(format!("{} tokens", m.shape()[1]), |r| r.to_string())
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        return Err(Error::Inputs(if have.is_empty() {
            "[local_blend]: the UNet output no cross-attention maps (compile with --hooks capture)"
                .to_string()
        } else {
            format!(
                "[local_blend] resolution = {res}: no captured cross-attention maps have {res}x{res} query tokens (the UNet's maps have resolutions {})",
                have.join(", ")
            )
        }));
    }
    let words = layers[0].shape()[2];
    let (h, w) = (x.shape()[2], x.shape()[3]);
    let mut masks = Vec::new();
    for p in 0..prompts {
        // Mean over layers of the words' summed maps.
        let mut m = vec![0f32; res * res];
        for layer in &layers {
            for q in 0..res * res {
                m[q] += lb.words[p]
                    .iter()
                    .map(|&wi| layer[[p, q, wi.min(words - 1)]])
                    .sum::<f32>()
                    / layers.len() as f32;
            }
        }
        // 3x3 max pool, stride 1, padding 1.
        let pooled: Vec<f32> = (0..res * res)
            .map(|q| {
                let (r, c) = ((q / res) as isize, (q % res) as isize);
                let mut best = f32::NEG_INFINITY;
                for dr in -1..=1 {
                    for dc in -1..=1 {
                        let (rr, cc) = (r + dr, c + dc);
                        if rr >= 0 && cc >= 0 && (rr as usize) < res && (cc as usize) < res {
                            best = best.max(m[rr as usize * res + cc as usize]);
                        }
                    }
                }
                best
            })
            .collect();
        // Nearest upsampling to the latent size, normalised by the max.
        let up: Vec<f32> = (0..h * w)
            .map(|i| pooled[(i / w) * res / h * res + (i % w) * res / w])
            .collect();
        let max = up.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        masks.push(
            up.iter()
                .map(|v| v / max > lb.threshold)
                .collect::<Vec<bool>>(),
        );
    }
    let mut out = x.clone();
    let source = x.slice(s![0..1, .., .., ..]).to_owned();
    for p in 1..prompts {
        for c in 0..x.shape()[1] {
            for (i, (&in_source, &in_edit)) in masks[0].iter().zip(&masks[p]).enumerate() {
                let keep = in_source || in_edit;
                let (r, col) = (i / w, i % w);
                let src = source[[0, c, r, col]];
                out[[p, c, r, col]] = src + if keep { x[[p, c, r, col]] - src } else { 0.0 };
            }
        }
    }
    Ok(out)
}
