//! The exporter forms of scaled-dot-product attention, as patterns (data, one matcher):
//! each rooted at the merged-heads Reshape, binding the projections, head splits, scales
//! and softmax that `site` reads.
use crate::pattern::{Pat, alt, any, anything, op, through};

pub(super) const CAST: &[&str] = &["Cast"];

pub(super) fn heads(proj: &'static str, split: &'static str, bind: &'static str) -> Pat {
    op(
        "Transpose",
        [op("Reshape", [any(proj), anything()]).bind(split)],
    )
    .ints("perm", &[0, 2, 1, 3])
    .bind(bind)
}

/// `x` normalised per head (qk-norm: SD3.5): RMSNorm as torch writes it out
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
pub(super) struct JointNames {
    pub(super) parts: [(&'static str, &'static str, &'static str); 2],
    pub(super) cat: &'static str,
}

pub(super) const JOINT: [JointNames; 3] = [
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
pub(super) fn forms() -> Vec<(&'static str, Pat)> {
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
        // An additive mask on the scores (CLIP's causal mask, a padding mask): the fused op's
        // attention bias.
        let masked = op("Add", [logits.clone(), any("mask")]).commutative();
        // fp16 exports upcast around the softmax: Cast wrappers on either side of the bias add.
        let input = through(CAST, alt([baddbmm, masked, logits]));
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
