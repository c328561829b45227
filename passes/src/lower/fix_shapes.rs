//! Fixed input shapes: specialise a model to one set of input sizes and fold the shape
//! arithmetic that then has a single value. Exporters compute sizes at run time (`Shape →
//! Gather → Concat`), small nodes ONNX Runtime places on the CPU between the CUDA kernels;
//! with every size fixed they become constants (and `If`s on sizes their branch taken), and a
//! graph left with no CPU node is what CUDA graph capture (`attune bench --cuda-graph`) needs.
use std::collections::{BTreeMap, HashSet};

use attune_compiler::analysis::{Dim, Shapes, shapes};
use attune_compiler::error::{Error, Result};
use attune_compiler::ir::{Graph, Model, ValueId};
use attune_compiler::onnx::{self, ValueInfoProto, tensor_shape_proto::dimension};
use attune_compiler::pass::{Pass, PassCx, PassReport};

use crate::cleanup::dce;

/// One entry of `--fix-shapes`: an input's full shape (`sample=2x4x64x64`) or one dim
/// symbol of the inputs (`batch=2`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeSpec {
    pub name: String,
    pub sizes: Vec<i64>,
}

impl ShapeSpec {
    /// `sample=2x4x64x64,batch=2`
    pub fn parse_list(text: &str) -> std::result::Result<Vec<ShapeSpec>, String> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|item| {
                let (name, sizes) = item.split_once('=').ok_or_else(|| {
                    format!("--fix-shapes '{item}': expected INPUT=AxBx.. or SYMBOL=N")
                })?;
                let sizes = sizes
                    .split(['x', 'X'])
                    .map(|s| match s.trim().parse::<i64>() {
                        Ok(v) if v > 0 => Ok(v),
                        _ => Err(format!(
                            "--fix-shapes '{item}': '{}' is not a positive size",
                            s.trim()
                        )),
                    })
                    .collect::<std::result::Result<_, _>>()?;
                Ok(ShapeSpec {
                    name: name.trim().to_string(),
                    sizes,
                })
            })
            .collect()
    }
}

pub struct FixShapes {
    pub specs: Vec<ShapeSpec>,
}

impl Pass for FixShapes {
    fn name(&self) -> &'static str {
        "fix-shapes"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        let mut report = PassReport::default();
        let mut symbols = solve(&model.graph, &self.specs)?;
        let equal = Shapes::infer(model).equal_input_symbols().clone();
        report
            .notes
            .extend(size_equal_symbols(&mut symbols, &equal)?);
        check_defaults(&model.graph, &symbols)?;
        check_representable(&model.graph, &symbols)?;
        report.rewritten.push(
            symbols
                .iter()
                .map(|(s, v)| format!("{s}={v}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        fix_declarations(&mut model.graph, &symbols);
        report.notes.extend(still_dynamic(&model.graph));
        let shapes = Shapes::infer(model);
        check_sizes(&model.graph, &shapes)?;
        let before = model.graph.node_count();
        let folded = crate::canonical::fold_known_values(model, &shapes)?;
        let inlined = super::decided_if::inline(model)?;
        dce(model);
        let shapes = Shapes::infer(model);
        fix_outputs(&mut model.graph, &shapes);
        report.notes.push(format!(
            "{folded} computed sizes made constants, {} nodes fewer",
            before - model.graph.node_count()
        ));
        if inlined > 0 {
            report.notes.push(format!(
                "{inlined} If nodes decided by the sizes: the branch taken inlined"
            ));
        }
        Ok(report)
    }
}

/// Symbols the model uses as one size (inputs that name their batch differently, meeting in
/// a broadcast) all take the size given for any of them; notes on those so sized.
fn size_equal_symbols(
    symbols: &mut BTreeMap<String, i64>,
    equal: &BTreeMap<String, String>,
) -> Result<Vec<String>> {
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (s, first) in equal {
        groups.entry(first).or_insert_with(|| vec![first]).push(s);
    }
    let mut notes = Vec::new();
    for members in groups.values() {
        let sized: Vec<(&str, i64)> = members
            .iter()
            .filter_map(|m| symbols.get(*m).map(|v| (*m, *v)))
            .collect();
        let Some(&(from, size)) = sized.first() else {
            continue;
        };
        if let Some((other, v)) = sized.iter().find(|(_, v)| *v != size) {
            return Err(Error::Graph(format!(
                "--fix-shapes: {from}={size} but {other}={v}, and the model uses them as one size (they broadcast together)"
            )));
        }
        let unsized_: Vec<&str> = members
            .iter()
            .copied()
            .filter(|m| !symbols.contains_key(*m))
            .collect();
        for m in &unsized_ {
            symbols.insert(m.to_string(), size);
        }
        if !unsized_.is_empty() {
            notes.push(format!(
                "{}={size} too: one size with {from} in the model (they broadcast together)",
                unsized_.join(", ")
            ));
        }
    }
    Ok(notes)
}

/// Notes on the dim symbols the inputs still have: one per symbol of a required input, one
/// for all those only inputs with defaults have (a LoRA adapter's ranks, a hook's edits).
fn still_dynamic(g: &Graph) -> Vec<String> {
    let mut open: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let mut required: HashSet<String> = HashSet::new();
    for io in &g.inputs {
        for d in declared_dims(&io.info) {
            for (symbol, _) in d.symbols() {
                let names = open.entry(symbol.to_string()).or_default();
                if !names.contains(&io.info.name.as_str()) {
                    names.push(&io.info.name);
                }
                if g.initializer(io.value).is_none() {
                    required.insert(symbol.to_string());
                }
            }
        }
    }
    let hint = "give it in --fix-shapes for a fully static graph";
    let mut notes: Vec<String> = open
        .iter()
        .filter(|(symbol, _)| required.contains(*symbol))
        .map(|(symbol, names)| {
            let more = match names.len() {
                1 => String::new(),
                n => format!(" and {} more inputs", n - 1),
            };
            format!("{symbol} stays dynamic (in {}{more}); {hint}", names[0])
        })
        .collect();
    let optional: Vec<(&String, &Vec<&str>)> = open
        .iter()
        .filter(|(symbol, _)| !required.contains(*symbol))
        .collect();
    if let Some((symbol, names)) = optional.first() {
        let (more, hint) = match optional.len() {
            1 => (String::new(), hint.to_string()),
            n => (
                format!(" and {} more", n - 1),
                hint.replace(" it ", " them "),
            ),
        };
        notes.push(format!(
            "sizes of inputs with defaults stay dynamic: {symbol} (in {}){more}; {hint}",
            names[0]
        ));
    }
    notes
}

fn declared_dims(info: &ValueInfoProto) -> Vec<Dim> {
    shapes::declared_dims(info).unwrap_or_default()
}

/// The size of every dim symbol the specs decide.
fn solve(g: &Graph, specs: &[ShapeSpec]) -> Result<BTreeMap<String, i64>> {
    let err = |msg: String| Error::Graph(format!("--fix-shapes: {msg}"));
    let inputs: Vec<&ValueInfoProto> = g.inputs.iter().map(|io| &io.info).collect();
    let describe = || {
        inputs
            .iter()
            .map(|i| {
                let dims: Vec<String> = declared_dims(i).iter().map(Dim::to_string).collect();
                format!("{}[{}]", i.name, dims.join(","))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let known_symbols: Vec<String> = inputs
        .iter()
        .flat_map(|i| declared_dims(i))
        .flat_map(|d| d.symbols().map(|(s, _)| s.to_string()).collect::<Vec<_>>())
        .collect();
    let mut symbols = BTreeMap::new();
    // Symbols first, so input shapes can be checked against them.
    let (by_input, by_symbol): (Vec<&ShapeSpec>, Vec<&ShapeSpec>) = specs
        .iter()
        .partition(|s| inputs.iter().any(|i| i.name == s.name));
    for spec in by_symbol {
        if !known_symbols.contains(&spec.name) {
            return Err(err(format!(
                "'{}' is neither an input nor a dim symbol of the inputs ({})",
                spec.name,
                describe()
            )));
        }
        let [size] = spec.sizes[..] else {
            return Err(err(format!(
                "dim symbol '{}' takes one size, not {:?}",
                spec.name, spec.sizes
            )));
        };
        bind(&mut symbols, &spec.name, size, &spec.name)?;
    }
    for spec in by_input {
        let info = inputs.iter().find(|i| i.name == spec.name).expect("input");
        let dims = declared_dims(info);
        if dims.len() != spec.sizes.len() {
            return Err(err(format!(
                "input {} has {} dims ({}), {} given",
                spec.name,
                dims.len(),
                describe(),
                spec.sizes.len()
            )));
        }
        for (axis, (d, &size)) in dims.iter().zip(&spec.sizes).enumerate() {
            let at = match d {
                Dim::Known(_) => format!("input {} dim {axis}", spec.name),
                Dim::Sym { .. } => format!("input {} dim {axis} ({d})", spec.name),
            };
            match d.substitute(&symbols) {
                Some(Dim::Known(k)) if k == size => {}
                Some(Dim::Known(k)) => {
                    return Err(err(format!("{at} is {k}, not {size}")));
                }
                Some(Dim::Sym {
                    num,
                    den,
                    symbols: s,
                }) if s.len() == 1 && s.values().all(|p| *p == 1) => {
                    let name = s.keys().next().expect("one symbol");
                    let scaled = size * den;
                    if scaled % num != 0 {
                        let factor = match den {
                            1 => num.to_string(),
                            _ => format!("{num}/{den}"),
                        };
                        return Err(err(format!("{at}: {size} is not a multiple of {factor}")));
                    }
                    bind(&mut symbols, name, scaled / num, &at)?;
                }
                _ => {
                    return Err(err(format!(
                        "{at}: cannot tell its symbols from one size; give them as SYMBOL=N"
                    )));
                }
            }
        }
    }
    Ok(symbols)
}

/// An input with a default (a hook's setting) keeps the default's shape: a fixed size must
/// agree with it, or ONNX Runtime refuses the model.
fn check_defaults(g: &Graph, symbols: &BTreeMap<String, i64>) -> Result<()> {
    for io in &g.inputs {
        let Some(default) = g.initializer(io.value) else {
            continue;
        };
        for (axis, d) in declared_dims(&io.info).iter().enumerate() {
            let size = default.dims().get(axis).copied();
            if let (Some(Dim::Known(v)), Some(size)) = (d.substitute(symbols), size)
                && v != size
            {
                return Err(Error::Graph(format!(
                    "--fix-shapes: input {} dim {axis} ({d}) would be {v}, but its default has {size} there ({:?}); fixed sizes must agree with the defaults",
                    io.info.name,
                    default.dims()
                )));
            }
        }
    }
    Ok(())
}

/// Every input dim the sizes decide comes out a whole number, and every input's element
/// count fits 64 bits: a size that overflows (`8*height`) would otherwise stay dynamic.
fn check_representable(g: &Graph, symbols: &BTreeMap<String, i64>) -> Result<()> {
    for io in &g.inputs {
        let mut count: Option<i64> = Some(1);
        for (axis, d) in declared_dims(&io.info).iter().enumerate() {
            let decided = d.symbols().any(|(s, _)| symbols.contains_key(s));
            match d.substitute(symbols) {
                Some(Dim::Known(v)) => count = count.and_then(|c| c.checked_mul(v)),
                None if decided => {
                    return Err(Error::Graph(format!(
                        "--fix-shapes: input {} dim {axis} ({d}) is not a 64-bit whole number at these sizes",
                        io.info.name
                    )));
                }
                _ => {}
            }
        }
        if count.is_none() {
            return Err(Error::Graph(format!(
                "--fix-shapes: input {} would hold more than 2^63 elements",
                io.info.name
            )));
        }
    }
    Ok(())
}

fn bind(symbols: &mut BTreeMap<String, i64>, name: &str, size: i64, at: &str) -> Result<()> {
    if size < 1 {
        return Err(Error::Graph(format!(
            "--fix-shapes: {at}: {name} would be {size}"
        )));
    }
    match symbols.insert(name.to_string(), size) {
        Some(old) if old != size => Err(Error::Graph(format!(
            "--fix-shapes: {at} makes {name} {size}, but it is {old} elsewhere"
        ))),
        _ => Ok(()),
    }
}

/// Writes the fixed sizes into the inputs', outputs' and every `value_info` declaration.
pub(crate) fn fix_declarations(g: &mut Graph, symbols: &BTreeMap<String, i64>) {
    let fix = |info: &mut ValueInfoProto| {
        let Some(onnx::type_proto::Value::TensorType(t)) =
            info.r#type.as_mut().and_then(|t| t.value.as_mut())
        else {
            return;
        };
        for d in t.shape.iter_mut().flat_map(|s| s.dim.iter_mut()) {
            if let Some(dimension::Value::DimParam(p)) = &d.value
                && let Some(Dim::Known(v)) = Dim::parse(p).substitute(symbols)
            {
                d.value = Some(dimension::Value::DimValue(v));
            }
        }
    };
    for io in g.inputs.iter_mut().chain(g.outputs.iter_mut()) {
        fix(&mut io.info);
    }
    let ids: Vec<_> = g
        .values()
        .filter(|(_, v)| v.info.is_some())
        .map(|(id, _)| id)
        .collect();
    for id in ids {
        if let Some(info) = g.value_mut(id).info.as_mut() {
            fix(info);
        }
    }
}

/// Outputs get the sizes inference now knows.
fn fix_outputs(g: &mut Graph, shapes: &Shapes) {
    for io in g.outputs.iter_mut() {
        let Some(sizes) = shapes
            .shape(io.value)
            .and_then(|s| s.iter().map(Dim::known).collect::<Option<Vec<_>>>())
        else {
            continue;
        };
        if let Some(onnx::type_proto::Value::TensorType(t)) =
            io.info.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            t.shape = Some(onnx::TensorShapeProto {
                dim: sizes
                    .into_iter()
                    .map(|v| onnx::tensor_shape_proto::Dimension {
                        value: Some(dimension::Value::DimValue(v)),
                        ..Default::default()
                    })
                    .collect(),
            });
        }
    }
}

/// Sizes that cannot meet at these input sizes (a skip connection of another size than the
/// upsampled path it joins) fail here, naming the node, rather than in ONNX Runtime. Axes
/// compare where both sizes are known, so a partial spec (`height=3`) is checked too.
fn check_sizes(g: &Graph, shapes: &Shapes) -> Result<()> {
    let known = |v: Option<ValueId>| {
        shapes
            .shape(v?)
            .map(|s| s.iter().map(Dim::known).collect::<Vec<Option<i64>>>())
    };
    for n in g.topo_order()? {
        let node = g.node(n);
        let ins: Option<Vec<Vec<Option<i64>>>> = node.inputs.iter().map(|v| known(*v)).collect();
        let Some(ins) = ins else { continue };
        let mismatch = match node.op() {
            "Concat" => {
                let rank = ins.first().map_or(0, Vec::len) as i64;
                let a = node.attr("axis").map_or(0, |a| a.i);
                let a = if a < 0 { a + rank } else { a } as usize;
                let strip = |s: &Vec<Option<i64>>| {
                    let mut s = s.clone();
                    if a < s.len() {
                        s.remove(a);
                    }
                    s
                };
                let first = strip(&ins[0]);
                ins.iter().map(strip).any(|s| {
                    s.len() != first.len()
                        || s.iter()
                            .zip(&first)
                            .any(|(x, y)| matches!((x, y), (Some(x), Some(y)) if x != y))
                })
            }
            "Add" | "Sub" | "Mul" | "Div" | "Where" | "Pow" | "Equal" => !broadcasts(&ins),
            _ => false,
        };
        if mismatch {
            let sizes: Vec<String> = ins
                .iter()
                .map(|s| {
                    let dims: Vec<String> = s
                        .iter()
                        .map(|d| d.map_or("?".into(), |d| d.to_string()))
                        .collect();
                    format!("[{}]", dims.join(", "))
                })
                .collect();
            return Err(Error::Node {
                node: node.describe(),
                msg: format!(
                    "inputs of sizes {} do not fit together at these --fix-shapes sizes",
                    sizes.join(", ")
                ),
            });
        }
    }
    Ok(())
}

/// Whether the shapes broadcast together, as far as their known sizes tell.
fn broadcasts(shapes: &[Vec<Option<i64>>]) -> bool {
    let rank = shapes.iter().map(Vec::len).max().unwrap_or(0);
    (0..rank).all(|i| {
        let sizes: Vec<i64> = shapes
            .iter()
            .filter_map(|s| (i + s.len()).checked_sub(rank).and_then(|j| s[j]))
            .filter(|&d| d != 1)
            .collect();
        sizes.windows(2).all(|w| w[0] == w[1])
    })
}
