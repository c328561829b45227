//! Module paths (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`): how users,
//! LoRA files and reports name things. Recovered from what each exporter leaves behind:
//! - legacy TorchScript export: node names `/unet/down_blocks.0/.../to_q/MatMul`;
//! - dynamo export: anonymous names (`node_MatMul_162`) with the scope in `metadata_props`
//!   (`pkg.torch.onnx.name_scopes`, else `namespace`).
//!
//! A wrapper module every node sits in (`unet` in `/unet/...`) is stripped, the same way for
//! both exporters, so both name a module alike.
use crate::ir::Graph;
use crate::onnx::{self, NodeProto};

/// Sets every node's module path; returns the stripped wrapper prefix ("" if none).
/// Nodes the exporter left without a scope (dynamo drops it on some decompositions) get the
/// deepest module shared by the nodes around them.
pub fn assign(graph: &mut Graph) -> String {
    let ids: Vec<_> = graph.node_ids().collect();
    let scopes: Vec<Option<Vec<String>>> =
        ids.iter().map(|id| scope(&graph.node(*id).proto)).collect();
    let known: Vec<Vec<String>> = scopes.iter().flatten().cloned().collect();
    let strip = wrapper_depth(&known);
    let mut unscoped = Vec::new();
    for (id, components) in ids.into_iter().zip(&scopes) {
        match components {
            Some(c) => {
                graph.set_module(id, c.get(strip..).map(|c| c.join(".")).unwrap_or_default())
            }
            None => unscoped.push(id),
        }
    }
    if !known.is_empty() {
        for id in unscoped {
            let module = neighbour_module(graph, id);
            graph.set_module(id, module);
        }
    }
    known
        .iter()
        .find(|c| c.len() >= strip)
        .map(|c| c[..strip].join("."))
        .unwrap_or_default()
}

/// The deepest module shared by a node's producers and consumers.
fn neighbour_module(graph: &Graph, id: crate::ir::NodeId) -> String {
    let node = graph.node(id);
    let producers = node
        .inputs
        .iter()
        .flatten()
        .filter_map(|v| graph.value(*v).producer.map(|(p, _)| p));
    let consumers = node
        .outputs
        .iter()
        .flatten()
        .flat_map(|v| graph.value(*v).consumers.iter().map(|u| u.node()));
    let mut modules = producers
        .chain(consumers)
        .filter(|n| *n != id)
        .map(|n| graph.node(n).module.as_str());
    let Some(first) = modules.next() else {
        return String::new();
    };
    modules.fold(first.to_string(), |acc, m| common_prefix(&acc, m))
}

/// Longest shared dotted prefix: `a.b.c`, `a.b.d` → `a.b`.
pub fn common_prefix(a: &str, b: &str) -> String {
    let shared: Vec<&str> = a
        .split('.')
        .zip(b.split('.'))
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect();
    shared.join(".")
}

/// Where attune records the module path of nodes it creates (exporters' own conventions do
/// not cover them), so a written model reads back with the same paths.
pub const MODULE_KEY: &str = "attune.module";
pub const PREFIX_KEY: &str = "attune.module_prefix";

/// Metadata entries recording `module` (and the model's wrapper prefix) on a new node.
pub fn metadata(prefix: &str, module: &str) -> Vec<crate::onnx::StringStringEntryProto> {
    let entry = |k: &str, v: &str| crate::onnx::StringStringEntryProto {
        key: k.into(),
        value: v.into(),
    };
    let mut out = vec![entry(MODULE_KEY, module)];
    if !prefix.is_empty() {
        out.push(entry(PREFIX_KEY, prefix));
    }
    out
}

/// The module scope of a node as path components (`["unet", "down_blocks.0", "attentions.0"]`),
/// `None` when the exporter recorded none.
pub fn scope(node: &NodeProto) -> Option<Vec<String>> {
    if let Some(module) = onnx::metadata(&node.metadata_props, MODULE_KEY) {
        let prefix = onnx::metadata(&node.metadata_props, PREFIX_KEY).unwrap_or("");
        let components = prefix
            .split('.')
            .chain(std::iter::once(module))
            .filter(|c| !c.is_empty())
            .map(str::to_string);
        return Some(components.collect());
    }
    if let Some(s) = onnx::metadata(&node.metadata_props, "pkg.torch.onnx.name_scopes") {
        let entries = parse_python_str_list(s);
        if entries.iter().any(|e| e.contains("empty_nn_module_stack")) {
            return None;
        }
        if let Some(c) = from_cumulative(&entries) {
            return Some(c);
        }
    }
    if let Some(s) = onnx::metadata(&node.metadata_props, "namespace") {
        let entries: Vec<String> = s
            .split('/')
            .map(|e| e.split(": ").next().unwrap_or("").trim().to_string())
            .collect();
        if let Some(c) = from_cumulative(&entries) {
            return Some(c);
        }
    }
    node.name
        .starts_with('/')
        .then(|| from_legacy_name(&node.name))
}

/// `/unet/down_blocks.0/attn1/to_q/MatMul` → `["unet", "down_blocks.0", "attn1", "to_q"]`.
fn from_legacy_name(name: &str) -> Vec<String> {
    let Some(rest) = name.strip_prefix('/') else {
        return Vec::new();
    };
    let mut parts: Vec<String> = rest.split('/').map(str::to_string).collect();
    parts.pop(); // the op's own name
    parts.retain(|p| !p.is_empty());
    parts
}

/// Cumulative scopes `["", "unet", "unet.down_blocks.0", ..., "<fx node>"]` → components.
fn from_cumulative(entries: &[String]) -> Option<Vec<String>> {
    if entries.len() < 2 {
        return None;
    }
    let mut out = Vec::new();
    let mut prev = "";
    for e in &entries[..entries.len() - 1] {
        if e.is_empty() {
            continue;
        }
        let component = e
            .strip_prefix(prev)
            .and_then(|r| r.strip_prefix('.'))
            .filter(|_| !prev.is_empty())
            .unwrap_or(e);
        out.push(component.to_string());
        prev = e;
    }
    Some(out)
}

/// Parses a Python list-of-strings literal such as `['', 'unet', 'unet.conv_in']`.
fn parse_python_str_list(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\'' || c == '"' {
            let mut item = String::new();
            while let Some(d) = chars.next() {
                match d {
                    '\\' => item.extend(chars.next()),
                    d if d == c => break,
                    d => item.push(d),
                }
            }
            out.push(item);
        }
    }
    out
}

/// How many leading components every scoped node shares: wrapper modules whose whole
/// computation is one child module. The root's own nodes have no scope and don't count.
fn wrapper_depth(scopes: &[Vec<String>]) -> usize {
    let mut scoped = scopes.iter().filter(|s| !s.is_empty());
    let Some(first) = scoped.next() else { return 0 };
    let mut depth = first.len();
    for s in scoped {
        depth = depth.min(s.iter().zip(first).take_while(|(a, b)| a == b).count());
    }
    // Keep at least one component for the deepest shared node (a module is never stripped to nothing
    // for every node, which happens when the model is a single leaf module).
    if scopes
        .iter()
        .filter(|s| !s.is_empty())
        .all(|s| s.len() <= depth)
    {
        depth = depth.saturating_sub(1);
    }
    depth
}

/// Module path of a parameter name (`unet.down_blocks.0.resnets.0.conv1.weight` →
/// `down_blocks.0.resnets.0.conv1`), with the wrapper prefix removed.
pub fn of_parameter_name<'a>(name: &'a str, prefix: &str) -> &'a str {
    let name = if prefix.is_empty() {
        name
    } else {
        name.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('.'))
            .unwrap_or(name)
    };
    name.rsplit_once('.').map(|(m, _)| m).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_names() {
        assert_eq!(
            from_legacy_name("/unet/down_blocks.0/attentions.0/to_q/MatMul"),
            ["unet", "down_blocks.0", "attentions.0", "to_q"]
        );
        assert!(from_legacy_name("/Constant").is_empty());
        assert!(from_legacy_name("Identity_3").is_empty());
    }

    #[test]
    fn dynamo_scopes() {
        let s = "['', 'unet', 'unet.down_blocks.0', 'unet.down_blocks.0.attn1.to_k', 'linear_8']";
        let c = from_cumulative(&parse_python_str_list(s)).unwrap();
        assert_eq!(c, ["unet", "down_blocks.0", "attn1.to_k"]);
    }

    #[test]
    fn wrapper_is_stripped_only_when_shared() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            wrapper_depth(&[s(&["unet", "a"]), s(&["unet", "b"]), vec![]]),
            1
        );
        assert_eq!(wrapper_depth(&[s(&["a"]), s(&["b"])]), 0);
        assert_eq!(wrapper_depth(&[s(&["m", "a"]), s(&["m", "a"])]), 1);
    }
}
