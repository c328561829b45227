//! ONNX Runtime's contrib ops (`com.microsoft`), as the passes emit them.
use super::*;

/// The ONNX Runtime contrib ops attune emits (shapes only).
pub(super) fn infer_contrib(
    op: &str,
    attrs: &[AttributeProto],
    input: &dyn Fn(usize) -> Facts,
    fresh: &mut dyn FnMut() -> Dim,
) -> Vec<Facts> {
    let x = input(0);
    let same = || {
        x.shape
            .clone()
            .map(|s| shaped(s, x.float))
            .unwrap_or_default()
    };
    match op {
        "GroupNorm" | "BiasAdd" | "BiasGelu" | "FastGelu" | "Gelu" | "QuickGelu" => vec![same()],
        "SkipGroupNorm" => vec![same(), same()],
        // Outputs: normalised, mean, inverse std-dev, input + skip + bias.
        "SkipLayerNormalization" => vec![same(), Facts::default(), Facts::default(), same()],
        "BiasSplitGelu" => {
            let shape = x.shape.as_ref().and_then(|s| {
                let (last, rest) = s.split_last()?;
                let half = last.div(&Dim::Known(2))?;
                Some(rest.iter().cloned().chain([half]).collect())
            });
            vec![shape.map(|s| shaped(s, x.float)).unwrap_or_default()]
        }
        // NHWC in, [N, H', W', M] out (OHWI weights).
        "NhwcConv" => {
            let (Some(xs), Some(ws)) = (&x.shape, &input(1).shape) else {
                return vec![Facts::default()];
            };
            if xs.len() != 4 || ws.len() != 4 {
                return vec![Facts::default()];
            }
            let ints = |k: &str| attr_ints(attrs, k).unwrap_or_default();
            let (strides, pads, dilations) = (ints("strides"), ints("pads"), ints("dilations"));
            let mut spatial = |i: usize| {
                let pad = (pads.get(i).copied().unwrap_or(0))
                    .saturating_add(pads.get(i + 2).copied().unwrap_or(0));
                let size = ws[1 + i].known().and_then(|k| {
                    let s = strides.get(i).copied().unwrap_or(1);
                    conv_size(
                        &xs[1 + i],
                        k,
                        s,
                        dilations.get(i).copied().unwrap_or(1),
                        Some(pad),
                    )
                });
                size.unwrap_or_else(&mut *fresh)
            };
            let shape = vec![xs[0].clone(), spatial(0), spatial(1), ws[0].clone()];
            vec![shaped(shape, x.float)]
        }
        // [B, S, Dv] from query [B, S, D] and value [B, L, Dv]; packed QKV [B, S, N, 3, H];
        // query [B, S, D] and packed KV [B, L, N, 2, H].
        "MultiHeadAttention" => {
            let (k, v) = (input(1), input(2));
            let heads = |p: &[Dim]| p[2].mul(&p[4]);
            let shape = match (&x.shape, &k.shape, &v.shape) {
                (Some(q), _, Some(v)) if q.len() == 3 && v.len() == 3 => {
                    Some(vec![q[0].clone(), q[1].clone(), v[2].clone()])
                }
                (Some(q), _, _) if q.len() == 5 => {
                    heads(q).map(|d| vec![q[0].clone(), q[1].clone(), d])
                }
                (Some(q), Some(kv), None) if q.len() == 3 && kv.len() == 5 => {
                    heads(kv).map(|d| vec![q[0].clone(), q[1].clone(), d])
                }
                _ => None,
            };
            vec![shape.map(|s| shaped(s, x.float)).unwrap_or_default()]
        }
        _ => vec![],
    }
}
