//! Dead-code elimination: nodes whose outputs nothing reads, then initializers and values
//! left unused. Passes (and the rule engine) run it after applying their patches.
use crate::ir::{Graph, Model, NodeId};

/// What was removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub nodes: usize,
    pub initializers: usize,
}

fn is_dead(g: &Graph, n: NodeId) -> bool {
    g.node(n)
        .outputs
        .iter()
        .flatten()
        .all(|v| g.value(*v).consumers.is_empty() && !g.is_graph_output(*v))
}

/// Removes dead nodes (transitively) and unused initializers.
pub fn dce(model: &mut Model) -> Removed {
    let g = &mut model.graph;
    let mut removed = Removed::default();
    let mut work: Vec<NodeId> = g.node_ids().filter(|n| is_dead(g, *n)).collect();
    while let Some(n) = work.pop() {
        if !g.contains_node(n) || !is_dead(g, n) {
            continue;
        }
        let producers: Vec<NodeId> = g.predecessors(n).collect();
        let mut values: Vec<_> = g
            .node(n)
            .inputs
            .iter()
            .flatten()
            .chain(g.node(n).outputs.iter().flatten())
            .copied()
            .collect();
        // A node may read one value in several slots (Mul(x, x)): remove it once.
        values.sort();
        values.dedup();
        g.remove_node(n);
        removed.nodes += 1;
        for v in values {
            let val = g.value(v);
            if val.producer.is_none()
                && val.consumers.is_empty()
                && !g.is_graph_output(v)
                && !g.inputs.iter().any(|io| io.value == v)
            {
                if val.initializer.is_some() {
                    removed.initializers += 1;
                }
                g.remove_value(v).expect("unused value");
            }
        }
        work.extend(producers);
    }
    removed
}
