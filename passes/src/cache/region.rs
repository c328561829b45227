//! A region of the graph made switchable: its nodes move into the `then` branch of an `If`
//! whose `else` branch passes a cached value through. The condition and the cached value are
//! new graph inputs, the value the region computes (fresh or cached) a new graph output, so
//! the runtime keeps it between steps. One graph, one session, the weights stored once: the
//! branch reads them from the enclosing graph.
use std::collections::HashSet;

use attune_compiler::analysis::types::ElemTypes;
use attune_compiler::analysis::{Dim, Shapes};
use attune_compiler::error::{Error, Result};
use attune_compiler::ir::{Model, NodeId, ValueId};
use attune_compiler::onnx::attribute_proto::AttributeType;
use attune_compiler::onnx::tensor_shape_proto::dimension::Value as DimValue;
use attune_compiler::onnx::{self, AttributeProto, DataType, GraphProto, NodeProto};
use attune_compiler::patch::{In, Patch};

/// The names a split graph is run by.
#[derive(Clone, Copy, Debug)]
pub struct CacheIo {
    /// bool [] input: true computes the region, false passes `cached` through.
    pub refresh: &'static str,
    /// Input: the value of an earlier refresh step (any shape on refresh steps).
    pub cached: &'static str,
    /// Output: the region's value this step, to feed back as `cached`.
    pub value: &'static str,
}

/// The nodes only `cut` needs: ancestors of `cut` that no graph output reaches without going
/// through `cut`. Empty if every ancestor is needed elsewhere too.
pub fn nodes_only_for(model: &Model, cut: ValueId) -> Result<Vec<NodeId>> {
    let g = &model.graph;
    let mut live: HashSet<NodeId> = HashSet::new();
    let mut work: Vec<NodeId> = g
        .outputs
        .iter()
        .filter_map(|o| g.producer(o.value))
        .collect();
    let reads = |n: NodeId| {
        let node = g.node(n);
        node.inputs
            .iter()
            .flatten()
            .chain(&node.implicit_inputs)
            .copied()
            .collect::<Vec<_>>()
    };
    while let Some(n) = work.pop() {
        if !live.insert(n) {
            continue;
        }
        for v in reads(n) {
            if v != cut {
                work.extend(g.producer(v));
            }
        }
    }
    let mut region: HashSet<NodeId> = HashSet::new();
    let mut work: Vec<NodeId> = g.producer(cut).into_iter().collect();
    while let Some(n) = work.pop() {
        if live.contains(&n) || !region.insert(n) {
            continue;
        }
        for v in reads(n) {
            work.extend(g.producer(v));
        }
    }
    Ok(g.topo_order()?
        .into_iter()
        .filter(|n| region.contains(n))
        .collect())
}

/// Moves `region` (in topological order, computing `cut`) into an `If` on `io.refresh`.
pub fn make_switchable(
    model: &mut Model,
    region: &[NodeId],
    cut: ValueId,
    io: CacheIo,
) -> Result<()> {
    let g = &model.graph;
    if region.is_empty() || g.producer(cut).is_none_or(|p| !region.contains(&p)) {
        return Err(Error::Graph(format!(
            "'{}': no nodes compute it for the graph outputs alone",
            g.value(cut).name
        )));
    }
    for name in [io.refresh, io.cached, io.value] {
        if g.value_id(name).is_some() {
            return Err(Error::Graph(format!(
                "the graph already has a value '{name}': was it split before?"
            )));
        }
    }
    let elem = ElemTypes::infer(g)?
        .get(cut)
        .unwrap_or(DataType::Float as i32);
    let elem = DataType::try_from(elem).unwrap_or(DataType::Float);
    let shape: Option<Vec<Dim>> = Shapes::infer(model).shape(cut).map(<[Dim]>::to_vec);
    let rank = shape.as_ref().map(Vec::len);
    let inside: HashSet<NodeId> = region.iter().copied().collect();
    let mut free: Vec<ValueId> = Vec::new();
    for &n in region {
        let node = g.node(n);
        for v in node.inputs.iter().flatten().chain(&node.implicit_inputs) {
            let from_outside = g.producer(*v).is_none_or(|p| !inside.contains(&p));
            if from_outside && !free.contains(v) {
                free.push(*v);
            }
        }
    }
    // Symbolic dims: the runtime feeds an empty tensor before the first refresh.
    let any_dims = rank.map(|r| {
        (0..r)
            .map(|k| DimValue::DimParam(format!("{}_dim{k}", io.cached.replace('.', "_"))))
            .collect()
    });
    let then_branch = GraphProto {
        name: format!("{}_compute", io.value),
        node: region.iter().map(|n| g.node_to_proto(*n)).collect(),
        output: vec![onnx::tensor_info(&g.value(cut).name, elem, None)],
        ..Default::default()
    };
    let mut p = Patch::new(model);
    let refresh = p.graph_input(
        onnx::tensor_info(io.refresh, DataType::Bool, Some(vec![])),
        None,
    );
    let cached = p.graph_input(onnx::tensor_info(io.cached, elem, any_dims), None);
    let passed = p.fresh(&format!("{}_passed", io.cached));
    let else_branch = GraphProto {
        name: format!("{}_reuse", io.value),
        node: vec![NodeProto {
            name: format!("{}/reuse", io.value),
            op_type: "Identity".into(),
            input: vec![cached.clone()],
            output: vec![passed.clone()],
            ..Default::default()
        }],
        output: vec![onnx::tensor_info(&passed, elem, None)],
        ..Default::default()
    };
    let branch = |name: &str, g: GraphProto| AttributeProto {
        name: name.into(),
        r#type: AttributeType::Graph as i32,
        g: Some(g),
        ..Default::default()
    };
    let last = *region.last().expect("not empty");
    let module = g.node(last).module.clone();
    let switched = p.op(
        "If",
        &format!("{}/If", io.value),
        vec![In::New(refresh)],
        vec![
            branch("then_branch", then_branch),
            branch("else_branch", else_branch),
        ],
        &module,
        Some(last),
    );
    p.replace(cut, In::New(switched.clone()));
    p.graph_output(In::New(switched.clone()), io.value, elem, &module, Some(last));
    let computed: Vec<ValueId> = region
        .iter()
        .flat_map(|n| g.node(*n).outputs.iter().flatten().copied())
        .collect();
    for &n in region {
        p.drop_node(n);
    }
    let added = p.into_parts().apply(model)?;
    let g = &mut model.graph;
    let if_node = added
        .into_iter()
        .find(|n| g.node(*n).is("If"))
        .expect("the patch adds the If");
    for v in free {
        g.add_implicit_input(if_node, v);
    }
    // The If's output has the region's shape: analyses of the split graph (inspect's
    // attention sites) keep their sizes.
    if let (Some(dims), Some(v)) = (shape, g.value_id(&switched)) {
        let dims = dims
            .iter()
            .map(|d| match d {
                Dim::Known(k) => Some(DimValue::DimValue(*k)),
                d if d.to_string().contains('?') => None,
                d => Some(DimValue::DimParam(d.to_string())),
            })
            .collect::<Option<Vec<_>>>();
        if let Some(dims) = dims {
            let name = g.value(v).name.clone();
            g.set_value_info(v, onnx::tensor_info(&name, elem, Some(dims)));
        }
    }
    // The branch defines these names now; the enclosing graph must not declare them.
    for v in computed {
        g.remove_value(v)?;
    }
    attune_compiler::dce::dce(model);
    Ok(())
}
