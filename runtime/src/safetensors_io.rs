//! `.safetensors` files of host tensors (f32, f16, i64, i32, bool).
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor};

/// A LoRA adapter (`compile --lora-mode adapter`, `attune lora-adapter`): every tensor, each
/// float checked finite as LoRA files are (a NaN factor runs and makes every output NaN).
pub fn read_adapter(path: &Path) -> Result<Vec<(String, HostTensor)>> {
    let tensors = read(path)?;
    for (name, t) in &tensors {
        let values = match t {
            HostTensor::F32(_) | HostTensor::F16(_) => t.to_f64(),
            _ => continue,
        };
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::file(
                path,
                format!(
                    "tensor '{name}' holds a non-finite value ({}) at element {i}: an adapter's factors must be finite",
                    values[i]
                ),
            ));
        }
    }
    Ok(tensors)
}

/// Every tensor in the file, in the file's name order.
pub fn read(path: &Path) -> Result<Vec<(String, HostTensor)>> {
    let bytes = attune_compiler::files::read_regular(path)?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::file(path, format!("not a valid .safetensors file: {e}")))?;
    let mut out = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    for name in names {
        let view = st
            .tensor(&name)
            .map_err(|e| Error::file(path, format!("tensor '{name}': {e}")))?;
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::I64 => DType::I64,
            Dtype::I32 => DType::I32,
            Dtype::BOOL => DType::Bool,
            other => {
                return Err(Error::file(
                    path,
                    format!("tensor '{name}': element type {other:?} is not supported"),
                ));
            }
        };
        let what = format!("tensor '{name}'");
        let t = HostTensor::from_le_bytes(dtype, view.shape(), view.data(), &what)
            .map_err(|e| Error::file(path, e.to_string()))?;
        out.push((name, t));
    }
    Ok(out)
}

/// Writes tensors atomically.
pub fn write(path: &Path, tensors: &[(String, HostTensor)]) -> Result<()> {
    let data: Vec<(String, Vec<u8>, DType, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.to_le_bytes(), t.dtype(), t.shape().to_vec()))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, bytes, dtype, shape)| {
            let dt = match dtype {
                DType::F32 => Dtype::F32,
                DType::F16 => Dtype::F16,
                DType::I64 => Dtype::I64,
                DType::I32 => Dtype::I32,
                DType::Bool => Dtype::BOOL,
            };
            (
                n.clone(),
                TensorView::new(dt, shape.clone(), bytes).expect("sizes match by construction"),
            )
        })
        .collect();
    let bytes =
        safetensors::serialize(views, None).map_err(|e| Error::file(path, e.to_string()))?;
    crate::npy::write_atomic(path, &bytes)
}
