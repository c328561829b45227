//! Precision lowering: run the model's data path in fp16 or bf16, weights converted on disk,
//! with numerically sensitive ops kept in fp32 islands behind Casts:
//! - normalisation (Instance/Group/Layer/BatchNormalization) and Reduce* statistics;
//! - scatters that accumulate (ToMe's merge sums many tokens into one);
//! - the sinusoidal timestep projection (`time_proj`, `add_time_proj`): `t·freq` reaches
//!   the thousands, where fp16's spacing is 0.5 and sin/cos of it would be noise;
//! - every Sin/Cos and the product that makes its angle (Flux's rotary position embedding:
//!   `position·freq` of 64 is already off by 0.03 in fp16).
//!
//! Softmax stays low: ORT's fp16 CUDA softmax accumulates in fp32 inside the kernel.
//! An `If` whose branches only pass a value through (torch's trace of `x.squeeze(1)`) takes
//! that value's new type; a control-flow body that computes on floats is refused.
//! Shape arithmetic (everything computed from `Shape`, not from the inputs' values) keeps its
//! types. Graph inputs and outputs take the new precision unless `keep_io_types`.
use std::collections::{HashMap, HashSet};

use attune_compiler::analysis::ElemTypes;
use attune_compiler::error::{Error, Result};
use attune_compiler::ir::{Graph, Model, NodeId, ValueId};
use attune_compiler::onnx::DataType;
use attune_compiler::pass::{Pass, PassCx, PassReport};
use attune_compiler::patch::{In, Patch, attr};
use attune_compiler::weights::{Tensor, Transform};

use crate::cleanup::dce;

/// A value that needs a converted copy: (value, target type, copy's name, its readers).
type CastCopy = (ValueId, i32, String, Vec<(NodeId, usize)>);

/// The floating-point type a model computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn data_type(self) -> DataType {
        match self {
            Precision::F32 => DataType::Float,
            Precision::F16 => DataType::Float16,
            Precision::Bf16 => DataType::Bfloat16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "fp32",
            Precision::F16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Converts the data path to `precision` (fp16 or bf16).
pub struct PrecisionPass {
    pub precision: Precision,
    pub keep_io_types: bool,
}

/// Ops whose statistics stay in fp32 (LayerNormalization only when its `stash_type` does not
/// already make it accumulate in fp32).
const STATISTICS: &[&str] = &[
    "InstanceNormalization",
    "GroupNormalization",
    "BatchNormalization",
    "RMSNormalization",
    "ReduceMean",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
];

/// Modules (last path segment) computed in fp32: the sinusoidal timestep projections.
const FP32_MODULES: &[&str] = &["time_proj", "add_time_proj"];

fn is_float(t: Option<i32>) -> bool {
    matches!(
        t.and_then(|t| DataType::try_from(t).ok()),
        Some(DataType::Float | DataType::Float16 | DataType::Bfloat16)
    )
}

/// Input slots that take any type, or a fixed one, whatever the node computes in.
pub(crate) fn typeless_slot(op: &str, slot: usize) -> bool {
    matches!(
        (op, slot),
        ("Cast" | "CastLike" | "Shape" | "Size", 0)
            | ("Resize", 1 | 2)
            | ("Upsample", 1)
            | ("GroupNorm" | "SkipGroupNorm", 1 | 2) // ONNX Runtime's kernel takes fp32 γ/β
    )
}

/// A Scatter that accumulates (`reduction` other than `none`).
pub(crate) fn reducing_scatter(node: &attune_compiler::ir::Node) -> bool {
    matches!(node.op(), "ScatterElements" | "ScatterND")
        && node.attr("reduction").is_some_and(|a| a.s != b"none")
}

/// Is the node an fp32 island?
pub fn keeps_fp32(g: &Graph, n: NodeId) -> bool {
    let node = g.node(n);
    let stashes_fp32 = node
        .attr("stash_type")
        .is_none_or(|a| a.i == DataType::Float as i64);
    STATISTICS.contains(&node.op())
        || node.op() == "LayerNormalization" && !stashes_fp32
        || reducing_scatter(node)
        || FP32_MODULES.contains(&node.module.rsplit('.').next().unwrap_or(""))
        || is_trigonometric(node)
        || makes_angles(g, n)
}

fn is_trigonometric(node: &attune_compiler::ir::Node) -> bool {
    matches!(node.op(), "Sin" | "Cos")
}

/// A product read only by Sin/Cos: the angles.
fn makes_angles(g: &Graph, n: NodeId) -> bool {
    let node = g.node(n);
    let readers = || {
        node.outputs
            .iter()
            .flatten()
            .flat_map(|v| &g.value(*v).consumers)
    };
    matches!(node.op(), "Mul" | "Div" | "MatMul" | "Einsum" | "Gemm")
        && !node.outputs.iter().flatten().any(|v| g.is_graph_output(*v))
        && readers().next().is_some()
        && readers().all(|u| is_trigonometric(g.node(u.node())))
}

/// The type each node computes in after the pass (only for nodes that change).
struct Plan {
    compute: HashMap<NodeId, i32>,
}

/// Removes Casts whose input already has the target type (exports cast to the compute type,
/// which the conversion made the low type); returns how many.
fn drop_identity_casts(model: &mut Model) -> Result<usize> {
    let types = ElemTypes::infer(&model.graph)?;
    let g = &model.graph;
    let pairs: Vec<(ValueId, ValueId)> = g
        .node_ids()
        .filter(|n| g.node(*n).is("Cast"))
        .filter_map(|n| {
            let node = g.node(n);
            let (x, y) = (
                node.inputs.first().copied()??,
                node.outputs.first().copied()??,
            );
            let to = node.attr("to")?.i as i32;
            (types.get(x) == Some(to) && !g.is_graph_output(y)).then_some((y, x))
        })
        .collect();
    for &(y, x) in &pairs {
        model.graph.replace_all_uses(y, x);
    }
    Ok(pairs.len())
}

/// Values computed from the values of the graph inputs (not just their shapes).
pub(super) fn data_values(g: &Graph, order: &[NodeId]) -> HashSet<ValueId> {
    let mut data: HashSet<ValueId> = g.inputs.iter().map(|io| io.value).collect();
    for &n in order {
        let node = g.node(n);
        if matches!(node.op(), "Shape" | "Size") {
            continue;
        }
        let reads = node.inputs.iter().flatten().chain(&node.implicit_inputs);
        if reads.into_iter().any(|v| data.contains(v)) {
            data.extend(node.outputs.iter().flatten());
        }
    }
    data
}

fn plan(g: &Graph, types: &ElemTypes, order: &[NodeId], low: i32) -> Plan {
    let data = data_values(g, order);
    let mut compute = HashMap::new();
    for &n in order {
        let node = g.node(n);
        if has_subgraph(node) {
            continue; // typed by what its branches pass through (`passthrough_sources`)
        }
        let reads_data = node.inputs.iter().flatten().any(|v| data.contains(v));
        let floaty = node
            .inputs
            .iter()
            .enumerate()
            .filter(|(slot, _)| !typeless_slot(node.op(), *slot))
            .filter_map(|(_, v)| *v)
            .chain(node.outputs.iter().flatten().copied())
            .any(|v| is_float(types.get(v)));
        if reads_data && floaty {
            let t = if keeps_fp32(g, n) {
                DataType::Float as i32
            } else {
                low
            };
            compute.insert(n, t);
        }
    }
    Plan { compute }
}

/// Float `Constant` nodes (exports write some γ/β and scalars that way) become initializers
/// of the same name, so converting them rewrites their data instead of adding a Cast node.
fn hoist_float_constants(model: &mut Model) -> usize {
    let g = &model.graph;
    let found: Vec<(NodeId, Tensor)> = g
        .node_ids()
        .filter_map(|n| {
            let node = g.node(n);
            if !node.domain().is_empty() || !node.is("Constant") {
                return None;
            }
            let out = node.outputs.first().copied().flatten()?;
            let value = node.proto.attribute.first().filter(|a| a.name == "value")?;
            let mut proto = value.t.clone()?;
            if g.is_graph_output(out) || !is_float(Some(proto.data_type)) {
                return None;
            }
            proto.name = g.value(out).name.clone();
            Some((
                n,
                Tensor {
                    proto,
                    data: attune_compiler::weights::TensorData::Inline,
                },
            ))
        })
        .collect();
    let count = found.len();
    for (n, tensor) in found {
        model.graph.remove_node(n);
        model.graph.set_initializer(tensor);
    }
    count
}

fn has_subgraph(node: &attune_compiler::ir::Node) -> bool {
    node.proto
        .attribute
        .iter()
        .any(|a| a.subgraphs().next().is_some())
}

/// Ops that move data without computing on it: their output has their data input's type.
const PASSTHROUGH: &[&str] = &[
    "Identity",
    "Squeeze",
    "Unsqueeze",
    "Reshape",
    "Flatten",
    "Transpose",
    "Slice",
    "Gather",
    "Expand",
];

/// For each float output of an `If`, the outer values its branches pass through unchanged
/// (empty for another output); an error naming the node when a branch computes on floats, or
/// for another control-flow op with float outputs.
fn passthrough_sources(g: &Graph, types: &ElemTypes, n: NodeId) -> Result<Vec<Vec<ValueId>>> {
    let node = g.node(n);
    let refuse = |why: String| {
        Error::Graph(format!(
            "{}: {why}; --precision converts no control-flow body that computes on floats \
             (keep this model in fp32)",
            node.describe()
        ))
    };
    let outputs = node.outputs.len();
    if !node.is("If") {
        // The body's declared outputs say what it returns (the outer types may be unknown).
        let declared_float = node
            .proto
            .attribute
            .iter()
            .flat_map(|a| a.subgraphs())
            .flat_map(|b| &b.output)
            .any(|o| {
                let t = o
                    .r#type
                    .as_ref()
                    .and_then(attune_compiler::onnx::tensor_type);
                is_float(t.map(|t| t.elem_type))
            });
        if declared_float {
            return Err(refuse(format!("its {} body returns floats", node.op())));
        }
        return Ok(vec![Vec::new(); outputs]);
    }
    let mut sources = vec![Vec::new(); outputs];
    for (i, source) in sources.iter_mut().enumerate() {
        let mut found = Vec::new();
        for branch in node.proto.attribute.iter().flat_map(|a| a.subgraphs()) {
            let producer: HashMap<&str, &attune_compiler::onnx::NodeProto> = branch
                .node
                .iter()
                .flat_map(|p| p.output.iter().map(move |o| (o.as_str(), p)))
                .collect();
            let mut name = branch.output.get(i).map(|o| o.name.as_str()).unwrap_or("");
            while let Some(p) = producer.get(name) {
                if !PASSTHROUGH.contains(&p.op_type.as_str()) {
                    return Err(refuse(format!("a branch computes ({})", p.op_type)));
                }
                name = p.input.first().map(String::as_str).unwrap_or("");
            }
            let outer = g
                .value_id(name)
                .ok_or_else(|| refuse(format!("a branch returns '{name}', not an outer value")))?;
            found.push(outer);
        }
        if found.iter().all(|v| is_float(types.get(*v))) {
            *source = found;
        }
    }
    Ok(sources)
}

/// A float tensor's data converted to `to` (f32, f16 or bf16), values beyond the new type's
/// range clamped to its largest finite value. Computed when the export writes it (weights of
/// the input files: see `Tensor::transformed`) or now (data a pass made); the count is of
/// values clamped now (the export reports the others).
pub(super) fn convert_tensor(t: &Tensor, to: i32) -> Result<(Tensor, usize)> {
    let is_float = |t: i32| {
        matches!(
            DataType::try_from(t),
            Ok(DataType::Float | DataType::Float16 | DataType::Bfloat16)
        )
    };
    if !is_float(t.data_type()) {
        return Err(Error::tensor(t.name(), "is not a float tensor"));
    }
    let to = DataType::try_from(to)
        .ok()
        .filter(|to| is_float(*to as i32))
        .ok_or_else(|| Error::tensor(t.name(), "cannot be converted to that type"))?;
    let (converted, clamped) = t.transformed(Transform::Convert(to))?;
    Ok((converted, clamped as usize))
}

fn set_elem_type(info: &mut attune_compiler::onnx::ValueInfoProto, t: i32) {
    if let Some(attune_compiler::onnx::type_proto::Value::TensorType(tt)) =
        info.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        tt.elem_type = t;
    }
}

impl Pass for PrecisionPass {
    fn name(&self) -> &'static str {
        "precision"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        let mut report = PassReport::default();
        if self.precision == Precision::F32 {
            return Ok(report);
        }
        let low = self.precision.data_type() as i32;
        let f32t = DataType::Float as i32;
        let hoisted = hoist_float_constants(model);
        if hoisted > 0 {
            report.notes.push(format!(
                "{hoisted} float Constant nodes made initializers (converted as data, not Cast)"
            ));
        }
        let g = &model.graph;
        let types = ElemTypes::infer(g)?;
        let order = g.topo_order()?;
        let plan = plan(g, &types, &order, low);
        let graph_inputs: HashSet<ValueId> = g.inputs.iter().map(|io| io.value).collect();

        // The type every value has after the pass.
        let mut new_type: HashMap<ValueId, i32> = HashMap::new();
        for io in &g.inputs {
            if !self.keep_io_types && is_float(types.get(io.value)) {
                new_type.insert(io.value, low);
            }
        }
        for (&n, &t) in &plan.compute {
            for v in g.node(n).outputs.iter().flatten() {
                if is_float(types.get(*v)) {
                    new_type.insert(*v, t);
                }
            }
        }
        // Control flow: an If's outputs take the type of what its branches pass through.
        let mut branch_types: Vec<(NodeId, usize, i32)> = Vec::new();
        for &n in &order {
            if !has_subgraph(g.node(n)) {
                continue;
            }
            for (i, sources) in passthrough_sources(g, &types, n)?.into_iter().enumerate() {
                let Some(Some(out)) = g.node(n).outputs.get(i) else {
                    continue;
                };
                let of = |v: &ValueId| new_type.get(v).copied().or(types.get(*v));
                let mut kinds: Vec<i32> = sources.iter().filter_map(of).collect();
                kinds.sort_unstable();
                kinds.dedup();
                let t = match kinds[..] {
                    [t] => t,
                    [] => continue,
                    _ => {
                        return Err(Error::Graph(format!(
                            "{}: its branches return values that convert to different types",
                            g.node(n).describe()
                        )));
                    }
                };
                if Some(t) != types.get(*out) {
                    new_type.insert(*out, t);
                    branch_types.push((n, i, t));
                }
            }
        }
        let type_of = |v: ValueId| new_type.get(&v).copied().or(types.get(v));

        // Every read whose type does not match what its node computes in.
        let mut casts: HashMap<(ValueId, i32), Vec<(NodeId, usize)>> = HashMap::new();
        let mut n_islands = 0;
        for &n in &order {
            let Some(&t) = plan.compute.get(&n) else {
                continue;
            };
            n_islands += usize::from(t == f32t);
            let node = g.node(n);
            for (slot, v) in node.inputs.iter().enumerate() {
                let Some(v) = *v else { continue };
                if typeless_slot(node.op(), slot) || !is_float(type_of(v)) || type_of(v) == Some(t)
                {
                    continue;
                }
                casts.entry((v, t)).or_default().push((n, slot));
            }
        }

        let mut p = Patch::new(model);
        let mut in_place: Vec<(ValueId, i32)> = Vec::new();
        let mut copies: Vec<CastCopy> = Vec::new();
        let mut n_casts = 0;
        let mut keys: Vec<_> = casts.keys().copied().collect();
        keys.sort();
        for (v, t) in keys {
            let at = casts.remove(&(v, t)).expect("key");
            let value = g.value(v);
            if value.initializer.is_some() && !graph_inputs.contains(&v) {
                if at.len() == value.consumers.len() && !g.is_graph_output(v) {
                    in_place.push((v, t));
                } else {
                    let name = p.fresh(&format!(
                        "{}_{}",
                        value.name,
                        attune_compiler::onnx::type_name(t)
                    ));
                    copies.push((v, t, name, at));
                }
                continue;
            }
            let (module, after) = match value.producer {
                Some((prod, _)) => (g.node(prod).module.clone(), Some(prod)),
                None => (g.node(at[0].0).module.clone(), None),
            };
            let name = format!(
                "{}/attune_cast_{}",
                module,
                attune_compiler::onnx::type_name(t)
            );
            let out = p.op(
                "Cast",
                &name,
                vec![In::Value(v)],
                vec![attr::int("to", t as i64)],
                &module,
                after,
            );
            p.rewire_inputs(at, out);
            n_casts += 1;
        }
        // Graph outputs that became low are cast back when the caller keeps the I/O types.
        let mut output_casts = Vec::new();
        if self.keep_io_types {
            for io in &g.outputs {
                let (before, after) = (types.get(io.value), type_of(io.value));
                if let (Some(before), Some(after)) = (before, after)
                    && before != after
                {
                    let prod = g.value(io.value).producer.map(|(n, _)| n);
                    let module = prod.map(|n| g.node(n).module.clone()).unwrap_or_default();
                    let name = format!("{module}/attune_cast_output");
                    let out = p.op(
                        "Cast",
                        &name,
                        vec![In::Value(io.value)],
                        vec![attr::int("to", before as i64)],
                        &module,
                        prod,
                    );
                    output_casts.push((io.value, out));
                    n_casts += 1;
                }
            }
        }
        let patch = p.into_parts();

        // Weights: converted where only converted nodes read them, copied where others do too.
        let mut clamped = 0;
        let mut converted = 0u64;
        for (v, t) in in_place {
            let (tensor, c) = convert_tensor(model.graph.initializer(v).expect("initializer"), t)?;
            clamped += c;
            converted += 1;
            model.graph.set_initializer(tensor);
            new_type.insert(v, t);
        }
        for (v, t, name, at) in copies {
            let (mut tensor, c) =
                convert_tensor(model.graph.initializer(v).expect("initializer"), t)?;
            tensor.proto.name = name.clone();
            clamped += c;
            converted += 1;
            let id = model.graph.set_initializer(tensor);
            for (n, slot) in at {
                model.graph.set_input(n, slot, Some(id));
            }
        }
        // Graph inputs that are overridable initializers (hook defaults) follow their input.
        for io in model.graph.inputs.clone() {
            if new_type.get(&io.value) == Some(&low)
                && let Some(t) = model.graph.initializer(io.value)
                && t.data_type() != low
            {
                let (tensor, c) = convert_tensor(t, low)?;
                clamped += c;
                model.graph.set_initializer(tensor);
            }
        }
        patch.apply(model)?;

        // Types: Cast targets, declared I/O and value_info.
        let g = &mut model.graph;
        for (&n, &t) in &plan.compute {
            let node = g.node(n);
            if node.op() == "Cast" && is_float(node.attr("to").map(|a| a.i as i32)) {
                let a = g
                    .node_proto_mut(n)
                    .attribute
                    .iter_mut()
                    .find(|a| a.name == "to")
                    .expect("to");
                a.i = t as i64;
            }
        }
        for (n, i, t) in branch_types {
            for a in &mut g.node_proto_mut(n).attribute {
                for branch in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                    if let Some(out) = branch.output.get_mut(i) {
                        set_elem_type(out, t);
                    }
                }
            }
        }
        for io in g.inputs.iter_mut().chain(g.outputs.iter_mut()) {
            if let Some(&t) = new_type.get(&io.value) {
                set_elem_type(&mut io.info, t);
            }
        }
        for (&v, &t) in &new_type {
            if let Some(mut info) = g.value(v).info.clone() {
                set_elem_type(&mut info, t);
                g.set_value_info(v, info);
            }
        }
        for (low_value, cast) in output_casts {
            let cast = g.value_id(&cast).expect("cast output");
            let name = g.value(low_value).name.clone();
            let Some(io) = g.outputs.iter_mut().find(|io| io.value == low_value) else {
                continue;
            };
            let declared = io.info.clone();
            io.value = cast;
            let tmp = format!("{name}_{}", self.precision.name());
            let tmp = if g.value_id(&tmp).is_some() {
                g.value(cast).name.clone() + "_low"
            } else {
                tmp
            };
            g.rename_value(low_value, &tmp)?;
            g.rename_value(cast, &name)?;
            let io = g
                .outputs
                .iter_mut()
                .find(|io| io.value == cast)
                .expect("output");
            io.info = declared;
            if let Some(t) = types.get(low_value) {
                set_elem_type(&mut io.info, t);
            }
        }
        let identity = drop_identity_casts(model)?;
        if identity > 0 {
            report.notes.push(format!(
                "{identity} Casts to the type their input already has (the export's own, now in {}) dropped",
                self.precision.name()
            ));
        }
        let removed = dce(model);
        report.rewritten.push(format!(
            "{} nodes in {}, {} of them fp32 islands; {} weights converted; {} Casts",
            plan.compute.len(),
            self.precision.name(),
            n_islands,
            converted,
            n_casts
        ));
        if clamped > 0 {
            report.notes.push(format!(
                "{clamped} weight values beyond the fp16 range were clamped to ±65504"
            ));
        }
        if removed.nodes > 0 {
            report
                .notes
                .push(format!("removed {} dead nodes", removed.nodes));
        }
        Ok(report)
    }
}
