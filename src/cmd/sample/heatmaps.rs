//! Captured cross-attention maps as PNG heatmaps.
use std::path::Path;

use anyhow::bail;
use attune_runtime::sample::Maps;
use ndarray::{ArrayD, IxDyn};

/// Per prompt and word: the maps of the highest-resolution captured layers (mean over layers
/// and steps) as an 8-bit grayscale PNG, scaled to its max and enlarged to about 256 px.
pub(super) fn write_heatmaps(
    dir: &Path,
    maps: &Maps,
    prompts: usize,
    words: &[usize],
) -> anyhow::Result<usize> {
    write_prompt_heatmaps(dir, maps, &vec![words.to_vec(); prompts])
}

/// `write_heatmaps` with each prompt's own token indices (`attune generate`'s words).
pub(super) fn write_prompt_heatmaps(
    dir: &Path,
    maps: &Maps,
    words: &[Vec<usize>],
) -> anyhow::Result<usize> {
    let prompts = words.len();
    for (path, m) in &maps.sum {
        if m.ndim() != 3 || m.shape()[0] < prompts || m.shape().contains(&0) {
            bail!(
                "--save-maps: output 'attn.{path}' is {:?}, expected [{prompts}, query tokens, text tokens]",
                m.shape()
            );
        }
    }
    let Some(tokens) = maps.sum.values().map(|m| m.shape()[1]).max() else {
        bail!("--save-maps: the UNet outputs no attention maps (compile it with --hooks capture)");
    };
    let side = (tokens as f64).sqrt() as usize;
    if side * side != tokens {
        bail!("--save-maps: {tokens} query tokens are not a square grid");
    }
    let layers: Vec<&ArrayD<f32>> = maps
        .sum
        .values()
        .filter(|m| m.shape()[1] == tokens)
        .collect();
    std::fs::create_dir_all(dir)?;
    let scale = (256 / side).max(1);
    let mut written = 0;
    for (p, words) in words.iter().enumerate() {
        for &w in words {
            let total = layers.iter().map(|l| l.shape()[2]).min().unwrap_or(0);
            if w >= total {
                bail!("--save-maps: word {w} is beyond the {total} text tokens");
            }
            let m: Vec<f32> = (0..tokens)
                .map(|q| layers.iter().map(|l| l[[p, q, w]]).sum::<f32>())
                .collect();
            let max = m.iter().cloned().fold(f32::MIN_POSITIVE, f32::max);
            let img = ArrayD::from_shape_fn(IxDyn(&[side * scale, side * scale]), |ix| {
                let (r, c) = (ix[0] / scale, ix[1] / scale);
                (m[r * side + c] / max * 255.0).round().clamp(0.0, 255.0) as u8
            });
            let path = dir.join(format!("prompt{p}_word{w}.png"));
            let file = std::fs::File::create(&path)?;
            let mut enc = png::Encoder::new(
                std::io::BufWriter::new(file),
                (side * scale) as u32,
                (side * scale) as u32,
            );
            enc.set_color(png::ColorType::Grayscale);
            enc.set_depth(png::BitDepth::Eight);
            enc.write_header()?
                .write_image_data(img.as_slice().expect("standard layout"))?;
            written += 1;
        }
    }
    Ok(written)
}
