//! One engine for local rewrites. A rule is a pattern (data: ops, operands, alternatives,
//! guards), a check that says why a matched site stays, and a rewrite into a patch.
//!
//! The engine infers shapes once per pass, walks the graph from its outputs back (so an outer
//! match is found before the smaller ones inside it), refuses matches whose inner values are
//! read from outside (unless the rule provides them), claims what each match covers so no two
//! rewrites share a node, then writes the rewrites in graph order (a rewrite reads the
//! replacements of those before it) as one patch.
use std::collections::{BTreeMap, HashMap, HashSet};

use crate::analysis::{ElemTypes, Shapes};
use crate::error::Result;
use crate::ir::{Model, NodeId, Use};
use crate::pass::{Pass, PassCx, PassReport, Skipped};
use crate::patch::Patch;
use crate::pattern::{Cx, Match, Pat, match_in};

pub trait Rule {
    /// What it rewrites into what, for reports ("GroupNorm -> com.microsoft.GroupNorm").
    fn name(&self) -> &'static str;
    /// The op every site has: each such node no rewrite covers is reported as skipped.
    fn anchor(&self) -> Option<&'static str> {
        None
    }
    /// The form, tried at every value; alternatives from the longest to the shortest.
    fn pattern(&self) -> Pat;
    /// Bound values that readers outside the match may read: the rewrite provides them.
    fn shared(&self) -> &'static [&'static str] {
        &[]
    }
    /// What the pattern cannot say, with the reason a matched site stays.
    fn check(&self, _cx: &Cx, _m: &Match) -> std::result::Result<(), String> {
        Ok(())
    }
    /// Writes the replacement; returns what is worth counting about this site ("with SiLU").
    fn rewrite(&self, cx: &Cx, m: &Match, p: &mut Patch) -> Vec<&'static str>;
    /// Why an anchor that no pattern matched stays (`None`: it is no candidate).
    fn unmatched(&self, _cx: &Cx, _anchor: NodeId) -> Option<String> {
        None
    }
    /// The operator set the rewritten graph needs (domain, version).
    fn opset(&self) -> Option<(&'static str, i64)> {
        None
    }
}

/// A pass that applies its rules (each site to the first rule that takes it).
pub struct RulePass {
    pub name: &'static str,
    pub rules: Vec<Box<dyn Rule>>,
}

impl Pass for RulePass {
    fn name(&self) -> &'static str {
        self.name
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        let mut report = PassReport::default();
        apply(model, &self.rules, &mut report)?;
        Ok(report)
    }
}

/// One accepted match: the rule (its index), what it bound, the node its root value leaves.
struct Site {
    rule: usize,
    m: Match,
    root: NodeId,
}

/// What the match phase found: the sites (in graph order) and why refused anchors stay.
struct Found {
    sites: Vec<Site>,
    claimed: HashSet<NodeId>,
    refused: HashMap<NodeId, String>,
    order: Vec<NodeId>,
}

/// Matches `rules` from the graph's outputs back, claiming what each accepted match covers.
fn find(cx: &Cx, rules: &[Box<dyn Rule>]) -> Result<Found> {
    let g = cx.g;
    let order = g.topo_order()?;
    let mut claimed = HashSet::new();
    let mut sites = Vec::new();
    let mut refused: HashMap<NodeId, String> = HashMap::new();
    let patterns: Vec<Pat> = rules.iter().map(|r| r.pattern()).collect();
    for &n in order.iter().rev() {
        if claimed.contains(&n) {
            continue;
        }
        for (k, rule) in rules.iter().enumerate() {
            let cx = Cx {
                claimed: Some(&claimed),
                ..*cx
            };
            let found = g.node(n).outputs.iter().flatten().find_map(|&v| {
                let m = match_in(&cx, v, &patterns[k])?;
                contained(&cx, &m, n, rule.shared()).then_some(m)
            });
            let Some(m) = found else { continue };
            if let Err(why) = rule.check(&cx, &m) {
                for &a in m
                    .matched
                    .iter()
                    .filter(|a| is_anchor(rule.as_ref(), g, **a))
                {
                    refused.entry(a).or_insert_with(|| why.clone());
                }
                continue;
            }
            claimed.extend(m.matched.iter().copied());
            sites.push(Site {
                rule: k,
                m,
                root: n,
            });
            break;
        }
    }
    // Written in graph order: a rewrite reads what those before it replaced.
    let position: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    sites.sort_by_key(|s| position[&s.root]);
    Ok(Found {
        sites,
        claimed,
        refused,
        order,
    })
}

/// How many sites `rules` would rewrite in `model`.
pub fn count(model: &Model, rules: &[Box<dyn Rule>]) -> Result<usize> {
    let shapes = Shapes::infer(model);
    let types = ElemTypes::infer(&model.graph)?;
    Ok(find(&Cx::new(&model.graph, &shapes, &types), rules)?
        .sites
        .len())
}

/// Applies `rules` to `model` as one patch, reporting each rule's count and the anchors that
/// stay with their reasons; returns how many sites were rewritten. Unused nodes are removed.
pub fn apply(model: &mut Model, rules: &[Box<dyn Rule>], report: &mut PassReport) -> Result<usize> {
    let shapes = Shapes::infer(model);
    let types = ElemTypes::infer(&model.graph)?;
    let g = &model.graph;
    let cx = Cx::new(g, &shapes, &types);
    let Found {
        sites,
        claimed,
        mut refused,
        order,
    } = find(&cx, rules)?;
    let mut p = Patch::new(model);
    let mut counts = vec![(0usize, BTreeMap::<&str, usize>::new()); rules.len()];
    for site in &sites {
        let (count, tags) = &mut counts[site.rule];
        *count += 1;
        for tag in rules[site.rule].rewrite(&cx, &site.m, &mut p) {
            *tags.entry(tag).or_default() += 1;
        }
    }
    let mut reported = HashSet::new();
    for &n in &order {
        for rule in rules.iter().filter(|r| is_anchor(r.as_ref(), g, n)) {
            if claimed.contains(&n) {
                continue;
            }
            let why = refused.remove(&n).or_else(|| rule.unmatched(&cx, n));
            let Some(reason) = why else { continue };
            let skipped = Skipped {
                site: g.node(n).module.clone(),
                reason: format!("{}: {reason}", rule.name()),
            };
            // One line a site (a pattern may hold two anchors: a LayerNorm's two means).
            if reported.insert((skipped.site.clone(), skipped.reason.clone())) {
                report.skipped.push(skipped);
            }
        }
    }
    p.into_parts().apply(model)?;
    crate::dce::dce(model);
    for (rule, (count, tags)) in rules.iter().zip(counts) {
        if count == 0 {
            continue;
        }
        if let Some((domain, version)) = rule.opset() {
            model.require_opset(domain, version);
        }
        let tags: Vec<String> = tags.iter().map(|(t, n)| format!("{n} {t}")).collect();
        report.rewritten.push(if tags.is_empty() {
            format!("{count} {}", rule.name())
        } else {
            format!("{count} {} ({})", rule.name(), tags.join(", "))
        });
    }
    Ok(sites.len())
}

fn is_anchor(rule: &dyn Rule, g: &crate::ir::Graph, n: NodeId) -> bool {
    let node = g.node(n);
    rule.anchor()
        .is_some_and(|op| match op.strip_prefix("com.microsoft.") {
            Some(contrib) => node.domain() == "com.microsoft" && node.op() == contrib,
            None => node.is(op),
        })
}

/// Nothing outside the match reads what the match computes inside, but for the values the
/// rule provides (`shared`): rewriting it loses nothing another reader needs.
fn contained(cx: &Cx, m: &Match, root: NodeId, shared: &[&str]) -> bool {
    let g = cx.g;
    let inside: HashSet<NodeId> = m.matched.iter().copied().collect();
    let provided: HashSet<_> = shared.iter().filter_map(|s| m.value(s)).collect();
    inside.iter().filter(|n| **n != root).all(|&n| {
        g.node(n).outputs.iter().flatten().all(|&v| {
            provided.contains(&v)
                || (!g.is_graph_output(v)
                    && g.value(v).consumers.iter().all(|u| match u {
                        Use::Input(reader, _) => inside.contains(reader),
                        Use::Subgraph(_) => false,
                    }))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::builder::Builder;
    use crate::patch::In;
    use crate::pattern::{any, constant, op};

    /// `x·γ + β` → `Affine(x, γ, β)`, anchored at the Mul; refuses a 1-D input.
    struct Affine;

    impl Rule for Affine {
        fn name(&self) -> &'static str {
            "affine"
        }
        fn anchor(&self) -> Option<&'static str> {
            Some("Mul")
        }
        fn pattern(&self) -> Pat {
            let scaled = op("Mul", [any("x"), constant("g")]).commutative();
            op("Add", [scaled, constant("b")]).commutative()
        }
        fn check(&self, cx: &Cx, m: &Match) -> std::result::Result<(), String> {
            let rank = cx.shapes.shape(m.value("x").unwrap()).map_or(0, <[_]>::len);
            (rank > 1)
                .then_some(())
                .ok_or_else(|| format!("rank {rank}"))
        }
        fn rewrite(&self, _cx: &Cx, m: &Match, p: &mut Patch) -> Vec<&'static str> {
            let inputs = ["x", "g", "b"].map(|k| In::Value(m.value(k).unwrap()));
            let out = p.op("Affine", "affine", inputs.to_vec(), vec![], "", None);
            p.replace(m.root.unwrap(), In::New(out));
            vec!["fused"]
        }
        fn unmatched(&self, _cx: &Cx, _anchor: NodeId) -> Option<String> {
            Some("no β".into())
        }
    }

    /// y = x·γ + β over `dims`; with `leak`, a Relu reads the product too; plus a lone x·γ.
    fn model(dims: &[i64], leak: bool) -> (Model, PassReport, usize) {
        let mut b = Builder::new();
        let x = b.input("x", dims);
        let g = b.constant("g", &[4], &[2.0; 4]);
        let beta = b.constant("b", &[4], &[1.0; 4]);
        let scaled = b.op("Mul", &[&x, &g]);
        let y = b.op("Add", &[&beta, &scaled]);
        let lone = b.op("Mul", &[&g, &y]);
        let mut outs = vec![lone];
        if leak {
            outs.push(b.op("Relu", &[&scaled]));
        }
        let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        let mut m = b.finish(&refs).unwrap();
        let mut report = PassReport::default();
        let n = apply(&mut m, &[Box::new(Affine)], &mut report).unwrap();
        (m, report, n)
    }

    fn ops(m: &Model) -> Vec<String> {
        let g = &m.graph;
        let mut ops: Vec<String> = g.node_ids().map(|n| g.node(n).op().to_string()).collect();
        ops.sort();
        ops
    }

    #[test]
    fn rewrites_a_match_and_reports_the_anchor_it_did_not_cover() {
        let (m, report, n) = model(&[2, 4], false);
        assert_eq!(n, 1);
        assert_eq!(ops(&m), ["Affine", "Mul"]);
        assert_eq!(report.rewritten, ["1 affine (1 fused)"]);
        // The lone Mul of the output is an anchor no match covered.
        assert_eq!(report.skipped.len(), 1);
        assert_eq!(report.skipped[0].reason, "affine: no β");
    }

    #[test]
    fn a_value_read_outside_the_match_keeps_it() {
        let (m, report, n) = model(&[2, 4], true);
        assert_eq!(n, 0);
        assert_eq!(ops(&m), ["Add", "Mul", "Mul", "Relu"]);
        assert!(report.rewritten.is_empty());
    }

    #[test]
    fn a_refused_check_is_reported_with_its_reason() {
        let (m, report, n) = model(&[4], false);
        assert_eq!(n, 0);
        assert_eq!(ops(&m), ["Add", "Mul", "Mul"]);
        let reasons: Vec<&str> = report.skipped.iter().map(|s| s.reason.as_str()).collect();
        assert_eq!(reasons, ["affine: rank 1", "affine: no β"]);
    }
}
