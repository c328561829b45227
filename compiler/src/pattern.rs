//! Patterns as data, and one matcher that walks the graph backwards from a value.
//!
//! A pattern names ops, their positional inputs, required attributes, commutative operands,
//! pass-through wrappers (`Cast`) and alternatives; binds name the values and nodes a pass
//! needs. Exporter variants are more alternatives, not more code.
use std::collections::{HashMap, HashSet};

use crate::analysis::{ElemTypes, Shapes};
use crate::ir::{Graph, NodeId, ValueId};

#[derive(Clone, Debug)]
pub enum Pat {
    /// Any value.
    Any(Option<&'static str>),
    /// The value is output 0 of a default-domain node with this op.
    Op(Box<OpPat>),
    /// Zero or more of these single-input ops, then `inner` (e.g. Cast wrappers).
    Through(&'static [&'static str], Box<Pat>),
    /// The first alternative that matches.
    Alt(Vec<Pat>),
    /// A constant: an initializer callers cannot override (not a graph input).
    Const(Option<&'static str>),
    /// A constant scalar (or one value repeated) equal to this number (relative 1e-4).
    Scalar(f64),
    /// `inner`, then `guard` on what the match bound so far: a condition the structure
    /// cannot say (shapes, sizes). Failing, the enclosing alternative is tried next.
    Check(Box<Pat>, Guard),
    /// `inner`, its value bound under a name (any pattern: an alternative, a wrapper).
    Bind(&'static str, Box<Pat>),
}

/// A condition on a match in progress.
pub type Guard = fn(&Cx, &Match) -> bool;

/// What a match reads: the graph, the pass's analyses, and the nodes earlier matches took.
pub struct Cx<'a> {
    pub g: &'a Graph,
    pub shapes: &'a Shapes,
    pub types: &'a ElemTypes,
    /// Nodes no pattern may match (another rewrite of the same patch took them).
    pub claimed: Option<&'a HashSet<NodeId>>,
}

impl<'a> Cx<'a> {
    pub fn new(g: &'a Graph, shapes: &'a Shapes, types: &'a ElemTypes) -> Self {
        Cx {
            g,
            shapes,
            types,
            claimed: None,
        }
    }

    fn free(&self, n: NodeId) -> bool {
        self.claimed.is_none_or(|c| !c.contains(&n))
    }
}

#[derive(Clone, Debug)]
pub struct OpPat {
    pub op: &'static str,
    /// Which of the node's outputs the value is (0 unless `.output(k)`).
    pub output: usize,
    /// Patterns of the first inputs (more inputs are not looked at).
    pub inputs: Vec<Pat>,
    pub ints: Vec<(&'static str, Vec<i64>)>,
    /// Try the two inputs in either order.
    pub commutative: bool,
    /// Binds the output value (and the node, under the same name).
    pub bind: Option<&'static str>,
    /// Its output has no reader but the node the pattern came from (and is no graph
    /// output): rewriting the match loses nothing another reader needs.
    pub sole: bool,
}

/// `Any` with a bind name.
pub fn any(bind: &'static str) -> Pat {
    Pat::Any(Some(bind))
}

/// Any value, not bound.
pub fn anything() -> Pat {
    Pat::Any(None)
}

pub fn op<const N: usize>(op: &'static str, inputs: [Pat; N]) -> Pat {
    Pat::Op(Box::new(OpPat {
        op,
        output: 0,
        inputs: inputs.into(),
        ints: Vec::new(),
        commutative: false,
        bind: None,
        sole: false,
    }))
}

/// A constant (initializer, not a graph input), bound under `bind`.
pub fn constant(bind: &'static str) -> Pat {
    Pat::Const(Some(bind))
}

/// A constant equal to `value` (a scalar, or one value everywhere).
pub fn scalar(value: f64) -> Pat {
    Pat::Scalar(value)
}

pub fn through(ops: &'static [&'static str], inner: Pat) -> Pat {
    Pat::Through(ops, Box::new(inner))
}

pub fn alt<const N: usize>(alternatives: [Pat; N]) -> Pat {
    Pat::Alt(alternatives.into())
}

impl Pat {
    fn op_mut(&mut self) -> &mut OpPat {
        match self {
            Pat::Op(o) => o,
            _ => panic!("attribute/bind/commutative apply to op patterns"),
        }
    }
    /// Requires an ints attribute (`perm`, `axes`).
    pub fn ints(mut self, name: &'static str, values: &[i64]) -> Pat {
        self.op_mut().ints.push((name, values.to_vec()));
        self
    }
    /// Requires an int attribute (`axis`).
    pub fn int(self, name: &'static str, value: i64) -> Pat {
        self.ints(name, &[value])
    }
    pub fn commutative(mut self) -> Pat {
        self.op_mut().commutative = true;
        self
    }
    /// Binds the value this pattern matches (and, for an op, its node) under `name`.
    pub fn bind(mut self, name: &'static str) -> Pat {
        match &mut self {
            Pat::Op(o) => {
                o.bind = Some(name);
                self
            }
            _ => Pat::Bind(name, Box::new(self)),
        }
    }
    /// The value is output `k` of the op (Split's halves).
    pub fn output(mut self, k: usize) -> Pat {
        self.op_mut().output = k;
        self
    }
    /// Requires `guard` of the match once this pattern matched.
    pub fn check(self, guard: Guard) -> Pat {
        Pat::Check(Box::new(self), guard)
    }
    /// Requires the op's output to be read only by the node matched above it.
    pub fn sole(mut self) -> Pat {
        self.op_mut().sole = true;
        self
    }
}

/// What a match bound.
#[derive(Clone, Debug, Default)]
pub struct Match {
    /// The value the pattern was matched at.
    pub root: Option<ValueId>,
    pub values: HashMap<&'static str, ValueId>,
    pub nodes: HashMap<&'static str, NodeId>,
    /// Every node the pattern matched (wrappers included), in no particular order.
    pub matched: Vec<NodeId>,
}

impl Match {
    pub fn value(&self, name: &str) -> Option<ValueId> {
        self.values.get(name).copied()
    }
    pub fn node(&self, name: &str) -> Option<NodeId> {
        self.nodes.get(name).copied()
    }
}

/// The most wrapper nodes (casts, scales) one `through` pattern looks past.
const MAX_WRAPPERS: usize = 32;

/// Matches `pat` against the value `v` (no shapes known to guards, every node free).
pub fn match_value(g: &Graph, v: ValueId, pat: &Pat) -> Option<Match> {
    let (shapes, types) = (Shapes::default(), ElemTypes::default());
    match_in(&Cx::new(g, &shapes, &types), v, pat)
}

/// Matches `pat` against the value `v` in `cx`.
pub fn match_in(cx: &Cx, v: ValueId, pat: &Pat) -> Option<Match> {
    let mut m = Match {
        root: Some(v),
        ..Match::default()
    };
    go(cx, v, pat, &mut m).then_some(m)
}

/// Matches `pat` against the outputs of the nodes reading `v` (reader-side matching: from a
/// value to what consumes it, e.g. from an InstanceNormalization's output down to its γ Mul).
/// Each reader's output is tried in turn; the first that matches.
pub fn match_reader(g: &Graph, v: ValueId, pat: &Pat) -> Option<Match> {
    g.readers(v)
        .into_iter()
        .filter_map(|n| g.output(n))
        .find_map(|out| match_value(g, out, pat))
}

fn go(cx: &Cx, v: ValueId, pat: &Pat, m: &mut Match) -> bool {
    let g = cx.g;
    match pat {
        Pat::Any(bind) => bind_value(m, *bind, v),
        Pat::Const(bind) => g.is_constant(v) && bind_value(m, *bind, v),
        Pat::Scalar(want) => {
            g.is_constant(v)
                && cx
                    .shapes
                    .scalar(v)
                    .is_some_and(|x| (x - want).abs() <= 1e-4 * want.abs().max(1.0))
        }
        Pat::Check(inner, guard) => {
            let mut trial = m.clone();
            let ok = go(cx, v, inner, &mut trial) && guard(cx, &trial);
            if ok {
                *m = trial;
            }
            ok
        }
        Pat::Bind(name, inner) => {
            let mut trial = m.clone();
            let ok = go(cx, v, inner, &mut trial) && bind_value(&mut trial, Some(name), v);
            if ok {
                *m = trial;
            }
            ok
        }
        Pat::Alt(alts) => alts.iter().any(|p| {
            let mut trial = m.clone();
            let ok = go(cx, v, p, &mut trial);
            if ok {
                *m = trial;
            }
            ok
        }),
        Pat::Through(ops, inner) => {
            // Iterative and bounded: a cycle of wrappers (in a corrupt model) must not recurse
            // forever; exporters chain a few.
            let mut v = v;
            let mut wrappers = Vec::new();
            for _ in 0..MAX_WRAPPERS {
                let mut trial = m.clone();
                if go(cx, v, inner, &mut trial) {
                    trial.matched.extend(wrappers);
                    *m = trial;
                    return true;
                }
                let Some((n, 0)) = g.value(v).producer else {
                    return false;
                };
                let node = g.node(n);
                if !ops.iter().any(|o| node.is(o)) || !cx.free(n) {
                    return false;
                }
                let Some(Some(input)) = node.inputs.first() else {
                    return false;
                };
                wrappers.push(n);
                v = *input;
            }
            false
        }
        Pat::Op(p) => {
            let Some((n, k)) = g.value(v).producer else {
                return false;
            };
            let node = g.node(n);
            if k != p.output || !node.is(p.op) || !cx.free(n) {
                return false;
            }
            // The value reaches the pattern's root (or one reader) only.
            if p.sole && (g.is_graph_output(v) || g.value(v).consumers.len() > 1) {
                return false;
            }
            for (name, want) in &p.ints {
                let Some(a) = node.attr(name) else {
                    return false;
                };
                let got = if a.ints.is_empty() {
                    vec![a.i]
                } else {
                    a.ints.clone()
                };
                if &got != want {
                    return false;
                }
            }
            if node.inputs.len() < p.inputs.len() {
                return false;
            }
            let orders: &[[usize; 2]] = if p.commutative && p.inputs.len() == 2 {
                &[[0, 1], [1, 0]]
            } else {
                &[[0, 1]]
            };
            for order in orders {
                let mut trial = m.clone();
                let ok = p.inputs.iter().enumerate().all(|(i, ip)| {
                    let slot = if i < 2 { order[i] } else { i };
                    match node.inputs[slot] {
                        Some(input) => go(cx, input, ip, &mut trial),
                        None => false,
                    }
                });
                if ok && bind_value(&mut trial, p.bind, v) {
                    if let Some(b) = p.bind {
                        trial.nodes.insert(b, n);
                    }
                    trial.matched.push(n);
                    *m = trial;
                    return true;
                }
            }
            false
        }
    }
}

fn bind_value(m: &mut Match, bind: Option<&'static str>, v: ValueId) -> bool {
    let Some(name) = bind else { return true };
    match m.values.get(name) {
        Some(prev) => *prev == v,
        None => {
            m.values.insert(name, v);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::builder::Builder;

    /// x → InstanceNorm-like chain: y = (x · γ) + β with γ, β constants; `other` also reads
    /// the product when `shared`.
    fn affine(shared: bool) -> (crate::ir::Model, &'static str) {
        let mut b = Builder::new();
        let x = b.input("x", &[2, 4]);
        let g = b.constant("gamma", &[4], &[1.0, 2.0, 3.0, 4.0]);
        let beta = b.constant("beta", &[4], &[0.5; 4]);
        let scaled = b.op("Mul", &[&x, &g]);
        let y = b.op("Add", &[&scaled, &beta]);
        let mut outs = vec![y];
        if shared {
            outs.push(b.op("Relu", &[&scaled]));
        }
        let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        (b.finish(&refs).unwrap(), "Add_1")
    }

    fn pattern(sole: bool) -> Pat {
        let mul = op("Mul", [any("x"), constant("gamma")]).commutative();
        let mul = if sole { mul.sole() } else { mul };
        op("Add", [mul, constant("beta")]).commutative().bind("add")
    }

    #[test]
    fn binds_constants_and_commutes() {
        let (m, out) = affine(false);
        let g = &m.graph;
        let found = match_value(g, g.value_id(out).unwrap(), &pattern(true)).unwrap();
        assert_eq!(g.value(found.value("x").unwrap()).name, "x");
        assert_eq!(g.value(found.value("gamma").unwrap()).name, "gamma");
        assert_eq!(found.matched.len(), 2);
        // A graph input is no constant.
        let swapped = op("Add", [op("Mul", [constant("x"), any("g")]), any("b")]);
        assert!(match_value(g, g.value_id(out).unwrap(), &swapped).is_none());
    }

    #[test]
    fn sole_refuses_a_value_other_nodes_read() {
        let (m, out) = affine(true);
        let g = &m.graph;
        let v = g.value_id(out).unwrap();
        assert!(
            match_value(g, v, &pattern(true)).is_none(),
            "the Relu reads the product"
        );
        assert!(match_value(g, v, &pattern(false)).is_some());
    }

    #[test]
    fn reader_side_matching_finds_the_consumer() {
        let (m, _) = affine(false);
        let g = &m.graph;
        let x = g.value_id("x").unwrap();
        // From x down to the Mul reading it.
        let mul = op("Mul", [any("x"), constant("gamma")]).bind("mul");
        let found = match_reader(g, x, &mul).unwrap();
        assert_eq!(g.node(found.node("mul").unwrap()).op(), "Mul");
        assert!(match_reader(g, x, &op("Sub", [anything(), anything()])).is_none());
    }

    #[test]
    fn a_failed_guard_falls_back_to_the_next_alternative() {
        let (m, out) = affine(false);
        let g = &m.graph;
        let v = g.value_id(out).unwrap();
        let never = op("Add", [anything(), any("beta")]).check(|_, _| false);
        let found = match_value(g, v, &alt([never, any("whole")])).unwrap();
        assert!(
            found.value("beta").is_none(),
            "the failed trial binds nothing"
        );
        assert_eq!(found.value("whole"), Some(v));
    }

    #[test]
    fn scalars_are_read_from_the_analysis() {
        let (m, out) = affine(false);
        let g = &m.graph;
        let (shapes, types) = (Shapes::infer(&m), ElemTypes::default());
        let cx = Cx::new(g, &shapes, &types);
        let v = g.value_id(out).unwrap();
        let half = op("Add", [anything(), scalar(0.5)]).commutative();
        assert!(match_in(&cx, v, &half).is_some());
        let one = op("Add", [anything(), scalar(1.0)]).commutative();
        assert!(match_in(&cx, v, &one).is_none());
        // γ = [1, 2, 3, 4] is no scalar.
        let mul = op("Mul", [anything(), scalar(1.0)]).commutative();
        assert!(match_in(&cx, g.value_id("Mul_0").unwrap(), &mul).is_none());
    }
}
