//! Weights derived from another tensor's data (converted to another float type, permuted to
//! channels-last), computed in blocks when they are written or read, never when a pass
//! decides them: a pass that converts 3.4 GB of weights only records what to do.
use std::borrow::Cow;
use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::{Tensor, TensorData};
use crate::error::{Error, Result};
use crate::onnx::{self, DataType};

/// One step from a source tensor's data to a derived tensor's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transform {
    /// Float values (fp32, fp16 or bf16) to another of those types, rounding to nearest even;
    /// to fp16, finite values beyond ±65504 are clamped to it (and counted).
    Convert(DataType),
    /// A 4-D OIHW weight to OHWI (channels last).
    ChannelsLast,
}

/// Data computed from `source`'s by `steps`: every conversion in order, then the permutation
/// (a conversion acts on each value alone, so converting first moves fewer bytes). The source
/// is never itself derived (steps are appended instead).
#[derive(Debug)]
pub struct Derived {
    source: Tensor,
    steps: Vec<Transform>,
    /// The types converted to, in order.
    converts: Vec<DataType>,
    /// (I, H·W) of the source's [O, I, H, W] when it is permuted.
    permute: Option<(usize, usize)>,
    from: DataType,
    to: DataType,
    elements: usize,
}

/// Values converted at a time (the buffers stay in cache).
const RUN: usize = 4096;
const F16_MAX: f32 = 65504.0;

/// Reusable buffers for [`Derived::compute_block`].
#[derive(Default)]
pub struct Scratch {
    values: Vec<f32>,
    halves: Vec<f16>,
    converted: Vec<u8>,
}

pub(super) fn float_type(data_type: i32) -> Option<DataType> {
    match DataType::try_from(data_type) {
        Ok(t @ (DataType::Float | DataType::Float16 | DataType::Bfloat16)) => Some(t),
        _ => None,
    }
}

fn width(t: DataType) -> usize {
    if t == DataType::Float { 4 } else { 2 }
}

impl Derived {
    /// `tensor`'s data followed by `step` (the source and steps of a derived `tensor`, then
    /// `step`). `None` where that cannot be expressed lazily: a second permutation.
    pub(super) fn new(tensor: &Tensor, step: Transform) -> Result<Option<Derived>> {
        let (source, mut steps) = match &tensor.data {
            TensorData::Derived(d) => (d.source.clone(), d.steps.clone()),
            _ => (tensor.clone(), Vec::new()),
        };
        if step == Transform::ChannelsLast && steps.contains(&Transform::ChannelsLast) {
            return Ok(None);
        }
        steps.push(step);
        let name = tensor.name();
        let converting = steps.iter().any(|s| matches!(s, Transform::Convert(_)));
        let from = match float_type(source.data_type()) {
            Some(t) => t,
            None if converting => return Err(Error::tensor(name, "is not a float tensor")),
            // Permuting only: any element type of a whole number of bytes.
            None => DataType::try_from(source.data_type())
                .map_err(|_| Error::tensor(name, "has an unknown data type"))?,
        };
        let converts: Vec<DataType> = steps
            .iter()
            .filter_map(|s| match s {
                Transform::Convert(t) => Some(*t),
                Transform::ChannelsLast => None,
            })
            .collect();
        if let Some(t) = converts.iter().find(|t| float_type(**t as i32).is_none()) {
            return Err(Error::tensor(
                name,
                format!("cannot be converted to {}", onnx::type_name(*t as i32)),
            ));
        }
        let to = converts.last().copied().unwrap_or(from);
        let elements = source
            .element_count()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| Error::tensor(name, "has no element count"))?;
        let permute = if steps.contains(&Transform::ChannelsLast) {
            let dims = source.dims();
            let [_, i, h, w] = dims else {
                return Err(Error::tensor(
                    name,
                    format!("dims {dims:?} are not 4-D (OIHW): cannot make it channels-last"),
                ));
            };
            let bits = onnx::element_bits(to as i32).unwrap_or(0);
            if bits == 0 || !bits.is_multiple_of(8) {
                return Err(Error::tensor(
                    name,
                    "elements are not whole bytes: cannot make it channels-last",
                ));
            }
            Some((*i as usize, (*h * *w) as usize))
        } else {
            None
        };
        Ok(Some(Derived {
            source,
            steps,
            converts,
            permute,
            from,
            to,
            elements,
        }))
    }

    /// The tensor the data is computed from.
    pub fn source(&self) -> &Tensor {
        &self.source
    }

    /// What is done to it, in order.
    pub fn steps(&self) -> &[Transform] {
        &self.steps
    }

    /// The derived data's type.
    pub fn data_type(&self) -> DataType {
        self.to
    }

    /// Its length in bytes (known without computing it).
    pub fn len(&self) -> usize {
        self.elements * self.out_width()
    }

    pub fn is_empty(&self) -> bool {
        self.elements == 0
    }

    fn in_width(&self) -> usize {
        onnx::element_bits(self.from as i32).map_or(1, |b| (b as usize).div_ceil(8))
    }

    fn out_width(&self) -> usize {
        onnx::element_bits(self.to as i32).map_or(1, |b| (b as usize).div_ceil(8))
    }

    /// Element ranges to compute one at a time, each about `bytes` of output or less (whole
    /// output channels when permuting: at least one), covering all of it in order.
    pub fn blocks(&self, bytes: usize) -> impl Iterator<Item = Range<usize>> + use<> {
        let row = match self.permute {
            Some((i, k)) => (i * k).max(1),
            None => 1,
        };
        let rows_per_block = (bytes / (row * self.out_width())).max(1);
        let step = rows_per_block * row;
        let elements = self.elements;
        (0..elements)
            .step_by(step.max(1))
            .map(move |a| a..(a + step).min(elements))
    }

    /// Bytes of output of an element range.
    pub fn block_len(&self, range: &Range<usize>) -> usize {
        range.len() * self.out_width()
    }

    /// Where in the source's bytes element `index` starts (the end of a block's reads).
    pub fn source_offset(&self, index: usize) -> usize {
        index * self.in_width()
    }

    /// Computes `range` of the output elements (a range from [`Derived::blocks`]) into `out`
    /// (exactly its bytes), reading `source` (the source's bytes, whole); returns how many
    /// values were clamped to the fp16 range.
    pub fn compute_block(
        &self,
        source: &[u8],
        range: Range<usize>,
        out: &mut [u8],
        scratch: &mut Scratch,
    ) -> u64 {
        let (wi, wo) = (self.in_width(), self.out_width());
        let src = &source[range.start * wi..range.end * wi];
        debug_assert_eq!(out.len(), range.len() * wo);
        let converts = &self.converts;
        let (i, k) = match self.permute {
            // [O, I, 1] and [O, 1, K] are laid out the same either way.
            Some((i, k)) if i > 1 && k > 1 => (i, k),
            _ => return convert(src, self.from, converts, out, scratch),
        };
        if converts.is_empty() {
            permute(src, out, i, k, wo);
            return 0;
        }
        // Whole output channels at a time, converted into a buffer that stays in cache.
        let rows = (RUN / (i * k)).max(1);
        let mut converted = std::mem::take(&mut scratch.converted);
        let mut clamped = 0;
        for (s, d) in src
            .chunks(rows * i * k * wi)
            .zip(out.chunks_mut(rows * i * k * wo))
        {
            converted.resize(d.len(), 0);
            clamped += convert(s, self.from, converts, &mut converted, scratch);
            permute(&converted, d, i, k, wo);
        }
        scratch.converted = converted;
        clamped
    }

    /// The source's bytes (what [`Derived::compute_block`] reads), checked against its dims.
    pub fn source_bytes(&self) -> Result<Cow<'_, [u8]>> {
        let source = self.source.bytes()?;
        let expected = self.elements * self.in_width();
        if source.len() != expected {
            return Err(Error::tensor(
                self.source.name(),
                format!(
                    "holds {} bytes, not the {expected} its dims call for",
                    source.len()
                ),
            ));
        }
        Ok(source)
    }

    /// All of the derived data, and how many values were clamped to the fp16 range.
    pub fn compute(&self) -> Result<(Vec<u8>, u64)> {
        let source = self.source_bytes()?;
        let mut out = vec![0u8; self.len()];
        let mut scratch = Scratch::default();
        let mut clamped = 0;
        let wo = self.out_width();
        for range in self.blocks(1 << 20) {
            let block = &mut out[range.start * wo..range.end * wo];
            clamped += self.compute_block(&source, range, block, &mut scratch);
        }
        Ok((out, clamped))
    }
}

/// Converts `src` (values of `from`) through each of `converts` in turn into `dst` (values
/// of the last one; a copy when there is none); returns the fp16 clamps.
fn convert(
    src: &[u8],
    from: DataType,
    converts: &[DataType],
    dst: &mut [u8],
    s: &mut Scratch,
) -> u64 {
    let Some(&to) = converts.last() else {
        dst.copy_from_slice(src);
        return 0;
    };
    let (wi, wo) = (width(from), width(to));
    s.values.resize(RUN, 0.0);
    s.halves.resize(RUN, f16::ZERO);
    let mut clamped = 0;
    for (si, di) in src.chunks(RUN * wi).zip(dst.chunks_mut(RUN * wo)) {
        let n = si.len() / wi;
        let values = &mut s.values[..n];
        let halves = &mut s.halves[..n];
        match from {
            DataType::Float => {
                for (v, b) in values.iter_mut().zip(si.as_chunks::<4>().0) {
                    *v = f32::from_le_bytes(*b);
                }
            }
            DataType::Float16 => {
                for (h, b) in halves.iter_mut().zip(si.as_chunks::<2>().0) {
                    *h = f16::from_le_bytes(*b);
                }
                halves.convert_to_f32_slice(values);
            }
            _ => {
                for (v, b) in values.iter_mut().zip(si.as_chunks::<2>().0) {
                    *v = bf16::from_le_bytes(*b).to_f32();
                }
            }
        }
        let last = converts.len() - 1;
        for (step, &t) in converts.iter().enumerate() {
            match t {
                DataType::Float16 => {
                    clamped += clamp_to_f16(values);
                    // The slice conversion uses the CPU's F16C instructions where it has them.
                    halves.convert_from_f32_slice(values);
                    if step < last {
                        halves.convert_to_f32_slice(values);
                    }
                }
                DataType::Bfloat16 if step < last => {
                    for v in values.iter_mut() {
                        *v = bf16::from_f32(*v).to_f32();
                    }
                }
                _ => {}
            }
        }
        match to {
            DataType::Float => {
                for (d, v) in di.as_chunks_mut::<4>().0.iter_mut().zip(values.iter()) {
                    *d = v.to_le_bytes();
                }
            }
            DataType::Float16 => {
                for (d, h) in di.as_chunks_mut::<2>().0.iter_mut().zip(halves.iter()) {
                    *d = h.to_le_bytes();
                }
            }
            _ => {
                for (d, v) in di.as_chunks_mut::<2>().0.iter_mut().zip(values.iter()) {
                    *d = bf16::from_f32(*v).to_le_bytes();
                }
            }
        }
    }
    clamped
}

/// Clamps finite values beyond fp16's range to ±65504; returns how many there were.
fn clamp_to_f16(values: &mut [f32]) -> u64 {
    let beyond = values
        .iter()
        .filter(|v| v.abs() > F16_MAX && v.is_finite())
        .count();
    if beyond > 0 {
        for v in values.iter_mut().filter(|v| v.is_finite()) {
            *v = v.clamp(-F16_MAX, F16_MAX);
        }
    }
    beyond as u64
}

/// Rows of [C, K] elements of `size` bytes to [K, C] (OIHW → OHWI with K = H·W).
fn permute(src: &[u8], dst: &mut [u8], c: usize, k: usize, size: usize) {
    match size {
        1 => permute_n::<1>(src, dst, c, k),
        2 => permute_n::<2>(src, dst, c, k),
        4 => permute_n::<4>(src, dst, c, k),
        8 => permute_n::<8>(src, dst, c, k),
        _ => {
            let row = c * k * size;
            for (s, d) in src.chunks_exact(row).zip(dst.chunks_exact_mut(row)) {
                for i in 0..c {
                    for yx in 0..k {
                        let (from, to) = ((i * k + yx) * size, (yx * c + i) * size);
                        d[to..to + size].copy_from_slice(&s[from..from + size]);
                    }
                }
            }
        }
    }
}

/// [`permute`] of `N`-byte elements: each output row written in runs of 16 channels, whose
/// reads (16 strided elements per kernel position) stay in cache.
fn permute_n<const N: usize>(src: &[u8], dst: &mut [u8], c: usize, k: usize) {
    const TILE: usize = 16;
    let (src, _) = src.as_chunks::<N>();
    let (dst, _) = dst.as_chunks_mut::<N>();
    for (s, d) in src.chunks_exact(c * k).zip(dst.chunks_exact_mut(c * k)) {
        for i0 in (0..c).step_by(TILE) {
            let i1 = (i0 + TILE).min(c);
            for yx in 0..k {
                let run = &mut d[yx * c + i0..yx * c + i1];
                for (j, x) in run.iter_mut().enumerate() {
                    *x = s[(i0 + j) * k + yx];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use super::super::DataFile;
    use super::*;

    /// `values` as fp32 bytes in a data file, and a tensor of `dims` mapping them.
    fn mapped(dir: &std::path::Path, values: &[f32], dims: &[i64]) -> Tensor {
        let path = dir.join("w.data");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&[7u8; 12]).unwrap(); // not at the file's start
        for v in values {
            f.write_all(&v.to_le_bytes()).unwrap();
        }
        drop(f);
        let file = Arc::new(DataFile::open("w.data", path).unwrap());
        let mut t = Tensor::new("w", DataType::Float, dims.to_vec(), Default::default());
        t.data = TensorData::External {
            file,
            offset: 12,
            len: values.len() * 4,
        };
        t
    }

    /// Converting then permuting, eagerly, element by element.
    fn eager_f16_channels_last(values: &[f32], [o, c, h, w]: [usize; 4]) -> (Vec<u8>, u64) {
        let mut clamped = 0;
        let half: Vec<f16> = values
            .iter()
            .map(|&v| {
                if v.is_finite() && v.abs() > F16_MAX {
                    clamped += 1;
                    f16::from_f32(v.clamp(-F16_MAX, F16_MAX))
                } else {
                    f16::from_f32(v)
                }
            })
            .collect();
        let mut out = vec![f16::ZERO; half.len()];
        for a in 0..o {
            for b in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        out[((a * h + y) * w + x) * c + b] = half[((a * c + b) * h + y) * w + x];
                    }
                }
            }
        }
        (out.iter().flat_map(|h| h.to_le_bytes()).collect(), clamped)
    }

    fn test_values(n: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        v[1] = 70000.0;
        v[5] = -1e9;
        v[7] = f32::INFINITY; // stays infinite: not counted
        v[9] = f32::NAN;
        v[n - 1] = 65504.0; // the largest fp16: not counted
        v
    }

    #[test]
    fn a_derived_tensor_equals_converting_then_permuting_eagerly() {
        let dir = tempfile::tempdir().unwrap();
        let dims = [5usize, 3, 3, 2];
        let values = test_values(dims.iter().product());
        let t = mapped(dir.path(), &values, &dims.map(|d| d as i64));
        let (converted, now) = t
            .transformed(Transform::Convert(DataType::Float16))
            .unwrap();
        let (nhwc, now2) = converted.transformed(Transform::ChannelsLast).unwrap();
        assert_eq!((now, now2), (0, 0), "nothing computed for mapped data");
        let TensorData::Derived(d) = &nhwc.data else {
            panic!("{:?}", nhwc.data)
        };
        assert_eq!(
            d.steps(),
            [
                Transform::Convert(DataType::Float16),
                Transform::ChannelsLast
            ]
        );
        assert!(matches!(d.source().data, TensorData::External { .. }));
        assert_eq!(nhwc.dims(), [5, 3, 2, 3]);
        assert_eq!(nhwc.data_type(), DataType::Float16 as i32);
        assert_eq!(nhwc.stored_len(), values.len() as u64 * 2);
        nhwc.check_len().unwrap();

        let (want, clamps) = eager_f16_channels_last(&values, dims);
        assert_eq!(clamps, 2);
        let (got, counted) = d.compute().unwrap();
        assert_eq!(got, want);
        assert_eq!(counted, 2);
        assert_eq!(&*nhwc.bytes().unwrap(), &want[..]);
        // Permuting first is the same (the steps are applied converting first).
        let (p, _) = t.transformed(Transform::ChannelsLast).unwrap();
        let (pc, _) = p
            .transformed(Transform::Convert(DataType::Float16))
            .unwrap();
        assert_eq!(&*pc.bytes().unwrap(), &want[..]);
        // Block by block (one output channel each), as the export writes it.
        let source = d.source_bytes().unwrap();
        let mut scratch = Scratch::default();
        let (mut joined, mut counted) = (Vec::new(), 0);
        for range in d.blocks(1) {
            assert_eq!(range.len(), 3 * 3 * 2);
            let mut block = vec![0u8; d.block_len(&range)];
            counted += d.compute_block(&source, range, &mut block, &mut scratch);
            joined.extend(block);
        }
        assert_eq!((joined, counted), (want, 2));
    }

    #[test]
    fn one_by_one_and_single_channel_weights_and_large_rows() {
        let dir = tempfile::tempdir().unwrap();
        for dims in [[6usize, 5, 1, 1], [4, 1, 3, 3], [3, 700, 3, 3]] {
            let values = test_values(dims.iter().product());
            let t = mapped(dir.path(), &values, &dims.map(|d| d as i64));
            let (c, _) = t
                .transformed(Transform::Convert(DataType::Float16))
                .unwrap();
            let (nhwc, _) = c.transformed(Transform::ChannelsLast).unwrap();
            let TensorData::Derived(d) = &nhwc.data else {
                panic!()
            };
            assert_eq!(d.compute().unwrap(), eager_f16_channels_last(&values, dims));
            // Permuted only: the fp32 bytes moved.
            let (p, _) = t.transformed(Transform::ChannelsLast).unwrap();
            let want: Vec<u8> = permuted_index(dims)
                .into_iter()
                .flat_map(|from| values[from].to_le_bytes())
                .collect();
            assert_eq!(&*p.bytes().unwrap(), &want[..], "{dims:?}");
        }
    }

    /// For each OHWI position, the OIHW index it comes from.
    fn permuted_index([o, c, h, w]: [usize; 4]) -> Vec<usize> {
        let mut from = Vec::new();
        for a in 0..o {
            for y in 0..h {
                for x in 0..w {
                    for b in 0..c {
                        from.push(((a * c + b) * h + y) * w + x);
                    }
                }
            }
        }
        from
    }

    #[test]
    fn owned_data_is_converted_now_and_its_clamps_counted() {
        let dims = [4usize, 2, 1, 3];
        let values = test_values(24);
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = Tensor::new("w", DataType::Float, vec![4, 2, 1, 3], bytes.into());
        let (c, clamped) = t
            .transformed(Transform::Convert(DataType::Float16))
            .unwrap();
        assert_eq!(clamped, 2);
        assert!(matches!(c.data, TensorData::Owned(_)));
        let (p, _) = c.transformed(Transform::ChannelsLast).unwrap();
        assert!(matches!(p.data, TensorData::Owned(_)));
        assert_eq!(
            p.bytes().unwrap().into_owned(),
            eager_f16_channels_last(&values, dims).0
        );
    }

    #[test]
    fn chained_conversions_round_through_each_type() {
        let dir = tempfile::tempdir().unwrap();
        let values = [1.0f32 + 1.0 / 1024.0 + 1.0 / 4096.0, 2.71, -2.5e-8, 1e5];
        let t = mapped(dir.path(), &values, &[4]);
        let (h, _) = t
            .transformed(Transform::Convert(DataType::Float16))
            .unwrap();
        let (b, _) = h
            .transformed(Transform::Convert(DataType::Bfloat16))
            .unwrap();
        let (f, _) = b.transformed(Transform::Convert(DataType::Float)).unwrap();
        let TensorData::Derived(d) = &f.data else {
            panic!()
        };
        assert_eq!(d.steps().len(), 3);
        let got: Vec<f32> = f
            .bytes()
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let want: Vec<f32> = values
            .iter()
            .map(|v| {
                let h = f16::from_f32(v.clamp(-F16_MAX, F16_MAX)).to_f32();
                bf16::from_f32(h).to_f32()
            })
            .collect();
        assert_eq!(got, want);
        assert_eq!(d.compute().unwrap().1, 1);
        // The same type: the same tensor. A non-float tensor: refused, naming it.
        let (same, _) = t.transformed(Transform::Convert(DataType::Float)).unwrap();
        assert!(matches!(same.data, TensorData::External { .. }));
        let ints = Tensor::new("ids", DataType::Int64, vec![1], vec![0u8; 8].into());
        let e = ints
            .transformed(Transform::Convert(DataType::Float16))
            .unwrap_err();
        assert!(e.to_string().contains("ids"), "{e}");
    }
}
