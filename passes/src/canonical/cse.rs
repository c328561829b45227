//! Common-subexpression elimination: nodes of one op, attributes and inputs compute one
//! value (the `Shape → Gather → Unsqueeze` chains exporters repeat per layer), and equal
//! small integer constants (axes, indices, shape targets) are one constant, so those chains
//! meet. Float constants stay apart: passes may convert or rewrite one of them.
use std::collections::HashMap;

use prost::Message;

use attune_compiler::Result;
use attune_compiler::ir::{Model, ValueId};
use attune_compiler::onnx::DataType;
use attune_compiler::patch::{In, Patch};

/// Integer constants up to this many elements are merged when equal.
const SMALL: u64 = 64;

/// Merges equal small integer constants and equal nodes; returns how many went.
pub fn merge(model: &mut Model) -> Result<usize> {
    let g = &model.graph;
    // What each value now stands for.
    let mut same: HashMap<ValueId, ValueId> = HashMap::new();
    let mut constants: HashMap<(i32, Vec<i64>, Vec<u8>), ValueId> = HashMap::new();
    for (v, t) in g.initializers() {
        let int = matches!(
            DataType::try_from(t.data_type()),
            Ok(DataType::Int64 | DataType::Int32 | DataType::Bool)
        );
        if !int
            || !g.is_constant(v)
            || g.is_graph_output(v)
            || t.element_count().is_none_or(|c| c > SMALL)
        {
            continue;
        }
        let Ok(bytes) = t.bytes() else { continue };
        let key = (t.data_type(), t.dims().to_vec(), bytes.into_owned());
        match constants.get(&key) {
            Some(&first) => {
                same.insert(v, first);
            }
            None => {
                constants.insert(key, v);
            }
        }
    }
    let mut p = Patch::new(model);
    let mut merged = same.len();
    for (&dup, &first) in &same {
        p.replace(dup, In::Value(first));
    }
    let mut seen: HashMap<Vec<u8>, Vec<ValueId>> = HashMap::new();
    for n in g.topo_order()? {
        let node = g.node(n);
        if super::RANDOM.contains(&node.op())
            || node.inputs.iter().flatten().next().is_none()
            || node
                .proto
                .attribute
                .iter()
                .any(|a| a.subgraphs().next().is_some())
            || node
                .outputs
                .iter()
                .any(|o| o.is_none_or(|v| g.is_graph_output(v)))
        {
            continue;
        }
        // Key: domain, op, attributes (sorted, docs left out), inputs as merged so far.
        let mut key = format!("{}\u{0}{}\u{0}", node.domain(), node.op()).into_bytes();
        let mut attrs = node.proto.attribute.clone();
        attrs.sort_by(|a, b| a.name.cmp(&b.name));
        for mut a in attrs {
            a.doc_string.clear();
            key.extend(a.encode_to_vec());
            key.push(0xff);
        }
        for v in &node.inputs {
            let id = v.map(|v| *same.get(&v).unwrap_or(&v));
            key.extend(id.map_or(u32::MAX, ValueId::index).to_le_bytes());
        }
        let outputs: Vec<ValueId> = node.outputs.iter().flatten().copied().collect();
        match seen.get(&key) {
            Some(first) if first.len() == outputs.len() => {
                for (dup, keep) in outputs.iter().zip(first) {
                    same.insert(*dup, *keep);
                    p.replace(*dup, In::Value(*keep));
                }
                p.drop_node(n);
                merged += 1;
            }
            Some(_) => {}
            None => {
                seen.insert(key, outputs);
            }
        }
    }
    p.into_parts().apply(model)?;
    Ok(merged)
}
