//! Structural diff of two models: nodes added, removed and changed, grouped by op type and
//! by module path, plus initializer, input/output and opset changes. The text rendering is
//! stable (sorted, no addresses) so tests can snapshot what a pass did.
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

use serde::Serialize;

use crate::ir::{Graph, Model, NodeId};
use crate::onnx;

#[derive(Debug, Default, Serialize)]
pub struct Diff {
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub added: Vec<NodeEntry>,
    pub removed: Vec<NodeEntry>,
    pub changed: Vec<Changed>,
    pub initializers: Changes,
    pub inputs: Changes,
    pub outputs: Changes,
    pub opsets: Changes,
}

/// A node as the diff names it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeEntry {
    pub module: String,
    pub op: String,
    pub key: String,
}

#[derive(Debug, Serialize)]
pub struct Changed {
    pub node: NodeEntry,
    /// What differs: `op`, `attributes`, `inputs`, `outputs`.
    pub what: Vec<&'static str>,
}

/// Named things added, removed, or present in both but different (with how).
#[derive(Debug, Default, Serialize)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Changes {
    fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.initializers.is_empty()
            && self.inputs.is_empty()
            && self.outputs.is_empty()
            && self.opsets.is_empty()
    }
}

/// Compares `a` (before) with `b` (after).
pub fn diff(a: &Model, b: &Model) -> Diff {
    let (ka, kb) = (node_keys(&a.graph), node_keys(&b.graph));
    let mut d = Diff {
        nodes_before: a.graph.node_count(),
        nodes_after: b.graph.node_count(),
        ..Default::default()
    };
    for (key, &na) in &ka {
        match kb.get(key) {
            None => d.removed.push(entry(&a.graph, na, key)),
            Some(&nb) => {
                let what = node_changes(&a.graph, na, &b.graph, nb);
                if !what.is_empty() {
                    d.changed.push(Changed {
                        node: entry(&b.graph, nb, key),
                        what,
                    });
                }
            }
        }
    }
    for (key, &nb) in &kb {
        if !ka.contains_key(key) {
            d.added.push(entry(&b.graph, nb, key));
        }
    }
    d.added.sort();
    d.removed.sort();
    d.changed.sort_by(|x, y| x.node.cmp(&y.node));
    d.initializers = initializer_changes(&a.graph, &b.graph);
    d.inputs = io_changes(&a.graph, &b.graph, |g| &g.inputs);
    d.outputs = io_changes(&a.graph, &b.graph, |g| &g.outputs);
    d.opsets = named_changes(
        a.proto
            .opset_import
            .iter()
            .map(|o| (domain_name(&o.domain), o.version.to_string()))
            .collect(),
        b.proto
            .opset_import
            .iter()
            .map(|o| (domain_name(&o.domain), o.version.to_string()))
            .collect(),
    );
    d
}

fn domain_name(d: &str) -> String {
    if onnx::is_default_domain(d) {
        "ai.onnx".into()
    } else {
        d.into()
    }
}

/// Stable identity of each node: its name when unique, else module/op#k in graph order.
fn node_keys(g: &Graph) -> BTreeMap<String, NodeId> {
    let order = g.topo_order().unwrap_or_else(|_| g.node_ids().collect());
    let mut name_count: HashMap<&str, usize> = HashMap::new();
    for id in &order {
        *name_count.entry(g.node(*id).name()).or_default() += 1;
    }
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let mut keys = BTreeMap::new();
    for id in order {
        let n = g.node(id);
        let key = if !n.name().is_empty() && name_count[n.name()] == 1 {
            n.name().to_string()
        } else {
            let k = seen.entry((n.module.clone(), op_name(g, id))).or_default();
            *k += 1;
            format!("{}/{}#{}", n.module, op_name(g, id), k)
        };
        keys.insert(key, id);
    }
    keys
}

fn op_name(g: &Graph, id: NodeId) -> String {
    let n = g.node(id);
    if onnx::is_default_domain(n.domain()) {
        n.op().to_string()
    } else {
        format!("{}.{}", n.domain(), n.op())
    }
}

fn entry(g: &Graph, id: NodeId, key: &str) -> NodeEntry {
    NodeEntry {
        module: g.node(id).module.clone(),
        op: op_name(g, id),
        key: key.to_string(),
    }
}

fn node_changes(ga: &Graph, a: NodeId, gb: &Graph, b: NodeId) -> Vec<&'static str> {
    let (na, nb) = (ga.node(a), gb.node(b));
    let names = |g: &Graph, vs: &[Option<crate::ir::ValueId>]| -> Vec<String> {
        vs.iter()
            .map(|v| v.map(|v| g.value(v).name.clone()).unwrap_or_default())
            .collect()
    };
    let mut what = Vec::new();
    if na.op() != nb.op() || na.domain() != nb.domain() {
        what.push("op");
    }
    if na.proto.attribute != nb.proto.attribute {
        what.push("attributes");
    }
    if names(ga, &na.inputs) != names(gb, &nb.inputs) {
        what.push("inputs");
    }
    if names(ga, &na.outputs) != names(gb, &nb.outputs) {
        what.push("outputs");
    }
    what
}

fn initializer_changes(a: &Graph, b: &Graph) -> Changes {
    let ia: BTreeMap<&str, _> = a.initializers().map(|(_, t)| (t.name(), t)).collect();
    let ib: BTreeMap<&str, _> = b.initializers().map(|(_, t)| (t.name(), t)).collect();
    let mut c = Changes::default();
    for (name, ta) in &ia {
        let Some(tb) = ib.get(name) else {
            c.removed.push(name.to_string());
            continue;
        };
        let how = if ta.data_type() != tb.data_type() {
            Some(format!(
                "{} -> {}",
                onnx::type_name(ta.data_type()),
                onnx::type_name(tb.data_type())
            ))
        } else if ta.dims() != tb.dims() {
            Some(format!("dims {:?} -> {:?}", ta.dims(), tb.dims()))
        } else {
            match (ta.bytes(), tb.bytes()) {
                (Ok(x), Ok(y)) if x == y => None,
                _ => Some("data".to_string()),
            }
        };
        if let Some(how) = how {
            c.changed.push(format!("{name} ({how})"));
        }
    }
    c.added = ib
        .keys()
        .filter(|k| !ia.contains_key(*k))
        .map(|k| k.to_string())
        .collect();
    c
}

fn io_changes(a: &Graph, b: &Graph, ios: impl Fn(&Graph) -> &Vec<crate::ir::Io>) -> Changes {
    let describe = |g: &Graph| -> BTreeMap<String, String> {
        ios(g)
            .iter()
            .map(|io| {
                (
                    g.value(io.value).name.clone(),
                    crate::summary::type_text(io.info.r#type.as_ref()),
                )
            })
            .collect()
    };
    named_changes(describe(a), describe(b))
}

fn named_changes(a: BTreeMap<String, String>, b: BTreeMap<String, String>) -> Changes {
    let mut c = Changes::default();
    for (k, va) in &a {
        match b.get(k) {
            None => c.removed.push(format!("{k} {va}")),
            Some(vb) if vb != va => c.changed.push(format!("{k} {va} -> {vb}")),
            _ => {}
        }
    }
    c.added = b
        .iter()
        .filter(|(k, _)| !a.contains_key(*k))
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    c
}

/// Nodes added, removed and changed.
pub type Counts = (usize, usize, usize);

impl Diff {
    /// Added/removed/changed nodes by op, and by module path (`<root>` for none) and op.
    #[allow(clippy::type_complexity)]
    pub fn tally(
        &self,
    ) -> (
        BTreeMap<&str, Counts>,
        BTreeMap<&str, BTreeMap<&str, Counts>>,
    ) {
        let mut by_op: BTreeMap<&str, Counts> = BTreeMap::new();
        let mut by_module: BTreeMap<&str, BTreeMap<&str, Counts>> = BTreeMap::new();
        let entries = self
            .added
            .iter()
            .map(|e| (e, 0))
            .chain(self.removed.iter().map(|e| (e, 1)))
            .chain(self.changed.iter().map(|c| (&c.node, 2)));
        for (e, which) in entries {
            let bump = |t: &mut Counts| match which {
                0 => t.0 += 1,
                1 => t.1 += 1,
                _ => t.2 += 1,
            };
            bump(by_op.entry(&e.op).or_default());
            let module = if e.module.is_empty() {
                "<root>"
            } else {
                &e.module
            };
            bump(
                by_module
                    .entry(module)
                    .or_default()
                    .entry(&e.op)
                    .or_default(),
            );
        }
        (by_op, by_module)
    }

    /// Stable text rendering: summary counts, per-op and per-module tables, then the lists.
    pub fn render(&self) -> String {
        self.render_with(false, None)
    }

    /// [`Diff::render`], with modules of the same change list on one line (a glob of their
    /// paths and how many) when `fold`, and at most `list_max` names per initializer, input,
    /// output and opset list (one screen, as the demo shows it).
    pub fn render_with(&self, fold: bool, list_max: Option<usize>) -> String {
        let mut s = String::new();
        if self.is_empty() {
            s.push_str("no structural differences\n");
            return s;
        }
        let _ = writeln!(
            s,
            "nodes: {} -> {} (+{} -{} ~{})",
            self.nodes_before,
            self.nodes_after,
            self.added.len(),
            self.removed.len(),
            self.changed.len()
        );
        let (by_op, by_module) = self.tally();
        if !by_op.is_empty() {
            s.push_str("by op:\n");
            for (op, t) in &by_op {
                let _ = writeln!(s, "  {op:<28} {}", counts(*t));
            }
            // Modules grouped by their change list, in the order of each group's first module.
            let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
            for (module, ops) in &by_module {
                let total = ops
                    .values()
                    .fold((0, 0, 0), |a, t| (a.0 + t.0, a.1 + t.1, a.2 + t.2));
                let detail: Vec<String> = ops
                    .iter()
                    .map(|(op, t)| format!("{op} {}", counts(*t)))
                    .collect();
                let change = format!("{} [{}]", counts(total), detail.join(", "));
                match groups.iter_mut().find(|(c, _)| fold && *c == change) {
                    Some((_, modules)) => modules.push(module),
                    None => groups.push((change, vec![module])),
                }
            }
            if fold {
                let folded = groups.iter().filter(|(_, m)| m.len() > 1).count();
                let note = if folded > 0 {
                    "; those with the same changes on one line"
                } else {
                    ""
                };
                let _ = writeln!(s, "by module ({} modules{note}):", by_module.len());
            } else {
                s.push_str("by module:\n");
            }
            for (change, modules) in &groups {
                match modules.as_slice() {
                    [one] => {
                        let _ = writeln!(s, "  {one}: {change}");
                    }
                    many => {
                        let _ =
                            writeln!(s, "  {} (x{} modules): {change}", globs(many), many.len());
                    }
                }
            }
        }
        let list_max = list_max.unwrap_or(usize::MAX);
        for (title, c) in [
            ("initializers", &self.initializers),
            ("inputs", &self.inputs),
            ("outputs", &self.outputs),
            ("opsets", &self.opsets),
        ] {
            let total = c.added.len() + c.removed.len() + c.changed.len();
            if total == 0 {
                continue;
            }
            let _ = writeln!(
                s,
                "{title}: +{} -{} ~{}",
                c.added.len(),
                c.removed.len(),
                c.changed.len()
            );
            let items = [("+", &c.added), ("-", &c.removed), ("~", &c.changed)]
                .into_iter()
                .flat_map(|(mark, list)| list.iter().map(move |item| (mark, item)));
            for (mark, item) in items.take(list_max) {
                let _ = writeln!(s, "  {mark} {item}");
            }
            if total > list_max {
                let _ = writeln!(
                    s,
                    "  ... and {} more (`attune diff` lists them all)",
                    total - list_max
                );
            }
        }
        s
    }
}

/// `+1 -66 ~2`
pub fn counts((added, removed, changed): Counts) -> String {
    let mut parts = Vec::new();
    if added > 0 {
        parts.push(format!("+{added}"));
    }
    if removed > 0 {
        parts.push(format!("-{removed}"));
    }
    if changed > 0 {
        parts.push(format!("~{changed}"));
    }
    parts.join(" ")
}

/// Names for several module paths: one glob per last component (`*.norm1, *.norm2`), a
/// module alone by its path.
fn globs(modules: &[&str]) -> String {
    let mut by_last: Vec<(&str, Vec<&str>)> = Vec::new();
    for m in modules {
        let last = m.rsplit('.').next().unwrap_or(m);
        match by_last.iter_mut().find(|(l, _)| *l == last) {
            Some((_, ms)) => ms.push(m),
            None => by_last.push((last, vec![m])),
        }
    }
    let names: Vec<String> = by_last
        .iter()
        .map(|(_, ms)| match ms.as_slice() {
            [one] => one.to_string(),
            many => glob(many),
        })
        .collect();
    names.join(", ")
}

/// One name for several module paths: their common leading and trailing components around a
/// `*` (`*.transformer_blocks.0.attn1`, `up_blocks.1.*.norm1`).
fn glob(modules: &[&str]) -> String {
    let split: Vec<Vec<&str>> = modules.iter().map(|m| m.split('.').collect()).collect();
    let shortest = split.iter().map(Vec::len).min().unwrap_or(0);
    let at_head = |i: usize| split.iter().all(|p| p[i] == split[0][i]);
    let at_tail = |i: usize| {
        split
            .iter()
            .all(|p| p[p.len() - 1 - i] == split[0][split[0].len() - 1 - i])
    };
    let mut head = 0;
    while head < shortest && at_head(head) {
        head += 1;
    }
    let mut tail = 0;
    while head + tail < shortest && at_tail(tail) {
        tail += 1;
    }
    let first = &split[0];
    let mut parts: Vec<&str> = first[..head].to_vec();
    parts.push("*");
    parts.extend(&first[first.len() - tail..]);
    if head == 0 && tail == 0 {
        return format!("{} and others", modules[0]);
    }
    parts.join(".")
}
