//! Exported LayerNorms → `LayerNormalization`.
//!
//! Below opset 17 ONNX has no LayerNormalization, so torch writes `nn.LayerNorm` out:
//! ReduceMean → Sub → Pow 2 → ReduceMean → Add ε → Sqrt → Div → Mul γ → Add β (diffusers'
//! conversion script and optimum export Stable Diffusion at opset 14). Nothing that looks
//! for a transformer block's norms finds these, and converted to fp16 the square overflows
//! beyond ±256. This pass writes each one as the op (statistics in fp32: `stash_type` 1),
//! raising the model to opset 17, so token merging, the hooks, the CUDA fusions and the
//! precision pass see the graph an opset-17 export would have given.
use attune_compiler::analysis::Shapes;
use attune_compiler::ir::{Graph, Model, NodeId, ValueId};
use attune_compiler::onnx::DataType;
use attune_compiler::pass::{Pass, PassCx, PassReport};
use attune_compiler::patch::{In, Patch, attr};
use attune_compiler::pattern::{Cx, Match, Pat, alt, any, op, through};
use attune_compiler::rule::{self, Rule};
use attune_compiler::{Error, Result};

/// LayerNormalization's first opset.
const LAYER_NORM_OPSET: i64 = 17;

pub struct LayerNormPass;

/// `x − mean(x)`, then normalised: `centered / √(mean(centered²) + ε)`, the reciprocal form
/// of ONNX's own function expansion, or either with `centered · centered`. fp16 exports
/// cast `centered` to f64 for the statistics, and the quotient back.
fn normalized() -> Pat {
    let centered = through(
        CAST,
        op("Sub", [any("x"), op("ReduceMean", [any("x")]).bind("mean")]).bind("centered"),
    );
    let again = || through(CAST, any("centered"));
    let square = alt([
        op("Pow", [again(), any("two")]),
        op("Mul", [again(), again()]),
    ]);
    let std = op(
        "Sqrt",
        [op(
            "Add",
            [op("ReduceMean", [square]).bind("variance"), any("epsilon")],
        )
        .commutative()],
    );
    through(
        CAST,
        alt([
            op("Div", [centered.clone(), std.clone()]),
            op("Mul", [centered, op("Reciprocal", [std])]).commutative(),
        ]),
    )
}

const CAST: &[&str] = &["Cast"];

/// The whole LayerNorm: normalised, then scaled by γ and shifted by β (each optional).
fn layer_norm() -> [Pat; 3] {
    let scaled = op("Mul", [normalized(), any("gamma")]).commutative();
    [
        op("Add", [scaled.clone(), any("beta")]).commutative(),
        scaled,
        normalized(),
    ]
}

/// One exported LayerNorm → LayerNormalization.
struct LayerNormRule;

impl Rule for LayerNormRule {
    fn name(&self) -> &'static str {
        "exported LayerNorms -> LayerNormalization"
    }

    /// The means: a refused match is reported at its first (both name the same module).
    fn anchor(&self) -> Option<&'static str> {
        Some("ReduceMean")
    }

    fn pattern(&self) -> Pat {
        alt(layer_norm())
    }

    fn check(&self, cx: &Cx, m: &Match) -> std::result::Result<(), String> {
        site(cx, m).map(|_| ())
    }

    fn rewrite(&self, cx: &Cx, m: &Match, p: &mut Patch) -> Vec<&'static str> {
        rewrite(p, cx.g, &site(cx, m).expect("checked"));
        Vec::new()
    }
}

fn rules() -> Vec<Box<dyn Rule>> {
    vec![Box::new(LayerNormRule)]
}

impl Pass for LayerNormPass {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        let mut report = PassReport::default();
        let from = model.opset("").unwrap_or(0);
        if rule::count(model, &rules())? > 0 && from < LAYER_NORM_OPSET {
            let notes = crate::attention::upgrade_default_opset(model, LAYER_NORM_OPSET)
                .map_err(|why| {
                    Error::Graph(format!(
                        "writing LayerNorms as LayerNormalization needs opset {LAYER_NORM_OPSET}: {why}"
                    ))
                })?;
            report.notes.extend(notes);
        }
        rule::apply(model, &rules(), &mut report)?;
        Ok(report)
    }
}

/// How many LayerNorms the model has written out (what the pass would rewrite).
pub fn written_out(model: &Model) -> usize {
    rule::count(model, &rules()).unwrap_or(0)
}

/// One exported LayerNorm.
struct Site {
    x: ValueId,
    gamma: Option<ValueId>,
    beta: Option<ValueId>,
    epsilon: f32,
    width: i64,
    dtype: DataType,
    /// The value the op replaces, and the node that computes it.
    out: ValueId,
    end: NodeId,
    /// The first ReduceMean (its module names the norm).
    mean: NodeId,
}

/// Checks what the pattern cannot: both means over the last axis only, kept; the exponent 2;
/// ε, γ and β constants that LayerNormalization can take.
fn site(cx: &Cx, m: &Match) -> std::result::Result<Site, String> {
    let (g, shapes, types) = (cx.g, cx.shapes, cx.types);
    let out = m.root.ok_or("no root")?;
    let end = g.producer(out).ok_or("no producer")?;
    let bound = |name: &str| m.value(name).ok_or_else(|| format!("no {name}"));
    let x = bound("x")?;
    let rank = shapes
        .shape(x)
        .map(<[_]>::len)
        .ok_or("unknown input rank")?;
    let width = shapes
        .shape(x)
        .and_then(|s| s.last()?.known())
        .ok_or("the normalised axis has no known size")?;
    for name in ["mean", "variance"] {
        let n = m.node(name).ok_or("unbound mean")?;
        if !reduces_last_axis_only(g, shapes, n, rank) {
            return Err(format!(
                "{} does not average the last axis alone (keeping it)",
                g.node(n).describe()
            ));
        }
    }
    if let Some(two) = m.value("two")
        && shapes.scalar(two) != Some(2.0)
    {
        return Err("the variance is not of the square".into());
    }
    let epsilon = m
        .value("epsilon")
        .and_then(|e| shapes.scalar(e))
        .filter(|e| *e >= 0.0)
        .ok_or("ε is not a non-negative constant")?;
    let dtype = types
        .get(x)
        .and_then(|t| DataType::try_from(t).ok())
        .filter(|t| {
            matches!(
                t,
                DataType::Float | DataType::Float16 | DataType::Bfloat16 | DataType::Double
            )
        })
        .ok_or("the input is not a float tensor")?;
    if types.get(out).is_some_and(|t| t != dtype as i32) {
        return Err("the result is cast to another type than the input's".into());
    }
    let affine = |name: &str| -> std::result::Result<Option<ValueId>, String> {
        let Some(v) = m.value(name) else {
            return Ok(None);
        };
        let fits = g.initializer(v).is_some()
            && types.get(v) == Some(dtype as i32)
            && shapes
                .shape(v)
                .is_some_and(|s| s.len() == 1 && s[0].known() == Some(width));
        fits.then_some(Some(v))
            .ok_or_else(|| format!("{name} is not a constant [{width}] of the input's type"))
    };
    Ok(Site {
        x,
        gamma: affine("gamma")?,
        beta: affine("beta")?,
        epsilon: epsilon as f32,
        width,
        dtype,
        out,
        end,
        mean: m.node("mean").ok_or("unbound mean")?,
    })
}

/// A ReduceMean over the last of `rank` axes alone, with keepdims (attribute axes below
/// opset 18, an input from 18).
fn reduces_last_axis_only(g: &Graph, shapes: &Shapes, n: NodeId, rank: usize) -> bool {
    let node = g.node(n);
    if node.attr("keepdims").is_some_and(|a| a.i == 0) {
        return false;
    }
    let axes: Option<Vec<i64>> = match node.attr("axes") {
        Some(a) => Some(a.ints.clone()),
        None => node
            .inputs
            .get(1)
            .copied()
            .flatten()
            .and_then(|v| shapes.value(v))
            .and_then(|vals| vals.iter().map(|x| x.as_i64()).collect()),
    };
    let last = rank as i64 - 1;
    matches!(axes.as_deref(), Some([a]) if *a == -1 || *a == last)
}

fn rewrite(p: &mut Patch, g: &Graph, s: &Site) {
    let module = g.node(s.mean).module.clone();
    let constant = |p: &mut Patch, given: Option<ValueId>, tag: &str, value: f64| {
        given.map(In::Value).unwrap_or_else(|| {
            let bytes = filled(s.dtype, value, s.width as usize);
            In::New(p.constant(&format!("{module}.{tag}"), s.dtype, vec![s.width], bytes))
        })
    };
    let gamma = constant(p, s.gamma, "weight", 1.0);
    let beta = constant(p, s.beta, "bias", 0.0);
    let out = p.op(
        "LayerNormalization",
        &format!("{module}/attune_LayerNormalization"),
        vec![In::Value(s.x), gamma, beta],
        vec![
            attr::int("axis", -1),
            attr::float("epsilon", s.epsilon),
            attr::int("stash_type", DataType::Float as i64),
        ],
        &module,
        Some(s.end),
    );
    p.replace(s.out, In::New(out));
}

/// `n` elements of `value` in `dtype`'s little-endian bytes.
fn filled(dtype: DataType, value: f64, n: usize) -> Vec<u8> {
    let one: Vec<u8> = match dtype {
        DataType::Float16 => half::f16::from_f64(value).to_le_bytes().to_vec(),
        DataType::Bfloat16 => half::bf16::from_f64(value).to_le_bytes().to_vec(),
        DataType::Double => value.to_le_bytes().to_vec(),
        _ => (value as f32).to_le_bytes().to_vec(),
    };
    one.repeat(n)
}
