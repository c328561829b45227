//! Host tensors: what goes into and comes out of a backend, and what .npy/.safetensors hold.
use half::f16;
use ndarray::{ArrayD, IxDyn};

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

    /// The same values as another type: floats of the other width (f32 <-> f16), and floats
    /// that are all whole numbers as integers (a float timestep for an int64 one); `None`
    /// otherwise.
    pub fn float_as(&self, dtype: DType) -> Option<HostTensor> {
        match (self, dtype) {
            (HostTensor::F32(a), DType::F16) => Some(HostTensor::F16(a.mapv(f16::from_f32))),
            (HostTensor::F16(a), DType::F32) => Some(HostTensor::F32(a.mapv(f16::to_f32))),
            (HostTensor::F32(_) | HostTensor::F16(_), DType::I64 | DType::I32) => {
                let limit = match dtype {
                    DType::I64 => 2f64.powi(53),
                    _ => f64::from(i32::MAX),
                };
                let values = self.to_f64();
                if !values.iter().all(|v| v.fract() == 0.0 && v.abs() <= limit) {
                    return None;
                }
                let shape = IxDyn(self.shape());
                let ints = values.iter().map(|v| *v as i64);
                Some(match dtype {
                    DType::I64 => {
                        HostTensor::I64(ArrayD::from_shape_vec(shape, ints.collect()).ok()?)
                    }
                    _ => HostTensor::I32(
                        ArrayD::from_shape_vec(shape, ints.map(|v| v as i32).collect()).ok()?,
                    ),
                })
            }
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
        let needed = byte_count(dtype, shape).ok_or_else(|| {
            Error::Inputs(format!(
                "{what}: shape {shape:?} {} is too large to hold in memory",
                dtype.name()
            ))
        })?;
        if bytes.len() != needed {
            return Err(Error::Inputs(format!(
                "{what}: {} bytes of data for shape {shape:?} {} (needs {needed})",
                bytes.len(),
                dtype.name(),
            )));
        }
        let dims = ndarray::IxDyn(shape);
        let bad_shape =
            |e: ndarray::ShapeError| Error::Inputs(format!("{what}: shape {shape:?}: {e}"));
        Ok(match dtype {
            DType::F32 => HostTensor::F32(
                ArrayD::from_shape_vec(dims, decode(bytes, f32::from_le_bytes))
                    .map_err(bad_shape)?,
            ),
            DType::F16 => HostTensor::F16(
                ArrayD::from_shape_vec(dims, decode(bytes, f16::from_le_bytes))
                    .map_err(bad_shape)?,
            ),
            DType::I64 => HostTensor::I64(
                ArrayD::from_shape_vec(dims, decode(bytes, i64::from_le_bytes))
                    .map_err(bad_shape)?,
            ),
            DType::I32 => HostTensor::I32(
                ArrayD::from_shape_vec(dims, decode(bytes, i32::from_le_bytes))
                    .map_err(bad_shape)?,
            ),
            DType::Bool => HostTensor::Bool(
                ArrayD::from_shape_vec(dims, bytes.iter().map(|b| *b != 0).collect())
                    .map_err(bad_shape)?,
            ),
        })
    }
}

/// Elements in `shape`; `None` when the count (or the product of the non-zero dims, which
/// ndarray also needs) does not fit in `isize`.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    isize::try_from(nonzero).ok()?;
    Some(if shape.contains(&0) { 0 } else { nonzero })
}

/// Bytes a tensor of `shape` takes; `None` when that overflows `isize`.
pub fn byte_count(dtype: DType, shape: &[usize]) -> Option<usize> {
    let bytes = element_count(shape)?.checked_mul(dtype.size())?;
    isize::try_from(bytes).ok().map(|_| bytes)
}

/// Values of `N` little-endian bytes each (`bytes.len()` is a multiple of `N`).
fn decode<T, const N: usize>(bytes: &[u8], from_le: fn([u8; N]) -> T) -> Vec<T> {
    let (chunks, _) = bytes.as_chunks::<N>();
    chunks.iter().map(|c| from_le(*c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_floats_become_integers_and_fractions_do_not() {
        let t =
            |v: Vec<f32>| HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v).unwrap());
        let ints = t(vec![999.0, 0.0, -3.0]).float_as(DType::I64).unwrap();
        assert_eq!(
            ints,
            HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[3]), vec![999, 0, -3]).unwrap())
        );
        assert!(t(vec![999.5]).float_as(DType::I64).is_none());
        assert!(t(vec![f32::NAN]).float_as(DType::I32).is_none());
        assert!(t(vec![3e9]).float_as(DType::I32).is_none());
        assert!(matches!(
            t(vec![1.5]).float_as(DType::F16),
            Some(HostTensor::F16(_))
        ));
    }
}
