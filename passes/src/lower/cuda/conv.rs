//! Conv → `com.microsoft.NhwcConv` (weights stored [M, kH, kW, C]) between Transposes.
use std::collections::HashSet;

use attune_compiler::ir::{Graph, NodeId, ValueId};
use attune_compiler::onnx::{DataType, TensorProto};
use attune_compiler::patch::{In, Patch};
use attune_compiler::weights::{Tensor, Transform};

use super::super::precision::convert_tensor;
use super::{Site, channels_last};

/// How NhwcConv weights are stored: in `low` (the precision pass's type) for the convolutions
/// of the data path, which that pass will run in `low` anyway, so the export writes half the
/// bytes. The stored weights are derived tensors (converted, then permuted to channels-last,
/// when written; see `Tensor::transformed`): nothing is computed here. `clamped` counts fp16
/// range clamps of weights computed now (pass-made ones); the export counts the others.
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
    // Converted (when stored low) and permuted as the export writes it, converted first:
    // half the bytes to move.
    let (source, clamped) = match store
        .low
        .filter(|_| dtype == DataType::Float && store.data.contains(&x))
    {
        Some(low) => convert_tensor(weight, low as i32).map_err(|e| e.to_string())?,
        None => (weight.clone(), 0),
    };
    store.clamped += clamped;
    let (permuted, _) = source
        .transformed(Transform::ChannelsLast)
        .map_err(|e| e.to_string())?;
    let stored = Tensor {
        proto: TensorProto {
            name: format!("{}_nhwc", weight.name()),
            data_type: permuted.data_type(),
            dims: nhwc_dims,
            ..Default::default()
        },
        data: permuted.data,
    };
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
