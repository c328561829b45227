use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use petgraph::Direction;
use petgraph::stable_graph::{NodeIndex, StableGraph};
use petgraph::visit::EdgeRef;

use crate::error::{Error, Result};
use crate::onnx::{
    self, AttributeProto, GraphProto, NodeProto, SparseTensorProto, TypeProto, ValueInfoProto,
};
use crate::weights::Tensor;

pub type NodeId = NodeIndex<u32>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(u32);

impl ValueId {
    /// Its position in the value table (stable while the value lives).
    pub fn index(self) -> u32 {
        self.0
    }
}

/// Where a value is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Use {
    /// Input `slot` of a node.
    Input(NodeId, usize),
    /// Read by name from inside one of the node's subgraphs (If/Loop/Scan bodies).
    Subgraph(NodeId),
}

impl Use {
    pub fn node(self) -> NodeId {
        match self {
            Use::Input(n, _) | Use::Subgraph(n) => n,
        }
    }
}

/// A tensor flowing in the graph: a graph input, an initializer or a node output.
#[derive(Clone, Debug)]
pub struct Value {
    pub name: String,
    pub producer: Option<(NodeId, usize)>,
    pub consumers: Vec<Use>,
    pub initializer: Option<Tensor>,
    pub sparse_initializer: Option<SparseTensorProto>,
    /// Its entry in the graph's `value_info`, if it has one.
    pub info: Option<ValueInfoProto>,
}

/// A graph input or output: the value and the declared name/type/doc.
#[derive(Clone, Debug)]
pub struct Io {
    pub value: ValueId,
    pub info: ValueInfoProto,
}

/// An operator application.
#[derive(Clone, Debug)]
pub struct Node {
    /// Every `NodeProto` field except `input` and `output` (kept empty here).
    pub proto: NodeProto,
    /// `None` is an omitted optional input (an empty name in ONNX).
    pub inputs: Vec<Option<ValueId>>,
    pub outputs: Vec<Option<ValueId>>,
    /// Values of the enclosing graph its subgraphs read by name.
    pub implicit_inputs: Vec<ValueId>,
    /// Module path of the torch module it came from (`down_blocks.0.attentions.0...`).
    pub module: String,
    /// Position key for a stable topological order: original nodes keep their order.
    pub(crate) order: (u64, u64),
}

impl Node {
    pub fn op(&self) -> &str {
        &self.proto.op_type
    }
    pub fn domain(&self) -> &str {
        &self.proto.domain
    }
    pub fn name(&self) -> &str {
        &self.proto.name
    }
    pub fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.proto.attribute.iter().find(|a| a.name == name)
    }
    pub fn is(&self, op: &str) -> bool {
        self.proto.op_type == op && onnx::is_default_domain(&self.proto.domain)
    }
    /// How errors and reports name it: `'/unet/conv_in/Conv' (Conv at conv_in)`.
    pub fn describe(&self) -> String {
        let module = if self.module.is_empty() {
            "<root>"
        } else {
            &self.module
        };
        format!(
            "node '{}' ({} at {module})",
            self.proto.name, self.proto.op_type
        )
    }
}

/// A graph with def-use links.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// Every `GraphProto` field except nodes, inputs, outputs, initializers and value_info.
    pub proto: GraphProto,
    nodes: StableGraph<Node, ValueId>,
    values: Vec<Option<Value>>,
    by_name: HashMap<String, ValueId>,
    pub inputs: Vec<Io>,
    pub outputs: Vec<Io>,
    /// Order of `initializer`, `sparse_initializer` and `value_info` entries as read.
    initializer_order: Vec<ValueId>,
    sparse_order: Vec<ValueId>,
    value_info_order: Vec<ValueId>,
    next_order: u64,
}

impl Graph {
    // ---- values -------------------------------------------------------------------------

    pub fn value(&self, id: ValueId) -> &Value {
        self.values[id.0 as usize].as_ref().expect("live value id")
    }

    pub fn value_mut(&mut self, id: ValueId) -> &mut Value {
        self.values[id.0 as usize].as_mut().expect("live value id")
    }

    pub fn value_id(&self, name: &str) -> Option<ValueId> {
        self.by_name.get(name).copied()
    }

    pub fn values(&self) -> impl Iterator<Item = (ValueId, &Value)> {
        self.values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.as_ref().map(|v| (ValueId(i as u32), v)))
    }

    /// The value named `name`, created (with no producer) if it does not exist yet.
    pub fn value_named(&mut self, name: &str) -> ValueId {
        if let Some(id) = self.by_name.get(name) {
            return *id;
        }
        let id = ValueId(self.values.len() as u32);
        self.values.push(Some(Value {
            name: name.to_string(),
            producer: None,
            consumers: Vec::new(),
            initializer: None,
            sparse_initializer: None,
            info: None,
        }));
        self.by_name.insert(name.to_string(), id);
        id
    }

    /// Gives a value a new, unused name (node inputs and outputs follow by id). Values read
    /// by name from subgraphs are not renamed.
    pub fn rename_value(&mut self, id: ValueId, name: &str) -> Result<()> {
        let v = self.value(id);
        if self.by_name.contains_key(name)
            || v.consumers.iter().any(|u| matches!(u, Use::Subgraph(_)))
        {
            return Err(Error::Graph(format!(
                "cannot rename value '{}' to '{name}'",
                v.name
            )));
        }
        let old = std::mem::replace(&mut self.value_mut(id).name, name.to_string());
        self.by_name.remove(&old);
        self.by_name.insert(name.to_string(), id);
        if let Some(info) = &mut self.value_mut(id).info {
            info.name = name.to_string();
        }
        Ok(())
    }

    /// A new value whose name starts with `base` and is not yet used.
    pub fn fresh_value(&mut self, base: &str) -> ValueId {
        let mut name = base.to_string();
        let mut k = 0;
        while self.by_name.contains_key(&name) {
            k += 1;
            name = format!("{base}_{k}");
        }
        self.value_named(&name)
    }

    /// Declared type: graph input/output declaration first, then `value_info`, then the
    /// initializer's own type.
    pub fn value_type(&self, id: ValueId) -> Option<&TypeProto> {
        let io = self
            .inputs
            .iter()
            .chain(&self.outputs)
            .find(|io| io.value == id);
        io.and_then(|io| io.info.r#type.as_ref())
            .or_else(|| self.value(id).info.as_ref()?.r#type.as_ref())
    }

    /// Element type from the declared type or the initializer.
    pub fn value_elem_type(&self, id: ValueId) -> Option<i32> {
        if let Some(t) = &self.value(id).initializer {
            return Some(t.data_type());
        }
        onnx::tensor_type(self.value_type(id)?)
            .map(|t| t.elem_type)
            .filter(|t| *t != 0)
    }

    pub fn initializer(&self, id: ValueId) -> Option<&Tensor> {
        self.value(id).initializer.as_ref()
    }

    /// Initializers in file order.
    pub fn initializers(&self) -> impl Iterator<Item = (ValueId, &Tensor)> {
        self.initializer_order.iter().filter_map(|id| {
            Some((
                *id,
                self.values[id.0 as usize].as_ref()?.initializer.as_ref()?,
            ))
        })
    }

    pub fn sparse_initializers(&self) -> impl Iterator<Item = &SparseTensorProto> {
        self.sparse_order.iter().filter_map(|id| {
            self.values[id.0 as usize]
                .as_ref()?
                .sparse_initializer
                .as_ref()
        })
    }

    /// `value_info` entries in file order.
    pub fn value_infos(&self) -> impl Iterator<Item = &ValueInfoProto> {
        self.value_info_order
            .iter()
            .filter_map(|id| self.values[id.0 as usize].as_ref()?.info.as_ref())
    }

    /// Sets (or replaces) the initializer of the value named like the tensor.
    pub fn set_initializer(&mut self, tensor: Tensor) -> ValueId {
        let id = self.value_named(tensor.name());
        if self.value(id).initializer.is_none() {
            self.initializer_order.push(id);
        }
        self.value_mut(id).initializer = Some(tensor);
        id
    }

    pub fn set_sparse_initializer(&mut self, id: ValueId, sparse: SparseTensorProto) {
        if self.value(id).sparse_initializer.is_none() {
            self.sparse_order.push(id);
        }
        self.value_mut(id).sparse_initializer = Some(sparse);
    }

    pub fn set_value_info(&mut self, id: ValueId, info: ValueInfoProto) {
        if self.value(id).info.is_none() {
            self.value_info_order.push(id);
        }
        self.value_mut(id).info = Some(info);
    }

    /// Drops the value's `value_info` entry (its declared type/shape no longer holds).
    pub fn forget_value_info(&mut self, id: ValueId) {
        if self.value_mut(id).info.take().is_some() {
            self.value_info_order.retain(|v| *v != id);
        }
    }

    /// Is the value defined without a producer node (graph input or initializer)?
    pub fn is_graph_defined(&self, id: ValueId) -> bool {
        let v = self.value(id);
        v.initializer.is_some()
            || v.sparse_initializer.is_some()
            || self.inputs.iter().any(|io| io.value == id)
    }

    pub fn is_graph_output(&self, id: ValueId) -> bool {
        self.outputs.iter().any(|io| io.value == id)
    }

    /// Removes a value that nothing produces or reads any more (and its initializer).
    pub fn remove_value(&mut self, id: ValueId) -> Result<()> {
        let v = self.value(id);
        if v.producer.is_some()
            || !v.consumers.is_empty()
            || self.is_graph_output(id)
            || self.inputs.iter().any(|io| io.value == id)
        {
            return Err(Error::Graph(format!(
                "value '{}' is still in use and cannot be removed",
                v.name
            )));
        }
        let name = v.name.clone();
        self.by_name.remove(&name);
        self.values[id.0 as usize] = None;
        self.initializer_order.retain(|v| *v != id);
        self.sparse_order.retain(|v| *v != id);
        self.value_info_order.retain(|v| *v != id);
        Ok(())
    }

    // ---- traversal ----------------------------------------------------------------------

    /// The node computing `v` (None for graph inputs and initializers).
    pub fn producer(&self, v: ValueId) -> Option<NodeId> {
        self.value(v).producer.map(|(n, _)| n)
    }

    /// The one node that reads `v`, in one input slot (None if several read it, a subgraph
    /// does, or it is a graph output: rewriting that reader would lose the others).
    pub fn sole_reader(&self, v: ValueId) -> Option<NodeId> {
        if self.is_graph_output(v) {
            return None;
        }
        match self.value(v).consumers.as_slice() {
            [Use::Input(n, _)] => Some(*n),
            _ => None,
        }
    }

    /// Nodes reading `v` (each once, in no particular order).
    pub fn readers(&self, v: ValueId) -> Vec<NodeId> {
        let mut nodes: Vec<NodeId> = self.value(v).consumers.iter().map(|u| u.node()).collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Every (node, input slot) reading `v` (subgraphs' reads left out): what a rewrite
    /// points at a replacement.
    pub fn input_uses(&self, v: ValueId) -> Vec<(NodeId, usize)> {
        self.value(v)
            .consumers
            .iter()
            .filter_map(|u| match u {
                Use::Input(n, s) => Some((*n, *s)),
                Use::Subgraph(_) => None,
            })
            .collect()
    }

    /// Input `slot` of node `n`, if present.
    pub fn input(&self, n: NodeId, slot: usize) -> Option<ValueId> {
        self.nodes[n].inputs.get(slot).copied().flatten()
    }

    /// Output 0 of node `n`.
    pub fn output(&self, n: NodeId) -> Option<ValueId> {
        self.nodes[n].outputs.first().copied().flatten()
    }

    /// For a binary node reading `from`: its other input.
    pub fn other_input(&self, n: NodeId, from: ValueId) -> Option<ValueId> {
        match (self.input(n, 0), self.input(n, 1)) {
            (Some(a), Some(b)) if a == from => Some(b),
            (Some(a), Some(b)) if b == from => Some(a),
            _ => None,
        }
    }

    /// Is `v` a fixed constant: an initializer that callers cannot override (not also a
    /// graph input)?
    pub fn is_constant(&self, v: ValueId) -> bool {
        self.value(v).initializer.is_some() && !self.inputs.iter().any(|io| io.value == v)
    }

    // ---- nodes --------------------------------------------------------------------------

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    /// Mutable access to a node's proto fields and module; rewire inputs with
    /// [`Graph::set_input`] so def-use links stay right.
    pub fn node_proto_mut(&mut self, id: NodeId) -> &mut NodeProto {
        &mut self.nodes[id].proto
    }

    /// Sets the module path a node is attributed to.
    pub fn set_module(&mut self, id: NodeId, module: String) {
        self.nodes[id].module = module;
    }

    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.node_indices()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.node_count()
    }

    pub fn contains_node(&self, id: NodeId) -> bool {
        self.nodes.contains_node(id)
    }

    /// Nodes that produce the inputs of `id` (the petgraph edges).
    pub fn predecessors(&self, id: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.neighbors_directed(id, Direction::Incoming)
    }

    /// Adds a node reading `inputs` and defining `outputs`. `after` places it, in the
    /// exported order, right after that node (new nodes otherwise go last).
    pub fn add_node(
        &mut self,
        proto: NodeProto,
        inputs: Vec<Option<ValueId>>,
        outputs: Vec<Option<ValueId>>,
        module: String,
        after: Option<NodeId>,
    ) -> Result<NodeId> {
        self.next_order += 1;
        let order = match after {
            Some(a) => (self.nodes[a].order.0, self.next_order),
            None => (u64::MAX, self.next_order),
        };
        self.insert_node(proto, inputs, outputs, module, order)
    }

    pub(crate) fn insert_node(
        &mut self,
        mut proto: NodeProto,
        inputs: Vec<Option<ValueId>>,
        outputs: Vec<Option<ValueId>>,
        module: String,
        order: (u64, u64),
    ) -> Result<NodeId> {
        for out in outputs.iter().flatten() {
            if let Some((p, _)) = self.value(*out).producer {
                return Err(Error::Node {
                    node: format!("node '{}' ({})", proto.name, proto.op_type),
                    msg: format!(
                        "output '{}' is already produced by {}",
                        self.value(*out).name,
                        self.nodes[p].describe()
                    ),
                });
            }
        }
        proto.input.clear();
        proto.output.clear();
        let n = self.nodes.add_node(Node {
            proto,
            inputs: Vec::new(),
            outputs: outputs.clone(),
            implicit_inputs: Vec::new(),
            module,
            order,
        });
        for (slot, out) in outputs.iter().enumerate() {
            if let Some(out) = out {
                self.value_mut(*out).producer = Some((n, slot));
            }
        }
        // Edges from the producers of values already in the graph to readers added before them.
        for out in outputs.iter().flatten() {
            let readers: Vec<NodeId> = self
                .value(*out)
                .consumers
                .iter()
                .map(|u| u.node())
                .collect();
            for r in readers {
                self.nodes.add_edge(n, r, *out);
            }
        }
        for (slot, input) in inputs.into_iter().enumerate() {
            self.nodes[n].inputs.push(None);
            self.set_input(n, slot, input);
        }
        Ok(n)
    }

    /// Points input `slot` of `node` at `value` (or leaves it empty).
    pub fn set_input(&mut self, node: NodeId, slot: usize, value: Option<ValueId>) {
        if let Some(old) = self.nodes[node].inputs[slot] {
            self.unlink(old, Use::Input(node, slot));
        }
        self.nodes[node].inputs[slot] = value;
        if let Some(v) = value {
            self.link(v, Use::Input(node, slot));
        }
    }

    /// Appends an input to a node.
    pub fn push_input(&mut self, node: NodeId, value: Option<ValueId>) {
        self.nodes[node].inputs.push(None);
        let slot = self.nodes[node].inputs.len() - 1;
        self.set_input(node, slot, value);
    }

    /// Records that one of the node's subgraphs reads `value` by name.
    pub fn add_implicit_input(&mut self, node: NodeId, value: ValueId) {
        if !self.nodes[node].implicit_inputs.contains(&value) {
            self.nodes[node].implicit_inputs.push(value);
            self.link(value, Use::Subgraph(node));
        }
    }

    fn link(&mut self, value: ValueId, at: Use) {
        self.value_mut(value).consumers.push(at);
        if let Some((p, _)) = self.value(value).producer {
            self.nodes.add_edge(p, at.node(), value);
        }
    }

    fn unlink(&mut self, value: ValueId, at: Use) {
        let v = self.value_mut(value);
        if let Some(i) = v.consumers.iter().position(|u| *u == at) {
            v.consumers.swap_remove(i);
        }
        if let Some((p, _)) = self.value(value).producer {
            let edge = self
                .nodes
                .edges_connecting(p, at.node())
                .find(|e| *e.weight() == value)
                .map(|e| e.id());
            if let Some(e) = edge {
                self.nodes.remove_edge(e);
            }
        }
    }

    /// Removes a node; its outputs stay as values without a producer.
    pub fn remove_node(&mut self, id: NodeId) {
        let inputs = self.nodes[id].inputs.clone();
        for (slot, v) in inputs.into_iter().enumerate() {
            if let Some(v) = v {
                self.unlink(v, Use::Input(id, slot));
            }
        }
        for v in self.nodes[id].implicit_inputs.clone() {
            self.unlink(v, Use::Subgraph(id));
        }
        for out in self.nodes[id].outputs.clone().into_iter().flatten() {
            self.value_mut(out).producer = None;
        }
        self.nodes.remove_node(id);
    }

    /// Makes every reader of `old` (node inputs, graph outputs) read `new` instead.
    /// Subgraphs reading `old` by name are rewritten too.
    pub fn replace_all_uses(&mut self, old: ValueId, new: ValueId) {
        self.replace_uses_except(old, new, &Default::default());
    }

    /// [`Graph::replace_all_uses`], except for readers in `keep` (typically the nodes that
    /// compute `new` from `old`).
    pub fn replace_uses_except(
        &mut self,
        old: ValueId,
        new: ValueId,
        keep: &std::collections::HashSet<NodeId>,
    ) {
        if old == new {
            return;
        }
        for u in self.value(old).consumers.clone() {
            if keep.contains(&u.node()) {
                continue;
            }
            match u {
                Use::Input(n, slot) => self.set_input(n, slot, Some(new)),
                Use::Subgraph(n) => {
                    let (from, to) = (self.value(old).name.clone(), self.value(new).name.clone());
                    for a in &mut self.nodes[n].proto.attribute {
                        for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                            rename_reads(g, &from, &to);
                        }
                    }
                    self.unlink(old, u);
                    self.nodes[n].implicit_inputs.retain(|v| *v != old);
                    self.add_implicit_input(n, new);
                }
            }
        }
        let mut was_output = false;
        for io in &mut self.outputs {
            if io.value == old {
                io.value = new;
                was_output = true;
            }
        }
        if was_output {
            self.keep_output_name(old, new);
        }
    }

    /// A graph output that now reads `new` keeps `old`'s name (callers feed and read outputs by
    /// name): `new` takes it, `old` gets a fresh one. Not when `new` is a graph input, or
    /// another output, whose name is as fixed.
    fn keep_output_name(&mut self, old: ValueId, new: ValueId) {
        let fixed = self.inputs.iter().any(|io| io.value == new)
            || self
                .outputs
                .iter()
                .any(|io| io.value == new && io.info.name == self.value(new).name);
        let subgraph = |g: &Self, v: ValueId| {
            g.value(v)
                .consumers
                .iter()
                .any(|u| matches!(u, Use::Subgraph(_)))
        };
        if fixed || subgraph(self, old) || subgraph(self, new) {
            return;
        }
        let name = self.value(old).name.clone();
        let mut spare = format!("{name}_replaced");
        let mut k = 0;
        while self.by_name.contains_key(&spare) {
            k += 1;
            spare = format!("{name}_replaced_{k}");
        }
        let renamed = self
            .rename_value(old, &spare)
            .and_then(|()| self.rename_value(new, &name));
        debug_assert!(renamed.is_ok(), "free names, no subgraph readers");
    }

    // ---- order --------------------------------------------------------------------------

    /// Topological order that keeps the original order wherever dependencies allow.
    /// Fails, naming a node on the cycle, if the graph is cyclic.
    pub fn topo_order(&self) -> Result<Vec<NodeId>> {
        let mut indegree: HashMap<NodeId, usize> = HashMap::with_capacity(self.nodes.node_count());
        let mut ready = BinaryHeap::new();
        for n in self.nodes.node_indices() {
            let d = self.nodes.edges_directed(n, Direction::Incoming).count();
            indegree.insert(n, d);
            if d == 0 {
                ready.push(Reverse((self.nodes[n].order, n)));
            }
        }
        let mut order = Vec::with_capacity(self.nodes.node_count());
        while let Some(Reverse((_, n))) = ready.pop() {
            order.push(n);
            for e in self.nodes.edges_directed(n, Direction::Outgoing) {
                let d = indegree.get_mut(&e.target()).expect("node in graph");
                *d -= 1;
                if *d == 0 {
                    ready.push(Reverse((self.nodes[e.target()].order, e.target())));
                }
            }
        }
        if order.len() != self.nodes.node_count() {
            let stuck = self
                .nodes
                .node_indices()
                .find(|n| indegree[n] > 0)
                .expect("some node left");
            return Err(Error::Node {
                node: self.nodes[stuck].describe(),
                msg: "is on a cycle".into(),
            });
        }
        Ok(order)
    }

    /// The node as an ONNX proto, with its input and output names.
    pub fn node_to_proto(&self, id: NodeId) -> NodeProto {
        let node = &self.nodes[id];
        let name = |v: &Option<ValueId>| v.map(|v| self.value(v).name.clone()).unwrap_or_default();
        let mut proto = node.proto.clone();
        proto.input = node.inputs.iter().map(name).collect();
        proto.output = node.outputs.iter().map(name).collect();
        proto
    }
}

/// Renames reads of `from` to `to` inside a subgraph (and its nested subgraphs).
fn rename_reads(g: &mut GraphProto, from: &str, to: &str) {
    for n in &mut g.node {
        for i in n.input.iter_mut().filter(|i| *i == from) {
            *i = to.to_string();
        }
        for a in &mut n.attribute {
            for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                rename_reads(sub, from, to);
            }
        }
    }
    for o in g.output.iter_mut().filter(|o| o.name == from) {
        o.name = to.to_string();
    }
}
