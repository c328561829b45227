//! `.npy` files (format 1.0-3.0, little-endian, C or Fortran order) for f32, f16, i64, i32
//! and bool. Writes are atomic.
use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::{self, DType, HostTensor};

const MAGIC: &[u8] = b"\x93NUMPY";

pub fn read(path: &Path) -> Result<HostTensor> {
    let bytes = attune_compiler::files::read_regular(path)?;
    parse(&bytes).map_err(|msg| Error::file(path, format!("not a valid .npy file: {msg}")))
}

fn parse(bytes: &[u8]) -> std::result::Result<HostTensor, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("missing the \\x93NUMPY magic".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
            12,
        ),
        v => return Err(format!("unsupported format version {v}")),
    };
    let header = bytes
        .get(start..start + header_len)
        .ok_or("header runs past the end of the file")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let descr = dict_value(header, "descr").ok_or("header has no 'descr'")?;
    let fortran = dict_value(header, "fortran_order")
        .ok_or("header has no 'fortran_order'")?
        .starts_with("True");
    let shape_text = dict_value(header, "shape").ok_or("header has no 'shape'")?;
    let shape: Vec<usize> = shape_text
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape {shape_text}"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let dtype = match descr {
        "<f4" => DType::F32,
        "<f2" => DType::F16,
        "<i8" => DType::I64,
        "<i4" => DType::I32,
        "|b1" => DType::Bool,
        other if other.starts_with('>') => {
            return Err(format!("big-endian data ('{other}') is not supported"));
        }
        other => {
            return Err(format!(
                "element type '{other}' is not supported (f32, f16, i64, i32, bool are)"
            ));
        }
    };
    let data = &bytes[start + header_len..];
    let needed = tensor::byte_count(dtype, &shape).ok_or_else(|| {
        format!(
            "shape {shape:?} {} is too large to hold in memory",
            dtype.name()
        )
    })?;
    if data.len() != needed {
        return Err(format!(
            "{} bytes of data for shape {shape:?} {} (needs {needed})",
            data.len(),
            dtype.name(),
        ));
    }
    if !fortran {
        return HostTensor::from_le_bytes(dtype, &shape, data, "npy").map_err(|e| e.to_string());
    }
    // Fortran order is C order of the reversed shape, transposed back.
    let reversed: Vec<usize> = shape.iter().rev().copied().collect();
    let t = HostTensor::from_le_bytes(dtype, &reversed, data, "npy").map_err(|e| e.to_string())?;
    Ok(match t {
        HostTensor::F32(a) => HostTensor::F32(a.reversed_axes().as_standard_layout().into_owned()),
        HostTensor::F16(a) => HostTensor::F16(a.reversed_axes().as_standard_layout().into_owned()),
        HostTensor::I64(a) => HostTensor::I64(a.reversed_axes().as_standard_layout().into_owned()),
        HostTensor::I32(a) => HostTensor::I32(a.reversed_axes().as_standard_layout().into_owned()),
        HostTensor::Bool(a) => {
            HostTensor::Bool(a.reversed_axes().as_standard_layout().into_owned())
        }
    })
}

/// The text after `'key':` in a header dict, up to the next top-level comma.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = header[at + key.len() + 2..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    let mut depth = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    Some(rest.trim())
}

/// The file's bytes for a tensor (format 1.0, header padded to 64 bytes like numpy's).
pub fn encode(t: &HostTensor) -> Vec<u8> {
    let descr = match t.dtype() {
        DType::F32 => "<f4",
        DType::F16 => "<f2",
        DType::I64 => "<i8",
        DType::I32 => "<i4",
        DType::Bool => "|b1",
    };
    let shape = t.shape();
    let shape = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(header.len() + 10 + t.len() * t.dtype().size());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&t.to_le_bytes());
    out
}

/// Writes a tensor atomically (temp file + rename).
pub fn write(path: &Path, t: &HostTensor) -> Result<()> {
    write_atomic(path, &encode(t))
}

/// As the compiler writes its outputs: a temp file in the same folder (mode 644), renamed.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(attune_compiler::export::write_file(path, bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::ArrayD;

    /// The bytes with the first `from` replaced by `to` (headers are ASCII; the magic is not).
    fn edit(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
        let at = bytes
            .windows(from.len())
            .position(|w| w == from.as_bytes())
            .expect("present");
        [&bytes[..at], to.as_bytes(), &bytes[at + from.len()..]].concat()
    }

    #[test]
    fn round_trip_every_dtype() {
        let shape = ndarray::IxDyn(&[2, 3]);
        let cases = [
            HostTensor::F32(
                ArrayD::from_shape_vec(shape.clone(), vec![1.5, -2.0, 3.0, 0.0, 1e-8, 7.0])
                    .unwrap(),
            ),
            HostTensor::F16(
                ArrayD::from_shape_vec(
                    shape.clone(),
                    [1.5f32, -2.0, 3.0, 0.0, 1e-3, 7.0]
                        .map(half::f16::from_f32)
                        .to_vec(),
                )
                .unwrap(),
            ),
            HostTensor::I64(
                ArrayD::from_shape_vec(shape.clone(), vec![1, -2, 3, 4, 5, i64::MAX]).unwrap(),
            ),
            HostTensor::I32(
                ArrayD::from_shape_vec(shape.clone(), vec![1, -2, 3, 4, 5, 6]).unwrap(),
            ),
            HostTensor::Bool(
                ArrayD::from_shape_vec(shape, vec![true, false, true, true, false, false]).unwrap(),
            ),
        ];
        for t in cases {
            let bytes = encode(&t);
            assert_eq!((bytes.len() - t.len() * t.dtype().size()) % 64, 0);
            assert_eq!(parse(&bytes).unwrap(), t);
        }
    }

    #[test]
    fn fortran_order_is_transposed() {
        let mut bytes = encode(&HostTensor::I32(
            ArrayD::from_shape_vec(ndarray::IxDyn(&[3, 2]), vec![1, 2, 3, 4, 5, 6]).unwrap(),
        ));
        bytes = edit(
            &bytes,
            "'fortran_order': False, 'shape': (3, 2)",
            "'fortran_order': True, 'shape': (2, 3) ",
        );
        let want = HostTensor::I32(
            ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 3]), vec![1, 3, 5, 2, 4, 6]).unwrap(),
        );
        assert_eq!(parse(&bytes).unwrap(), want);
    }

    #[test]
    fn corrupt_files_are_errors() {
        let good = encode(&HostTensor::F32(ArrayD::zeros(ndarray::IxDyn(&[4]))));
        assert!(
            parse(&good[..good.len() - 1])
                .unwrap_err()
                .contains("bytes of data")
        );
        assert!(parse(b"not numpy at all").unwrap_err().contains("magic"));
        assert!(parse(&good[..20]).unwrap_err().contains("past the end"));
        let f64_file = edit(&good, "<f4", "<f8");
        assert!(
            parse(&f64_file)
                .unwrap_err()
                .contains("'<f8' is not supported")
        );
    }
}
