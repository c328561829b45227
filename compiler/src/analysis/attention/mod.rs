//! Where is attention? Every scaled-dot-product attention of an exported diffusion graph as
//! one record (projections, heads, the scale actually applied, softmax, token counts), and
//! the transformer blocks around them. Every pass reads these records.
use std::collections::HashSet;

use serde::Serialize;

mod blocks;
mod forms;
mod operands;

use super::dim::Dim;
use super::shapes::Shapes;
use crate::ir::{Graph, Model, NodeId, ValueId};
use crate::pattern::{Match, anything, match_value, op, through};
use blocks::blocks;
use forms::{JOINT, forms};
use operands::{bind_traced, operands};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[serde(rename = "self")]
    SelfAttention,
    Cross,
    /// One attention over two streams' tokens concatenated (SD3's MM-DiT: image, then text).
    Joint,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::SelfAttention => "self",
            Kind::Cross => "cross",
            Kind::Joint => "joint",
        }
    }
}

/// A linear projection `x @ W (+ b)` as exported (`MatMul` with Wᵀ stored, optional `Add`).
#[derive(Clone, Debug, Serialize)]
pub struct Projection {
    #[serde(skip)]
    pub matmul: NodeId,
    #[serde(skip)]
    pub input: ValueId,
    /// The weight initializer's name (None when the weight is computed).
    pub weight: Option<String>,
    #[serde(skip)]
    pub bias_add: Option<NodeId>,
    #[serde(skip)]
    pub output: ValueId,
}

/// What the attention reads as Q, K or V, as the fused op can take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    /// A projection's output, [batch, tokens, heads·head_dim].
    Tokens(ValueId),
    /// Two streams' projections, joined along the tokens (image first, then text).
    Joint(ValueId, ValueId),
    /// Heads computed after the split (a per-head qk-norm), [batch, heads, tokens, head_dim].
    Heads(ValueId),
}

/// The second stream's projections of a joint attention (diffusers' `add_q_proj`, ...).
#[derive(Clone, Debug, Serialize)]
pub struct ContextProjections {
    pub q: Projection,
    pub k: Projection,
    pub v: Projection,
    /// The joined tokens start with this stream's (Flux: text first; SD3: image first).
    pub first: bool,
}

/// One attention site.
#[derive(Clone, Debug, Serialize)]
pub struct AttentionSite {
    pub path: String,
    pub kind: Kind,
    pub heads: i64,
    pub head_dim: i64,
    /// Softmax temperature actually applied to Q·Kᵀ (all multipliers read from the graph).
    pub scale: f64,
    pub query_tokens: Option<Dim>,
    pub key_tokens: Option<Dim>,
    /// Which exporter form matched (`sdpa-legacy`, `sdpa-dynamo`, `explicit-transpose`,
    /// `classic`, `qk-norm`, `joint`).
    pub form: &'static str,
    pub q: Projection,
    pub k: Projection,
    pub v: Projection,
    /// Joint attention's second stream.
    pub context: Option<ContextProjections>,
    /// Q, K and V as the attention reads them.
    #[serde(skip)]
    pub operands: [Operand; 3],
    /// Path of the enclosing transformer block.
    pub block: Option<String>,
    #[serde(skip)]
    pub softmax: NodeId,
    /// The attention probabilities as the value product reads them ([batch, heads, q, k], or
    /// [batch·heads, q, k] for the classic form), and that product node.
    #[serde(skip)]
    pub probs: ValueId,
    #[serde(skip)]
    pub probs_matmul: NodeId,
    /// An additive mask on the scores (CLIP's causal mask), broadcastable to
    /// [batch, heads, query tokens, key tokens], with its rank.
    #[serde(skip)]
    pub mask: Option<(ValueId, usize)>,
    /// Merged heads, [batch, query tokens, heads·head_dim] (what `to_out` reads).
    #[serde(skip)]
    pub output: ValueId,
    /// Nodes the match covered (the pattern core, shape subgraphs not included).
    #[serde(skip)]
    pub nodes: Vec<NodeId>,
}

/// A diffusers `BasicTransformerBlock`-style block: norms, attentions, feed-forward, residuals.
#[derive(Clone, Debug, Serialize)]
pub struct TransformerBlock {
    pub path: String,
    /// Indices into the site list.
    pub attn1: Option<usize>,
    pub attn2: Option<usize>,
    /// The hidden states entering the block (norm1's input).
    #[serde(skip)]
    pub input: Option<ValueId>,
    #[serde(skip)]
    pub norms: Vec<(String, NodeId)>,
    /// Residual additions onto the stream, in order (after attn1, attn2, ff).
    #[serde(skip)]
    pub residual_adds: Vec<NodeId>,
    pub tokens: Option<Dim>,
}

/// A Softmax that looks like attention (it sits between two MatMuls) but matched no pattern.
#[derive(Clone, Debug, Serialize)]
pub struct Unrecognised {
    pub path: String,
    pub node: String,
    pub reason: String,
}

#[derive(Debug, Default, Serialize)]
pub struct AttentionAnalysis {
    pub sites: Vec<AttentionSite>,
    pub blocks: Vec<TransformerBlock>,
    pub unrecognised: Vec<Unrecognised>,
}

/// Finds every attention site and transformer block.
pub fn analyze(model: &Model, shapes: &Shapes) -> AttentionAnalysis {
    let g = &model.graph;
    let forms = forms();
    let mut out = AttentionAnalysis::default();
    let mut covered: HashSet<NodeId> = HashSet::new();
    let order = g.topo_order().unwrap_or_else(|_| g.node_ids().collect());
    for &n in &order {
        if !g.node(n).is("Reshape") {
            continue;
        }
        let Some(Some(root)) = g.node(n).outputs.first().copied() else {
            continue;
        };
        for (form, pat) in &forms {
            let Some(mut m) = match_value(g, root, pat) else {
                continue;
            };
            if *form == "traced" {
                bind_traced(g, &mut m);
            }
            let softmax = m.node("softmax").expect("bound");
            match site(model, shapes, &m, form) {
                Ok(s) => {
                    covered.extend(s.nodes.iter().copied());
                    out.sites.push(s);
                }
                Err(reason) => {
                    covered.insert(softmax);
                    out.unrecognised.push(Unrecognised {
                        path: g.node(softmax).module.clone(),
                        node: g.node(softmax).name().to_string(),
                        reason,
                    });
                }
            }
            break;
        }
    }
    for &n in &order {
        let node = g.node(n);
        if node.is("Softmax") && !covered.contains(&n) && looks_like_attention(g, n) {
            out.unrecognised.push(Unrecognised {
                path: node.module.clone(),
                node: node.name().to_string(),
                reason: "no attention pattern matched".into(),
            });
        }
    }
    out.blocks = blocks(g, shapes, &mut out.sites);
    out
}

/// A Softmax fed (through casts/scales) by a MatMul and feeding a MatMul.
fn looks_like_attention(g: &Graph, softmax: NodeId) -> bool {
    let Some(scores) = g.node(softmax).inputs.first().copied().flatten() else {
        return false;
    };
    let from_matmul = match_value(
        g,
        scores,
        &through(
            &["Cast", "Mul", "Div", "Add"],
            op("MatMul", [anything(), anything()]),
        ),
    )
    .is_some();
    let mut frontier: Vec<ValueId> = g.node(softmax).outputs.iter().flatten().copied().collect();
    let mut to_matmul = false;
    for _ in 0..3 {
        let next: Vec<NodeId> = frontier
            .iter()
            .flat_map(|v| g.value(*v).consumers.iter().map(|u| u.node()))
            .collect();
        to_matmul |= next.iter().any(|n| g.node(*n).is("MatMul"));
        frontier = next
            .iter()
            .filter(|n| g.node(**n).is("Cast"))
            .flat_map(|n| g.node(*n).outputs.iter().flatten().copied())
            .collect();
    }
    from_matmul && to_matmul
}

fn projection(g: &Graph, v: ValueId) -> Option<Projection> {
    let (n, _) = g.value(v).producer?;
    let node = g.node(n);
    let (matmul, bias_add) = if node.is("Add") {
        let mm = node.inputs.iter().flatten().find_map(|i| {
            g.value(*i)
                .producer
                .filter(|(p, _)| g.node(*p).is("MatMul"))
        })?;
        (mm.0, Some(n))
    } else if node.is("MatMul") {
        (n, None)
    } else {
        return None;
    };
    let mm = g.node(matmul);
    let input = mm.inputs.first().copied().flatten()?;
    let w = mm.inputs.get(1).copied().flatten()?;
    let weight = g.initializer(w).map(|t| t.name().to_string());
    Some(Projection {
        matmul,
        input,
        weight,
        bias_add,
        output: v,
    })
}

fn site(
    model: &Model,
    shapes: &Shapes,
    m: &Match,
    form: &'static str,
) -> Result<AttentionSite, String> {
    let g = &model.graph;
    for role in ["q", "k", "v"] {
        if m.value(&format!("{role}_proj")).is_none() {
            return Err(format!("no head split of a projection found below {role}"));
        }
    }
    // Every form binds these; the traced form binds what it found (a corrupt graph may
    // leave a role half found).
    let value = |name: &str| {
        m.value(name)
            .ok_or_else(|| format!("'{name}' of the attention pattern not found"))
    };
    let proj = |role: &str, v: ValueId| {
        projection(g, v).ok_or_else(|| format!("{role} is not a linear projection"))
    };
    let (q, k, v) = (
        proj("Q", value("q_proj")?)?,
        proj("K", value("k_proj")?)?,
        proj("V", value("v_proj")?)?,
    );
    let streams = ["cq_proj", "ck_proj", "cv_proj"].map(|c| m.value(c).is_some());
    if streams.iter().any(|s| *s != streams[0]) {
        return Err("Q, K and V do not read the same streams".into());
    }
    let joint = streams[0];
    let context = if joint {
        Some(ContextProjections {
            q: proj("the second stream's Q", value("cq_proj")?)?,
            k: proj("the second stream's K", value("ck_proj")?)?,
            v: proj("the second stream's V", value("cv_proj")?)?,
            first: m.value(operands::CONTEXT_FIRST).is_some(),
        })
    } else {
        None
    };
    let (operands, k4) = operands(g, m, form)?;
    // [batch, heads, tokens, head_dim]: the operand itself where it was traced.
    let four = |role: &str| {
        m.value(&format!("{role}_any"))
            .or_else(|| m.value(&format!("{role}_heads")))
    };
    let q_heads = four("q")
        .and_then(|v| shapes.shape(v))
        .ok_or("head split shape unknown")?;
    let (heads, head_dim) = match q_heads {
        [_, h, _, d] => (
            h.known().ok_or("head count is not constant")?,
            d.known().ok_or("head dim is not constant")?,
        ),
        _ => return Err("head split is not 4-D".into()),
    };
    // The value heads must agree (same count; head dim may differ only for exotic models).
    if let Some([_, vh, _, _]) = four("v").and_then(|v| shapes.shape(v))
        && vh.known() != Some(heads)
    {
        return Err(format!("value heads {vh} differ from query heads {heads}"));
    }
    // Heads computed after the split, and the second stream's, must be split alike.
    let split_alike = |v: ValueId| match shapes.shape(v) {
        Some([_, h, _, d]) => h.known() == Some(heads) && d.known() == Some(head_dim),
        _ => false,
    };
    for (i, operand) in operands.iter().enumerate() {
        let parts = match *operand {
            Operand::Heads(x) => vec![x],
            _ => vec![],
        };
        let second = joint.then(|| m.value(JOINT[i].parts[1].2)).flatten();
        if let Some(bad) = parts.into_iter().chain(second).find(|v| !split_alike(*v)) {
            return Err(format!(
                "'{}' is not split into {heads} heads × {head_dim} like the query",
                g.value(bad).name
            ));
        }
    }
    // The projection's output width: from its shape, else from its weight (x @ Wᵀ: last dim).
    let weight_width = || {
        let w = g.node(q.matmul).inputs.get(1).copied().flatten()?;
        g.initializer(w).and_then(|t| t.dims().last().copied())
    };
    let hidden = shapes
        .shape(value("q_proj")?)
        .and_then(|s| s.last())
        .and_then(Dim::known)
        .or_else(weight_width);
    if hidden != heads.checked_mul(head_dim) {
        return Err(format!(
            "{heads} heads × {head_dim} do not make the hidden size {hidden:?}"
        ));
    }
    // Kᵀ must really end in [head_dim, key tokens].
    if let (Some(kt), Some(kh)) = (
        m.node("scores")
            .and_then(|s| g.node(s).inputs[1])
            .and_then(|v| shapes.shape(v)),
        k4.and_then(|v| shapes.shape(v)),
    ) {
        let n = kt.len();
        if n < 3 || kh.len() != 4 || kt[n - 2] != kh[3] || kt[n - 1] != kh[2] {
            return Err("key transpose does not end in [head_dim, key tokens]".into());
        }
    }
    if let Some(beta) = m.value("beta")
        && shapes.scalar(beta) != Some(0.0)
    {
        return Err("an additive bias/mask is applied to the scores".into());
    }
    let mask = match m.value("mask") {
        Some(mask) => Some((mask, mask_rank(g, shapes, m, form, mask, heads)?)),
        None => None,
    };
    let mut scale = 1.0;
    for (name, invert) in [
        ("q_mul", false),
        ("q_div", true),
        ("k_mul", false),
        ("k_div", true),
        ("s_mul", false),
        ("s_div", true),
    ] {
        if let Some(v) = m.value(name) {
            let s = shapes
                .scalar(v)
                .ok_or_else(|| format!("scale factor '{}' is not a constant", g.value(v).name))?;
            scale *= if invert { 1.0 / s } else { s };
        }
    }
    if !scale.is_finite() || scale <= 0.0 {
        return Err(format!("scale {scale} is not a positive number"));
    }
    let kind = if joint {
        Kind::Joint
    } else if k.input == q.input {
        Kind::SelfAttention
    } else {
        Kind::Cross
    };
    let softmax = m.node("softmax").expect("bound");
    // The attention module: the deepest module shared by the projections (…attn1).
    let path = crate::module_path::common_prefix(
        &crate::module_path::common_prefix(&g.node(q.matmul).module, &g.node(k.matmul).module),
        &g.node(v.matmul).module,
    );
    // Tokens: of the 4-D operand where the streams join or per-head work happens, else of
    // the projection.
    let tokens = |p: &Projection, i: usize| {
        let four = [
            m.value(JOINT[i].cat),
            m.value(["q_any", "k_any"][i]),
            k4.filter(|_| i == 1),
        ];
        match operands[i] {
            Operand::Tokens(_) => shapes.shape(p.output).and_then(|s| s.get(1).cloned()),
            _ => four
                .into_iter()
                .flatten()
                .find_map(|v| shapes.shape(v)?.get(2).cloned()),
        }
        .filter(|d| !d.is_unknown())
    };
    Ok(AttentionSite {
        path,
        kind,
        heads,
        head_dim,
        scale,
        query_tokens: tokens(&q, 0),
        key_tokens: tokens(&k, 1),
        form,
        block: None,
        softmax,
        probs: m
            .node("attn")
            .and_then(|n| g.node(n).inputs[0])
            .expect("the value product reads the probabilities"),
        probs_matmul: m.node("attn").expect("bound"),
        output: value("merged")?,
        mask,
        nodes: m.matched.clone(),
        q,
        k,
        v,
        context,
        operands,
    })
}

/// The rank of an additive mask on the scores, if the fused ops can take it as their
/// attention bias: at most 4-D, broadcastable to [batch, heads, query, key] along batch and
/// heads only (the kernels broadcast those, not the tokens).
fn mask_rank(
    g: &Graph,
    shapes: &Shapes,
    m: &Match,
    form: &str,
    mask: ValueId,
    heads: i64,
) -> Result<usize, String> {
    let name = &g.value(mask).name;
    if form == "classic" {
        return Err(format!(
            "the mask '{name}' is added to heads folded into the batch"
        ));
    }
    let shape = shapes
        .shape(mask)
        .ok_or_else(|| format!("the mask '{name}' has no known shape"))?;
    let scores = m
        .node("scores")
        .and_then(|s| g.node(s).outputs.first().copied().flatten())
        .and_then(|v| shapes.shape(v));
    let r = shape.len();
    if !(2..=4).contains(&r) {
        return Err(format!("the mask '{name}' is {r}-D, not [.., query, key]"));
    }
    if r >= 3
        && !matches!(shape[r - 3].known(), Some(1) | None)
        && shape[r - 3].known() != Some(heads)
    {
        return Err(format!(
            "the mask '{name}' has {} heads, the attention {heads}",
            shape[r - 3]
        ));
    }
    // The token axes: each as the scores' (a broadcast 1 only where the scores have 1).
    if let Some(sc) = scores.filter(|s| s.len() == 4) {
        for (i, d) in shape.iter().rev().take(2).enumerate() {
            if *d == Dim::Known(1) && sc[3 - i] != Dim::Known(1) {
                return Err(format!(
                    "the mask '{name}' broadcasts over the {} tokens",
                    ["key", "query"][i]
                ));
            }
        }
    }
    Ok(r)
}
