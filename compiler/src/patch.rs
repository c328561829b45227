//! Patches: how passes rewrite. A pass reads the graph, records new nodes and constants,
//! value replacements and nodes to drop, then applies the patch in one step; dead-code
//! elimination removes what the rewrite left unused.
use std::collections::HashSet;

use bytes::Bytes;

use crate::error::Result;
use crate::ir::{Graph, Model, NodeId, ValueId};
use crate::onnx::{
    AttributeProto, DataType, NodeProto, ValueInfoProto, attribute_proto::AttributeType,
};
use crate::weights::Tensor;

/// A value a patch node reads: one in the graph, or one the patch creates (by name).
#[derive(Clone, Debug)]
pub enum In {
    Value(ValueId),
    New(String),
    /// An omitted optional input.
    None,
}

impl From<ValueId> for In {
    fn from(v: ValueId) -> Self {
        In::Value(v)
    }
}

impl From<&String> for In {
    fn from(name: &String) -> Self {
        In::New(name.clone())
    }
}

#[derive(Debug)]
struct NewNode {
    proto: NodeProto,
    inputs: Vec<In>,
    outputs: Vec<String>,
    module: String,
    after: Option<NodeId>,
}

#[derive(Debug)]
pub struct Patch<'g> {
    graph: &'g Graph,
    module_prefix: &'g str,
    taken_values: HashSet<String>,
    taken_nodes: HashSet<String>,
    nodes: Vec<NewNode>,
    tensors: Vec<Tensor>,
    replace: Vec<(ValueId, In)>,
    drop: Vec<NodeId>,
    inputs: Vec<ValueInfoProto>,
    rewires: Vec<(NodeId, usize, String)>,
    outputs: Vec<(String, DataType)>,
    folded: Vec<(NodeId, Vec<(ValueId, Tensor)>)>,
}

impl<'g> Patch<'g> {
    pub fn new(model: &'g Model) -> Self {
        let graph = &model.graph;
        Patch {
            graph,
            module_prefix: &model.module_prefix,
            taken_values: HashSet::new(),
            taken_nodes: graph
                .node_ids()
                .map(|n| graph.node(n).name().to_string())
                .collect(),
            nodes: Vec::new(),
            tensors: Vec::new(),
            replace: Vec::new(),
            drop: Vec::new(),
            inputs: Vec::new(),
            rewires: Vec::new(),
            outputs: Vec::new(),
            folded: Vec::new(),
        }
    }

    /// A value name starting with `base` that is free in the graph and this patch.
    pub fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 0;
        while self.graph.value_id(&name).is_some() || self.taken_values.contains(&name) {
            k += 1;
            name = format!("{base}_{k}");
        }
        self.taken_values.insert(name.clone());
        name
    }

    fn fresh_node_name(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 0;
        while self.taken_nodes.contains(&name) {
            k += 1;
            name = format!("{base}_{k}");
        }
        self.taken_nodes.insert(name.clone());
        name
    }

    /// A new initializer; returns its name.
    pub fn constant(
        &mut self,
        base: &str,
        data_type: DataType,
        dims: Vec<i64>,
        data: Vec<u8>,
    ) -> String {
        let name = self.fresh(base);
        self.tensors.push(Tensor::new(
            name.clone(),
            data_type,
            dims,
            Bytes::from(data),
        ));
        name
    }

    /// A new initializer holding `tensor`'s data (not copied), under a fresh name from its own.
    pub fn tensor(&mut self, mut tensor: Tensor) -> String {
        let name = self.fresh(tensor.name());
        tensor.proto.name = name.clone();
        self.tensors.push(tensor);
        name
    }

    pub fn i64s(&mut self, base: &str, values: &[i64]) -> String {
        self.constant(
            base,
            DataType::Int64,
            vec![values.len() as i64],
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    pub fn f32_scalar(&mut self, base: &str, value: f32) -> String {
        self.constant(base, DataType::Float, vec![], value.to_le_bytes().to_vec())
    }

    /// A scalar of a float type (f32, f16 or bf16; anything else is stored as f32).
    pub fn float_scalar(&mut self, base: &str, data_type: DataType, value: f32) -> String {
        let (data_type, bytes) = match data_type {
            DataType::Float16 => (data_type, half::f16::from_f32(value).to_le_bytes().to_vec()),
            DataType::Bfloat16 => (
                data_type,
                half::bf16::from_f32(value).to_le_bytes().to_vec(),
            ),
            _ => (DataType::Float, value.to_le_bytes().to_vec()),
        };
        self.constant(base, data_type, vec![], bytes)
    }

    /// Adds a node with `outputs` new values (named `<name>_out<i>`); returns their names.
    /// `name` is the node's name prefix (made unique); `module` its module path; `after`
    /// places it in the exported order.
    #[allow(clippy::too_many_arguments)] // one argument per NodeProto field
    pub fn node(
        &mut self,
        op: &str,
        domain: &str,
        name: &str,
        inputs: Vec<In>,
        outputs: usize,
        attributes: Vec<AttributeProto>,
        module: &str,
        after: Option<NodeId>,
    ) -> Vec<String> {
        let node_name = self.fresh_node_name(name);
        let outs: Vec<String> = (0..outputs)
            .map(|i| self.fresh(&format!("{node_name}_out{i}")))
            .collect();
        let metadata_props = crate::module_path::metadata(self.module_prefix, module);
        let proto = NodeProto {
            name: node_name,
            op_type: op.into(),
            domain: domain.into(),
            attribute: attributes,
            metadata_props,
            ..Default::default()
        };
        self.nodes.push(NewNode {
            proto,
            inputs,
            outputs: outs.clone(),
            module: module.into(),
            after,
        });
        outs
    }

    /// A single-output node; returns its output's name.
    pub fn op(
        &mut self,
        op: &str,
        name: &str,
        inputs: Vec<In>,
        attributes: Vec<AttributeProto>,
        module: &str,
        after: Option<NodeId>,
    ) -> String {
        self.node(op, "", name, inputs, 1, attributes, module, after)
            .remove(0)
    }

    /// Every reader of `old` (nodes that existed before the patch, graph outputs) reads `new`.
    pub fn replace(&mut self, old: ValueId, new: In) {
        self.replace.push((old, new));
    }

    /// What a new node should read for `v`: its replacement in this patch, if any (nodes the
    /// patch adds read what they are given, so a chain of rewrites reads through this).
    pub fn current(&self, v: ValueId) -> In {
        let replaced = self.replace.iter().rev().find(|(old, _)| *old == v);
        replaced.map_or(In::Value(v), |(_, new)| new.clone())
    }

    /// A new graph input named `info.name`. With `default` it is an overridable initializer:
    /// callers may feed it, and the default applies when they don't.
    pub fn graph_input(&mut self, info: ValueInfoProto, default: Option<Tensor>) -> String {
        let name = self.fresh(&info.name);
        let info = ValueInfoProto {
            name: name.clone(),
            ..info
        };
        if let Some(t) = default {
            let mut t = t;
            t.proto.name = name.clone();
            self.tensors.push(t);
        }
        self.inputs.push(info);
        name
    }

    /// A new graph output named `name` (made free in the graph), a copy of `value`, declared
    /// with element type `elem_type` (its shape left to the runtime).
    pub fn graph_output(
        &mut self,
        value: In,
        name: &str,
        elem_type: DataType,
        module: &str,
        after: Option<NodeId>,
    ) -> String {
        let node_name = self.fresh_node_name(&format!("{module}/attune_output"));
        let out = self.fresh(name);
        let metadata_props = crate::module_path::metadata(self.module_prefix, module);
        let proto = NodeProto {
            name: node_name,
            op_type: "Identity".into(),
            metadata_props,
            ..Default::default()
        };
        self.nodes.push(NewNode {
            proto,
            inputs: vec![value],
            outputs: vec![out.clone()],
            module: module.into(),
            after,
        });
        self.outputs.push((out.clone(), elem_type));
        out
    }

    /// Points these inputs (node, slot) of existing nodes at the new value `name`.
    pub fn rewire_inputs(&mut self, at: Vec<(NodeId, usize)>, name: String) {
        self.rewires
            .extend(at.into_iter().map(|(n, slot)| (n, slot, name.clone())));
    }

    pub fn drop_node(&mut self, n: NodeId) {
        self.drop.push(n);
    }

    /// Replaces node `n` by constants: each (output, tensor) becomes an initializer of the
    /// output's own name (its readers keep reading it), and the node goes.
    pub fn fold(&mut self, n: NodeId, outputs: Vec<(ValueId, Tensor)>) {
        self.folded.push((n, outputs));
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
            && self.replace.is_empty()
            && self.drop.is_empty()
            && self.tensors.is_empty()
            && self.folded.is_empty()
    }

    /// Detaches the patch from the graph it was built against, so it can be applied.
    pub fn into_parts(self) -> AppliedPatch {
        AppliedPatch {
            nodes: self.nodes,
            tensors: self.tensors,
            replace: self.replace,
            drop: self.drop,
            inputs: self.inputs,
            rewires: self.rewires,
            outputs: self.outputs,
            folded: self.folded,
        }
    }
}

/// A patch detached from the graph it was built against, ready to apply.
#[derive(Debug)]
pub struct AppliedPatch {
    nodes: Vec<NewNode>,
    tensors: Vec<Tensor>,
    replace: Vec<(ValueId, In)>,
    drop: Vec<NodeId>,
    inputs: Vec<ValueInfoProto>,
    rewires: Vec<(NodeId, usize, String)>,
    outputs: Vec<(String, DataType)>,
    folded: Vec<(NodeId, Vec<(ValueId, Tensor)>)>,
}

impl AppliedPatch {
    pub fn apply(self, model: &mut Model) -> Result<Vec<NodeId>> {
        let g = &mut model.graph;
        for t in self.tensors {
            g.set_initializer(t);
        }
        for info in self.inputs {
            let value = g.value_named(&info.name);
            g.inputs.push(crate::ir::Io { value, info });
        }
        let resolve = |g: &mut Graph, i: &In| match i {
            In::Value(v) => Some(*v),
            In::New(name) => Some(g.value_named(name)),
            In::None => None,
        };
        let mut added = Vec::new();
        for n in self.nodes {
            let inputs = n.inputs.iter().map(|i| resolve(g, i)).collect();
            let outputs = n.outputs.iter().map(|o| Some(g.value_named(o))).collect();
            added.push(g.add_node(n.proto, inputs, outputs, n.module, n.after)?);
        }
        let new: HashSet<NodeId> = added.iter().copied().collect();
        for (old, with) in self.replace {
            if let Some(with) = resolve(g, &with) {
                g.replace_uses_except(old, with, &new);
            }
        }
        for (name, elem_type) in self.outputs {
            let value = g.value_named(&name);
            let info = crate::onnx::tensor_info(&name, elem_type, None);
            g.outputs.push(crate::ir::Io { value, info });
        }
        for (n, slot, name) in self.rewires {
            let v = g.value_named(&name);
            g.set_input(n, slot, Some(v));
        }
        for n in self.drop {
            if g.contains_node(n) {
                g.remove_node(n);
            }
        }
        for (n, outputs) in self.folded {
            if g.contains_node(n) {
                g.remove_node(n);
            }
            for (v, mut t) in outputs {
                t.proto.name = g.value(v).name.clone();
                g.set_initializer(t);
            }
        }
        Ok(added)
    }
}

/// Attribute constructors.
pub mod attr {
    use super::*;

    pub fn int(name: &str, v: i64) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Int as i32,
            i: v,
            ..Default::default()
        }
    }
    pub fn float(name: &str, v: f32) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Float as i32,
            f: v,
            ..Default::default()
        }
    }
    pub fn ints(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Ints as i32,
            ints: v.to_vec(),
            ..Default::default()
        }
    }
    pub fn tensor(name: &str, t: crate::onnx::TensorProto) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Tensor as i32,
            t: Some(t),
            ..Default::default()
        }
    }
}
