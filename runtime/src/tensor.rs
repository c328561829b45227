//! Host tensors: what goes into and comes out of a backend, and what .npy/.safetensors hold.
use half::f16;
use ndarray::ArrayD;

use crate::error::{Error, Result};

/// Element types attune moves between files and runtimes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    I64,
    I32,
    Bool,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::Bool => "bool",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 => 2,
            DType::I64 => 8,
            DType::Bool => 1,
        }
    }

    /// From an ONNX `TensorProto.DataType`.
    pub fn from_onnx(data_type: i32) -> Option<DType> {
        use attune_compiler::onnx::DataType as D;
        Some(match D::try_from(data_type).ok()? {
            D::Float => DType::F32,
            D::Float16 => DType::F16,
            D::Int64 => DType::I64,
            D::Int32 => DType::I32,
            D::Bool => DType::Bool,
            _ => return None,
        })
    }
}

/// A dense host tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum HostTensor {
    F32(ArrayD<f32>),
    F16(ArrayD<f16>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
    Bool(ArrayD<bool>),
}

#[allow(unused_macros)]
macro_rules! each {
    ($t:expr, $a:ident => $e:expr) => {
        match $t {
            HostTensor::F32($a) => $e,
            HostTensor::F16($a) => $e,
            HostTensor::I64($a) => $e,
            HostTensor::I32($a) => $e,
            HostTensor::Bool($a) => $e,
        }
    };
}

impl HostTensor {
    pub fn dtype(&self) -> DType {
        match self {
            HostTensor::F32(_) => DType::F32,
            HostTensor::F16(_) => DType::F16,
            HostTensor::I64(_) => DType::I64,
            HostTensor::I32(_) => DType::I32,
            HostTensor::Bool(_) => DType::Bool,
        }
    }

    pub fn shape(&self) -> &[usize] {
        each!(self, a => a.shape())
    }

    pub fn len(&self) -> usize {
        each!(self, a => a.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values widened to f64 (for numeric comparison).
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            HostTensor::F32(a) => a.iter().map(|v| *v as f64).collect(),
            HostTensor::F16(a) => a.iter().map(|v| v.to_f64()).collect(),
            HostTensor::I64(a) => a.iter().map(|v| *v as f64).collect(),
            HostTensor::I32(a) => a.iter().map(|v| *v as f64).collect(),
            HostTensor::Bool(a) => a.iter().map(|v| *v as u8 as f64).collect(),
        }
    }

    /// The same values as another float type (f32 <-> f16); `None` unless both are floats.
    pub fn float_as(&self, dtype: DType) -> Option<HostTensor> {
        match (self, dtype) {
            (HostTensor::F32(a), DType::F16) => Some(HostTensor::F16(a.mapv(f16::from_f32))),
            (HostTensor::F16(a), DType::F32) => Some(HostTensor::F32(a.mapv(f16::to_f32))),
            _ => None,
        }
    }

    /// Little-endian bytes in C order.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            HostTensor::F32(a) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            HostTensor::F16(a) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            HostTensor::I64(a) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            HostTensor::I32(a) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            HostTensor::Bool(a) => a.iter().map(|v| *v as u8).collect(),
        }
    }

    /// From little-endian bytes in C order; `what` names the source in errors.
    pub fn from_le_bytes(dtype: DType, shape: &[usize], bytes: &[u8], what: &str) -> Result<Self> {
        let count: usize = shape.iter().product();
        if bytes.len() != count * dtype.size() {
            return Err(Error::Inputs(format!(
                "{what}: {} bytes of data for shape {shape:?} {} (needs {})",
                bytes.len(),
                dtype.name(),
                count * dtype.size()
            )));
        }
        let shape = ndarray::IxDyn(shape);
        let arr = |v| Ok(v);
        match dtype {
            DType::F32 => arr(HostTensor::F32(
                ArrayD::from_shape_vec(
                    shape,
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                )
                .unwrap(),
            )),
            DType::F16 => arr(HostTensor::F16(
                ArrayD::from_shape_vec(
                    shape,
                    bytes
                        .chunks_exact(2)
                        .map(|c| f16::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                )
                .unwrap(),
            )),
            DType::I64 => arr(HostTensor::I64(
                ArrayD::from_shape_vec(
                    shape,
                    bytes
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                )
                .unwrap(),
            )),
            DType::I32 => arr(HostTensor::I32(
                ArrayD::from_shape_vec(
                    shape,
                    bytes
                        .chunks_exact(4)
                        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                )
                .unwrap(),
            )),
            DType::Bool => arr(HostTensor::Bool(
                ArrayD::from_shape_vec(shape, bytes.iter().map(|b| *b != 0).collect()).unwrap(),
            )),
        }
    }
}
