//! What `attune inspect` reports about a model: I/O, ops, parameters, opsets, the exporter
//! and the module tree.
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::analysis::Shapes;
use crate::analysis::attention::{self, AttentionSite, Unrecognised};
use crate::ir::{Graph, Model, ValueId};
use crate::module_path;
use crate::onnx::{self, TypeProto};

#[derive(Debug, Serialize)]
pub struct Summary {
    pub exporter: String,
    pub producer: String,
    pub ir_version: i64,
    pub opsets: BTreeMap<String, i64>,
    pub inputs: Vec<IoEntry>,
    pub outputs: Vec<IoEntry>,
    pub nodes: usize,
    pub ops: BTreeMap<String, usize>,
    pub parameters: Parameters,
    pub data_files: Vec<String>,
    pub module_prefix: String,
    /// Every module that owns parameters, sorted by path.
    pub modules: Vec<ModuleEntry>,
    /// Every attention site found.
    pub attention: Vec<AttentionSite>,
    /// Attention-like Softmax nodes no pattern matched, with the reason.
    pub unrecognised_attention: Vec<Unrecognised>,
    pub transformer_blocks: usize,
}

#[derive(Debug, Serialize)]
pub struct IoEntry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Parameters {
    /// Elements of floating-point, non-scalar initializers (the learned weights).
    pub count: u64,
    pub bytes: u64,
    pub tensors: usize,
    /// All initializers, any type.
    pub initializer_bytes: u64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ModuleEntry {
    pub path: String,
    pub parameters: u64,
}

pub fn summarize(model: &Model) -> Summary {
    let g = &model.graph;
    let mut ops = BTreeMap::new();
    for id in g.node_ids() {
        let n = g.node(id);
        let op = if onnx::is_default_domain(n.domain()) {
            n.op().to_string()
        } else {
            format!("{}.{}", n.domain(), n.op())
        };
        *ops.entry(op).or_insert(0) += 1;
    }
    let mut parameters = Parameters::default();
    for (_, t) in g.initializers() {
        parameters.initializer_bytes += t.stored_len();
    }
    let learned = learned_parameters(model);
    for (id, _) in &learned {
        let t = g.initializer(*id).expect("parameters are initializers");
        parameters.count += t.element_count().unwrap_or(0);
        parameters.bytes += t.stored_len();
        parameters.tensors += 1;
    }
    let mut per_module: BTreeMap<String, u64> = BTreeMap::new();
    for (id, module) in learned {
        *per_module.entry(module).or_default() += g
            .initializer(id)
            .and_then(|t| t.element_count())
            .unwrap_or(0);
    }
    let found = attention::analyze(model, &Shapes::infer(model));
    Summary {
        attention: found.sites,
        unrecognised_attention: found.unrecognised,
        transformer_blocks: found.blocks.len(),
        exporter: exporter(model),
        producer: format!(
            "{} {}",
            model.proto.producer_name, model.proto.producer_version
        )
        .trim()
        .to_string(),
        ir_version: model.proto.ir_version,
        opsets: model
            .proto
            .opset_import
            .iter()
            .map(|o| {
                (
                    if o.domain.is_empty() {
                        "ai.onnx".into()
                    } else {
                        o.domain.clone()
                    },
                    o.version,
                )
            })
            .collect(),
        inputs: g
            .inputs
            .iter()
            .filter(|io| g.initializer(io.value).is_none())
            .map(|io| io_entry(g, io.value, io.info.r#type.as_ref()))
            .collect(),
        outputs: g
            .outputs
            .iter()
            .map(|io| io_entry(g, io.value, io.info.r#type.as_ref()))
            .collect(),
        nodes: g.node_count(),
        ops,
        parameters,
        data_files: model
            .data_files
            .iter()
            .map(|f| f.location.clone())
            .collect(),
        module_prefix: model.module_prefix.clone(),
        modules: per_module
            .into_iter()
            .map(|(path, parameters)| ModuleEntry { path, parameters })
            .collect(),
    }
}

fn io_entry(g: &Graph, id: ValueId, ty: Option<&TypeProto>) -> IoEntry {
    let t = ty.and_then(onnx::tensor_type);
    IoEntry {
        name: g.value(id).name.clone(),
        dtype: t
            .map(|t| onnx::type_name(t.elem_type))
            .unwrap_or_else(|| "?".into()),
        shape: t
            .and_then(|t| t.shape.as_ref())
            .map(|s| s.dim.iter().map(onnx::dim_text).collect())
            .unwrap_or_default(),
    }
}

/// `f32[batch,4,height,width]`, or `?` when undeclared.
pub fn type_text(ty: Option<&TypeProto>) -> String {
    let Some(t) = ty.and_then(onnx::tensor_type) else {
        return "?".into();
    };
    let dims: Vec<String> = t
        .shape
        .as_ref()
        .map(|s| s.dim.iter().map(onnx::dim_text).collect())
        .unwrap_or_default();
    format!("{}[{}]", onnx::type_name(t.elem_type), dims.join(","))
}

/// Which exporter made the model, from what it leaves in the graph.
pub fn exporter(model: &Model) -> String {
    let g = &model.graph;
    let dynamo = g.node_ids().any(|id| {
        g.node(id)
            .proto
            .metadata_props
            .iter()
            .any(|p| p.key.starts_with("pkg.torch.onnx"))
    });
    let scoped_names = g.node_ids().any(|id| g.node(id).name().starts_with('/'));
    match (model.proto.producer_name.as_str(), dynamo, scoped_names) {
        (_, true, _) => "torch-dynamo".into(),
        ("pytorch", false, true) => "torch-legacy".into(),
        ("", _, _) => "unknown".into(),
        (producer, _, _) => producer.into(),
    }
}

/// The learned weights and the module owning each. Exporters fold some weights into
/// anonymous initializers (`onnx::MatMul_1627` = Wᵀ, GroupNorm's affine reshaped to [C,1,1])
/// and also store computed constants (timestep frequencies, resize scales, the ones/zeros
/// of a decomposed GroupNorm). A floating-point, non-scalar initializer counts when it is
/// named after a module's parameter, or, if anonymous, when it is not a constant fill and is
/// read as the weight of a linear/conv op or as the affine of a normalisation.
pub fn learned_parameters(model: &Model) -> Vec<(ValueId, String)> {
    let g = &model.graph;
    let modules = known_modules(g);
    let norm_modules: BTreeSet<&str> = g
        .node_ids()
        .map(|id| g.node(id))
        .filter(|n| {
            matches!(
                n.op(),
                "InstanceNormalization" | "LayerNormalization" | "GroupNormalization"
            )
        })
        .map(|n| n.module.as_str())
        .collect();
    let mut out = Vec::new();
    for (id, t) in g.initializers() {
        if !onnx::is_float(t.data_type()) || t.element_count().unwrap_or(0) < 2 {
            continue;
        }
        let named = module_path::of_parameter_name(t.name(), &model.module_prefix);
        if !named.is_empty() && modules.contains(named) {
            out.push((id, named.to_string()));
            continue;
        }
        let readers: Vec<&crate::ir::Node> = g
            .value(id)
            .consumers
            .iter()
            .map(|u| g.node(u.node()))
            .collect();
        let weight_like = readers.iter().any(|n| {
            matches!(n.op(), "MatMul" | "Gemm" | "Conv" | "ConvTranspose")
                || (matches!(n.op(), "Mul" | "Add") && norm_modules.contains(n.module.as_str()))
        });
        if weight_like && !is_fill(t) {
            let module = readers
                .iter()
                .map(|n| n.module.clone())
                .reduce(|a, b| module_path::common_prefix(&a, &b));
            out.push((id, module.unwrap_or_default()));
        }
    }
    out
}

/// Is the tensor one value repeated (ones, zeros)? Only small tensors are read to tell.
fn is_fill(t: &crate::weights::Tensor) -> bool {
    if t.element_count().unwrap_or(0) > 65536 {
        return false;
    }
    let Some(width) = onnx::element_bits(t.data_type()).map(|b| (b / 8).max(1) as usize) else {
        return false;
    };
    match t.bytes() {
        Ok(b) => b.chunks(width).all(|c| c == &b[..width.min(b.len())]),
        Err(_) => false,
    }
}

/// Every module path the nodes name, with all their ancestors.
pub fn known_modules(g: &Graph) -> BTreeSet<&str> {
    let mut set = BTreeSet::new();
    for id in g.node_ids() {
        let mut m = g.node(id).module.as_str();
        while !m.is_empty() && set.insert(m) {
            m = m.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
        }
    }
    set
}
