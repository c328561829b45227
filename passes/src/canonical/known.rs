//! Values shape inference knows completely (sizes computed from the declared input dims,
//! `Gather(Shape(x), 1)` of a known channel count) become initializers.
use std::collections::HashSet;

use attune_compiler::Result;
use attune_compiler::analysis::shapes::declared_dims;
use attune_compiler::analysis::{Dim, ElemTypes, Num, Shapes};
use attune_compiler::ir::{Graph, Model, NodeId, ValueId};
use attune_compiler::onnx::DataType;
use attune_compiler::patch::{In, Patch};

/// Integer and boolean values inference knows completely become initializers.
pub fn fold_known_values(model: &mut Model, shapes: &Shapes) -> Result<usize> {
    let g = &model.graph;
    let types = ElemTypes::infer(g)?;
    let mut p = Patch::new(model);
    let mut folded = 0;
    let mut settable = Settable::of_inputs(g);
    for n in g.topo_order()? {
        let node = g.node(n);
        if settable.propagate(g, n) {
            continue;
        }
        if node.is("Constant") {
            continue;
        }
        for v in node.outputs.iter().flatten().copied() {
            if g.is_graph_output(v) {
                continue;
            }
            let Some(bytes) = known_bytes(shapes, types.get(v), v) else {
                continue;
            };
            let (data_type, dims, data) = bytes;
            let name = p.constant(&fold_name(g, n), data_type, dims, data);
            p.replace(v, In::New(name));
            folded += 1;
        }
    }
    p.into_parts().apply(model)?;
    Ok(folded)
}

/// What an input with a default (a hook's or adapter's setting, fed or not at run time) may
/// change from run to run: inference read the default, so these stay computed. Its values
/// reach what is computed from it; its size, only where its dims are not fixed, and sizes
/// computed from its values (a Reshape target, an Expand shape).
struct Settable {
    values: HashSet<ValueId>,
    sizes: HashSet<ValueId>,
}

impl Settable {
    fn of_inputs(g: &Graph) -> Settable {
        let mut s = Settable {
            values: HashSet::new(),
            sizes: HashSet::new(),
        };
        for io in g
            .inputs
            .iter()
            .filter(|io| g.initializer(io.value).is_some())
        {
            s.values.insert(io.value);
            if declared_dims(&io.info)
                .unwrap_or_default()
                .iter()
                .any(|d| d.known().is_none())
            {
                s.sizes.insert(io.value);
            }
        }
        s
    }

    /// Marks the node's outputs; is any of them settable?
    fn propagate(&mut self, g: &Graph, n: NodeId) -> bool {
        let node = g.node(n);
        let ins: Vec<(usize, ValueId)> = node
            .inputs
            .iter()
            .enumerate()
            .filter_map(|(i, v)| Some((i, (*v)?)))
            .collect();
        let sized = ins.iter().any(|(_, v)| self.sizes.contains(v));
        let size_from_values = ins
            .iter()
            .any(|&(i, v)| self.values.contains(&v) && size_input(node.op(), i));
        let valued = match node.op() {
            "Shape" | "Size" => sized,
            _ => ins.iter().any(|(_, v)| self.values.contains(v)),
        };
        let outputs = node.outputs.iter().flatten().copied();
        if sized || size_from_values {
            self.sizes.extend(outputs.clone());
        }
        if valued || sized {
            self.values.extend(outputs);
        }
        valued || sized || size_from_values
    }
}

/// Does input `slot` of `op` decide the size of its output?
fn size_input(op: &str, slot: usize) -> bool {
    match op {
        "ConstantOfShape" | "NonZero" | "Range" => true,
        "Reshape" | "Expand" | "Tile" | "Slice" | "Resize" | "TopK" | "Pad" | "Squeeze"
        | "Unsqueeze" | "Split" | "Compress" | "OneHot" => slot >= 1,
        _ => false,
    }
}

fn fold_name(g: &Graph, n: NodeId) -> String {
    let node = g.node(n);
    format!("{}/attune_fixed", node.module.trim_end_matches('/'))
}

type Encoded = (DataType, Vec<i64>, Vec<u8>);

/// The value's bytes, when inference knows every element: integers and bools, and floats
/// that are sizes (whole numbers the type holds exactly: a `Range` limit cast from a size).
fn known_bytes(shapes: &Shapes, elem_type: Option<i32>, v: ValueId) -> Option<Encoded> {
    let dims: Vec<i64> = shapes
        .shape(v)?
        .iter()
        .map(Dim::known)
        .collect::<Option<_>>()?;
    let data_type = DataType::try_from(elem_type?).ok()?;
    let exact = match data_type {
        DataType::Float | DataType::Double => 1 << 24,
        DataType::Float16 => 1 << 11,
        _ => 0,
    };
    let values: Vec<i64> = shapes
        .value(v)?
        .iter()
        .map(|n| match n {
            Num::I(d) => d.known(),
            Num::F(f) if f.fract() == 0.0 && f.abs() <= exact as f64 => Some(*f as i64),
            Num::F(_) => None,
        })
        .collect::<Option<_>>()?;
    let count = dims.iter().try_fold(1i64, |acc, d| acc.checked_mul(*d));
    if count != Some(values.len() as i64) {
        return None;
    }
    let data = match data_type {
        DataType::Int64 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DataType::Int32 => values
            .iter()
            .map(|&x| i32::try_from(x).ok())
            .collect::<Option<Vec<_>>>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DataType::Bool => values.iter().map(|&x| (x != 0) as u8).collect(),
        DataType::Float => values
            .iter()
            .flat_map(|&x| (x as f32).to_le_bytes())
            .collect(),
        DataType::Double => values
            .iter()
            .flat_map(|&x| (x as f64).to_le_bytes())
            .collect(),
        DataType::Float16 => values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x as f32).to_le_bytes())
            .collect(),
        _ => return None,
    };
    Some((data_type, dims, data))
}
