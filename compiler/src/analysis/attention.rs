//! Where is attention? Every scaled-dot-product attention of an exported diffusion graph as
//! one record (projections, heads, the scale actually applied, softmax, token counts), and
//! the transformer blocks around them. Every pass reads these records.
use std::collections::HashSet;

use serde::Serialize;

use super::dim::Dim;
use super::shapes::Shapes;
use crate::ir::{Graph, Model, NodeId, ValueId};
use crate::pattern::{Match, Pat, alt, any, anything, match_value, op, through};

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

const CAST: &[&str] = &["Cast"];

fn heads(proj: &'static str, split: &'static str, bind: &'static str) -> Pat {
    op(
        "Transpose",
        [op("Reshape", [any(proj), anything()]).bind(split)],
    )
    .ints("perm", &[0, 2, 1, 3])
    .bind(bind)
}

/// `x` normalised per head (qk-norm: SD3.5, Flux): RMSNorm as torch writes it out
/// (`x · 1/√(mean(x²) + ε)`, then `· γ`), or LayerNormalization. The norm stays as exported;
/// only its place is matched.
fn head_norm(x: Pat) -> Pat {
    let rsqrt = alt([
        op("Div", [anything(), op("Sqrt", [anything()])]),
        op("Reciprocal", [op("Sqrt", [anything()])]),
    ]);
    let rms = op("Mul", [through(CAST, x.clone()), rsqrt]).commutative();
    let rms = alt([
        op("Mul", [through(CAST, rms.clone()), anything()]).commutative(),
        rms,
    ]);
    through(CAST, alt([rms, op("LayerNormalization", [x])]))
}

/// A head split, normalised per head or not.
fn part(proj: &'static str, split: &'static str, bind: &'static str) -> Pat {
    let h = heads(proj, split, bind);
    alt([h.clone(), head_norm(h)])
}

/// Bind names of one role's joint operand: its two streams' parts and their Concat.
struct JointNames {
    parts: [(&'static str, &'static str, &'static str); 2],
    cat: &'static str,
}

const JOINT: [JointNames; 3] = [
    JointNames {
        parts: [
            ("q_proj", "q_split", "q_heads"),
            ("cq_proj", "cq_split", "cq_heads"),
        ],
        cat: "q_cat",
    },
    JointNames {
        parts: [
            ("k_proj", "k_split", "k_heads"),
            ("ck_proj", "ck_split", "ck_heads"),
        ],
        cat: "k_cat",
    },
    JointNames {
        parts: [
            ("v_proj", "v_split", "v_heads"),
            ("cv_proj", "cv_split", "cv_heads"),
        ],
        cat: "v_cat",
    },
];

/// Two streams' heads concatenated along the tokens (SD3's `torch.cat([.., ..], dim=2)`).
fn joint(n: &JointNames) -> Pat {
    let [(p0, s0, h0), (p1, s1, h1)] = n.parts;
    op("Concat", [part(p0, s0, h0), part(p1, s1, h1)])
        .int("axis", 2)
        .bind(n.cat)
}

/// `x`, `x * s` or `x / s`.
fn scaled(x: Pat, mul: &'static str, div: &'static str) -> Pat {
    alt([
        op("Mul", [x.clone(), any(mul)]).commutative(),
        op("Div", [x.clone(), any(div)]),
        x,
    ])
}

/// The exporter forms, as data: (name, pattern rooted at the merged-heads Reshape).
fn forms() -> Vec<(&'static str, Pat)> {
    let q_heads = heads("q_proj", "q_split", "q_heads");
    let k_heads = heads("k_proj", "k_split", "k_heads");
    let v_heads = heads("v_proj", "v_split", "v_heads");
    // Heads folded into the batch: [batch, heads, tokens, dim] -> [batch*heads, tokens, dim].
    let fold = |x: Pat| op("Reshape", [x, anything()]);
    let merge4 = |attn: Pat| {
        op(
            "Reshape",
            [
                op("Transpose", [attn]).ints("perm", &[0, 2, 1, 3]),
                anything(),
            ],
        )
        .bind("merged")
    };
    let softmax = |scores: Pat| {
        let logits = through(CAST, scaled(scores, "s_mul", "s_div"));
        // baddbmm(empty, q, kᵀ, beta=0, alpha=scale) adds `empty * 0`; beta is checked to be 0.
        let baddbmm = op(
            "Add",
            [
                logits.clone(),
                op("Mul", [anything(), any("beta")]).commutative(),
            ],
        )
        .commutative();
        // fp16 exports upcast around the softmax: Cast wrappers on either side of the bias add.
        let input = through(CAST, alt([baddbmm, logits]));
        alt([
            op("Softmax", [input.clone()])
                .int("axis", -1)
                .bind("softmax"),
            op("Softmax", [input.clone()])
                .int("axis", 3)
                .bind("softmax"),
            op("Softmax", [input]).int("axis", 2).bind("softmax"),
        ])
    };
    let sdpa_of = |q: Pat, k: Pat, v: Pat| {
        let scores = op(
            "MatMul",
            [scaled(q, "q_mul", "q_div"), scaled(k, "k_mul", "k_div")],
        )
        .bind("scores");
        merge4(op("MatMul", [through(CAST, softmax(scores)), v]).bind("attn"))
    };
    let sdpa = |k: Pat| sdpa_of(q_heads.clone(), k, v_heads.clone());
    let k_transposed = |k: Pat| op("Transpose", [k]).ints("perm", &[0, 1, 3, 2]);
    // Kᵀ laid out [batch, heads, head_dim, key tokens].
    let k_sdpa_legacy = op(
        "Transpose",
        [op("Reshape", [any("k_proj"), anything()]).bind("k_split")],
    )
    .ints("perm", &[0, 2, 3, 1]);
    // The dynamo exporter transposes K folded to 3-D: [b·h, t, d] -> [b·h, d, t], unfolded.
    let k_dynamo = |k: Pat| {
        op(
            "Reshape",
            [
                op("Transpose", [op("Reshape", [k, anything()])]).ints("perm", &[0, 2, 1]),
                anything(),
            ],
        )
    };
    let k_sdpa_dynamo = k_dynamo(k_heads.clone());
    let k_explicit = k_transposed(k_heads.clone());
    let k_either = |k: Pat| alt([k_transposed(k.clone()), k_dynamo(k)]);
    let classic = {
        let scores = op(
            "MatMul",
            [
                scaled(fold(q_heads.clone()), "q_mul", "q_div"),
                scaled(
                    op("Transpose", [fold(k_heads)]).ints("perm", &[0, 2, 1]),
                    "k_mul",
                    "k_div",
                ),
            ],
        )
        .bind("scores");
        let attn = op(
            "MatMul",
            [through(CAST, softmax(scores)), fold(v_heads.clone())],
        )
        .bind("attn");
        merge4(op("Reshape", [attn, anything()]))
    };
    let qk_norm = sdpa_of(
        head_norm(q_heads.clone()),
        k_either(part("k_proj", "k_split", "k_heads")),
        v_heads.clone(),
    );
    let joint = sdpa_of(
        joint(&JOINT[0]),
        k_either(joint(&JOINT[1])),
        joint(&JOINT[2]),
    );
    vec![
        ("sdpa-legacy", sdpa(k_sdpa_legacy)),
        ("sdpa-dynamo", sdpa(k_sdpa_dynamo)),
        ("explicit-transpose", sdpa(k_explicit)),
        ("classic", classic),
        ("qk-norm", qk_norm),
        ("joint", joint),
        // Any other per-head work between the split and the scores (Flux's rotary embedding
        // after its qk-norm, in one stream or two): the operands as they are, the projections
        // found by tracing back from them.
        (
            "traced",
            sdpa_of(any("q_any"), k_either(any("k_any")), any("v_any")),
        ),
    ]
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
    let value = |name: &str| m.value(name).expect("bound by every form");
    let proj = |role: &str, v: ValueId| {
        projection(g, v).ok_or_else(|| format!("{role} is not a linear projection"))
    };
    let (q, k, v) = (
        proj("Q", value("q_proj"))?,
        proj("K", value("k_proj"))?,
        proj("V", value("v_proj"))?,
    );
    let joint = m.value("cq_proj").is_some();
    let context = if joint {
        Some(ContextProjections {
            q: proj("the second stream's Q", value("cq_proj"))?,
            k: proj("the second stream's K", value("ck_proj"))?,
            v: proj("the second stream's V", value("cv_proj"))?,
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
        .shape(value("q_proj"))
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
        output: value("merged"),
        nodes: m.matched.clone(),
        q,
        k,
        v,
        context,
        operands,
    })
}

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
fn bind_traced(g: &Graph, m: &mut Match) {
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
fn operands(g: &Graph, m: &Match, form: &str) -> Result<([Operand; 3], Option<ValueId>), String> {
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

/// Groups sites into transformer blocks by module path (`….transformer_blocks.0.attn1`).
/// Transformer blocks: every module with a `norm1` normalisation, an `attn1` and residual
/// adds (found from the graph itself, so blocks whose attention was already rewritten are
/// found too), with the sites of their `attn1`/`attn2` attached.
fn blocks(g: &Graph, shapes: &Shapes, sites: &mut [AttentionSite]) -> Vec<TransformerBlock> {
    let order = g.topo_order().unwrap_or_else(|_| g.node_ids().collect());
    let mut paths: Vec<String> = Vec::new();
    for &n in &order {
        let node = g.node(n);
        let is_norm = matches!(
            node.op(),
            "LayerNormalization" | "GroupNormalization" | "InstanceNormalization"
        );
        if let Some(parent) = node.module.strip_suffix(".norm1").filter(|_| is_norm)
            && !paths.iter().any(|p| p == parent)
        {
            paths.push(parent.to_string());
        }
    }
    let has_attn1 = |p: &str| {
        let prefix = format!("{p}.attn1");
        order.iter().any(|n| {
            g.node(*n).module == prefix || g.node(*n).module.starts_with(&format!("{prefix}."))
        })
    };
    paths.retain(|p| has_attn1(p));
    let mut out: Vec<TransformerBlock> = paths
        .iter()
        .map(|p| block(g, shapes, p))
        .filter(|b| !b.residual_adds.is_empty())
        .collect();
    for (i, site) in sites.iter_mut().enumerate() {
        let Some((parent, leaf)) = site.path.rsplit_once('.') else {
            continue;
        };
        let Some(b) = out.iter_mut().find(|b| b.path == parent) else {
            continue;
        };
        match leaf {
            "attn1" => b.attn1 = Some(i),
            "attn2" => b.attn2 = Some(i),
            _ => continue,
        }
        site.block = Some(parent.to_string());
    }
    out
}

fn block(g: &Graph, shapes: &Shapes, path: &str) -> TransformerBlock {
    let order = g.topo_order().unwrap_or_default();
    let mut norms = Vec::new();
    let mut residual_adds = Vec::new();
    for &n in &order {
        let node = g.node(n);
        if let Some(leaf) = node
            .module
            .strip_prefix(path)
            .and_then(|r| r.strip_prefix('.'))
        {
            if leaf.starts_with("norm")
                && matches!(
                    node.op(),
                    "LayerNormalization" | "GroupNormalization" | "InstanceNormalization"
                )
            {
                norms.push((leaf.to_string(), n));
            }
        } else if node.module == path && node.is("Add") && is_residual(g, n) {
            residual_adds.push(n);
        }
    }
    let input = norms
        .iter()
        .find(|(l, _)| l == "norm1")
        .and_then(|(_, n)| g.node(*n).inputs.first().copied().flatten());
    let tokens = input
        .and_then(|v| shapes.shape(v))
        .and_then(|s| s.get(1).cloned());
    TransformerBlock {
        path: path.to_string(),
        attn1: None,
        attn2: None,
        input,
        norms,
        residual_adds,
        tokens,
    }
}

/// An Add whose operands have the same shape (stream + sublayer), not a bias add.
fn is_residual(g: &Graph, add: NodeId) -> bool {
    g.node(add)
        .inputs
        .iter()
        .flatten()
        .all(|v| g.initializer(*v).is_none())
}
