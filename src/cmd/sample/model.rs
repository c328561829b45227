//! What `attune sample` reads off the model: latent channels, patch size, timestep form and
//! the resolutions of its captured maps.
use std::collections::BTreeMap;
use std::path::Path;

use attune_compiler::Model;
use attune_compiler::analysis::shapes::declared_dims;
use attune_compiler::analysis::{Dim, Shapes};
use attune_compiler::ir::{Use, ValueId};
use attune_runtime::sample::{self, TimestepForm};

/// The resolutions (sides of square query-token grids) of the UNet's captured cross-attention
/// maps for latents of `shape` [batch, channels, height, width], from symbolic shape
/// inference; `None` where a size is not known statically.
pub(super) fn map_resolutions(model: &Model, shape: &[usize]) -> Option<Vec<usize>> {
    let g = &model.graph;
    let shapes = Shapes::infer(model);
    let sample = g.value_id("sample")?;
    let declared = shapes.shape(sample)?;
    if declared.len() != 4 || shape.len() != 4 {
        return None;
    }
    let sides: Vec<i64> = shape[2..].iter().map(|&s| s as i64).collect();
    let values = solve_symbols(&declared[2..], &sides)?;
    let mut out = std::collections::BTreeSet::new();
    for io in &g.outputs {
        if !g.value(io.value).name.starts_with("attn.") {
            continue;
        }
        let tokens = shapes
            .shape(io.value)?
            .get(1)?
            .substitute(&values)?
            .known()?;
        out.insert(sample::square_side(usize::try_from(tokens).ok()?)?);
    }
    (!out.is_empty()).then(|| out.into_iter().collect())
}

/// The timestep's declared form: a scalar, one for the batch (`[1]`), else one per row.
pub(super) fn timestep_form(model: &Model) -> TimestepForm {
    let declared = model
        .graph
        .inputs
        .iter()
        .find(|io| io.info.name == "timestep")
        .and_then(|io| declared_dims(&io.info));
    match declared.as_deref() {
        Some([]) => TimestepForm::Scalar,
        Some([Dim::Known(1)]) => TimestepForm::One,
        _ => TimestepForm::PerRow,
    }
}

/// The latents' channel count: declared, or (diffusers' conversion script declares it a
/// `channels` symbol) the input channels of the convolution reading the sample.
pub(super) fn latent_channels(model: &Model, sample: ValueId, declared: &[Dim]) -> Option<usize> {
    if let Some(c) = declared.get(1).and_then(Dim::known) {
        return usize::try_from(c).ok();
    }
    let g = &model.graph;
    g.value(sample).consumers.iter().find_map(|u| {
        let Use::Input(n, 0) = u else { return None };
        let node = g.node(*n);
        let weight = node.inputs.get(1).copied().flatten()?;
        let dims = &g.initializer(weight)?.proto.dims;
        (node.is("Conv") && dims.len() == 4)
            .then(|| usize::try_from(dims[1]).ok())
            .flatten()
    })
}

/// The side of the patches a transformer cuts the sample into: the strides of a convolution
/// reading the sample (input `latents`) whose kernel is its stride (PixArt's and SD3's patch
/// embedding).
pub(super) fn patch_size(model: &Model, latents: &str) -> Option<usize> {
    let g = &model.graph;
    let sample = g.value_id(latents)?;
    g.value(sample).consumers.iter().find_map(|u| {
        let Use::Input(n, 0) = u else { return None };
        let node = g.node(*n);
        let weight = node.inputs.get(1).copied().flatten()?;
        let dims = &g.initializer(weight)?.proto.dims;
        let strides = node.attr("strides")?.ints.clone();
        let patch = *strides.first()?;
        (node.is("Conv")
            && patch > 1
            && strides.iter().all(|&s| s == patch)
            && dims[2..].iter().all(|&k| k == patch))
        .then(|| usize::try_from(patch).ok())
        .flatten()
    })
}

/// Sizes of the symbols of `declared` dims (`height`, `8*height`) that make them `sizes`;
/// `None` when a dim is a product of symbols, a size does not divide, or sizes contradict.
fn solve_symbols(declared: &[Dim], sizes: &[i64]) -> Option<BTreeMap<String, i64>> {
    let mut values = BTreeMap::new();
    for (d, &size) in declared.iter().zip(sizes) {
        match d {
            Dim::Known(k) if *k == size => {}
            Dim::Known(_) => return None,
            Dim::Sym { num, den, symbols } => {
                let [(name, 1)] = symbols.iter().collect::<Vec<_>>()[..] else {
                    return None;
                };
                let scaled = size.checked_mul(*den)?;
                if *num == 0 || scaled % num != 0 {
                    return None;
                }
                if *values.entry(name.clone()).or_insert(scaled / num) != scaled / num {
                    return None;
                }
            }
        }
    }
    Some(values)
}

/// The width of an LCM-distilled UNet's `timestep_cond` (its `time_cond_proj_dim`): declared,
/// else the rows of the MatMul weight that reads it.
pub(super) fn guidance_embedding_width(model: &Model, unet: &Path) -> anyhow::Result<usize> {
    let g = &model.graph;
    let input = g.inputs.iter().find(|io| io.info.name == "timestep_cond");
    let declared = input
        .and_then(|io| declared_dims(&io.info))
        .and_then(|d| d.get(1).and_then(Dim::known))
        .and_then(|d| usize::try_from(d).ok());
    let read = || {
        let value = g.value_id("timestep_cond")?;
        g.value(value).consumers.iter().find_map(|u| {
            let Use::Input(n, 0) = u else { return None };
            let node = g.node(*n);
            let weight = node.inputs.get(1).copied().flatten()?;
            let dims = &g.initializer(weight)?.proto.dims;
            (node.is("MatMul") && dims.len() == 2)
                .then(|| usize::try_from(dims[0]).ok())
                .flatten()
        })
    };
    match declared.or_else(read) {
        Some(w) if w >= 4 => Ok(w),
        _ => anyhow::bail!(
            "{}: its 'timestep_cond' input (an LCM-distilled UNet's guidance embedding) has no known width >= 4: declare it [batch, time_cond_proj_dim]",
            unet.display()
        ),
    }
}
