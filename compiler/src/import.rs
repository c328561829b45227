//! Reading an `.onnx` file into the IR without copying weights: the model file is
//! memory-mapped and decoded in place (inline `raw_data` stays a slice of the map), and
//! external data is mapped, not read.
use std::collections::HashSet;
use std::path::Path;

use bytes::Bytes;
use memmap2::Mmap;
use prost::Message;

use crate::error::{Error, IoContext, Result};
use crate::ir::{Graph, Io, Model, NodeId};
use crate::module_path;
use crate::onnx::{GraphProto, ModelProto};
use crate::weights::ExternalData;

/// Reads a model and maps its external data.
pub fn read(path: &Path) -> Result<Model> {
    let file = crate::files::open_regular(path)?;
    let len = file.metadata().at(path)?.len();
    if len == 0 {
        return Err(Error::Model {
            path: path.into(),
            msg: "file is empty".into(),
        });
    }
    // SAFETY: read-only map; attune never writes to a file it reads (outputs are renamed into place).
    let map = unsafe { Mmap::map(&file) }.at(path)?;
    let proto = ModelProto::decode(Bytes::from_owner(map)).map_err(|err| Error::Decode {
        path: path.into(),
        err,
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = if base.as_os_str().is_empty() {
        Path::new(".").to_path_buf()
    } else {
        base
    };
    let mut model = from_proto(proto, &mut ExternalData::new(&base)).map_err(|e| match e {
        Error::Graph(msg) => Error::Model {
            path: path.into(),
            msg,
        },
        other => other,
    })?;
    if let Some(problem) = crate::verify::malformed_constants(&model)
        .into_iter()
        .next()
    {
        return Err(Error::Model {
            path: path.into(),
            msg: problem,
        });
    }
    model.path = Some(path.to_path_buf());
    Ok(model)
}

/// Builds the IR from a decoded model; external data resolves against `external`.
pub fn from_proto(mut proto: ModelProto, external: &mut ExternalData) -> Result<Model> {
    let graph_proto = proto
        .graph
        .take()
        .ok_or_else(|| Error::Graph("model has no graph".into()))?;
    if proto.ir_version == 0 && proto.opset_import.is_empty() {
        return Err(Error::Graph(
            "not an ONNX model (no IR version, no opset imports)".into(),
        ));
    }
    let mut graph = build_graph(graph_proto, external)?;
    let module_prefix = module_path::assign(&mut graph);
    let data_files = external.files().cloned().collect();
    Ok(Model {
        proto,
        graph,
        path: None,
        data_files,
        module_prefix,
    })
}

fn build_graph(mut gp: GraphProto, external: &mut ExternalData) -> Result<Graph> {
    let mut g = Graph::default();
    let inputs = std::mem::take(&mut gp.input);
    let outputs = std::mem::take(&mut gp.output);
    let initializers = std::mem::take(&mut gp.initializer);
    let sparse = std::mem::take(&mut gp.sparse_initializer);
    let value_info = std::mem::take(&mut gp.value_info);
    let nodes = std::mem::take(&mut gp.node);
    g.proto = gp;

    for info in inputs {
        let value = g.value_named(&info.name);
        g.inputs.push(Io { value, info });
    }
    for t in initializers {
        if t.name.is_empty() {
            return Err(Error::Graph("an initializer has no name".into()));
        }
        if g.value_id(&t.name)
            .and_then(|v| g.value(v).initializer.as_ref())
            .is_some()
        {
            return Err(Error::tensor(&t.name, "is defined twice as an initializer"));
        }
        let tensor = external.resolve(t)?;
        tensor.check_len()?;
        g.set_initializer(tensor);
    }
    for mut s in sparse {
        for t in s.values.iter_mut().chain(s.indices.iter_mut()) {
            external.inline_nested(t)?;
        }
        let name = s
            .values
            .as_ref()
            .map(|v| v.name.clone())
            .unwrap_or_default();
        let id = g.value_named(&name);
        g.set_sparse_initializer(id, s);
    }
    for (index, mut np) in nodes.into_iter().enumerate() {
        let inputs = std::mem::take(&mut np.input)
            .iter()
            .map(|n| (!n.is_empty()).then(|| g.value_named(n)))
            .collect();
        let outputs = std::mem::take(&mut np.output)
            .iter()
            .map(|n| (!n.is_empty()).then(|| g.value_named(n)))
            .collect();
        for a in &mut np.attribute {
            external.inline_attribute(a)?;
        }
        let free = subgraph_free_names(&np);
        let id: NodeId = g.insert_node(np, inputs, outputs, String::new(), (index as u64, 0))?;
        for name in free {
            let v = g.value_named(&name);
            g.add_implicit_input(id, v);
        }
    }
    for info in value_info {
        let id = g.value_named(&info.name);
        g.set_value_info(id, info);
    }
    for info in outputs {
        let value = g.value_named(&info.name);
        g.outputs.push(Io { value, info });
    }
    Ok(g)
}

/// Names a node's subgraphs read from enclosing scopes.
fn subgraph_free_names(node: &crate::onnx::NodeProto) -> Vec<String> {
    let mut free = Vec::new();
    for a in &node.attribute {
        for g in a.subgraphs() {
            for name in graph_free_names(g) {
                if !free.contains(&name) {
                    free.push(name);
                }
            }
        }
    }
    free
}

fn graph_free_names(g: &GraphProto) -> Vec<String> {
    let mut defined: HashSet<&str> = g.input.iter().map(|i| i.name.as_str()).collect();
    defined.extend(g.initializer.iter().map(|t| t.name.as_str()));
    defined.extend(
        g.sparse_initializer
            .iter()
            .filter_map(|s| s.values.as_ref())
            .map(|t| t.name.as_str()),
    );
    defined.extend(
        g.node
            .iter()
            .flat_map(|n| n.output.iter().map(String::as_str)),
    );
    let mut free: Vec<String> = Vec::new();
    let add = |name: &str, free: &mut Vec<String>| {
        if !name.is_empty() && !defined.contains(name) && !free.iter().any(|f| f == name) {
            free.push(name.to_string());
        }
    };
    for n in &g.node {
        for i in &n.input {
            add(i, &mut free);
        }
        for name in subgraph_free_names(n) {
            add(&name, &mut free);
        }
    }
    for o in &g.output {
        add(&o.name, &mut free);
    }
    free
}
