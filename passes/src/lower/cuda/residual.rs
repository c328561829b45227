//! The transformer blocks' residual adds, fused into what reads them.
//!
//! Each sublayer ends in `x + (y·W + b)`: a bias Add and a residual Add, two passes over the
//! activations, and after attention the sum is normalised next. ONNX Runtime fuses these:
//! - `LayerNorm(x + (y·W + b))` → `com.microsoft.SkipLayerNormalization(y·W, x, γ, β, b)`,
//!   which also writes the sum (output 3) for the next residual;
//! - the feed-forward's `x + (y·W + b)` → `com.microsoft.BiasAdd(y·W, b, x)` (CUDA kernel for
//!   320, 640 or 1280 channels only, the SD widths).
use attune_compiler::patch::{In, Patch, attr};
use attune_compiler::pattern::{Cx, Match, Pat, alt, any, constant, op};
use attune_compiler::rule::Rule;

use super::MS_DOMAIN;

/// The channel counts ORT's CUDA BiasAdd kernel takes.
pub const BIAS_ADD_WIDTHS: &[i64] = &[320, 640, 1280];

/// `proj + bias` (read only by the sum), `bias` a constant vector over `proj`'s last axis.
fn biased() -> Pat {
    op("Add", [any("proj"), constant("bias").check(bias_fits)])
        .commutative()
        .sole()
}

fn bias_fits(cx: &Cx, m: &Match) -> bool {
    let (Some(proj), Some(bias)) = (m.value("proj"), m.value("bias")) else {
        return false;
    };
    let width = cx.shapes.shape(proj).and_then(|s| s.last()?.known());
    cx.shapes
        .shape(bias)
        .is_some_and(|b| b.len() == 1 && b[0].known() == width && width.is_some())
}

/// Both sides of the bound `sum` have its shape (nothing broadcasts).
fn same_shapes(cx: &Cx, m: &Match) -> Result<usize, String> {
    let shape = |name: &str| m.value(name).and_then(|v| cx.shapes.shape(v));
    let sum = shape("sum").ok_or("the sum's shape is unknown")?;
    if shape("proj") != Some(sum) || shape("skip") != Some(sum) {
        return Err("the sum broadcasts".into());
    }
    Ok(sum.len())
}

/// `LayerNormalization(a + b)` over the last axis → `SkipLayerNormalization(a, b, γ, β)`,
/// with the bias of `a = p + bias` folded in; β optional (the dynamo exporter omits it for
/// affine-less norms: SD3's adaLN); the sum is written too when anything else reads it.
pub struct SkipLayerNormRule;

impl Rule for SkipLayerNormRule {
    fn name(&self) -> &'static str {
        "residual Add + LayerNormalization -> com.microsoft.SkipLayerNormalization"
    }

    fn anchor(&self) -> Option<&'static str> {
        Some("LayerNormalization")
    }

    fn pattern(&self) -> Pat {
        let sum = alt([
            op("Add", [biased(), any("skip")]).commutative(),
            op("Add", [any("proj"), any("skip")]),
        ])
        .bind("sum");
        op("LayerNormalization", [sum, any("gamma")]).bind("ln")
    }

    fn shared(&self) -> &'static [&'static str] {
        &["sum"]
    }

    fn check(&self, cx: &Cx, m: &Match) -> Result<(), String> {
        let rank = same_shapes(cx, m)?;
        let ln = cx.g.node(m.node("ln").ok_or("no norm")?);
        let axis = ln.attr("axis").map_or(-1, |a| a.i);
        if axis != -1 && axis != rank as i64 - 1 {
            return Err("normalises more than the last axis".into());
        }
        if rank != 3 {
            return Err(format!("its input has rank {rank}, not 3"));
        }
        Ok(())
    }

    fn rewrite(&self, cx: &Cx, m: &Match, p: &mut Patch) -> Vec<&'static str> {
        let g = cx.g;
        let ln = m.node("ln").expect("bound");
        let sum = m.value("sum").expect("bound");
        let node = g.node(ln);
        let wants_sum = g.is_graph_output(sum) || g.value(sum).consumers.len() > 1;
        let module = node.module.clone();
        let bound = |name: &str| p.current(m.value(name).expect("bound"));
        let mut inputs = vec![bound("proj"), bound("skip"), bound("gamma")];
        inputs.push(g.input(ln, 2).map_or(In::None, In::Value));
        inputs.extend(m.value("bias").map(In::Value));
        let outs = p.node(
            "SkipLayerNormalization",
            MS_DOMAIN,
            &format!("{module}/attune_SkipLayerNormalization"),
            inputs,
            if wants_sum { 4 } else { 1 },
            vec![attr::float(
                "epsilon",
                node.attr("epsilon").map_or(1e-5, |a| a.f),
            )],
            &module,
            Some(ln),
        );
        p.replace(m.root.expect("matched"), In::New(outs[0].clone()));
        if wants_sum {
            p.replace(sum, In::New(outs[3].clone()));
        }
        if m.value("bias").is_some() {
            vec!["with the projection's bias"]
        } else {
            vec![]
        }
    }

    fn opset(&self) -> Option<(&'static str, i64)> {
        Some((MS_DOMAIN, 1))
    }
}

/// A residual `x + (y·W + b)` not normalised next → `BiasAdd(y·W, b, x)`, for the widths
/// its kernel takes.
pub struct BiasAddRule;

impl Rule for BiasAddRule {
    fn name(&self) -> &'static str {
        "bias + residual Add -> com.microsoft.BiasAdd"
    }

    fn pattern(&self) -> Pat {
        op("Add", [biased(), any("skip")]).commutative().bind("sum")
    }

    fn check(&self, cx: &Cx, m: &Match) -> Result<(), String> {
        let rank = same_shapes(cx, m)?;
        let width = cx
            .shapes
            .shape(m.value("sum").ok_or("no sum")?)
            .and_then(|s| s.last()?.known());
        if rank != 3 || !width.is_some_and(|w| BIAS_ADD_WIDTHS.contains(&w)) {
            return Err("not a [B, S, 320|640|1280] residual".into());
        }
        Ok(())
    }

    fn rewrite(&self, cx: &Cx, m: &Match, p: &mut Patch) -> Vec<&'static str> {
        let add = m.node("sum").expect("bound");
        let module = cx.g.node(add).module.clone();
        let bound = |name: &str| p.current(m.value(name).expect("bound"));
        let inputs = vec![bound("proj"), bound("bias"), bound("skip")];
        let out = p
            .node(
                "BiasAdd",
                MS_DOMAIN,
                &format!("{module}/attune_BiasAdd"),
                inputs,
                1,
                vec![],
                &module,
                Some(add),
            )
            .remove(0);
        p.replace(m.value("sum").expect("bound"), In::New(out));
        vec![]
    }

    fn opset(&self) -> Option<(&'static str, i64)> {
        Some((MS_DOMAIN, 1))
    }
}
