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
    let data = weight.bytes().map_err(|e| e.to_string())?;
    let dtype = DataType::try_from(weight.data_type()).map_err(|_| "unknown weight type")?;
    let module = node.module.clone();
    let after = Some(conv);
    let nhwc_dims = vec![dims[0], dims[2], dims[3], dims[1]];
    let mut stored = Tensor::new(
        format!("{}_nhwc", weight.name()),
        dtype,
        nhwc_dims,
        to_channels_last(&data, &dims).into(),
    );
    drop(data);
    weight.release();
    if let Some(low) = store
        .low
        .filter(|_| dtype == DataType::Float && store.data.contains(&x))
    {
        let (converted, clamped) =
            convert_tensor(&stored, low as i32).map_err(|e| e.to_string())?;
        store.clamped += clamped;
        stored = converted;
    }
    let bytes = stored.bytes().map_err(|e| e.to_string())?.into_owned();
    let stored_type = DataType::try_from(stored.data_type()).map_err(|_| "unknown weight type")?;
    let w_nhwc = p.constant(stored.name(), stored_type, stored.dims().to_vec(), bytes);
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

/// OIHW weight bytes as OHWI.
fn to_channels_last(data: &[u8], dims: &[i64]) -> Vec<u8> {
    let [m, c, kh, kw] = [dims[0], dims[1], dims[2], dims[3]].map(|d| d as usize);
    let size = data.len() / (m * c * kh * kw).max(1);
    let mut out = vec![0u8; data.len()];
    for o in 0..m {
        for i in 0..c {
            for y in 0..kh {
                for x in 0..kw {
                    let from = ((o * c + i) * kh + y) * kw + x;
                    let to = ((o * kh + y) * kw + x) * c + i;
                    out[to * size..(to + 1) * size]
                        .copy_from_slice(&data[from * size..(from + 1) * size]);
                }
            }
        }
    }
    out
}
