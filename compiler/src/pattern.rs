//! Patterns as data, and one matcher that walks the graph backwards from a value.
//!
//! A pattern names ops, their positional inputs, required attributes, commutative operands,
//! pass-through wrappers (`Cast`) and alternatives; binds name the values and nodes a pass
//! needs. Exporter variants are more alternatives, not more code.
use std::collections::HashMap;

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
}

#[derive(Clone, Debug)]
pub struct OpPat {
    pub op: &'static str,
    /// Patterns of the first inputs (more inputs are not looked at).
    pub inputs: Vec<Pat>,
    pub ints: Vec<(&'static str, Vec<i64>)>,
    /// Try the two inputs in either order.
    pub commutative: bool,
    /// Binds the output value (and the node, under the same name).
    pub bind: Option<&'static str>,
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
        inputs: inputs.into(),
        ints: Vec::new(),
        commutative: false,
        bind: None,
    }))
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
    pub fn bind(mut self, name: &'static str) -> Pat {
        self.op_mut().bind = Some(name);
        self
    }
}

/// What a match bound.
#[derive(Clone, Debug, Default)]
pub struct Match {
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

/// Matches `pat` against the value `v`.
pub fn match_value(g: &Graph, v: ValueId, pat: &Pat) -> Option<Match> {
    let mut m = Match::default();
    go(g, v, pat, &mut m).then_some(m)
}

fn go(g: &Graph, v: ValueId, pat: &Pat, m: &mut Match) -> bool {
    match pat {
        Pat::Any(bind) => bind_value(m, *bind, v),
        Pat::Alt(alts) => alts.iter().any(|p| {
            let mut trial = m.clone();
            let ok = go(g, v, p, &mut trial);
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
                if go(g, v, inner, &mut trial) {
                    trial.matched.extend(wrappers);
                    *m = trial;
                    return true;
                }
                let Some((n, 0)) = g.value(v).producer else {
                    return false;
                };
                let node = g.node(n);
                if !ops.iter().any(|o| node.is(o)) {
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
            let Some((n, 0)) = g.value(v).producer else {
                return false;
            };
            let node = g.node(n);
            if !node.is(p.op) {
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
                        Some(input) => go(g, input, ip, &mut trial),
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
