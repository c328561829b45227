//! Model inputs: what the model declares, checking what the caller gives against it, and
//! seeded random inputs for the rest (symbolic dims from `--dim NAME=V`).
use std::collections::BTreeMap;

use attune_compiler::Model;
use attune_compiler::onnx::{self, tensor_shape_proto::dimension::Value as DimValue};
use half::f16;
use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};
use crate::tensor::{self, DType, HostTensor};

/// Largest random input `prepare` generates (4 GiB); bigger ones must come from files.
const MAX_GENERATED_BYTES: usize = 4 << 30;

/// Deepest parenthesis nesting of a dim expression (the parser recurses per level).
const MAX_NESTING: usize = 64;

/// A declared input.
#[derive(Clone, Debug)]
pub struct InputSpec {
    pub name: String,
    /// Has a default (an overridable initializer, e.g. a LoRA branch): fed only when given.
    pub optional: bool,
    /// ONNX element type (`TensorProto.DataType`).
    pub elem_type: i32,
    pub dims: Vec<Dim>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Dim {
    Fixed(usize),
    /// A symbol or an expression of symbols (`batch`, `8*height`).
    Symbol(String),
    Unknown,
}

impl InputSpec {
    pub fn dtype(&self) -> Option<DType> {
        DType::from_onnx(self.elem_type)
    }

    /// `sample f32[batch,4,height,width]`
    pub fn describe(&self) -> String {
        let dims: Vec<String> = self
            .dims
            .iter()
            .map(|d| match d {
                Dim::Fixed(v) => v.to_string(),
                Dim::Symbol(s) => s.clone(),
                Dim::Unknown => "?".into(),
            })
            .collect();
        format!(
            "{} {}[{}]",
            self.name,
            onnx::type_name(self.elem_type),
            dims.join(",")
        )
    }
}

/// Graph inputs; those with an initializer (overridable defaults) are optional.
pub fn input_specs(model: &Model) -> Vec<InputSpec> {
    let g = &model.graph;
    g.inputs
        .iter()
        .map(|io| {
            let t = io.info.r#type.as_ref().and_then(onnx::tensor_type);
            let dims = t
                .and_then(|t| t.shape.as_ref())
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(DimValue::DimValue(v)) if *v >= 0 => Dim::Fixed(*v as usize),
                            Some(DimValue::DimParam(p)) if !p.is_empty() => Dim::Symbol(p.clone()),
                            _ => Dim::Unknown,
                        })
                        .collect()
                })
                .unwrap_or_default();
            InputSpec {
                name: g.value(io.value).name.clone(),
                optional: g.initializer(io.value).is_some(),
                elem_type: t.map(|t| t.elem_type).unwrap_or(0),
                dims,
            }
        })
        .collect()
}

pub fn output_names(model: &Model) -> Vec<String> {
    model
        .graph
        .outputs
        .iter()
        .map(|io| model.graph.value(io.value).name.clone())
        .collect()
}

/// Values of symbolic dims (`--dim height=64`).
#[derive(Clone, Debug, Default)]
pub struct Dims(pub BTreeMap<String, i64>);

impl Dims {
    /// Parses `NAME=V` items.
    pub fn parse(items: &[String]) -> Result<Dims> {
        let mut map = BTreeMap::new();
        for item in items {
            let (k, v) = item
                .rsplit_once('=')
                .ok_or_else(|| Error::Inputs(format!("--dim '{item}': expected NAME=VALUE")))?;
            let v: i64 = v
                .trim()
                .parse()
                .map_err(|_| Error::Inputs(format!("--dim '{item}': '{v}' is not an integer")))?;
            if v < 0 {
                return Err(Error::Inputs(format!(
                    "--dim '{item}': sizes cannot be negative"
                )));
            }
            map.insert(k.trim().to_string(), v);
        }
        Ok(Dims(map))
    }

    /// The size of a symbolic dim: given literally, or computed from the symbols it uses
    /// (`None` when a symbol has no size); an error for an expression too deep to evaluate.
    pub fn resolve(&self, symbol: &str) -> std::result::Result<Option<i64>, String> {
        match self.0.get(symbol) {
            Some(v) => Ok(Some(*v)),
            None => eval(symbol, &self.0),
        }
    }
}

/// Checks given inputs against the model and fills the missing ones with seeded random
/// data. Inputs come back in the model's order.
pub fn prepare(
    specs: &[InputSpec],
    given: Vec<(String, HostTensor)>,
    dims: &Dims,
    seed: u64,
) -> Result<Vec<(String, HostTensor)>> {
    let expected = || {
        let required: Vec<String> = specs
            .iter()
            .filter(|s| !s.optional)
            .map(|s| format!("  {}", s.describe()))
            .collect();
        let optional = specs.iter().filter(|s| s.optional).count();
        let more = if optional > 0 {
            format!("\n  (and {optional} optional inputs with defaults)")
        } else {
            String::new()
        };
        format!("{}{more}", required.join("\n"))
    };
    for (name, _) in &given {
        if !specs.iter().any(|s| &s.name == name) {
            return Err(Error::Inputs(format!(
                "the model has no input '{name}'; it expects:\n{}",
                expected()
            )));
        }
    }
    // Random data would decide what a step-cached UNet computes, and from what.
    use crate::sample::step_cache as sc;
    for (cache, how) in [
        (
            sc::REFRESH_INPUT,
            format!(
                "give {} (bool [], true computes every block) and {} (the {} output of an earlier step; an empty [0, 0, 0, 0] tensor when refreshing)",
                sc::REFRESH_INPUT,
                sc::CACHED_INPUT,
                sc::FEATURE_OUTPUT
            ),
        ),
        (
            sc::CACHED_INPUT,
            format!("give it and {}", sc::REFRESH_INPUT),
        ),
        (
            sc::PREV_RESIDUAL,
            format!(
                "give {} (a 0 scalar computes every block) and each {}* (the {}* outputs of the last computed step; 0 scalars first)",
                sc::PREV_RESIDUAL,
                sc::CACHED_RESIDUAL,
                sc::RESIDUAL
            ),
        ),
    ] {
        if specs.iter().any(|s| s.name == cache) && !given.iter().any(|(n, _)| n == cache) {
            return Err(Error::Input {
                input: cache.into(),
                msg: format!(
                    "the model is split for step caching (compile --step-cache) and takes the cache as inputs: {how} with --input, or sample it with `attune sample`/`generate`"
                ),
            });
        }
    }
    let mut dims = dims.clone();
    // Sizes the given inputs imply for symbols, checked for consistency.
    let mut seen: BTreeMap<String, (i64, String)> = BTreeMap::new();
    // Float data of the other width is converted: an fp16 model takes fp32 latents.
    let given: Vec<(String, HostTensor)> = given
        .into_iter()
        .map(|(name, t)| {
            let spec = specs
                .iter()
                .find(|s| s.name == name)
                .expect("checked above");
            let t = spec.dtype().and_then(|d| t.float_as(d)).unwrap_or(t);
            (name, t)
        })
        .collect();
    for (name, t) in &given {
        let spec = specs
            .iter()
            .find(|s| &s.name == name)
            .expect("checked above");
        check(spec, t).map_err(|msg| Error::Input {
            input: name.clone(),
            msg: format!("{msg}; the model expects:\n{}", expected()),
        })?;
        for (d, size) in spec.dims.iter().zip(t.shape()) {
            if let Dim::Symbol(sym) = d {
                let size = *size as i64;
                if let Some((prev, from)) = seen.get(sym)
                    && *prev != size
                {
                    return Err(Error::Input {
                        input: name.clone(),
                        msg: format!("dim '{sym}' is {size} here but {prev} in '{from}'"),
                    });
                }
                let resolved = dims.resolve(sym).map_err(|msg| Error::Input {
                    input: name.clone(),
                    msg,
                })?;
                if let Some(want) = resolved
                    && want != size
                {
                    return Err(Error::Input {
                        input: name.clone(),
                        msg: format!("dim '{sym}' is {size} but --dim gives {want}"),
                    });
                }
                seen.insert(sym.clone(), (size, name.clone()));
            }
        }
    }
    for (sym, (size, _)) in &seen {
        dims.0.entry(sym.clone()).or_insert(*size);
    }
    // A given `8*height` of 64 says `height` is 8, for the other inputs that use `height`.
    for (sym, (size, _)) in &seen {
        if let Some((name, k)) = linear_symbol(sym)
            && k > 0
            && size % k == 0
        {
            dims.0.entry(name).or_insert(size / k);
        }
    }
    let to_make: Vec<&InputSpec> = specs
        .iter()
        .filter(|s| !s.optional && !given.iter().any(|(n, _)| *n == s.name))
        .collect();
    if let Some(msg) = missing_dims(&to_make, &dims) {
        return Err(Error::Inputs(msg));
    }
    let mut rng = Rng::new(seed);
    let mut given: BTreeMap<String, HostTensor> = given.into_iter().collect();
    let mut out = Vec::new();
    for spec in specs {
        if let Some(t) = given.remove(&spec.name) {
            out.push((spec.name.clone(), t));
            continue;
        }
        if spec.optional {
            continue;
        }
        let shape = concrete_shape(spec, &dims)?;
        let dtype = spec.dtype().ok_or_else(|| Error::Input {
            input: spec.name.clone(),
            msg: format!(
                "cannot generate random {} data; give it with --input",
                onnx::type_name(spec.elem_type)
            ),
        })?;
        if tensor::byte_count(dtype, &shape).is_none_or(|b| b > MAX_GENERATED_BYTES) {
            return Err(Error::Input {
                input: spec.name.clone(),
                msg: format!(
                    "random {} data of shape {shape:?} would take more than {} GiB; give smaller --dim sizes or the input itself with --input",
                    dtype.name(),
                    MAX_GENERATED_BYTES >> 30
                ),
            });
        }
        out.push((
            spec.name.clone(),
            random(&spec.name, dtype, &shape, &mut rng),
        ));
    }
    Ok(out)
}

/// Does a tensor fit a declared input? (dtype, rank, fixed dims)
fn check(spec: &InputSpec, t: &HostTensor) -> std::result::Result<(), String> {
    if spec.dtype() != Some(t.dtype()) {
        return Err(format!(
            "got {} data, the model declares {}",
            t.dtype().name(),
            onnx::type_name(spec.elem_type)
        ));
    }
    if !spec.dims.is_empty() || t.shape().is_empty() {
        if spec.dims.len() != t.shape().len() {
            return Err(format!(
                "got rank {} (shape {:?}), the model declares rank {}",
                t.shape().len(),
                t.shape(),
                spec.dims.len()
            ));
        }
        for (i, (d, size)) in spec.dims.iter().zip(t.shape()).enumerate() {
            if let Dim::Fixed(want) = d
                && want != size
            {
                return Err(format!(
                    "dim {i} is {size}, the model declares {want} (shape {:?})",
                    t.shape()
                ));
            }
        }
    }
    Ok(())
}

fn concrete_shape(spec: &InputSpec, dims: &Dims) -> Result<Vec<usize>> {
    let mut missing = Vec::new();
    let mut shape = Vec::new();
    for (axis, d) in spec.dims.iter().enumerate() {
        match d {
            Dim::Fixed(v) => shape.push(*v),
            Dim::Symbol(s) => match dims.resolve(s).map_err(|msg| Error::Input {
                input: spec.name.clone(),
                msg,
            })? {
                Some(v) => shape.push(usize::try_from(v).map_err(|_| Error::Input {
                    input: spec.name.clone(),
                    msg: format!(
                        "dim '{}' comes to {v}; sizes cannot be negative",
                        abbreviated(s)
                    ),
                })?),
                None => missing.push(s.clone()),
            },
            // No size and no name (or a negative size): nothing --dim could set.
            Dim::Unknown => {
                return Err(Error::Input {
                    input: spec.name.clone(),
                    msg: format!(
                        "dim {axis} has neither a size nor a name in the model; give the input itself with --input"
                    ),
                });
            }
        }
    }
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().flat_map(|m| symbols(m)).collect();
        let example: Vec<String> = names.iter().map(|n| format!("--dim {n}=N")).collect();
        return Err(Error::Input {
            input: spec.name.clone(),
            msg: format!(
                "symbolic dims {} need sizes: give {} (or the input itself with --input)",
                missing.join(", "),
                example.join(" ")
            ),
        });
    }
    Ok(shape)
}

/// Every symbol the inputs to be made use without a size, in one message: each with the
/// inputs (and dims) that use it, and what an expression such as dynamo's `8*height` means.
/// `None` when every symbol has a size.
fn missing_dims(specs: &[&InputSpec], dims: &Dims) -> Option<String> {
    // Symbol -> the uses (input, axis, declared expression), in the order the inputs use them.
    type Uses = Vec<(String, usize, String)>;
    let mut missing: Vec<(String, Uses)> = Vec::new();
    for spec in specs {
        for (axis, d) in spec.dims.iter().enumerate() {
            let Dim::Symbol(expr) = d else { continue };
            if !matches!(dims.resolve(expr), Ok(None)) {
                continue;
            }
            for sym in symbols(expr) {
                if dims.0.contains_key(&sym) {
                    continue;
                }
                let use_ = (spec.name.clone(), axis, expr.clone());
                match missing.iter_mut().find(|(s, _)| *s == sym) {
                    Some((_, uses)) => uses.push(use_),
                    None => missing.push((sym, vec![use_])),
                }
            }
        }
    }
    if missing.is_empty() {
        return None;
    }
    let width = missing.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
    let flags: Vec<String> = missing
        .iter()
        .map(|(s, _)| format!("--dim {s}=N"))
        .collect();
    let mut msg = format!(
        "symbolic dims need sizes: give {} (or those inputs with --input)",
        flags.join(" ")
    );
    for (sym, uses) in &missing {
        let described: Vec<String> = uses
            .iter()
            .map(|(input, axis, expr)| describe_use(sym, input, *axis, expr, specs))
            .collect();
        msg.push_str(&format!("\n  {sym:<width$}  {}", described.join(", ")));
    }
    Some(msg)
}

/// `input 'sample' dim 2`, or with an expression `input 'sample' dim 2 = 8*height: height is
/// the latent's height divided by 8 ...`.
fn describe_use(sym: &str, input: &str, axis: usize, expr: &str, specs: &[&InputSpec]) -> String {
    if expr == sym {
        return format!("input '{input}' dim {axis}");
    }
    let what = match linear_symbol(expr) {
        Some((_, k)) if k > 1 => {
            let rank = specs
                .iter()
                .find(|s| s.name == input)
                .map_or(0, |s| s.dims.len());
            let side = match (input, rank, axis) {
                ("sample", 4, 2) => "the latent's height".to_string(),
                ("sample", 4, 3) => "the latent's width".to_string(),
                _ => format!("{input}'s dim {axis}"),
            };
            let example = if 64 % k == 0 {
                format!(" (e.g. --dim {sym}={} when it is 64)", 64 / k)
            } else {
                String::new()
            };
            format!(": {sym} is {side} divided by {k}{example}")
        }
        _ => String::new(),
    };
    format!("input '{input}' dim {axis} = {}{what}", abbreviated(expr))
}

/// A dim that is a symbol times a constant: `height` (1), `8*height` or `height*8` (8).
pub fn linear_symbol(expr: &str) -> Option<(String, i64)> {
    match tokenize(expr)?.as_slice() {
        [Tok::Ident(s)] => Some((s.clone(), 1)),
        [Tok::Num(k), Tok::Op('*'), Tok::Ident(s)] | [Tok::Ident(s), Tok::Op('*'), Tok::Num(k)] => {
            Some((s.clone(), *k))
        }
        _ => None,
    }
}

/// Random data: normal(0, 1) for floats; timesteps uniform in [0, 1000); integers in [0, 100).
fn random(name: &str, dtype: DType, shape: &[usize], rng: &mut Rng) -> HostTensor {
    let timestep = name.contains("timestep");
    let float = |rng: &mut Rng| {
        if timestep {
            (rng.next_f64() * 1000.0).floor()
        } else {
            rng.normal()
        }
    };
    let sh = IxDyn(shape);
    match dtype {
        DType::F32 => HostTensor::F32(ArrayD::from_shape_fn(sh, |_| float(rng) as f32)),
        DType::F16 => HostTensor::F16(ArrayD::from_shape_fn(sh, |_| f16::from_f64(float(rng)))),
        DType::I64 => HostTensor::I64(ArrayD::from_shape_fn(sh, |_| {
            (rng.next_f64() * if timestep { 1000.0 } else { 100.0 }) as i64
        })),
        DType::I32 => HostTensor::I32(ArrayD::from_shape_fn(sh, |_| {
            (rng.next_f64() * if timestep { 1000.0 } else { 100.0 }) as i32
        })),
        DType::Bool => HostTensor::Bool(ArrayD::from_shape_fn(sh, |_| rng.next_f64() < 0.5)),
    }
}

/// SplitMix64: small, seedable, identical on every platform.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub(crate) fn normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Identifiers used in a dim expression.
fn symbols(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_alphanumeric() || c == '_' {
            cur.push(c);
        } else if !cur.is_empty() {
            if !cur.chars().all(|c| c.is_ascii_digit()) && !out.contains(&cur) {
                out.push(cur.clone());
            }
            cur.clear();
        }
    }
    out
}

/// Evaluates a dim expression such as `8*height` or `(s0 + 1)//2` with integer arithmetic;
/// `None` for unknown symbols, overflow or bad syntax, an error for too deep nesting.
fn eval(expr: &str, vars: &BTreeMap<String, i64>) -> std::result::Result<Option<i64>, String> {
    let Some(tokens) = tokenize(expr) else {
        return Ok(None);
    };
    let mut depth = 0usize;
    for t in &tokens {
        match t {
            Tok::Op('(') => depth += 1,
            Tok::Op(')') => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > MAX_NESTING {
            return Err(format!(
                "dim expression '{}' nests parentheses more than {MAX_NESTING} deep",
                abbreviated(expr)
            ));
        }
    }
    let mut p = Parser {
        tokens: &tokens,
        pos: 0,
        vars,
    };
    Ok(p.sum().filter(|_| p.pos == tokens.len()))
}

/// The start of a long expression, for messages.
fn abbreviated(expr: &str) -> String {
    const SHOWN: usize = 40;
    match expr.char_indices().nth(SHOWN) {
        Some((at, _)) => format!("{}...", &expr[..at]),
        None => expr.to_string(),
    }
}

#[derive(Debug, PartialEq)]
enum Tok {
    Num(i64),
    Ident(String),
    Op(char),
}

fn tokenize(s: &str) -> Option<Vec<Tok>> {
    let mut out = Vec::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            out.push(Tok::Num(
                chars[start..i].iter().collect::<String>().parse().ok()?,
            ));
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
        } else if "+-*/()".contains(c) {
            // `//` (Python floor division) is the same as `/` on sizes.
            if c == '/' && chars.get(i + 1) == Some(&'/') {
                i += 1;
            }
            out.push(Tok::Op(c));
            i += 1;
        } else {
            return None;
        }
    }
    Some(out)
}

struct Parser<'a> {
    tokens: &'a [Tok],
    pos: usize,
    vars: &'a BTreeMap<String, i64>,
}

impl Parser<'_> {
    fn sum(&mut self) -> Option<i64> {
        let mut v = self.product()?;
        while let Some(Tok::Op(op @ ('+' | '-'))) = self.tokens.get(self.pos) {
            self.pos += 1;
            let r = self.product()?;
            v = if *op == '+' {
                v.checked_add(r)?
            } else {
                v.checked_sub(r)?
            };
        }
        Some(v)
    }
    fn product(&mut self) -> Option<i64> {
        let mut v = self.atom()?;
        while let Some(Tok::Op(op @ ('*' | '/'))) = self.tokens.get(self.pos) {
            self.pos += 1;
            let r = self.atom()?;
            v = if *op == '*' {
                v.checked_mul(r)?
            } else {
                v.checked_div(r)?
            };
        }
        Some(v)
    }
    fn atom(&mut self) -> Option<i64> {
        let t = self.tokens.get(self.pos)?;
        self.pos += 1;
        match t {
            Tok::Num(n) => Some(*n),
            Tok::Ident(name) => self.vars.get(name).copied(),
            Tok::Op('(') => {
                let v = self.sum()?;
                (self.tokens.get(self.pos) == Some(&Tok::Op(')'))).then(|| self.pos += 1)?;
                Some(v)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dim_expressions() {
        let d = Dims::parse(&["height=2".into(), "batch=3".into()]).unwrap();
        assert_eq!(d.resolve("8*height"), Ok(Some(16)));
        assert_eq!(d.resolve("(batch + 1)//2"), Ok(Some(2)));
        assert_eq!(d.resolve("width"), Ok(None));
        let deep = format!("{}height{}", "(".repeat(100_000), ")".repeat(100_000));
        assert!(d.resolve(&deep).unwrap_err().contains("more than 64 deep"));
        let nested = format!("{}height{}", "(".repeat(64), ")".repeat(64));
        assert_eq!(d.resolve(&nested), Ok(Some(2)));
        assert_eq!(symbols("8*height + w_1"), ["height", "w_1"]);
        assert!(Dims::parse(&["x".into()]).is_err());
    }

    #[test]
    fn missing_dims_are_listed_at_once() {
        let spec = |name: &str, dims: &[&str]| InputSpec {
            name: name.into(),
            optional: false,
            elem_type: 1,
            dims: dims
                .iter()
                .map(|d| match d.parse() {
                    Ok(v) => Dim::Fixed(v),
                    Err(_) => Dim::Symbol(d.to_string()),
                })
                .collect(),
        };
        let specs = [
            spec("sample", &["batch", "4", "8*height", "8*width"]),
            spec("timestep", &["batch"]),
            spec("encoder_hidden_states", &["batch", "sequence", "32"]),
        ];
        let err = prepare(&specs, vec![], &Dims::default(), 0)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "symbolic dims need sizes: give --dim batch=N --dim height=N --dim width=N --dim sequence=N"
            ),
            "{err}"
        );
        assert!(
            err.contains(
                "input 'sample' dim 0, input 'timestep' dim 0, input 'encoder_hidden_states' dim 0"
            ),
            "{err}"
        );
        assert!(
            err.contains(
                "input 'sample' dim 2 = 8*height: height is the latent's height divided by 8"
            ),
            "{err}"
        );
        assert!(err.contains("input 'encoder_hidden_states' dim 1"), "{err}");
        // A given latent of 64 says height = 8 for the rest; only `sequence` is then missing.
        let sample = HostTensor::F32(ArrayD::zeros(IxDyn(&[2, 4, 64, 48])));
        let err = prepare(
            &specs,
            vec![("sample".into(), sample.clone())],
            &Dims::default(),
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("symbolic dims need sizes: give --dim sequence=N"),
            "{err}"
        );
        let dims = Dims::parse(&["sequence=7".into()]).unwrap();
        let out = prepare(&specs, vec![("sample".into(), sample)], &dims, 0).unwrap();
        assert_eq!(out[2].1.shape(), &[2, 7, 32]);
        assert_eq!(linear_symbol("height*8"), Some(("height".into(), 8)));
        assert_eq!(linear_symbol("height+1"), None);
    }

    #[test]
    fn rng_is_deterministic() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..10 {
            assert_eq!(a.normal(), b.normal());
        }
    }
}
