//! Evaluating a node whose inputs are all constants (constant folding). Covers what exporters
//! compute from weights and sizes: data movement (Transpose, Concat, Slice, Gather, ...),
//! Cast, Shape, and elementwise arithmetic with broadcasting. Anything else, any malformed
//! node, and any output over [`MAX_ELEMENTS`] is `None`: the node stays as it is.
use bytes::Bytes;

use attune_compiler::ir::Node;
use attune_compiler::onnx::{self, DataType};

/// A constant operand: element type, dims and little-endian bytes.
#[derive(Clone, Debug)]
pub struct Const {
    pub dtype: DataType,
    pub dims: Vec<usize>,
    pub data: Bytes,
}

/// Folded outputs larger than this stay computed (a broadcast or a Range can make a small
/// graph build a huge tensor).
const MAX_ELEMENTS: usize = 1 << 27;
/// Ops that make more data than they read are folded only up to this size.
const MAX_GROWN: usize = 1 << 16;

impl Const {
    fn count(&self) -> usize {
        self.dims.iter().product()
    }
    fn width(&self) -> usize {
        elem_size(self.dtype)
    }
    fn ints(&self) -> Option<Vec<i64>> {
        let d = &self.data;
        Some(match self.dtype {
            DataType::Int64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DataType::Int32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            DataType::Int8 => d.iter().map(|&b| b as i8 as i64).collect(),
            DataType::Uint8 | DataType::Bool => d.iter().map(|&b| b as i64).collect(),
            _ => return None,
        })
    }
    fn floats(&self) -> Option<Vec<f64>> {
        let d = &self.data;
        Some(match self.dtype {
            DataType::Float => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DataType::Double => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DataType::Float16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            DataType::Bfloat16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            _ => return None,
        })
    }
    /// Every element as f64 (floats and integers).
    pub fn values(&self) -> Option<Vec<f64>> {
        self.floats()
            .or_else(|| Some(self.ints()?.iter().map(|&i| i as f64).collect()))
    }
    fn of_ints(dtype: DataType, dims: Vec<usize>, v: &[i64]) -> Option<Const> {
        let data: Vec<u8> = match dtype {
            DataType::Int64 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DataType::Int32 => v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect(),
            DataType::Int8 | DataType::Uint8 => v.iter().map(|&x| x as u8).collect(),
            DataType::Bool => v.iter().map(|&x| (x != 0) as u8).collect(),
            _ => return None,
        };
        Some(Const {
            dtype,
            dims,
            data: data.into(),
        })
    }
    fn of_floats(dtype: DataType, dims: Vec<usize>, v: &[f64]) -> Option<Const> {
        let data: Vec<u8> = match dtype {
            DataType::Float => v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
            DataType::Double => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DataType::Float16 => v
                .iter()
                .flat_map(|&x| half::f16::from_f64(x).to_le_bytes())
                .collect(),
            DataType::Bfloat16 => v
                .iter()
                .flat_map(|&x| half::bf16::from_f64(x).to_le_bytes())
                .collect(),
            _ => return None,
        };
        Some(Const {
            dtype,
            dims,
            data: data.into(),
        })
    }
    fn with_dims(&self, dims: Vec<usize>) -> Const {
        Const {
            dims,
            ..self.clone()
        }
    }
}

pub fn elem_size(t: DataType) -> usize {
    onnx::element_bits(t as i32).map_or(0, |b| (b / 8) as usize)
}

fn is_float(t: DataType) -> bool {
    matches!(
        t,
        DataType::Float | DataType::Double | DataType::Float16 | DataType::Bfloat16
    )
}

fn is_int(t: DataType) -> bool {
    matches!(
        t,
        DataType::Int64 | DataType::Int32 | DataType::Int8 | DataType::Uint8 | DataType::Bool
    )
}

/// Row-major strides of `dims`.
fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// The next row-major index into `dims` (an odometer).
fn advance(idx: &mut [usize], dims: &[usize]) {
    for k in (0..idx.len()).rev() {
        idx[k] += 1;
        if idx[k] < dims[k] {
            return;
        }
        idx[k] = 0;
    }
}

/// `axis` (negative from the end) as an index into `rank` dims (`rank + 1` for insertions).
fn axis(a: i64, rank: usize) -> Option<usize> {
    let a = if a < 0 { a + rank as i64 } else { a };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

fn int_attr(node: &Node, name: &str) -> Option<i64> {
    node.attr(name).map(|a| a.i)
}

fn ints_attr(node: &Node, name: &str) -> Option<Vec<i64>> {
    node.attr(name).map(|a| a.ints.clone())
}

/// The outputs of `node` applied to `inputs` (all present inputs constant), or `None`.
pub fn eval(node: &Node, inputs: &[Option<Const>], opset: i64) -> Option<Vec<Const>> {
    let x = || inputs.first()?.as_ref();
    let arg = |i: usize| inputs.get(i).and_then(Option::as_ref);
    let out = match node.op() {
        "Identity" => x()?.clone(),
        "Cast" => cast(x()?, DataType::try_from(int_attr(node, "to")? as i32).ok()?)?,
        "Reshape" => reshape(
            x()?,
            &arg(1)?.ints()?,
            int_attr(node, "allowzero") == Some(1),
        )?,
        "Flatten" => {
            let x = x()?;
            let a = int_attr(node, "axis").unwrap_or(1);
            let a = if a < 0 { a + x.dims.len() as i64 } else { a };
            let a = usize::try_from(a).ok().filter(|a| *a <= x.dims.len())?;
            x.with_dims(vec![
                x.dims[..a].iter().product(),
                x.dims[a..].iter().product(),
            ])
        }
        "Squeeze" => {
            let x = x()?;
            let axes = if opset >= 13 {
                arg(1).map(Const::ints)
            } else {
                ints_attr(node, "axes").map(Some)
            };
            let axes: Option<Vec<usize>> = match axes {
                Some(a) => Some(
                    a?.iter()
                        .map(|&a| axis(a, x.dims.len()))
                        .collect::<Option<_>>()?,
                ),
                None => None,
            };
            let dims = x
                .dims
                .iter()
                .enumerate()
                .filter(|(i, d)| match &axes {
                    Some(a) => !a.contains(i),
                    None => **d != 1,
                })
                .map(|(_, d)| *d)
                .collect();
            if axes
                .as_ref()
                .is_some_and(|a| a.iter().any(|&i| x.dims[i] != 1))
            {
                return None;
            }
            x.with_dims(dims)
        }
        "Unsqueeze" => {
            let x = x()?;
            let axes = if opset >= 13 {
                arg(1)?.ints()?
            } else {
                ints_attr(node, "axes")?
            };
            let rank = x.dims.len() + axes.len();
            let mut at: Vec<usize> = axes.iter().map(|&a| axis(a, rank)).collect::<Option<_>>()?;
            at.sort_unstable();
            at.dedup();
            if at.len() != axes.len() {
                return None;
            }
            let mut src = x.dims.iter();
            let dims = (0..rank).map(|i| {
                if at.contains(&i) {
                    Some(1)
                } else {
                    src.next().copied()
                }
            });
            x.with_dims(dims.collect::<Option<_>>()?)
        }
        "Transpose" => {
            let x = x()?;
            let perm =
                ints_attr(node, "perm").unwrap_or_else(|| (0..x.dims.len() as i64).rev().collect());
            transpose(x, &perm)?
        }
        "Concat" => {
            let parts: Vec<&Const> = inputs.iter().map(Option::as_ref).collect::<Option<_>>()?;
            concat(&parts, int_attr(node, "axis")?)?
        }
        "Shape" => {
            let x = x()?;
            let rank = x.dims.len() as i64;
            let clamp = |v: i64| if v < 0 { (v + rank).max(0) } else { v.min(rank) } as usize;
            let start = clamp(int_attr(node, "start").unwrap_or(0));
            let end = clamp(int_attr(node, "end").unwrap_or(rank));
            let dims: Vec<i64> = x
                .dims
                .get(start..end.max(start))?
                .iter()
                .map(|&d| d as i64)
                .collect();
            Const::of_ints(DataType::Int64, vec![dims.len()], &dims)?
        }
        "Size" => Const::of_ints(DataType::Int64, vec![], &[x()?.count() as i64])?,
        "Gather" => gather(x()?, arg(1)?, int_attr(node, "axis").unwrap_or(0))?,
        "Slice" if opset >= 10 => {
            let x = x()?;
            let axes = match arg(3) {
                Some(a) => a.ints()?,
                None => (0..arg(1)?.count() as i64).collect(),
            };
            let steps = match arg(4) {
                Some(s) => s.ints()?,
                None => vec![1; axes.len()],
            };
            slice(x, &arg(1)?.ints()?, &arg(2)?.ints()?, &axes, &steps)?
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Max" | "Min" => {
            if inputs.len() != 2 {
                return None;
            }
            binary(node.op(), x()?, arg(1)?)?
        }
        "Neg" | "Sqrt" | "Reciprocal" | "Abs" | "Exp" | "Log" | "Sin" | "Cos" | "Floor"
        | "Ceil" => unary(node.op(), x()?)?,
        "Equal" | "Less" | "Greater" => compare(node.op(), x()?, arg(1)?)?,
        "Where" => where_(x()?, arg(1)?, arg(2)?)?,
        "Expand" => {
            let x = x()?;
            let shape: Vec<usize> = arg(1)?
                .ints()?
                .iter()
                .map(|&d| usize::try_from(d).ok())
                .collect::<Option<_>>()?;
            let dims = broadcast_dims(&[&x.dims, &shape])?;
            if dims.iter().product::<usize>() > MAX_GROWN.max(x.count()) {
                return None;
            }
            gather_broadcast(x, &dims)
        }
        "ConstantOfShape" => {
            let dims: Vec<usize> = x()?
                .ints()?
                .iter()
                .map(|&d| usize::try_from(d).ok())
                .collect::<Option<_>>()?;
            let n: usize = dims.iter().product();
            if n > MAX_GROWN {
                return None;
            }
            let (dtype, one) = match node.attr("value").and_then(|a| a.t.as_ref()) {
                Some(t) => {
                    let dtype = DataType::try_from(t.data_type).ok()?;
                    let bytes = if t.raw_data.is_empty() {
                        attune_compiler::weights::typed_field_bytes(t).ok()?
                    } else {
                        t.raw_data.to_vec()
                    };
                    (dtype, bytes)
                }
                None => (DataType::Float, 0f32.to_le_bytes().to_vec()),
            };
            if one.len() != elem_size(dtype) {
                return None;
            }
            Const {
                dtype,
                dims,
                data: one.repeat(n).into(),
            }
        }
        "Range" => {
            let (s, l, d) = (x()?, arg(1)?, arg(2)?);
            if is_int(s.dtype) {
                let (s, l, d) = (s.ints()?[0], l.ints()?[0], d.ints()?[0]);
                if d == 0 {
                    return None;
                }
                let n = ((l - s) as f64 / d as f64).ceil().max(0.0) as usize;
                if n > MAX_GROWN {
                    return None;
                }
                let v: Vec<i64> = (0..n as i64).map(|i| s + i * d).collect();
                Const::of_ints(x()?.dtype, vec![n], &v)?
            } else {
                let (s, l, d) = (s.floats()?[0], l.floats()?[0], d.floats()?[0]);
                if d == 0.0 || !(s.is_finite() && l.is_finite() && d.is_finite()) {
                    return None;
                }
                let n = ((l - s) / d).ceil().max(0.0) as usize;
                if n > MAX_GROWN {
                    return None;
                }
                let v: Vec<f64> = (0..n).map(|i| s + i as f64 * d).collect();
                Const::of_floats(x()?.dtype, vec![n], &v)?
            }
        }
        _ => return None,
    };
    (out.count() <= MAX_ELEMENTS && out.data.len() == out.count() * out.width())
        .then_some(vec![out])
}

fn cast(x: &Const, to: DataType) -> Option<Const> {
    if x.dtype == to {
        return Some(x.clone());
    }
    match (is_float(x.dtype), is_float(to)) {
        (true, true) => Const::of_floats(to, x.dims.clone(), &x.floats()?),
        (false, true) => {
            let v: Vec<f64> = x.ints()?.iter().map(|&i| i as f64).collect();
            Const::of_floats(to, x.dims.clone(), &v)
        }
        (true, false) => {
            let f = x.floats()?;
            // Float → int truncates (as ONNX Runtime does); non-finite values have no result.
            if f.iter().any(|v| !v.is_finite()) {
                return None;
            }
            let v: Vec<i64> = f
                .iter()
                .map(|&v| {
                    if to == DataType::Bool {
                        (v != 0.0) as i64
                    } else {
                        v.trunc() as i64
                    }
                })
                .collect();
            Const::of_ints(to, x.dims.clone(), &v)
        }
        (false, false) => {
            let v = x.ints()?;
            Const::of_ints(to, x.dims.clone(), &v)
        }
    }
}

fn reshape(x: &Const, shape: &[i64], allow_zero: bool) -> Option<Const> {
    let mut dims = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (i, &d) in shape.iter().enumerate() {
        match d {
            -1 if infer.is_none() => {
                infer = Some(i);
                dims.push(1);
            }
            0 if !allow_zero => dims.push(*x.dims.get(i)?),
            d => dims.push(usize::try_from(d).ok()?),
        }
    }
    let known: usize = dims.iter().product();
    if let Some(i) = infer {
        if known == 0 || !x.count().is_multiple_of(known) {
            return None;
        }
        dims[i] = x.count() / known;
    }
    (dims.iter().product::<usize>() == x.count()).then(|| x.with_dims(dims))
}

fn transpose(x: &Const, perm: &[i64]) -> Option<Const> {
    let rank = x.dims.len();
    let perm: Vec<usize> = perm.iter().map(|&p| axis(p, rank)).collect::<Option<_>>()?;
    let mut seen = perm.clone();
    seen.sort_unstable();
    if perm.len() != rank || seen != (0..rank).collect::<Vec<_>>() {
        return None;
    }
    let dims: Vec<usize> = perm.iter().map(|&p| x.dims[p]).collect();
    let src_strides = strides(&x.dims);
    let moved: Vec<usize> = perm.iter().map(|&p| src_strides[p]).collect();
    Some(pick_elements(x, dims, |idx| {
        idx.iter().zip(&moved).map(|(i, s)| i * s).sum()
    }))
}

/// A tensor of `dims` whose element at each index is `x`'s element at `offset(index)`.
fn pick_elements(x: &Const, dims: Vec<usize>, offset: impl Fn(&[usize]) -> usize) -> Const {
    let w = x.width();
    let count: usize = dims.iter().product();
    let mut out = Vec::with_capacity(count * w);
    let mut idx = vec![0usize; dims.len()];
    for _ in 0..count {
        let off = offset(&idx);
        out.extend_from_slice(&x.data[off * w..(off + 1) * w]);
        advance(&mut idx, &dims);
    }
    Const {
        dtype: x.dtype,
        dims,
        data: out.into(),
    }
}

fn concat(parts: &[&Const], a: i64) -> Option<Const> {
    let first = parts.first()?;
    let rank = first.dims.len();
    let a = axis(a, rank)?;
    let same = |c: &Const| {
        c.dtype == first.dtype
            && c.dims.len() == rank
            && (0..rank).all(|i| i == a || c.dims[i] == first.dims[i])
    };
    if !parts.iter().all(|c| same(c)) {
        return None;
    }
    let outer: usize = first.dims[..a].iter().product();
    let w = first.width();
    let mut dims = first.dims.clone();
    dims[a] = parts.iter().map(|c| c.dims[a]).sum();
    let mut out = Vec::with_capacity(parts.iter().map(|c| c.data.len()).sum());
    for o in 0..outer {
        for c in parts {
            let block = c.dims[a..].iter().product::<usize>() * w;
            out.extend_from_slice(&c.data[o * block..(o + 1) * block]);
        }
    }
    Some(Const {
        dtype: first.dtype,
        dims,
        data: out.into(),
    })
}

fn gather(x: &Const, indices: &Const, a: i64) -> Option<Const> {
    let rank = x.dims.len();
    let a = axis(a, rank)?;
    let n = x.dims[a] as i64;
    let idx: Vec<usize> = indices
        .ints()?
        .iter()
        .map(|&i| {
            let i = if i < 0 { i + n } else { i };
            (0..n).contains(&i).then_some(i as usize)
        })
        .collect::<Option<_>>()?;
    let outer: usize = x.dims[..a].iter().product();
    let inner: usize = x.dims[a + 1..].iter().product::<usize>() * x.width();
    let mut out = Vec::with_capacity(outer * idx.len() * inner);
    for o in 0..outer {
        for &i in &idx {
            let start = (o * x.dims[a] + i) * inner;
            out.extend_from_slice(&x.data[start..start + inner]);
        }
    }
    let dims = x.dims[..a]
        .iter()
        .chain(&indices.dims)
        .chain(&x.dims[a + 1..])
        .copied()
        .collect();
    Some(Const {
        dtype: x.dtype,
        dims,
        data: out.into(),
    })
}

fn slice(x: &Const, starts: &[i64], ends: &[i64], axes: &[i64], steps: &[i64]) -> Option<Const> {
    let rank = x.dims.len();
    if starts.len() != axes.len() || ends.len() != axes.len() || steps.len() != axes.len() {
        return None;
    }
    // Per axis: the source indices taken.
    let mut picks: Vec<Vec<usize>> = x.dims.iter().map(|&d| (0..d).collect()).collect();
    for i in 0..axes.len() {
        let a = axis(axes[i], rank)?;
        let d = x.dims[a] as i64;
        let step = steps[i];
        if step == 0 {
            return None;
        }
        let norm = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
        let (lo, hi) = if step > 0 { (0, d) } else { (-1, d - 1) };
        let start = norm(starts[i]).clamp(lo, hi);
        let end = norm(ends[i]).clamp(lo, hi);
        let mut taken = Vec::new();
        let mut at = start;
        while (step > 0 && at < end) || (step < 0 && at > end) {
            taken.push(at as usize);
            at += step;
        }
        picks[a] = taken;
    }
    let dims: Vec<usize> = picks.iter().map(Vec::len).collect();
    let src = strides(&x.dims);
    Some(pick_elements(x, dims, |idx| {
        (0..rank).map(|k| picks[k][idx[k]] * src[k]).sum()
    }))
}

/// numpy's broadcast of several shapes.
fn broadcast_dims(shapes: &[&[usize]]) -> Option<Vec<usize>> {
    let rank = shapes.iter().map(|s| s.len()).max()?;
    (0..rank)
        .map(|i| {
            let mut d = 1;
            for s in shapes {
                let Some(j) = (i + s.len()).checked_sub(rank) else {
                    continue;
                };
                match (d, s[j]) {
                    (_, 1) => {}
                    (1, x) => d = x,
                    (a, b) if a == b => {}
                    _ => return None,
                }
            }
            Some(d)
        })
        .collect()
}

/// For each element of a `dims`-shaped output, the element of `x` (broadcast) it reads.
fn broadcast_index(x: &[usize], dims: &[usize]) -> Vec<usize> {
    let rank = dims.len();
    let src = strides(x);
    let offset = rank - x.len();
    let eff: Vec<usize> = (0..rank)
        .map(|k| {
            if k < offset || x[k - offset] == 1 {
                0
            } else {
                src[k - offset]
            }
        })
        .collect();
    let count: usize = dims.iter().product();
    let mut out = Vec::with_capacity(count);
    let mut idx = vec![0usize; rank];
    for _ in 0..count {
        out.push(idx.iter().zip(&eff).map(|(i, s)| i * s).sum());
        advance(&mut idx, dims);
    }
    out
}

fn gather_broadcast(x: &Const, dims: &[usize]) -> Const {
    let w = x.width();
    let mut out = Vec::new();
    for i in broadcast_index(&x.dims, dims) {
        out.extend_from_slice(&x.data[i * w..(i + 1) * w]);
    }
    Const {
        dtype: x.dtype,
        dims: dims.to_vec(),
        data: out.into(),
    }
}

fn binary(op: &str, a: &Const, b: &Const) -> Option<Const> {
    if a.dtype != b.dtype && op != "Pow" {
        return None;
    }
    let dims = broadcast_dims(&[&a.dims, &b.dims])?;
    let (ia, ib) = (
        broadcast_index(&a.dims, &dims),
        broadcast_index(&b.dims, &dims),
    );
    if is_float(a.dtype) {
        let (x, y) = (
            a.floats()?,
            b.floats()
                .or_else(|| Some(b.ints()?.iter().map(|&i| i as f64).collect()))?,
        );
        // f32/f16 arithmetic computed in f64 and rounded once gives the correctly rounded
        // result for + - * / (f64 holds more than twice their precision).
        let f = |p: f64, q: f64| match op {
            "Add" => p + q,
            "Sub" => p - q,
            "Mul" => p * q,
            "Div" => p / q,
            "Pow" => p.powf(q),
            "Max" => p.max(q),
            _ => p.min(q),
        };
        let v: Vec<f64> = ia.iter().zip(&ib).map(|(&i, &j)| f(x[i], y[j])).collect();
        Const::of_floats(a.dtype, dims, &v)
    } else {
        let (x, y) = (a.ints()?, b.ints()?);
        let v: Vec<i64> = ia
            .iter()
            .zip(&ib)
            .map(|(&i, &j)| {
                let (p, q) = (x[i], y[j]);
                match op {
                    "Add" => Some(p.wrapping_add(q)),
                    "Sub" => Some(p.wrapping_sub(q)),
                    "Mul" => Some(p.wrapping_mul(q)),
                    "Div" => p.checked_div(q),
                    "Max" => Some(p.max(q)),
                    "Min" => Some(p.min(q)),
                    _ => None,
                }
            })
            .collect::<Option<_>>()?;
        Const::of_ints(a.dtype, dims, &v)
    }
}

fn unary(op: &str, x: &Const) -> Option<Const> {
    if (op == "Neg" || op == "Abs")
        && let Some(v) = x
            .ints()
            .filter(|_| x.dtype == DataType::Int64 || x.dtype == DataType::Int32)
    {
        let v: Vec<i64> = v
            .iter()
            .map(|&i| {
                if op == "Neg" {
                    i.wrapping_neg()
                } else {
                    i.wrapping_abs()
                }
            })
            .collect();
        return Const::of_ints(x.dtype, x.dims.clone(), &v);
    }
    let v: Vec<f64> = x
        .floats()?
        .iter()
        .map(|&p| match op {
            "Neg" => -p,
            "Sqrt" => p.sqrt(),
            "Reciprocal" => 1.0 / p,
            "Abs" => p.abs(),
            "Exp" => p.exp(),
            "Log" => p.ln(),
            "Sin" => p.sin(),
            "Cos" => p.cos(),
            "Floor" => p.floor(),
            _ => p.ceil(),
        })
        .collect();
    Const::of_floats(x.dtype, x.dims.clone(), &v)
}

fn compare(op: &str, a: &Const, b: &Const) -> Option<Const> {
    if a.dtype != b.dtype {
        return None;
    }
    let dims = broadcast_dims(&[&a.dims, &b.dims])?;
    let (ia, ib) = (
        broadcast_index(&a.dims, &dims),
        broadcast_index(&b.dims, &dims),
    );
    let (x, y) = match (a.floats(), b.floats()) {
        (Some(x), Some(y)) => (x, y),
        _ => (
            a.ints()?.iter().map(|&i| i as f64).collect(),
            b.ints()?.iter().map(|&i| i as f64).collect(),
        ),
    };
    let v: Vec<i64> = ia
        .iter()
        .zip(&ib)
        .map(|(&i, &j)| match op {
            "Equal" => x[i] == y[j],
            "Less" => x[i] < y[j],
            _ => x[i] > y[j],
        } as i64)
        .collect();
    Const::of_ints(DataType::Bool, dims, &v)
}

fn where_(c: &Const, a: &Const, b: &Const) -> Option<Const> {
    if c.dtype != DataType::Bool || a.dtype != b.dtype {
        return None;
    }
    let dims = broadcast_dims(&[&c.dims, &a.dims, &b.dims])?;
    if dims.iter().product::<usize>() > MAX_GROWN.max(a.count()).max(b.count()) {
        return None;
    }
    let (ic, ia, ib) = (
        broadcast_index(&c.dims, &dims),
        broadcast_index(&a.dims, &dims),
        broadcast_index(&b.dims, &dims),
    );
    let w = a.width();
    let mut out = Vec::with_capacity(ic.len() * w);
    for k in 0..ic.len() {
        let (src, i) = if c.data[ic[k]] != 0 {
            (a, ia[k])
        } else {
            (b, ib[k])
        };
        out.extend_from_slice(&src.data[i * w..(i + 1) * w]);
    }
    Some(Const {
        dtype: a.dtype,
        dims,
        data: out.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(dims: &[usize], v: &[f32]) -> Const {
        Const {
            dtype: DataType::Float,
            dims: dims.to_vec(),
            data: v
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        }
    }

    #[test]
    fn transpose_and_slice_move_the_right_elements() {
        let x = f32s(&[2, 3], &[0., 1., 2., 3., 4., 5.]);
        let t = transpose(&x, &[1, 0]).unwrap();
        assert_eq!(t.dims, vec![3, 2]);
        assert_eq!(t.floats().unwrap(), vec![0., 3., 1., 4., 2., 5.]);
        let s = slice(&x, &[1], &[i64::MAX], &[1], &[1]).unwrap();
        assert_eq!(s.floats().unwrap(), vec![1., 2., 4., 5.]);
        let r = slice(&x, &[-1], &[i64::MIN], &[1], &[-1]).unwrap();
        assert_eq!(r.floats().unwrap(), vec![2., 1., 0., 5., 4., 3.]);
    }

    #[test]
    fn broadcasting_arithmetic_and_concat() {
        let x = f32s(&[2, 3], &[0., 1., 2., 3., 4., 5.]);
        let col = f32s(&[2, 1], &[10., 20.]);
        let y = binary("Add", &x, &col).unwrap();
        assert_eq!(y.floats().unwrap(), vec![10., 11., 12., 23., 24., 25.]);
        let c = concat(&[&x, &col], 1).unwrap();
        assert_eq!(c.dims, vec![2, 4]);
        assert_eq!(c.floats().unwrap(), vec![0., 1., 2., 10., 3., 4., 5., 20.]);
        assert!(
            binary("Add", &x, &f32s(&[2], &[1., 2.])).is_none(),
            "3 vs 2 does not broadcast"
        );
    }

    #[test]
    fn reshape_resolves_zero_and_minus_one() {
        let x = f32s(&[2, 3, 4], &[0.; 24]);
        assert_eq!(reshape(&x, &[0, -1], false).unwrap().dims, vec![2, 12]);
        assert!(reshape(&x, &[5, -1], false).is_none());
    }
}
