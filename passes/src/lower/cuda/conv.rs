//! Conv → `com.microsoft.NhwcConv` (weights stored [M, kH, kW, C]) between Transposes.
use std::collections::HashSet;

use attune_compiler::ir::{Graph, NodeId, ValueId};
use attune_compiler::onnx::DataType;
use attune_compiler::patch::{In, Patch};
use attune_compiler::weights::Tensor;

use super::super::precision::convert_tensor;
use super::{Site, channels_last};

/// How NhwcConv weights are stored: in `low` (the precision pass's type) for the convolutions
/// of the data path, which that pass will run in `low` anyway; this halves what the compile
/// holds (the transposed weights are new tensors). `clamped` counts fp16 range clamps.
pub struct WeightStore {
    pub low: Option<DataType>,
    pub data: HashSet<ValueId>,
    pub clamped: usize,
}

/// Conv → Transpose → NhwcConv → Transpose, or why the conv stays. A conv reading another
/// conv of the same patch reads its replacement.
pub fn nhwc_conv(
    p: &mut Patch,
    g: &Graph,
    conv: NodeId,
    store: &mut WeightStore,
) -> std::result::Result<(), String> {
    let node = g.node(conv);
    let x = g.input(conv, 0).ok_or("no input")?;
    let w = g.input(conv, 1).ok_or("no weight")?;
    // A 4-D weight makes it a 2-D convolution of a 4-D (NCHW) input.
    let weight = g
        .initializer(w)
        .filter(|t| t.dims().len() == 4)
        .ok_or("its weight is not a 4-D initializer")?;
    if node.attr("group").is_some_and(|a| a.i != 1) {
        return Err("grouped convolution".into());
    }
    let y = g.output(conv).ok_or("no output")?;
    let dims = weight.dims().to_vec();
    let dtype = DataType::try_from(weight.data_type()).map_err(|_| "unknown weight type")?;
    let module = node.module.clone();
    let after = Some(conv);
    let nhwc_dims = vec![dims[0], dims[2], dims[3], dims[1]];
    // Converted first (when stored low), then permuted: half the bytes to move.
    let source = match store
        .low
        .filter(|_| dtype == DataType::Float && store.data.contains(&x))
    {
        Some(low) => {
            let (converted, clamped) =
                convert_tensor(weight, low as i32).map_err(|e| e.to_string())?;
            store.clamped += clamped;
            converted
        }
        None => weight.clone(),
    };
    let stored_type = DataType::try_from(source.data_type()).map_err(|_| "unknown weight type")?;
    let permuted = to_channels_last(&source.bytes().map_err(|e| e.to_string())?, &dims);
    weight.release();
    let stored = Tensor::new(
        format!("{}_nhwc", weight.name()),
        stored_type,
        nhwc_dims,
        permuted.into(),
    );
    let w_nhwc = p.tensor(stored);
    let x = p.current(x);
    let mut rest = vec![In::New(w_nhwc)];
    rest.extend(g.input(conv, 2).map(In::Value));
    let attrs = node.proto.attribute.clone();
    let at = Site {
        module: &module,
        after,
    };
    let nchw = channels_last(p, &at, "NhwcConv", x, rest, attrs, 1).remove(0);
    p.replace(y, In::New(nchw));
    Ok(())
}

/// OIHW weight bytes as OHWI (elements moved whole: 2, 4 or 8 bytes).
fn to_channels_last(data: &[u8], dims: &[i64]) -> Vec<u8> {
    let [m, c, kh, kw] = [dims[0], dims[1], dims[2], dims[3]].map(|d| d as usize);
    let count = m * c * kh * kw;
    match data.len() / count.max(1) {
        2 => permute::<2>(data, c, kh * kw),
        4 => permute::<4>(data, c, kh * kw),
        8 => permute::<8>(data, c, kh * kw),
        size => {
            let mut out = vec![0u8; data.len()];
            for from in 0..count {
                let (o, rest) = (from / (c * kh * kw), from % (c * kh * kw));
                let (i, yx) = (rest / (kh * kw), rest % (kh * kw));
                let to = (o * kh * kw + yx) * c + i;
                out[to * size..(to + 1) * size]
                    .copy_from_slice(&data[from * size..(from + 1) * size]);
            }
            out
        }
    }
}

/// [M, C, K] → [M, K, C] of `N`-byte elements.
fn permute<const N: usize>(data: &[u8], c: usize, k: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    let block = c * k * N;
    for (src, dst) in data.chunks_exact(block).zip(out.chunks_exact_mut(block)) {
        for i in 0..c {
            for yx in 0..k {
                let from = (i * k + yx) * N;
                let to = (yx * c + i) * N;
                dst[to..to + N].copy_from_slice(&src[from..from + N]);
            }
        }
    }
    out
}
