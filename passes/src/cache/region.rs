//! A region of the graph made switchable: its nodes move into the `then` branch of an `If`
//! whose `else` branch reuses what an earlier step computed (the caller builds it: a cached
//! value passed through, or a cached residual added). One graph, one session, the weights
//! stored once: the branch reads them from the enclosing graph.
use std::collections::HashSet;

use attune_compiler::analysis::types::ElemTypes;
use attune_compiler::analysis::{Dim, Shapes};
use attune_compiler::error::{Error, Result};
use attune_compiler::ir::{Graph, Model, NodeId, ValueId};
use attune_compiler::onnx::attribute_proto::AttributeType;
use attune_compiler::onnx::tensor_shape_proto::dimension::Value as DimValue;
use attune_compiler::onnx::{self, AttributeProto, DataType, GraphProto, NodeProto};
use attune_compiler::patch::{AppliedPatch, In, Patch};

/// The nodes only `cuts` need: ancestors of the cuts that no graph output (but the cuts), and
/// none of `needed`, reaches without going through a cut.
pub fn nodes_only_for(model: &Model, cuts: &[ValueId], needed: &[ValueId]) -> Result<Vec<NodeId>> {
    let g = &model.graph;
    let reads = |n: NodeId| {
        let node = g.node(n);
        node.inputs
            .iter()
            .flatten()
            .chain(&node.implicit_inputs)
            .copied()
            .collect::<Vec<_>>()
    };
    let mut live: HashSet<NodeId> = HashSet::new();
    let mut work: Vec<NodeId> = g
        .outputs
        .iter()
        .map(|o| o.value)
        .filter(|v| !cuts.contains(v))
        .chain(needed.iter().copied())
        .filter_map(|v| g.producer(v))
        .collect();
    while let Some(n) = work.pop() {
        if !live.insert(n) {
            continue;
        }
        for v in reads(n) {
            if !cuts.contains(&v) {
                work.extend(g.producer(v));
            }
        }
    }
    let mut region: HashSet<NodeId> = HashSet::new();
    let mut work: Vec<NodeId> = cuts.iter().filter_map(|c| g.producer(*c)).collect();
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

/// The region `main` cuts off (see [`nodes_only_for`]), and the extra graph outputs it computes:
/// outputs besides the first (attention maps of `--hooks capture`) that derive from the region's
/// work. Those are cut too and reused as they were on skipped steps; the other extra outputs
/// stay live.
pub fn region_with_outputs(
    model: &Model,
    main: &[ValueId],
    needed: &[ValueId],
) -> Result<(Vec<NodeId>, Vec<ValueId>)> {
    let g = &model.graph;
    let extra: Vec<ValueId> = g.outputs.iter().skip(1).map(|o| o.value).collect();
    if extra.is_empty() {
        return Ok((nodes_only_for(model, main, needed)?, Vec::new()));
    }
    let all: Vec<ValueId> = main.iter().chain(&extra).copied().collect();
    let wide: HashSet<NodeId> = nodes_only_for(model, &all, needed)?.into_iter().collect();
    // The region's work proper: what the main cuts need inside it.
    let core = ancestors_within(g, main, &wide);
    let derived: Vec<ValueId> = extra
        .into_iter()
        .filter(|v| !ancestors_within(g, &[*v], &wide).is_disjoint(&core))
        .collect();
    let cuts: Vec<ValueId> = main.iter().chain(&derived).copied().collect();
    Ok((nodes_only_for(model, &cuts, needed)?, derived))
}

/// The producers of `values` and their ancestors, staying inside `within`.
fn ancestors_within(g: &Graph, values: &[ValueId], within: &HashSet<NodeId>) -> HashSet<NodeId> {
    let mut seen = HashSet::new();
    let mut work: Vec<NodeId> = values.iter().filter_map(|v| g.producer(*v)).collect();
    while let Some(n) = work.pop() {
        if !within.contains(&n) || !seen.insert(n) {
            continue;
        }
        let node = g.node(n);
        for v in node.inputs.iter().flatten().chain(&node.implicit_inputs) {
            work.extend(g.producer(*v));
        }
    }
    seen
}

/// A reuse branch's pass-through of the values of an earlier step: an input
/// `{prefix}.cached_output.{name}` per graph output `name` (declared without a shape), and its
/// Identity node and branch output.
pub fn passed_outputs(
    p: &mut Patch,
    g: &Graph,
    types: &Types,
    outputs: &[ValueId],
    prefix: &str,
) -> (Vec<NodeProto>, Vec<onnx::ValueInfoProto>) {
    let mut nodes = Vec::new();
    let mut infos = Vec::new();
    for v in outputs {
        let name = &g.value(*v).name;
        let output = g
            .outputs
            .iter()
            .find(|o| o.value == *v)
            .map_or(name, |o| &o.info.name);
        let input = p.graph_input(
            onnx::tensor_info(
                &format!(
                    "{prefix}{}{output}",
                    attune_compiler::cache_io::CACHED_OUTPUT
                ),
                types.elem(*v),
                None,
            ),
            None,
        );
        let passed = p.fresh(&format!("{input}_passed"));
        nodes.push(NodeProto {
            name: format!("{prefix}/reuse_{output}"),
            op_type: "Identity".into(),
            input: vec![input],
            output: vec![passed.clone()],
            ..Default::default()
        });
        infos.push(onnx::tensor_info(&passed, types.elem(*v), None));
    }
    (nodes, infos)
}

/// Element type and (where inferred) shape of each value.
pub struct Types {
    elem: ElemTypes,
    shapes: Shapes,
}

impl Types {
    pub fn infer(model: &Model) -> Result<Types> {
        Ok(Types {
            elem: ElemTypes::infer(&model.graph)?,
            shapes: Shapes::infer(model),
        })
    }

    pub fn elem(&self, v: ValueId) -> DataType {
        self.elem
            .get(v)
            .and_then(|t| DataType::try_from(t).ok())
            .unwrap_or(DataType::Float)
    }

    pub fn shape(&self, v: ValueId) -> Option<&[Dim]> {
        self.shapes.shape(v)
    }

    /// The value's shape as ONNX dims, if every dim is known or a symbol expression.
    pub fn onnx_dims(&self, v: ValueId) -> Option<Vec<DimValue>> {
        self.shape(v)?
            .iter()
            .map(|d| match d {
                Dim::Known(k) => Some(DimValue::DimValue(*k)),
                d if d.to_string().contains('?') => None,
                d => Some(DimValue::DimParam(d.to_string())),
            })
            .collect()
    }

    /// Dims of the value's rank, each a symbol of its own named after `name`: a cache input
    /// the runtime may feed an empty tensor before the first computed step.
    pub fn any_dims(&self, v: ValueId, name: &str) -> Option<Vec<DimValue>> {
        let rank = self.shape(v)?.len();
        let base = name.replace('.', "_");
        Some(
            (0..rank)
                .map(|k| DimValue::DimParam(format!("{base}_dim{k}")))
                .collect(),
        )
    }
}

/// A graph attribute `name`.
fn graph_attr(name: &str, g: GraphProto) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Graph as i32,
        g: Some(g),
        ..Default::default()
    }
}

/// A branch of plain nodes with these outputs.
pub fn branch(name: &str, node: Vec<NodeProto>, outputs: Vec<onnx::ValueInfoProto>) -> GraphProto {
    GraphProto {
        name: name.into(),
        node,
        output: outputs,
        ..Default::default()
    }
}

/// Records in `p` an `If` on `cond` whose `then` branch is `region` computing `cuts` and
/// whose `else` branch is `reuse` (outputs in the order of `cuts`); every reader of a cut
/// reads the If's output instead. Returns the If's outputs. Apply with [`apply`].
#[allow(clippy::too_many_arguments)] // the If's parts, each from its caller
pub fn switch(
    p: &mut Patch,
    g: &Graph,
    region: &[NodeId],
    cuts: &[ValueId],
    types: &Types,
    cond: In,
    reuse: GraphProto,
    name: &str,
) -> Result<Vec<String>> {
    let computed = |c: &ValueId| g.producer(*c).is_some_and(|p| region.contains(&p));
    if region.is_empty() || !cuts.iter().all(computed) {
        return Err(Error::Graph(format!(
            "{name}: the values to cache are needed elsewhere too: nothing would be skipped"
        )));
    }
    // A cut that is a graph output keeps its name outside (the If's output takes it), so inside
    // the branch it is computed under another.
    let inside = |v: ValueId| {
        let name = g.value(v).name.clone();
        if g.is_graph_output(v) {
            format!("{name}/computed")
        } else {
            name
        }
    };
    let renamed: Vec<(String, String)> = cuts
        .iter()
        .filter(|c| g.is_graph_output(**c))
        .map(|c| (g.value(*c).name.clone(), inside(*c)))
        .collect();
    // ONNX Runtime binds a branch's read of an overridable initializer (a graph input with a
    // default, such as a LoRA adapter's A and B) to the default, not to what is fed: the
    // branch reads such inputs through an Identity outside it.
    let mut renamed = renamed;
    let mut overridable: Vec<ValueId> = Vec::new();
    for n in region {
        for v in g.node(*n).inputs.iter().flatten() {
            let fed = g.inputs.iter().any(|io| io.value == *v) && g.initializer(*v).is_some();
            if fed && !overridable.contains(v) {
                overridable.push(*v);
            }
        }
    }
    for v in overridable {
        let through = p.op(
            "Identity",
            &format!("{name}/fed"),
            vec![In::Value(v)],
            vec![],
            "",
            None,
        );
        renamed.push((g.value(v).name.clone(), through));
    }
    let mut nodes: Vec<NodeProto> = region.iter().map(|n| g.node_to_proto(*n)).collect();
    for n in &mut nodes {
        for name in n.input.iter_mut().chain(n.output.iter_mut()) {
            if let Some((_, to)) = renamed.iter().find(|(from, _)| from == name) {
                *name = to.clone();
            }
        }
    }
    let then_branch = branch(
        &format!("{name}_compute"),
        nodes,
        cuts.iter()
            .map(|c| onnx::tensor_info(&inside(*c), types.elem(*c), None))
            .collect(),
    );
    let last = *region.last().expect("not empty");
    let module = g.node(last).module.clone();
    let outs = p.node(
        "If",
        "",
        &format!("{name}/If"),
        vec![cond],
        cuts.len(),
        vec![
            graph_attr("then_branch", then_branch),
            graph_attr("else_branch", reuse),
        ],
        &module,
        Some(last),
    );
    for (c, o) in cuts.iter().zip(&outs) {
        p.replace(*c, In::New(o.clone()));
    }
    for &n in region {
        p.drop_node(n);
    }
    Ok(outs)
}

/// The values the region's nodes compute.
pub fn values_of(g: &Graph, region: &[NodeId]) -> Vec<ValueId> {
    region
        .iter()
        .flat_map(|n| g.node(*n).outputs.iter().flatten().copied())
        .collect()
}

/// A value's declared type: (name, element type, dims).
pub type Declared = (String, DataType, Vec<DimValue>);

/// Applies a patch holding [`switch`]es: links what their branches read from the graph, gives
/// their outputs the shapes of the values they replace (`shapes`), and removes the region's
/// values `computed` ([`values_of`]: the branches define those names now).
pub fn apply(
    model: &mut Model,
    patch: AppliedPatch,
    computed: Vec<ValueId>,
    shapes: Vec<Declared>,
) -> Result<()> {
    let added = patch.apply(model)?;
    let g = &mut model.graph;
    for v in computed {
        if let Err(e) = g.remove_value(v) {
            let readers: Vec<String> = g
                .value(v)
                .consumers
                .iter()
                .map(|u| g.node(u.node()).describe())
                .collect();
            let producer = g.producer(v).map(|n| g.node(n).describe());
            return Err(Error::Graph(format!(
                "{e} (read by {readers:?}, made by {producer:?}, output {})",
                g.is_graph_output(v)
            )));
        }
    }
    let switches: Vec<NodeId> = added.into_iter().filter(|n| g.node(*n).is("If")).collect();
    for n in switches {
        let mut free: Vec<String> = Vec::new();
        for a in &g.node(n).proto.attribute {
            for b in a.subgraphs() {
                let defined: HashSet<&str> = b
                    .node
                    .iter()
                    .flat_map(|x| x.output.iter().map(String::as_str))
                    .collect();
                for x in &b.node {
                    for i in &x.input {
                        if !i.is_empty() && !defined.contains(i.as_str()) && !free.contains(i) {
                            free.push(i.clone());
                        }
                    }
                }
            }
        }
        for name in free {
            let v = g.value_id(&name).ok_or_else(|| {
                Error::Graph(format!(
                    "a cached branch reads '{name}', which nothing defines"
                ))
            })?;
            g.add_implicit_input(n, v);
        }
    }
    for (name, elem, dims) in shapes {
        if let Some(v) = g.value_id(&name) {
            g.set_value_info(v, onnx::tensor_info(&name, elem, Some(dims)));
        }
    }
    attune_compiler::dce::dce(model);
    Ok(())
}
