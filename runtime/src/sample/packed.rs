//! Flux's packed latents: each 2x2 patch of the latent image one token of 4·C features,
//! row by row, with its position ids (0, row, column); the text tokens' ids are zeros.
use ndarray::{Array2, ArrayD, IxDyn};

/// [B, C, H, W] → [B, (H/2)(W/2), 4C] (diffusers' `FluxPipeline._pack_latents`).
pub fn pack(x: &ArrayD<f32>) -> ArrayD<f32> {
    let w = x.shape()[3];
    ArrayD::from_shape_fn(IxDyn(&token_shape(x.shape())), |ix| {
        let (n, token, f) = (ix[0], ix[1], ix[2]);
        let (row, col) = (token / (w / 2), token % (w / 2));
        let (ch, dy, dx) = (f / 4, (f % 4) / 2, f % 2);
        x[[n, ch, 2 * row + dy, 2 * col + dx]]
    })
}

/// `pack`'s output shape for an image of `shape` [B, C, H, W].
pub fn token_shape(shape: &[usize]) -> [usize; 3] {
    [shape[0], (shape[2] / 2) * (shape[3] / 2), shape[1] * 4]
}

/// The inverse of `pack` for an [B, C, H, W] image.
pub fn unpack(tokens: &ArrayD<f32>, shape: &[usize]) -> ArrayD<f32> {
    let w = shape[3];
    ArrayD::from_shape_fn(IxDyn(shape), |ix| {
        let (n, ch, y, x) = (ix[0], ix[1], ix[2], ix[3]);
        let token = (y / 2) * (w / 2) + x / 2;
        tokens[[n, token, ch * 4 + (y % 2) * 2 + x % 2]]
    })
}

/// (0, row, column) per token of an H x W latent.
pub fn image_ids(h: usize, w: usize) -> ArrayD<f32> {
    Array2::from_shape_fn(((h / 2) * (w / 2), 3), |(token, k)| match k {
        1 => (token / (w / 2)) as f32,
        2 => (token % (w / 2)) as f32,
        _ => 0.0,
    })
    .into_dyn()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_puts_each_2x2_patch_in_one_token_and_unpack_inverts_it() {
        let x = ArrayD::from_shape_fn(IxDyn(&[1, 2, 4, 6]), |ix| {
            (ix[1] * 100 + ix[2] * 10 + ix[3]) as f32
        });
        let p = pack(&x);
        assert_eq!(p.shape(), [1, 6, 8]);
        // token 4 = patch row 1, column 1: pixels (2..4, 2..4), channel 0 then channel 1
        let token: Vec<f32> = (0..8).map(|f| p[[0, 4, f]]).collect();
        assert_eq!(token, [22., 23., 32., 33., 122., 123., 132., 133.]);
        assert_eq!(unpack(&p, x.shape()), x);
        let ids = image_ids(4, 6);
        assert_eq!([ids[[4, 0]], ids[[4, 1]], ids[[4, 2]]], [0., 1., 1.]);
    }
}
