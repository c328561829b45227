//! Images in and out of a pipeline, with diffusers' `VaeImageProcessor` conventions: a VAE
//! decoder's output in [-1, 1] becomes 8-bit RGB as `(x / 2 + 0.5).clamp(0, 1) · 255`, rounded;
//! an input image becomes `[1, 3, H, W]` in [-1, 1] (`x / 255 · 2 − 1`); a mask becomes
//! `[1, 1, H, W]` of 0 and 1 (grayscale, binarised at ½).
use std::io::BufReader;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};
use crate::tensor::HostTensor;

/// An 8-bit RGB image, row-major, 3 bytes a pixel.
#[derive(Clone, Debug, PartialEq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// The images of a decoder output `[N, 3, H, W]` (f32 or f16, in [-1, 1]).
pub fn from_decoded(t: &HostTensor) -> Result<Vec<Rgb>> {
    let shape = t.shape().to_vec();
    let [n, 3, h, w] = shape[..] else {
        return Err(Error::Inputs(format!(
            "the VAE decoder's output has shape {shape:?}, not [N, 3, H, W]"
        )));
    };
    let a = match t {
        HostTensor::F32(a) => a.as_standard_layout().into_owned(),
        HostTensor::F16(a) => a.mapv(half::f16::to_f32).as_standard_layout().into_owned(),
        _ => {
            return Err(Error::Inputs(
                "the VAE decoder's output is not a float tensor".into(),
            ));
        }
    };
    let data = a.as_slice().expect("standard layout");
    let plane = h * w;
    Ok((0..n)
        .map(|i| {
            let image = &data[i * 3 * plane..(i + 1) * 3 * plane];
            let mut pixels = Vec::with_capacity(3 * plane);
            for p in 0..plane {
                for c in 0..3 {
                    pixels.push(to_byte(image[c * plane + p]));
                }
            }
            Rgb {
                width: w,
                height: h,
                pixels,
            }
        })
        .collect())
}

/// A value in [-1, 1] as a byte (NaN becomes 0, as numpy's cast of a clipped NaN does not
/// define: say black).
fn to_byte(x: f32) -> u8 {
    let unit = (x / 2.0 + 0.5).clamp(0.0, 1.0);
    if unit.is_nan() {
        0
    } else {
        (unit * 255.0).round_ties_even() as u8
    }
}

/// Writes `image` as an 8-bit RGB PNG, atomically.
pub fn write_png(path: &Path, image: &Rgb) -> Result<()> {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, image.width as u32, image.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc
            .write_header()
            .map_err(|e| Error::file(path, e.to_string()))?;
        writer
            .write_image_data(&image.pixels)
            .map_err(|e| Error::file(path, e.to_string()))?;
    }
    crate::npy::write_atomic(path, &bytes)
}

/// Reads a PNG as 8-bit RGB (gray and alpha converted as PIL's `convert("RGB")` does:
/// gray repeated, alpha dropped).
pub fn read_png(path: &Path) -> Result<Rgb> {
    Ok(read_png_mode(path)?.0)
}

/// A PNG's colour type, as PIL names its mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    L,
    La,
    Rgb,
    Rgba,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::L => "L",
            Mode::La => "LA",
            Mode::Rgb => "RGB",
            Mode::Rgba => "RGBA",
        }
    }
}

/// Reads a PNG as 8-bit RGB, with the mode it had (diffusers' image processor takes RGB images
/// as they are; a caller may refuse the others).
pub fn read_png_mode(path: &Path) -> Result<(Rgb, Mode)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder
        .read_info()
        .map_err(|e| Error::file(path, format!("not a readable PNG: {e}")))?;
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| Error::file(path, format!("not a readable PNG: {e}")))?;
    let (width, height) = (info.width as usize, info.height as usize);
    let (channels, mode) = match info.color_type {
        png::ColorType::Grayscale => (1, Mode::L),
        png::ColorType::GrayscaleAlpha => (2, Mode::La),
        png::ColorType::Rgb => (3, Mode::Rgb),
        png::ColorType::Rgba => (4, Mode::Rgba),
        png::ColorType::Indexed => {
            return Err(Error::file(
                path,
                "an indexed PNG the decoder did not expand",
            ));
        }
    };
    let data = &buf[..info.buffer_size()];
    let mut pixels = Vec::with_capacity(width * height * 3);
    for px in data.chunks_exact(channels) {
        match channels {
            1 | 2 => pixels.extend([px[0]; 3]),
            _ => pixels.extend(&px[..3]),
        }
    }
    Ok((
        Rgb {
            width,
            height,
            pixels,
        },
        mode,
    ))
}

/// `image` as the `[1, 3, H, W]` f32 tensor in [-1, 1] a VAE encoder reads.
pub fn to_tensor(image: &Rgb) -> HostTensor {
    let (h, w) = (image.height, image.width);
    let mut data = vec![0f32; 3 * h * w];
    for (p, px) in image.pixels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * h * w + p] = f32::from(px[c]) / 255.0 * 2.0 - 1.0;
        }
    }
    HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[1, 3, h, w]), data).expect("sized"))
}

/// `mask` (white: repaint) as `[1, 1, H, W]` of 0 and 1: its luminance (PIL's `convert("L")`,
/// ITU-R 601-2) over 255, binarised at ½.
pub fn to_mask(mask: &Rgb) -> HostTensor {
    let data = mask
        .pixels
        .chunks_exact(3)
        .map(|px| {
            let [r, g, b] = [px[0], px[1], px[2]].map(u32::from);
            // PIL's fixed-point form of L = R·0.299 + G·0.587 + B·0.114.
            let l = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
            if l as f32 / 255.0 < 0.5 { 0.0 } else { 1.0 }
        })
        .collect();
    HostTensor::F32(
        ArrayD::from_shape_vec(IxDyn(&[1, 1, mask.height, mask.width]), data).expect("sized"),
    )
}

/// A `[1, 1, H, W]` mask at `[h, w]` as torch's `interpolate(mode="nearest")` resizes it
/// (the source pixel ⌊i·H/h⌋), as diffusers' inpainting brings its mask to the latents.
pub fn resize_nearest(mask: &ArrayD<f32>, h: usize, w: usize) -> ArrayD<f32> {
    let (sh, sw) = (mask.shape()[2], mask.shape()[3]);
    let src = |i: usize, from: usize, to: usize| -> usize {
        let scale = from as f32 / to as f32;
        ((i as f32 * scale).floor() as usize).min(from - 1)
    };
    ArrayD::from_shape_fn(IxDyn(&[1, 1, h, w]), |ix| {
        mask[[0, 0, src(ix[2], sh, h), src(ix[3], sw, w)]]
    })
}

/// `image` as `[1, 3, H, W]` f32 in [0, 1] (a ControlNet's `controlnet_cond`: diffusers'
/// control image processor does not normalise to [-1, 1]).
pub fn to_unit_tensor(image: &Rgb) -> ArrayD<f32> {
    let (h, w) = (image.height, image.width);
    let mut data = vec![0f32; 3 * h * w];
    for (p, px) in image.pixels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * h * w + p] = f32::from(px[c]) / 255.0;
        }
    }
    ArrayD::from_shape_vec(IxDyn(&[1, 3, h, w]), data).expect("sized")
}

/// PIL's resampling filters (`Image.Resampling`), as image processors name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    Lanczos,
    Bilinear,
    Bicubic,
}

impl Filter {
    /// PIL's number for it (a preprocessor config's `resample`).
    pub fn from_pil(n: i64) -> Option<Filter> {
        match n {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Lanczos => 3.0,
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        let x = x.abs();
        match self {
            Filter::Lanczos if x < 3.0 => sinc(x) * sinc(x / 3.0),
            Filter::Bilinear if x < 1.0 => 1.0 - x,
            // PIL's cubic with a = -0.5.
            Filter::Bicubic if x < 1.0 => (1.5 * x - 2.5) * x * x + 1.0,
            Filter::Bicubic if x < 2.0 => (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5,
            _ => 0.0,
        }
    }
}

/// `image` resized to `width` x `height` with Lanczos, as PIL's `Image.resize(..., LANCZOS)`
/// (what diffusers' image processors call).
pub fn resize_lanczos(image: &Rgb, width: usize, height: usize) -> Rgb {
    resize(image, width, height, Filter::Lanczos)
}

/// `image` resized to `width` x `height` as PIL's `Image.resize` does it: a separable filter
/// widened by the downscale factor, fixed-point weights with 22 fraction bits, the horizontal
/// pass first, each pass rounded and clamped to 8 bits. The same size is the image itself.
pub fn resize(image: &Rgb, width: usize, height: usize, filter: Filter) -> Rgb {
    let mut out = image.pixels.clone();
    let (mut w, h) = (image.width, image.height);
    if width != w {
        let taps = taps(w, width, filter);
        let mut next = vec![0u8; width * h * 3];
        for y in 0..h {
            for (x, (first, k)) in taps.iter().enumerate() {
                for c in 0..3 {
                    let at = |i: usize| out[(y * w + first + i) * 3 + c];
                    next[(y * width + x) * 3 + c] = weighted(k, at);
                }
            }
        }
        (out, w) = (next, width);
    }
    if height != h {
        let taps = taps(h, height, filter);
        let mut next = vec![0u8; w * height * 3];
        for (y, (first, k)) in taps.iter().enumerate() {
            for x in 0..w {
                for c in 0..3 {
                    let at = |i: usize| out[((first + i) * w + x) * 3 + c];
                    next[(y * w + x) * 3 + c] = weighted(k, at);
                }
            }
        }
        out = next;
    }
    Rgb {
        width,
        height,
        pixels: out,
    }
}

/// PIL's fixed-point precision for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input pixel it reads and its fixed-point weights.
fn taps(from: usize, to: usize, filter: Filter) -> Vec<(usize, Vec<i64>)> {
    let scale = from as f64 / to as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    (0..to)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero.
            let first = ((center - support + 0.5) as i64).max(0) as usize;
            let last = ((center + support + 0.5) as i64).min(from as i64) as usize;
            let w: Vec<f64> = (first..last)
                .map(|x| filter.weight((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|v| {
                    let v = if total != 0.0 { v / total } else { *v };
                    let f = v * f64::from(1u32 << PRECISION_BITS);
                    (if f < 0.0 { f - 0.5 } else { f + 0.5 }) as i64
                })
                .collect();
            (first, fixed)
        })
        .collect()
}

/// CLIP's image preprocessing (transformers' CLIPImageProcessor, PIL backend): the shortest
/// edge resized to `shortest` (the long side `int(shortest·long/short)`), a centre crop of
/// `crop` (height, width), each channel `(v/255 - mean)/std`; `[1, 3, crop h, crop w]`.
pub fn clip_pixels(
    image: &Rgb,
    shortest: usize,
    crop: (usize, usize),
    filter: Filter,
    mean: [f32; 3],
    std: [f32; 3],
) -> ArrayD<f32> {
    let (w, h) = (image.width, image.height);
    let (nw, nh) = if w <= h {
        (shortest, (shortest as f64 * h as f64 / w as f64) as usize)
    } else {
        ((shortest as f64 * w as f64 / h as f64) as usize, shortest)
    };
    let resized = resize(image, nw, nh, filter);
    let (ch, cw) = crop;
    let top = nh.saturating_sub(ch) / 2;
    let left = nw.saturating_sub(cw) / 2;
    ArrayD::from_shape_fn(IxDyn(&[1, 3, ch, cw]), |ix| {
        let (c, y, x) = (ix[1], ix[2] + top, ix[3] + left);
        if y >= nh || x >= nw {
            return (0.0 - mean[c]) / std[c];
        }
        let v = f32::from(resized.pixels[(y * nw + x) * 3 + c]) * (1.0 / 255.0);
        (v - mean[c]) / std[c]
    })
}

/// One output sample: the weighted input samples, rounded, clamped to 8 bits.
fn weighted(k: &[i64], at: impl Fn(usize) -> u8) -> u8 {
    let mut sum = 1i64 << (PRECISION_BITS - 1);
    for (i, w) in k.iter().enumerate() {
        sum += i64::from(at(i)) * w;
    }
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoded_values_round_like_diffusers() {
        // −1 → 0, 1 → 255, 0 → 127.5 → 128 (numpy rounds half to even: 128), beyond clamps.
        let t = HostTensor::F32(
            ArrayD::from_shape_vec(
                IxDyn(&[1, 3, 1, 2]),
                vec![-1.0, 1.0, 0.0, 3.0, -7.0, f32::NAN],
            )
            .unwrap(),
        );
        let images = from_decoded(&t).unwrap();
        assert_eq!(images[0].pixels, [0, 128, 0, 255, 255, 0]);
    }

    #[test]
    fn a_png_round_trips_and_converts_to_the_encoders_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let image = Rgb {
            width: 2,
            height: 1,
            pixels: vec![0, 255, 51, 255, 0, 204],
        };
        write_png(&path, &image).unwrap();
        assert_eq!(read_png(&path).unwrap(), image);
        let HostTensor::F32(t) = to_tensor(&image) else {
            panic!()
        };
        assert_eq!(t.shape(), [1, 3, 1, 2]);
        let want = [-1.0, 1.0, 1.0, -1.0, -0.6, 0.6];
        for (got, want) in t.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{t:?}");
        }
        let HostTensor::F32(m) = to_mask(&image) else {
            panic!()
        };
        assert_eq!(m.as_slice().unwrap(), [1.0, 0.0]);
        std::fs::write(&path, b"not a png").unwrap();
        let err = read_png(&path).unwrap_err().to_string();
        assert!(
            err.contains("x.png") && err.contains("not a readable PNG"),
            "{err}"
        );
    }
}
