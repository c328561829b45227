//! Each node against its op's schema: attribute presence, type and range, input counts,
//! Constant values whose bytes, dims and type agree. Backends trust these (ONNX Runtime and
//! tract crash, hang or allocate without bound on a repeated Transpose perm, a Conv stride of
//! 0 or a Constant of 2^40 elements), so attune refuses them first. Every problem names the
//! node, its module path and the attribute.
use crate::ir::{Model, Node};
use crate::onnx::{self, AttributeProto, DataType, TensorProto, attribute_proto::AttributeType};
use crate::weights;

/// The most elements one tensor may hold (16 GiB of f32): more than any diffusion model's
/// largest activation, far less than a backend's allocation of a malformed size.
pub const MAX_ELEMENTS: u64 = 1 << 32;

/// Largest stride, dilation, kernel size or padding attune accepts.
const MAX_WINDOW: i64 = 1 << 16;

/// What an attribute must hold.
#[derive(Clone, Copy)]
enum Want {
    /// An integer in `lo..=hi`.
    Int(i64, i64),
    /// A list of integers, each in `lo..=hi`.
    Ints(i64, i64),
    /// A permutation of `0..len` (Transpose).
    Perm,
    /// A known element type (Cast's `to`).
    Dtype,
    /// A subgraph (If/Loop/Scan bodies).
    Graph,
    /// A finite float.
    Float,
}

/// `(op, attribute, required, want)` for the default domain.
const ATTRIBUTES: &[(&str, &str, bool, Want)] = &[
    ("Transpose", "perm", false, Want::Perm),
    ("Conv", "strides", false, Want::Ints(1, MAX_WINDOW)),
    ("Conv", "dilations", false, Want::Ints(1, MAX_WINDOW)),
    ("Conv", "kernel_shape", false, Want::Ints(1, MAX_WINDOW)),
    ("Conv", "pads", false, Want::Ints(0, MAX_WINDOW)),
    ("Conv", "group", false, Want::Int(1, MAX_WINDOW)),
    ("ConvTranspose", "strides", false, Want::Ints(1, MAX_WINDOW)),
    (
        "ConvTranspose",
        "dilations",
        false,
        Want::Ints(1, MAX_WINDOW),
    ),
    (
        "ConvTranspose",
        "kernel_shape",
        false,
        Want::Ints(1, MAX_WINDOW),
    ),
    ("ConvTranspose", "pads", false, Want::Ints(0, MAX_WINDOW)),
    (
        "ConvTranspose",
        "output_padding",
        false,
        Want::Ints(0, MAX_WINDOW),
    ),
    ("ConvTranspose", "group", false, Want::Int(1, MAX_WINDOW)),
    ("MaxPool", "kernel_shape", true, Want::Ints(1, MAX_WINDOW)),
    ("MaxPool", "strides", false, Want::Ints(1, MAX_WINDOW)),
    ("MaxPool", "dilations", false, Want::Ints(1, MAX_WINDOW)),
    ("MaxPool", "pads", false, Want::Ints(0, MAX_WINDOW)),
    (
        "AveragePool",
        "kernel_shape",
        true,
        Want::Ints(1, MAX_WINDOW),
    ),
    ("AveragePool", "strides", false, Want::Ints(1, MAX_WINDOW)),
    ("AveragePool", "pads", false, Want::Ints(0, MAX_WINDOW)),
    ("Split", "split", false, Want::Ints(0, i64::MAX)),
    ("Cast", "to", true, Want::Dtype),
    ("If", "then_branch", true, Want::Graph),
    ("If", "else_branch", true, Want::Graph),
    ("Loop", "body", true, Want::Graph),
    ("Scan", "body", true, Want::Graph),
    ("LayerNormalization", "epsilon", false, Want::Float),
    ("GroupNormalization", "epsilon", false, Want::Float),
    (
        "GroupNormalization",
        "num_groups",
        true,
        Want::Int(1, i64::MAX),
    ),
    ("InstanceNormalization", "epsilon", false, Want::Float),
    ("Concat", "axis", true, Want::Int(-64, 63)),
    ("Softmax", "axis", false, Want::Int(-64, 63)),
    ("Gather", "axis", false, Want::Int(-64, 63)),
    ("Flatten", "axis", false, Want::Int(-64, 64)),
    ("DepthToSpace", "blocksize", true, Want::Int(1, MAX_WINDOW)),
    ("SpaceToDepth", "blocksize", true, Want::Int(1, MAX_WINDOW)),
];

/// The most inputs of ops whose schema fixes it (variadic ops are not listed).
const MAX_INPUTS: &[(&str, usize)] = &[
    ("Add", 2),
    ("Sub", 2),
    ("Mul", 2),
    ("Div", 2),
    ("Pow", 2),
    ("MatMul", 2),
    ("Gemm", 3),
    ("Conv", 3),
    ("ConvTranspose", 3),
    ("Reshape", 2),
    ("Expand", 2),
    ("Gather", 2),
    ("Where", 3),
    ("Slice", 5),
    ("Softmax", 1),
    ("Transpose", 1),
    ("Cast", 1),
    ("Shape", 1),
    ("Sigmoid", 1),
    ("Relu", 1),
    ("Erf", 1),
    ("Sqrt", 1),
    ("Range", 3),
    ("ConstantOfShape", 1),
    ("If", 1),
    ("Constant", 0),
    ("LayerNormalization", 3),
    ("GroupNormalization", 3),
    ("InstanceNormalization", 3),
];

/// Every schema problem of one node, as sentences naming it.
pub fn node_problems(model: &Model, node: &Node) -> Vec<String> {
    if !onnx::is_default_domain(node.domain()) {
        return Vec::new();
    }
    let mut out = Vec::new();
    let op = node.op();
    if let Some(&(_, max)) = MAX_INPUTS.iter().find(|(o, _)| *o == op)
        && node.inputs.len() > max
    {
        out.push(format!(
            "{}: {op} takes at most {max} input{}, has {}",
            node.describe(),
            if max == 1 { "" } else { "s" },
            node.inputs.len()
        ));
    }
    for &(_, name, required, want) in ATTRIBUTES.iter().filter(|(o, ..)| *o == op) {
        match node.attr(name) {
            None if required => out.push(format!(
                "{}: attribute '{name}' is required",
                node.describe()
            )),
            None => {}
            Some(a) => {
                if let Err(why) = check_attribute(a, want) {
                    out.push(format!("{}: attribute '{name}' {why}", node.describe()));
                }
            }
        }
    }
    if op == "Split" && model.opset("").is_some_and(|v| v >= 13) && node.attr("split").is_some() {
        out.push(format!(
            "{}: attribute 'split' is not in Split at opset 13 and later (an input since)",
            node.describe()
        ));
    }
    if op == "Constant" {
        for a in &node.proto.attribute {
            if let Some(t) = &a.t
                && let Err(why) = tensor_problem(t)
            {
                out.push(format!("{}: attribute '{}' {why}", node.describe(), a.name));
            }
        }
    }
    out
}

/// Why an attribute does not hold what its schema asks, if it does not.
fn check_attribute(a: &AttributeProto, want: Want) -> Result<(), String> {
    let ty = AttributeType::try_from(a.r#type).unwrap_or(AttributeType::Undefined);
    let kind = |expected: AttributeType| {
        // Exporters leave `type` unset on some attributes; the field holding the value decides.
        if ty == expected || ty == AttributeType::Undefined {
            Ok(())
        } else {
            Err(format!(
                "is {}, must be {}",
                ty.as_str_name(),
                expected.as_str_name()
            ))
        }
    };
    match want {
        Want::Int(lo, hi) => {
            kind(AttributeType::Int)?;
            in_range(a.i, lo, hi)
        }
        Want::Ints(lo, hi) => {
            kind(AttributeType::Ints)?;
            a.ints
                .iter()
                .try_for_each(|&v| in_range(v, lo, hi))
                .map_err(|e| format!("{:?}: {e}", a.ints))
        }
        Want::Perm => {
            kind(AttributeType::Ints)?;
            let n = a.ints.len() as i64;
            let mut seen = vec![false; a.ints.len()];
            for &p in &a.ints {
                if !(0..n).contains(&p) {
                    return Err(format!(
                        "{:?} is not a permutation: {p} is out of range 0..{n}",
                        a.ints
                    ));
                }
                if std::mem::replace(&mut seen[p as usize], true) {
                    return Err(format!(
                        "{:?} is not a permutation: {p} is repeated",
                        a.ints
                    ));
                }
            }
            Ok(())
        }
        Want::Dtype => {
            kind(AttributeType::Int)?;
            known_dtype(a.i as i32)
        }
        Want::Graph => {
            kind(AttributeType::Graph)?;
            a.g.as_ref()
                .map(|_| ())
                .ok_or_else(|| "holds no graph".to_string())
        }
        Want::Float => {
            kind(AttributeType::Float)?;
            if a.f.is_finite() {
                Ok(())
            } else {
                Err(format!("is {}, must be finite", a.f))
            }
        }
    }
}

fn in_range(v: i64, lo: i64, hi: i64) -> Result<(), String> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else if hi == i64::MAX {
        Err(format!("{v} is below {lo}"))
    } else {
        Err(format!("{v} is outside {lo}..={hi}"))
    }
}

/// A defined element type ONNX knows.
pub fn known_dtype(dt: i32) -> Result<(), String> {
    match DataType::try_from(dt) {
        Ok(DataType::Undefined) | Err(_) => Err(format!("names an unknown element type ({dt})")),
        Ok(_) => Ok(()),
    }
}

/// Why a tensor (a Constant's value, an initializer) cannot be read as it declares itself.
pub fn tensor_problem(t: &TensorProto) -> Result<(), String> {
    known_dtype(t.data_type)?;
    let Some(count) = onnx::element_count(&t.dims) else {
        return Err(format!("has dims {:?}: negative or too large", t.dims));
    };
    if count > MAX_ELEMENTS {
        return Err(format!(
            "has dims {:?}: {count} elements, more than attune's limit of {MAX_ELEMENTS}",
            t.dims
        ));
    }
    if !t.external_data.is_empty() {
        return Ok(()); // read and checked by the external-data loader
    }
    let Some(expected) = onnx::byte_len(t.data_type, count) else {
        return Ok(()); // strings: no fixed size
    };
    let actual = if t.raw_data.is_empty() {
        weights::typed_field_bytes(t)
            .map_err(|e| e.to_string())?
            .len() as u64
    } else {
        t.raw_data.len() as u64
    };
    if actual != expected {
        return Err(format!(
            "holds {actual} bytes but dims {:?} of {} need {expected}",
            t.dims,
            onnx::type_name(t.data_type)
        ));
    }
    Ok(())
}
