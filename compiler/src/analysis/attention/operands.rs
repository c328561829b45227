//! What the attention reads as Q, K and V, and the projections of the traced form.
use std::collections::HashSet;

use super::forms::{JOINT, heads};
use super::{Operand, projection};
use crate::ir::{Graph, NodeId, ValueId};
use crate::pattern::{Match, alt, any, anything, match_value, op};

/// Bound (to the second stream's Q projection) when the joined tokens start with the second
/// stream's (Flux: text, then image).
pub(super) const CONTEXT_FIRST: &str = "context_first";

/// The most values one operand's trace back to its head splits looks at (a rotary
/// embedding's cos/sin computation included).
const TRACE_BUDGET: usize = 256;

/// Binds, for the traced form, each operand's head splits of projections as the other forms
/// do: one (`q_proj`, `q_split`, ...), or two streams joined (the second stream's, the
/// `add_*` projection, as `cq_proj`, `cq_split`, ...). A split is `[.., heads, head_dim]`
/// with or without its transpose (Flux transposes after its rotary embedding). The trace
/// follows data only (not into `Shape`) and stops at other layers (MatMul, Gemm, Softmax).
/// An operand with none or more than two splits stays unbound, and the site is reported
/// unrecognised.
pub(super) fn bind_traced(g: &Graph, m: &mut Match) {
    let split = alt([
        heads("p", "s", "h"),
        op("Reshape", [any("p"), anything()]).bind("s"),
    ]);
    for (i, any) in ["q_any", "k_any", "v_any"].into_iter().enumerate() {
        let Some(x) = m.value(any) else { continue };
        let mut found: Vec<Match> = Vec::new();
        let mut seen = HashSet::new();
        let mut stack = vec![x];
        while let Some(v) = stack.pop() {
            if seen.len() >= TRACE_BUDGET || !seen.insert(v) {
                continue;
            }
            if let Some(hit) = match_value(g, v, &split)
                && hit.value("p").is_some_and(|p| projection(g, p).is_some())
            {
                found.push(hit);
                continue;
            }
            let Some((n, _)) = g.value(v).producer else {
                continue;
            };
            let node = g.node(n);
            let layer = [
                "MatMul",
                "Gemm",
                "Softmax",
                "Shape",
                "Size",
                "ConstantOfShape",
            ];
            if !layer.iter().any(|o| node.is(o)) {
                // Inputs in reverse, so the first input is traced first (the Concat order).
                stack.extend(node.inputs.iter().rev().flatten());
            }
        }
        let second_stream = |h: &Match| {
            let p = h.value("p").and_then(|p| g.value(p).producer);
            p.is_some_and(|(n, _)| g.node(n).module.rsplit('.').any(|s| s.starts_with("add_")))
        };
        if found.len() == 2 && second_stream(&found[0]) && !second_stream(&found[1]) {
            found.swap(0, 1);
            if let (0, Some(p)) = (i, found[1].value("p")) {
                m.values.insert(CONTEXT_FIRST, p); // bound at all: the text tokens come first
            }
        }
        if !(1..=2).contains(&found.len()) {
            continue;
        }
        for (hit, (proj, split_name, heads_name)) in found.iter().zip(&JOINT[i].parts) {
            for (from, to) in [("p", proj), ("s", split_name), ("h", heads_name)] {
                if let Some(v) = hit.value(from) {
                    m.values.insert(to, v);
                }
            }
        }
    }
}

/// Q, K and V as the attention reads them (below the scales, K below its transpose), and
/// K's [batch, heads, tokens, head_dim] value. The exporter forms without per-head work read
/// the projections.
pub(super) fn operands(
    g: &Graph,
    m: &Match,
    form: &str,
) -> Result<([Operand; 3], Option<ValueId>), String> {
    let bound = |name: &str| m.value(name).expect("bound by the form");
    let projections = ["q_proj", "k_proj", "v_proj"].map(|p| Operand::Tokens(bound(p)));
    if form == "traced" {
        let mut out = projections;
        for (i, any) in ["q_any", "k_any", "v_any"].into_iter().enumerate() {
            let x = bound(any);
            if m.value(JOINT[i].parts[0].2) != Some(x) {
                out[i] = Operand::Heads(x);
            }
        }
        return Ok((out, Some(bound("k_any"))));
    }
    if !matches!(form, "qk-norm" | "joint") {
        return Ok((projections, m.value("k_heads")));
    }
    let input = |n: NodeId, i: usize| g.node(n).inputs.get(i).copied().flatten();
    let below_scale = |v: ValueId, mul: &str, div: &str| {
        let Some(s) = m.value(mul).or_else(|| m.value(div)) else {
            return Some(v);
        };
        let (n, _) = g.value(v).producer?;
        g.node(n).inputs.iter().flatten().copied().find(|x| *x != s)
    };
    let scores = m.node("scores").expect("bound");
    let missing = || "attention operands not found".to_string();
    let q = input(scores, 0)
        .and_then(|v| below_scale(v, "q_mul", "q_div"))
        .ok_or_else(missing)?;
    // Kᵀ down to K: through the transpose (and the dynamo exporter's 3-D folding around it).
    let mut k = input(scores, 1)
        .and_then(|v| below_scale(v, "k_mul", "k_div"))
        .ok_or_else(missing)?;
    for _ in 0..3 {
        let Some((n, _)) = g.value(k).producer else {
            break;
        };
        let wrapper = g.node(n).is("Transpose") || g.node(n).is("Reshape");
        if !wrapper || [m.value("k_heads"), m.value("k_cat")].contains(&Some(k)) {
            break;
        }
        k = input(n, 0).ok_or_else(missing)?;
    }
    let v = input(m.node("attn").expect("bound"), 1).ok_or_else(missing)?;
    let mut out = projections;
    for (i, x) in [q, k, v].into_iter().enumerate() {
        let names = &JOINT[i];
        out[i] = if m.value(names.parts[0].2) == Some(x) {
            projections[i]
        } else if m.value(names.cat) == Some(x) {
            let cat = g.value(x).producer.expect("matched").0;
            let inputs = &g.node(cat).inputs;
            let plain = names.parts.map(|(_, _, h)| m.value(h));
            if inputs.len() != 2 {
                return Err(format!("joint Concat of {} inputs, not 2", inputs.len()));
            }
            if inputs[0] == plain[0] && inputs[1] == plain[1] {
                Operand::Joint(bound(names.parts[0].0), bound(names.parts[1].0))
            } else {
                Operand::Heads(x)
            }
        } else {
            Operand::Heads(x)
        };
    }
    Ok((out, Some(k)))
}
