//! Symbolic shape inference, and partial evaluation of the small shape/scale computations
//! exporters emit (`Shape → Gather → Div → Concat → Reshape`, `Sqrt(1/sqrt(d))`). Sizes are
//! [`Dim`]s in terms of the graph inputs' dim symbols; values of small tensors are tracked
//! so reshape targets, head counts and attention scales can be read off the graph.
use std::collections::{BTreeMap, HashMap};

mod contrib;
mod ops;
mod slices;

use super::dim::Dim;
use crate::ir::{Graph, Model, NodeId, ValueId};
use crate::onnx::{
    self, AttributeProto, DataType, TensorProto, tensor_shape_proto::dimension::Value as DimValue,
};
use crate::weights::Tensor;
use contrib::infer_contrib;
use ops::infer_op;
use slices::{ceil_div, crop, part_of_sum};

/// An element of a small tensor whose value is known: an integer size or a float.
#[derive(Clone, Debug, PartialEq)]
pub enum Num {
    I(Dim),
    F(f64),
}

impl Num {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Num::F(f) => Some(*f),
            Num::I(d) => d.known().map(|v| v as f64),
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Num::I(d) => d.known(),
            Num::F(f) => (f.fract() == 0.0).then_some(*f as i64),
        }
    }
    fn dim(&self) -> Option<Dim> {
        match self {
            Num::I(d) => Some(d.clone()),
            Num::F(f) if f.fract() == 0.0 => Some(Dim::Known(*f as i64)),
            Num::F(_) => None,
        }
    }
}

/// What is known about a value.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub shape: Option<Vec<Dim>>,
    /// Elements (row-major) of tensors with at most [`MAX_VALUE_LEN`] elements.
    pub value: Option<Vec<Num>>,
    /// Is it a floating-point tensor? (decides Cast/Div semantics of values)
    pub float: bool,
}

const MAX_VALUE_LEN: usize = 64;

#[derive(Debug, Default)]
pub struct Shapes {
    facts: HashMap<ValueId, Facts>,
    /// Counter of unknown sizes handed out (each one a distinct symbol).
    unknowns: usize,
    /// Input dim symbols found to be one size (see [`Shapes::infer`]), by the one they became.
    aliases: BTreeMap<String, String>,
    /// Unknown sizes that are a Concat's sum of two symbolic sizes (joint attention's image
    /// and text tokens), so slicing the parts back out keeps their sizes.
    sums: HashMap<String, [Dim; 2]>,
}

impl Shapes {
    /// Shapes and small integer values of every value it can tell. Exports may name one size
    /// differently per input (Olive: `unet_sample_batch`, `unet_hidden_batch`); where two
    /// input symbols must broadcast together they are one size, so inference runs again with
    /// each such group named after its first symbol, and the shapes line up.
    pub fn infer(model: &Model) -> Shapes {
        let first = Shapes::infer_named(model, BTreeMap::new());
        let aliases = first.equal_symbols(model);
        if aliases.is_empty() {
            first
        } else {
            Shapes::infer_named(model, aliases)
        }
    }

    fn infer_named(model: &Model, aliases: BTreeMap<String, String>) -> Shapes {
        let g = &model.graph;
        let mut s = Shapes {
            aliases,
            ..Shapes::default()
        };
        for io in &g.inputs {
            if g.initializer(io.value).is_some() {
                continue;
            }
            let t = io.info.r#type.as_ref().and_then(onnx::tensor_type);
            let shape = declared_dims(&io.info).map(|d| s.renamed(d));
            let float = t.is_some_and(|t| onnx::is_float(t.elem_type));
            s.facts.insert(
                io.value,
                Facts {
                    shape,
                    value: None,
                    float,
                },
            );
        }
        for (id, t) in g.initializers() {
            s.facts.insert(id, tensor_facts(t));
        }
        if let Ok(order) = g.topo_order() {
            for n in order {
                s.infer_node(g, n);
            }
        }
        s
    }

    fn renamed(&self, dims: Vec<Dim>) -> Vec<Dim> {
        if self.aliases.is_empty() {
            return dims;
        }
        let rename = |s: &str| {
            self.aliases
                .get(s)
                .cloned()
                .unwrap_or_else(|| s.to_string())
        };
        dims.iter().map(|d| d.renamed(rename)).collect()
    }

    /// Input dim symbols that meet in an elementwise op or a MatMul's batch dims, where both
    /// can only hold if they are equal (or one is 1, which a batch or a token count is not),
    /// or as the batch of a fused op's inputs: each → the group's symbol that appears first
    /// in the inputs.
    fn equal_symbols(&self, model: &Model) -> BTreeMap<String, String> {
        let g = &model.graph;
        let declared: Vec<String> = g
            .inputs
            .iter()
            .flat_map(|io| declared_dims(&io.info).unwrap_or_default())
            .filter_map(|d| d.as_symbol().map(str::to_string))
            .collect();
        let rank = |s: &str| declared.iter().position(|d| d == s);
        let mut pairs: Vec<(Dim, Dim)> = Vec::new();
        for n in g.node_ids() {
            let node = g.node(n);
            let shape = |slot: usize| self.shape(node.inputs.get(slot).copied().flatten()?);
            if let Some(slots) = SHARED_BATCH
                .iter()
                .find(|(op, _)| node.op() == *op)
                .map(|(_, slots)| *slots)
            {
                let batches: Vec<&Dim> = slots.iter().filter_map(|&i| shape(i)?.first()).collect();
                pairs.extend(batches.windows(2).map(|w| (w[0].clone(), w[1].clone())));
            } else if BROADCASTING.contains(&node.op())
                && let (Some(a), Some(b)) = (shape(0), shape(1))
            {
                let lead = |s: &[Dim]| match node.op() {
                    "MatMul" => s[..s.len().saturating_sub(2)].to_vec(),
                    _ => s.to_vec(),
                };
                pairs.extend(aligned(&lead(a), &lead(b)));
            }
        }
        let mut parent: BTreeMap<String, String> = BTreeMap::new();
        let root = |parent: &BTreeMap<String, String>, s: &str| {
            let mut at = s.to_string();
            while let Some(p) = parent.get(&at) {
                at = p.clone();
            }
            at
        };
        for (x, y) in &pairs {
            let (Some(x), Some(y)) = (x.as_symbol(), y.as_symbol()) else {
                continue;
            };
            if rank(x).is_none() || rank(y).is_none() {
                continue;
            }
            let (rx, ry) = (root(&parent, x), root(&parent, y));
            if rx != ry {
                let (keep, drop) = if rank(&rx) <= rank(&ry) {
                    (rx, ry)
                } else {
                    (ry, rx)
                };
                parent.insert(drop, keep);
            }
        }
        parent
            .keys()
            .map(|s| (s.clone(), root(&parent, s)))
            .collect()
    }

    /// Input dim symbols taken to be one size, each → its group's first symbol.
    pub fn equal_input_symbols(&self) -> &BTreeMap<String, String> {
        &self.aliases
    }

    pub fn facts(&self, v: ValueId) -> Option<&Facts> {
        self.facts.get(&v)
    }

    pub fn shape(&self, v: ValueId) -> Option<&[Dim]> {
        self.facts.get(&v)?.shape.as_deref()
    }

    pub fn value(&self, v: ValueId) -> Option<&[Num]> {
        self.facts.get(&v)?.value.as_deref()
    }

    /// A scalar (or all-equal) float value.
    pub fn scalar(&self, v: ValueId) -> Option<f64> {
        let vals = self.value(v)?;
        let first = vals.first()?.as_f64()?;
        vals.iter()
            .all(|x| x.as_f64() == Some(first))
            .then_some(first)
    }

    fn infer_node(&mut self, g: &Graph, id: NodeId) {
        let node = g.node(id);
        let contrib = node.domain() == "com.microsoft";
        if !onnx::is_default_domain(node.domain()) && !contrib {
            return;
        }
        let facts = &self.facts;
        let input = |i: usize| {
            node.inputs
                .get(i)
                .copied()
                .flatten()
                .and_then(|v| facts.get(&v).cloned())
                .unwrap_or_default()
        };
        let mut unknowns = self.unknowns;
        let mut fresh = || {
            unknowns += 1;
            Dim::unknown(unknowns)
        };
        let mut outs = if contrib {
            infer_contrib(node.op(), &node.proto.attribute, &input, &mut fresh)
        } else {
            infer_op(
                node.op(),
                &node.proto.attribute,
                node.inputs.len(),
                &input,
                &mut fresh,
            )
        };
        self.unknowns = unknowns;
        if node.is("Slice")
            && outs.first().is_none_or(|f| f.shape.is_none())
            && let Some(f) =
                crop(g, &self.facts, id).or_else(|| part_of_sum(g, &self.facts, &self.sums, id))
        {
            outs = vec![f];
        }
        if node.is("Add")
            && outs.first().is_none_or(|f| f.value.is_none())
            && let Some(f) = ceil_div(g, &self.facts, id)
        {
            outs = vec![f];
        }
        if node.is("Concat") {
            self.remember_sum(g, id, outs.first());
        }
        if node.is("Conv")
            && outs
                .first()
                .and_then(|f| f.shape.as_ref())
                .is_none_or(|s| s.iter().any(Dim::is_unknown))
            && let Some(f) = padded_conv(g, &self.facts, id)
        {
            outs = vec![f];
        }
        outs.resize(node.outputs.len(), Facts::default());
        for (slot, mut facts) in outs.into_iter().enumerate() {
            let Some(Some(v)) = node.outputs.get(slot) else {
                continue;
            };
            // What the exporter declared (dynamo's value_info) fills in what inference could not.
            if facts.shape.is_none() {
                facts.shape = declared_shape(g, *v).map(|d| self.renamed(d));
            }
            self.facts.insert(*v, facts);
        }
    }
}

/// The dims an input declares: sizes, dim expressions, and a symbol of its own (`name_i`) for
/// a dim it leaves unnamed; None without a declared shape.
pub fn declared_dims(info: &onnx::ValueInfoProto) -> Option<Vec<Dim>> {
    let shape = onnx::tensor_type(info.r#type.as_ref()?)?.shape.as_ref()?;
    Some(
        shape
            .dim
            .iter()
            .enumerate()
            .map(|(i, d)| match &d.value {
                Some(DimValue::DimValue(v)) => Dim::Known(*v),
                Some(DimValue::DimParam(p)) if !p.is_empty() => Dim::parse(p),
                _ => Dim::symbol(&format!("{}_{i}", info.name)),
            })
            .collect(),
    )
}

fn declared_shape(g: &Graph, v: ValueId) -> Option<Vec<Dim>> {
    let shape = onnx::tensor_type(g.value_type(v)?)?.shape.as_ref()?;
    shape
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(DimValue::DimValue(x)) => Some(Dim::Known(*x)),
            Some(DimValue::DimParam(p)) if !p.is_empty() => Some(Dim::parse(p)),
            _ => None,
        })
        .collect()
}

fn tensor_facts(t: &Tensor) -> Facts {
    let shape = Some(t.dims().iter().map(|d| Dim::Known(*d)).collect());
    let float = onnx::is_float(t.data_type());
    let value = (t.element_count().unwrap_or(u64::MAX) <= MAX_VALUE_LEN as u64)
        .then(|| decode(t))
        .flatten();
    Facts {
        shape,
        value,
        float,
    }
}

fn decode(t: &Tensor) -> Option<Vec<Num>> {
    let bytes = t.bytes().ok()?;
    let dt = DataType::try_from(t.data_type()).ok()?;
    Some(match dt {
        DataType::Int64 => bytes
            .chunks_exact(8)
            .map(|c| Num::I(Dim::Known(i64::from_le_bytes(c.try_into().unwrap()))))
            .collect(),
        DataType::Int32 => bytes
            .chunks_exact(4)
            .map(|c| Num::I(Dim::Known(i32::from_le_bytes(c.try_into().unwrap()) as i64)))
            .collect(),
        DataType::Float => bytes
            .chunks_exact(4)
            .map(|c| Num::F(f32::from_le_bytes(c.try_into().unwrap()) as f64))
            .collect(),
        DataType::Double => bytes
            .chunks_exact(8)
            .map(|c| Num::F(f64::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        DataType::Float16 => bytes
            .chunks_exact(2)
            .map(|c| Num::F(half::f16::from_le_bytes(c.try_into().unwrap()).to_f64()))
            .collect(),
        DataType::Bool => bytes
            .iter()
            .map(|b| Num::I(Dim::Known(*b as i64)))
            .collect(),
        _ => return None,
    })
}

fn attr<'a>(attrs: &'a [AttributeProto], name: &str) -> Option<&'a AttributeProto> {
    attrs.iter().find(|a| a.name == name)
}
fn attr_i(attrs: &[AttributeProto], name: &str) -> Option<i64> {
    attr(attrs, name).map(|a| a.i)
}
fn attr_ints(attrs: &[AttributeProto], name: &str) -> Option<Vec<i64>> {
    attr(attrs, name).map(|a| a.ints.clone())
}

fn known_ints(f: &Facts) -> Option<Vec<i64>> {
    f.value.as_ref()?.iter().map(Num::as_i64).collect()
}

fn axis(a: i64, rank: usize) -> Option<usize> {
    let a = if a < 0 { a + rank as i64 } else { a };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

/// Numpy broadcasting. The model is assumed valid, so sizes that differ without either being
/// 1 must be equal at run time: an unknown size takes the other, a symbol against a known
/// size is that size, and two symbols (inputs that name their batch differently, as Olive's
/// `unet_sample_batch` and `unet_hidden_batch`, or optimum's `steps` timestep against
/// `batch_size`) are the first. One unnamed or renamed size then does not hide every shape
/// after it.
fn broadcast(a: &[Dim], b: &[Dim]) -> Option<Vec<Dim>> {
    aligned(a, b)
        .map(|(x, y)| match (&x, &y) {
            (Dim::Known(1), _) => Some(y),
            (_, Dim::Known(1)) => Some(x),
            _ if x == y => Some(x),
            _ if x.is_unknown() => Some(y),
            _ if y.is_unknown() => Some(x),
            (Dim::Known(p), Dim::Known(q)) if p != q => None,
            (_, Dim::Known(_)) => Some(y),
            _ => Some(x),
        })
        .collect()
}

/// The dims of two shapes paired from the last, the shorter padded with 1s in front.
fn aligned(a: &[Dim], b: &[Dim]) -> impl Iterator<Item = (Dim, Dim)> {
    let n = a.len().max(b.len());
    let pad = move |s: &[Dim]| -> Vec<Dim> {
        std::iter::repeat_n(Dim::Known(1), n - s.len())
            .chain(s.iter().cloned())
            .collect()
    };
    pad(a).into_iter().zip(pad(b))
}

/// Fused ops whose inputs (these slots) share their batch, dim 0: where the query's and the
/// text states' batches meet once attention is fused, and the time embedding's in a
/// SkipGroupNorm.
const SHARED_BATCH: &[(&str, &[usize])] = &[
    ("MultiHeadAttention", &[0, 1, 2]),
    ("Attention", &[0, 1, 2]),
    ("SkipGroupNorm", &[0, 3]),
    ("SkipLayerNormalization", &[0, 1]),
    ("BiasAdd", &[0, 2]),
];

/// Ops whose inputs broadcast against each other (a MatMul: its batch dims).
const BROADCASTING: &[&str] = &[
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Equal", "MatMul",
];

/// The most outputs a `Split` by `num_outputs` is believed to have.
const MAX_SPLIT: i64 = 1 << 16;

fn count(shape: &[Dim]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, d| {
        acc.checked_mul(usize::try_from(d.known()?).ok()?)
    })
}

fn product(shape: &[Dim]) -> Option<Dim> {
    shape.iter().try_fold(Dim::Known(1), |acc, d| acc.mul(d))
}

fn shaped(shape: Vec<Dim>, float: bool) -> Facts {
    Facts {
        shape: Some(shape),
        value: None,
        float,
    }
}

fn with_value(shape: Vec<Dim>, value: Vec<Num>, float: bool) -> Facts {
    Facts {
        shape: Some(shape),
        value: Some(value),
        float,
    }
}

fn binary_value(op: &str, a: &Num, b: &Num) -> Option<Num> {
    Some(match (a, b) {
        (Num::I(x), Num::I(y)) => Num::I(match op {
            "Add" => x.add(y)?,
            "Sub" => x.add(&y.neg()?)?,
            "Mul" => x.mul(y)?,
            "Div" => match (x.known(), y.known()) {
                (Some(p), Some(q)) if q != 0 => Dim::Known(p.checked_div_euclid(q)?),
                _ => x.div(y)?,
            },
            "Equal" => match (x.known(), y.known()) {
                (Some(p), Some(q)) => Dim::Known((p == q) as i64),
                // A size never equals a negative constant (the `-1` checks of reshapes).
                (None, Some(q)) | (Some(q), None) if q < 0 => Dim::Known(0),
                _ if x == y => Dim::Known(1),
                _ => return None,
            },
            _ => {
                let (p, q) = (x.known()?, y.known()?);
                Dim::Known(match op {
                    "Min" => p.min(q),
                    "Max" => p.max(q),
                    "Less" => (p < q) as i64,
                    "Greater" => (p > q) as i64,
                    // Sizes are not negative; fmod and Python-style modulo agree on them.
                    "Mod" if p >= 0 && q > 0 => p % q,
                    _ => return None,
                })
            }
        }),
        _ => {
            let (x, y) = (a.as_f64()?, b.as_f64()?);
            Num::F(match op {
                "Add" => x + y,
                "Sub" => x - y,
                "Mul" => x * y,
                "Div" => x / y,
                "Pow" => x.powf(y),
                "Equal" => (x == y) as i64 as f64,
                "Less" => (x < y) as i64 as f64,
                "Greater" => (x > y) as i64 as f64,
                "Min" => x.min(y),
                "Max" => x.max(y),
                _ => return None,
            })
        }
    })
}

/// A Conv reading an explicit Pad (torch's asymmetric `F.pad(x, (0, 1, 0, 1))` before
/// diffusers' strided Downsample2D conv): its size from the Pad's input with both paddings
/// summed, as `H + 1` padded then halved is `H / 2` though `H + 1` is no size of its own.
fn padded_conv(g: &Graph, facts: &HashMap<ValueId, Facts>, conv: NodeId) -> Option<Facts> {
    let node = g.node(conv);
    let pad = g
        .producer(g.input(conv, 0)?)
        .filter(|p| g.node(*p).is("Pad"))?;
    let pn = g.node(pad);
    let xs = facts.get(&g.input(pad, 0)?)?.shape.clone()?;
    let ws = facts.get(&g.input(conv, 1)?)?.shape.clone()?;
    let pads = match g.input(pad, 1) {
        Some(v) => known_ints(facts.get(&v)?)?,
        None => attr_ints(&pn.proto.attribute, "pads")?,
    };
    let rank = xs.len();
    let axes: Vec<usize> = match g.input(pad, 3) {
        Some(v) => known_ints(facts.get(&v)?)?
            .iter()
            .map(|a| axis(*a, rank))
            .collect::<Option<_>>()?,
        None => (0..rank).collect(),
    };
    if pads.len() != 2 * axes.len() || ws.len() != rank || rank < 3 {
        return None;
    }
    let attrs = &node.proto.attribute;
    if attr(attrs, "auto_pad").is_some_and(|a| !a.s.is_empty() && a.s != b"NOTSET") {
        return None;
    }
    let spatial = rank - 2;
    let mut total = vec![0i64; rank];
    for (i, a) in axes.iter().enumerate() {
        total[*a] = pads[i].checked_add(pads[i + axes.len()])?;
    }
    if total[0] != 0 || total[1] != 0 {
        return None;
    }
    let strides = attr_ints(attrs, "strides").unwrap_or_else(|| vec![1; spatial]);
    let dil = attr_ints(attrs, "dilations").unwrap_or_else(|| vec![1; spatial]);
    let conv_pads = attr_ints(attrs, "pads").unwrap_or_else(|| vec![0; 2 * spatial]);
    let mut out = vec![xs[0].clone(), ws[0].clone()];
    for i in 0..spatial {
        let pad = total[i + 2]
            .checked_add(*conv_pads.get(i).unwrap_or(&0))?
            .checked_add(*conv_pads.get(i + spatial).unwrap_or(&0))?;
        let (k, st) = (ws[i + 2].known()?, *strides.get(i)?);
        out.push(conv_size(
            &xs[i + 2],
            k,
            st,
            *dil.get(i).unwrap_or(&1),
            Some(pad),
        )?);
    }
    Some(shaped(out, true))
}

/// Output facts of one default-domain op.
/// A convolution's output size along one axis: kernel `k`, stride `s`, dilation `d`, total
/// padding `pad` (None: SAME auto-padding).
fn conv_size(size: &Dim, k: i64, s: i64, d: i64, pad: Option<i64>) -> Option<Dim> {
    if s <= 0 || d <= 0 || k <= 0 {
        return None; // invalid attributes: leave the size unknown
    }
    let extra = match pad {
        Some(p) => p.checked_sub(d.checked_mul(k - 1)?.checked_add(1)?)?,
        None => 0,
    };
    match size.known() {
        Some(v) if pad.is_some() => Some(Dim::Known(v.checked_add(extra)? / s + 1)),
        Some(v) => Some(Dim::Known(v.checked_add(s - 1)? / s)),
        // Symbolic: exact when the size divides by the stride (as UNet inputs must).
        None if pad.is_none() || (-s <= extra && extra < 0) => size.div(&Dim::Known(s)),
        None => None,
    }
}
