//! GroupNorm(+SiLU) → `com.microsoft.GroupNorm` / `SkipGroupNorm`, channels-last.
//!
//! Exporters write `nn.GroupNorm` as Reshape [N, G, -1] → InstanceNormalization (unit scale,
//! zero bias) → Reshape back → Mul γ → Add β, usually followed by SiLU (Sigmoid, Mul): six
//! kernels with the statistics in the activation type. ONNX Runtime's GroupNorm does it in
//! one (statistics in fp32, SiLU folded in), channels-last only, so the fused op sits between
//! Transposes. When the input is a sum (a residual, or the resnets' time embedding added per
//! channel) the Add folds in too: SkipGroupNorm, which also writes the sum when it is read.
use attune_compiler::analysis::{Dim, Shapes};
use attune_compiler::ir::{Graph, NodeId, ValueId};
use attune_compiler::onnx::DataType;
use attune_compiler::patch::{In, Patch, attr};
use attune_compiler::pattern::{Cx, Match, Pat, alt, any, anything, constant, op};
use attune_compiler::rule::Rule;

use super::{MS_DOMAIN, Site, channels_last};

/// One matched GroupNorm(+SiLU).
struct GroupNormSite {
    /// The (NCHW) input.
    x: ValueId,
    /// γ and β as the export has them ([C, 1, 1] or [1, C, 1, 1]); `None` where the export
    /// has none (a unit affine, canonicalised away): 1 and 0.
    gamma: Option<ValueId>,
    beta: Option<ValueId>,
    channels: i64,
    groups: i64,
    epsilon: f32,
    silu: bool,
    /// The value the fused op replaces (the Add, or the SiLU's Mul).
    out: ValueId,
    /// `x` is `x + skip` folded into the op (SkipGroupNorm): the skip, whether it broadcasts
    /// as [N, C, 1, 1], and the sum when anything else reads it.
    skip: Option<Skip>,
    /// The InstanceNormalization (its module names the site).
    norm: NodeId,
}

struct Skip {
    value: ValueId,
    /// For a [N, C, 1, 1] skip: the [N, C] value it unsqueezes, if there is one.
    per_channel: Option<Option<ValueId>>,
    sum: Option<ValueId>,
}

/// GroupNorm(+SiLU) → `com.microsoft.GroupNorm`, or `SkipGroupNorm` with the Add before it
/// (`with_skip`).
pub struct GroupNormRule {
    pub with_skip: bool,
}

impl Rule for GroupNormRule {
    fn name(&self) -> &'static str {
        "GroupNorm -> com.microsoft.GroupNorm (channels-last)"
    }

    fn anchor(&self) -> Option<&'static str> {
        Some("InstanceNormalization")
    }

    /// `[SiLU] ∘ [+β] ∘ [·γ] ∘ Reshape back ∘ InstanceNormalization ∘ Reshape [N, G, -1]` of
    /// `x` or of `x + skip`; γ and β per-channel constants.
    fn pattern(&self) -> Pat {
        let input = if self.with_skip {
            alt([
                op("Add", [any("x"), any("skip").check(skip_fits)])
                    .commutative()
                    .bind("sum"),
                any("x"),
            ])
        } else {
            any("x")
        };
        let norm = op(
            "InstanceNormalization",
            [
                op("Reshape", [input, anything()]).bind("grouped"),
                any("scale"),
                any("bias"),
            ],
        )
        .bind("norm");
        let back = op("Reshape", [norm, anything()]).bind("back");
        let scaled = alt([
            op("Mul", [back.clone(), constant("gamma").check(gamma_fits)]).commutative(),
            back,
        ]);
        let y = alt([
            op("Add", [scaled.clone(), constant("beta").check(beta_fits)]).commutative(),
            scaled,
        ])
        .bind("y");
        alt([
            op(
                "Mul",
                [y.clone(), op("Sigmoid", [any("y")]).bind("sigmoid")],
            )
            .commutative(),
            y,
        ])
    }

    fn shared(&self) -> &'static [&'static str] {
        &["sum"]
    }

    fn check(&self, cx: &Cx, m: &Match) -> Result<(), String> {
        shape_of(cx, m).map(|_| ())
    }

    fn rewrite(&self, cx: &Cx, m: &Match, p: &mut Patch) -> Vec<&'static str> {
        let site = site(cx, m).expect("checked");
        fuse_group_norm(p, cx.g, &site);
        let mut tags = vec![if site.skip.is_some() {
            "as SkipGroupNorm with the Add before"
        } else {
            "as GroupNorm"
        }];
        if site.silu {
            tags.push("with SiLU");
        }
        tags
    }

    fn unmatched(&self, _cx: &Cx, _anchor: NodeId) -> Option<String> {
        Some("not Reshape [N, G, -1] → InstanceNormalization → Reshape back (→ ·γ → +β → SiLU) with nothing else reading inside it".into())
    }

    fn opset(&self) -> Option<(&'static str, i64)> {
        Some((MS_DOMAIN, 1))
    }
}

/// The skip of `x + skip`: `x`'s shape, or [N, C, 1, 1] (the resnets' time embedding).
fn skip_fits(cx: &Cx, m: &Match) -> bool {
    let (Some(x), Some(skip)) = (m.value("x"), m.value("skip")) else {
        return false;
    };
    let (Some(xs), Some(s)) = (cx.shapes.shape(x), cx.shapes.shape(skip)) else {
        return false;
    };
    xs.len() == 4 && (s == xs || is_per_channel_of(s, xs))
}

fn is_per_channel_of(s: &[Dim], xs: &[Dim]) -> bool {
    s.len() == 4 && s[0] == xs[0] && s[1] == xs[1] && s[2..].iter().all(|d| d.known() == Some(1))
}

fn gamma_fits(cx: &Cx, m: &Match) -> bool {
    per_channel(cx, m, "gamma")
}

fn beta_fits(cx: &Cx, m: &Match) -> bool {
    per_channel(cx, m, "beta")
}

/// The parameter bound as `param`: [C, 1, 1] or [1, C, 1, 1] for `x`'s C channels.
fn per_channel(cx: &Cx, m: &Match, param: &str) -> bool {
    let c = m
        .value("x")
        .and_then(|x| cx.shapes.shape(x)?.get(1)?.known());
    let (Some(v), Some(c)) = (m.value(param), c) else {
        return false;
    };
    let Some(s) = cx.shapes.shape(v) else {
        return false;
    };
    let dims: Vec<Option<i64>> = s.iter().map(Dim::known).collect();
    matches!(dims.as_slice(), [Some(a), Some(1), Some(1)] | [Some(1), Some(a), Some(1), Some(1)] if *a == c)
}

/// The input's shape and the group count, or why the match is no GroupNorm the op computes.
fn shape_of<'a>(cx: &'a Cx, m: &Match) -> Result<(&'a [Dim], i64), String> {
    let shapes = cx.shapes;
    let bound = |name: &str| m.value(name).ok_or_else(|| format!("no {name}"));
    let (scale, bias) = (bound("scale")?, bound("bias")?);
    if shapes.scalar(scale) != Some(1.0) || shapes.scalar(bias) != Some(0.0) {
        return Err("its scale/bias are not the constant 1/0 a GroupNorm export has".into());
    }
    let groups = shapes
        .shape(scale)
        .and_then(|s| s.first()?.known())
        .ok_or("the group count is unknown")?;
    let x = m.value("sum").map_or_else(|| bound("x"), Ok)?;
    let x_shape = shapes.shape(x).ok_or("the input's shape is unknown")?;
    if x_shape.len() != 4 {
        return Err(format!(
            "the input has rank {}, not 4 (NCHW)",
            x_shape.len()
        ));
    }
    // Normalised per (sample, group): the Reshape must be [N, G, -1].
    let grouped_by_sample = shapes
        .shape(bound("grouped")?)
        .is_some_and(|s| s.len() == 3 && s[0] == x_shape[0]);
    if !grouped_by_sample {
        return Err("its Reshape is not [N, groups, -1]".into());
    }
    let c = x_shape[1].known().ok_or("the channel count is unknown")?;
    if groups <= 0 || c % groups != 0 {
        return Err(format!("{c} channels do not split into {groups} groups"));
    }
    if shapes.shape(bound("back")?) != Some(x_shape) {
        return Err("the second Reshape does not restore the input's shape".into());
    }
    Ok((x_shape, groups))
}

/// The [N, C] value a [N, C, 1, 1] `v` is made from by Unsqueezes (the time embedding).
fn unsqueezed_from(g: &Graph, shapes: &Shapes, v: ValueId) -> Option<ValueId> {
    let want = shapes.shape(v)?.get(..2)?;
    let mut at = v;
    while let Some(n) = g.producer(at).filter(|n| g.node(*n).is("Unsqueeze")) {
        at = g.input(n, 0)?;
        if shapes.shape(at) == Some(want) {
            return Some(at);
        }
    }
    None
}

/// The site a checked match describes.
fn site(cx: &Cx, m: &Match) -> Result<GroupNormSite, String> {
    let (g, shapes) = (cx.g, cx.shapes);
    let (x_shape, groups) = shape_of(cx, m)?;
    let norm = m.node("norm").ok_or("no norm")?;
    let skip = match (m.value("sum"), m.value("skip")) {
        (Some(sum), Some(skip)) => Some(Skip {
            value: skip,
            per_channel: (shapes.shape(skip) != Some(x_shape))
                .then(|| unsqueezed_from(g, shapes, skip)),
            // Written out too when anything but the GroupNorm reads the sum.
            sum: (g.is_graph_output(sum) || g.value(sum).consumers.len() > 1).then_some(sum),
        }),
        _ => None,
    };
    let silu = m.node("sigmoid").is_some();
    Ok(GroupNormSite {
        x: m.value("x").ok_or("no x")?,
        skip,
        gamma: m.value("gamma"),
        beta: m.value("beta"),
        channels: x_shape[1].known().ok_or("unknown channels")?,
        groups,
        epsilon: g.node(norm).attr("epsilon").map_or(1e-5, |a| a.f),
        silu,
        out: m.root.ok_or("no root")?,
        norm,
    })
}

/// Emits Transpose → GroupNorm → Transpose for `site`.
fn fuse_group_norm(p: &mut Patch, g: &Graph, site: &GroupNormSite) {
    let module = g.node(site.norm).module.clone();
    let after = Some(site.norm);
    let name = |tag: &str| format!("{module}/attune_{tag}");
    // γ/β: the kernel wants fp32 vectors.
    let mut vector = |v: Option<ValueId>, unit: f32, tag: &str| {
        // A constant γ/β (or the unit one the export left out): an fp32 [C] initializer.
        let mut vector_of = |values: Vec<f32>| {
            let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
            In::New(p.constant(&name(tag), DataType::Float, vec![site.channels], bytes))
        };
        let Some(v) = v else {
            return vector_of(vec![unit; site.channels as usize]);
        };
        let constant = g.initializer(v).filter(|_| g.is_constant(v)).and_then(|t| {
            let dtype = DataType::try_from(t.data_type()).ok()?;
            crate::lora::decode(&t.bytes().ok()?, dtype)
        });
        if let Some(values) = constant.filter(|x| x.len() == site.channels as usize) {
            return vector_of(values);
        }
        let flat = p.i64s(&name("flat"), &[-1]);
        let r = p.op(
            "Reshape",
            &name(tag),
            vec![In::Value(v), In::New(flat)],
            vec![],
            &module,
            after,
        );
        if g.value_elem_type(v)
            .is_some_and(|t| t != DataType::Float as i32)
            || g.initializer(v)
                .is_some_and(|t| t.data_type() != DataType::Float as i32)
        {
            In::New(p.op(
                "Cast",
                &name(&format!("{tag}_f32")),
                vec![In::New(r)],
                vec![attr::int("to", DataType::Float as i64)],
                &module,
                after,
            ))
        } else {
            In::New(r)
        }
    };
    let gamma = vector(site.gamma, 1.0, "gamma");
    let beta = vector(site.beta, 0.0, "beta");
    let mut rest = vec![gamma, beta];
    let op = if let Some(skip) = &site.skip {
        rest.push(if let Some(Some(nc)) = skip.per_channel {
            p.current(nc)
        } else if skip.per_channel.is_some() {
            // [N, C, 1, 1] → [N, C], a broadcast the kernel takes.
            let flat = p.i64s(&name("skip_nc"), &[0, -1]);
            In::New(p.op(
                "Reshape",
                &name("skip_nc"),
                vec![p.current(skip.value), In::New(flat)],
                vec![],
                &module,
                after,
            ))
        } else {
            In::New(p.op(
                "Transpose",
                &name("skip_to_nhwc"),
                vec![p.current(skip.value)],
                vec![attr::ints("perm", &[0, 2, 3, 1])],
                &module,
                after,
            ))
        });
        "SkipGroupNorm"
    } else {
        "GroupNorm"
    };
    let outputs = if site.skip.as_ref().is_some_and(|s| s.sum.is_some()) {
        2
    } else {
        1
    };
    let attrs = vec![
        attr::int("activation", i64::from(site.silu)),
        attr::int("channels_last", 1),
        attr::float("epsilon", site.epsilon),
        attr::int("groups", site.groups),
    ];
    let at = Site {
        module: &module,
        after,
    };
    let x = p.current(site.x);
    let nchw = channels_last(p, &at, op, x, rest, attrs, outputs);
    p.replace(site.out, In::New(nchw[0].clone()));
    if let Some(sum) = site.skip.as_ref().and_then(|s| s.sum) {
        p.replace(sum, In::New(nchw[1].clone()));
    }
}
