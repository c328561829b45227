//! The standard ops: each op's output shapes (and small values) from its inputs' facts.
use super::*;

pub(super) fn infer_op(
    op: &str,
    attrs: &[AttributeProto],
    n_inputs: usize,
    input: &dyn Fn(usize) -> Facts,
    fresh: &mut dyn FnMut() -> Dim,
) -> Vec<Facts> {
    let x = input(0);
    let one = |f: Option<Facts>| vec![f.unwrap_or_default()];
    match op {
        "Identity"
        | "Dropout"
        | "Sigmoid"
        | "Relu"
        | "Erf"
        | "Tanh"
        | "Exp"
        | "Log"
        | "Abs"
        | "Softmax"
        | "LogSoftmax"
        | "LayerNormalization"
        | "InstanceNormalization"
        | "GroupNormalization"
        | "Gelu"
        | "Sin"
        | "Cos"
        | "Floor"
        | "Ceil"
        | "Softplus"
        | "HardSigmoid"
        | "Clip"
        | "Not"
        | "CumSum"
        | "Neg"
        | "Sqrt"
        | "Reciprocal" => {
            let value = x.value.as_ref().and_then(|v| {
                v.iter()
                    .map(|n| match op {
                        "Identity" | "Dropout" => Some(n.clone()),
                        "Neg" => Some(match n {
                            Num::I(d) => Num::I(d.neg()?),
                            Num::F(f) => Num::F(-f),
                        }),
                        "Sqrt" => Some(Num::F(n.as_f64()?.sqrt())),
                        "Reciprocal" => Some(Num::F(1.0 / n.as_f64()?)),
                        "Floor" => Some(Num::F(n.as_f64()?.floor())),
                        "Ceil" => Some(Num::F(n.as_f64()?.ceil())),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
            });
            one(x.shape.clone().map(|s| Facts {
                shape: Some(s),
                value,
                float: x.float,
            }))
        }
        "Cast" => {
            let to = attr_i(attrs, "to").unwrap_or(0) as i32;
            let float = onnx::is_float(to);
            let value = x.value.as_ref().and_then(|v| {
                v.iter()
                    .map(|n| match (float, n) {
                        (true, n) => n.as_f64().map(Num::F),
                        (false, Num::I(d)) => Some(Num::I(d.clone())),
                        (false, Num::F(f)) => Some(Num::I(Dim::Known(f.trunc() as i64))),
                    })
                    .collect::<Option<Vec<_>>>()
            });
            one(x.shape.clone().map(|s| Facts {
                shape: Some(s),
                value,
                float,
            }))
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Equal" | "Less" | "Greater" | "And" | "Or"
        | "Max" | "Min" | "Mod" => {
            let y = input(1);
            let (Some(sa), Some(sb)) = (&x.shape, &y.shape) else {
                return one(None);
            };
            let Some(shape) = broadcast(sa, sb) else {
                return one(None);
            };
            let float = x.float || y.float;
            let float = float && !matches!(op, "Equal" | "Less" | "Greater" | "And" | "Or");
            let value = match (&x.value, &y.value, count(&shape)) {
                (Some(a), Some(b), Some(n))
                    if n <= MAX_VALUE_LEN
                        && (a.len() == n || a.len() == 1)
                        && (b.len() == n || b.len() == 1) =>
                {
                    (0..n)
                        .map(|i| binary_value(op, &a[i.min(a.len() - 1)], &b[i.min(b.len() - 1)]))
                        .collect::<Option<Vec<_>>>()
                }
                _ => None,
            };
            one(Some(Facts {
                shape: Some(shape),
                value,
                float,
            }))
        }
        "Where" => {
            let (c, a, b) = (x, input(1), input(2));
            let shape = c
                .shape
                .as_ref()
                .zip(a.shape.as_ref())
                .and_then(|(c, a)| broadcast(c, a))
                .zip(b.shape.as_ref())
                .and_then(|(s, b)| broadcast(&s, b));
            let value = match (&shape, &c.value, &a.value, &b.value) {
                (Some(sh), Some(cv), Some(av), Some(bv)) => {
                    count(sh).filter(|n| *n <= MAX_VALUE_LEN).and_then(|n| {
                        let pick = |v: &Vec<Num>, i: usize| {
                            v.get(if v.len() == 1 { 0 } else { i }).cloned()
                        };
                        (0..n)
                            .map(|i| {
                                if pick(cv, i)?.as_i64()? != 0 {
                                    pick(av, i)
                                } else {
                                    pick(bv, i)
                                }
                            })
                            .collect::<Option<Vec<_>>>()
                    })
                }
                _ => None,
            };
            one(shape.map(|s| Facts {
                shape: Some(s),
                value,
                float: a.float,
            }))
        }
        // Opset 23's Attention: [B, Sq, Hq·Dv] from 3-D Q/K/V (heads in the attributes),
        // [B, Hq, Sq, Dv] from 4-D ones.
        "Attention" => {
            let v = input(2);
            let shape = match (&x.shape, &v.shape) {
                (Some(q), Some(v)) if q.len() == 4 && v.len() == 4 => {
                    Some(vec![q[0].clone(), q[1].clone(), q[2].clone(), v[3].clone()])
                }
                (Some(q), Some(v)) if q.len() == 3 && v.len() == 3 => {
                    let heads = |name| attr_i(attrs, name).map(Dim::Known);
                    let width = match (heads("q_num_heads"), heads("kv_num_heads")) {
                        (Some(hq), Some(hkv)) if hq != hkv => {
                            v[2].div(&hkv).and_then(|d| d.mul(&hq))
                        }
                        _ => Some(v[2].clone()),
                    };
                    width.map(|w| vec![q[0].clone(), q[1].clone(), w])
                }
                _ => None,
            };
            vec![shape.map(|s| shaped(s, x.float)).unwrap_or_default()]
        }
        "MatMul" => {
            let y = input(1);
            let (Some(a), Some(b)) = (&x.shape, &y.shape) else {
                return one(None);
            };
            if a.len() < 2 || b.len() < 2 {
                return one(None);
            }
            let batch = broadcast(&a[..a.len() - 2], &b[..b.len() - 2]);
            one(batch.map(|mut s| {
                s.push(a[a.len() - 2].clone());
                s.push(b[b.len() - 1].clone());
                shaped(s, true)
            }))
        }
        "Gemm" => {
            let y = input(1);
            let (Some(a), Some(b)) = (&x.shape, &y.shape) else {
                return one(None);
            };
            if a.len() != 2 || b.len() != 2 {
                return one(None);
            }
            let m = if attr_i(attrs, "transA") == Some(1) {
                &a[1]
            } else {
                &a[0]
            };
            let n = if attr_i(attrs, "transB") == Some(1) {
                &b[0]
            } else {
                &b[1]
            };
            one(Some(shaped(vec![m.clone(), n.clone()], true)))
        }
        "Conv" => {
            let w = input(1);
            let (Some(xs), Some(ws)) = (&x.shape, &w.shape) else {
                return one(None);
            };
            let spatial = xs.len().saturating_sub(2);
            if spatial == 0 || ws.len() != xs.len() {
                return one(None);
            }
            let strides = attr_ints(attrs, "strides").unwrap_or_else(|| vec![1; spatial]);
            let dil = attr_ints(attrs, "dilations").unwrap_or_else(|| vec![1; spatial]);
            let pads = attr_ints(attrs, "pads").unwrap_or_else(|| vec![0; 2 * spatial]);
            let same = attr(attrs, "auto_pad").is_some_and(|a| a.s.starts_with(b"SAME"));
            let mut out = vec![xs[0].clone(), ws[0].clone()];
            for i in 0..spatial {
                let (Some(k), Some(s)) = (ws[i + 2].known(), strides.get(i).copied()) else {
                    return one(None);
                };
                let d = dil.get(i).copied().unwrap_or(1);
                let pad = (pads.get(i).copied().unwrap_or(0))
                    .saturating_add(pads.get(i + spatial).copied().unwrap_or(0));
                match conv_size(&xs[i + 2], k, s, d, (!same).then_some(pad)) {
                    Some(o) => out.push(o),
                    None => return one(None),
                }
            }
            one(Some(shaped(out, true)))
        }
        "Reshape" => {
            let t = input(1);
            let (Some(xs), Some(target)) = (&x.shape, &t.value) else {
                // Input shape unknown: the target's positive constants still hold.
                if let Some(target) = &t.value {
                    let dims = target
                        .iter()
                        .map(|n| {
                            n.dim()
                                .filter(|d| d.known().is_none_or(|v| v > 0))
                                .unwrap_or_else(&mut *fresh)
                        })
                        .collect();
                    return one(Some(shaped(dims, x.float)));
                }
                // A target of unknown values but known length: that many unknown sizes (no
                // tensor has more than MAX_VALUE_LEN dims; a corrupt model may claim 2^40).
                let rank = t
                    .shape
                    .as_ref()
                    .and_then(|s| s.first())
                    .and_then(Dim::known)
                    .filter(|r| (0..=MAX_VALUE_LEN as i64).contains(r));
                return one(rank.map(|r| shaped((0..r).map(|_| fresh()).collect(), x.float)));
            };
            let allowzero = attr_i(attrs, "allowzero") == Some(1);
            let mut out: Vec<Option<Dim>> = Vec::new();
            for (i, n) in target.iter().enumerate() {
                out.push(match n.dim() {
                    Some(Dim::Known(0)) if !allowzero => xs.get(i).cloned(),
                    Some(Dim::Known(-1)) => None,
                    Some(d) => Some(d),
                    None => Some(fresh()),
                });
            }
            if out.iter().filter(|d| d.is_none()).count() > 1 {
                return one(Some(shaped(
                    out.into_iter()
                        .map(|d| d.unwrap_or_else(&mut *fresh))
                        .collect(),
                    x.float,
                )));
            }
            if let Some(hole) = out.iter().position(Option::is_none) {
                let known: Vec<Dim> = out.iter().flatten().cloned().collect();
                let fill = product(xs)
                    .zip(product(&known))
                    .and_then(|(t, r)| t.div(&r));
                out[hole] = Some(fill.unwrap_or_else(&mut *fresh));
            }
            let shape: Vec<Dim> = out.into_iter().flatten().collect();
            let value = x.value.clone().filter(|_| count(&shape).is_some());
            one(Some(Facts {
                shape: Some(shape),
                value,
                float: x.float,
            }))
        }
        "Flatten" => {
            let Some(xs) = &x.shape else { return one(None) };
            let a = axis(attr_i(attrs, "axis").unwrap_or(1), xs.len() + 1).unwrap_or(1);
            let (l, r) = (product(&xs[..a]), product(&xs[a..]));
            one(l.zip(r).map(|(l, r)| shaped(vec![l, r], x.float)))
        }
        "Transpose" => {
            let Some(xs) = &x.shape else { return one(None) };
            let perm =
                attr_ints(attrs, "perm").unwrap_or_else(|| (0..xs.len() as i64).rev().collect());
            let shape: Option<Vec<Dim>> =
                perm.iter().map(|p| xs.get(*p as usize).cloned()).collect();
            let value = x.value.as_ref().and_then(|v| transpose_value(v, xs, &perm));
            one(shape.map(|s| Facts {
                shape: Some(s),
                value,
                float: x.float,
            }))
        }
        "Shape" => {
            let Some(xs) = &x.shape else { return one(None) };
            let r = xs.len() as i64;
            let clamp = |v: i64| if v < 0 { (v + r).max(0) } else { v.min(r) } as usize;
            let start = clamp(attr_i(attrs, "start").unwrap_or(0));
            let end = clamp(attr(attrs, "end").map(|a| a.i).unwrap_or(r));
            let dims: Vec<Num> = xs[start..end.max(start)]
                .iter()
                .cloned()
                .map(Num::I)
                .collect();
            one(Some(with_value(
                vec![Dim::Known(dims.len() as i64)],
                dims,
                false,
            )))
        }
        "Size" => one(x
            .shape
            .as_ref()
            .and_then(|s| product(s))
            .map(|p| with_value(vec![], vec![Num::I(p)], false))),
        "Gather" => {
            let idx = input(1);
            let (Some(xs), Some(is)) = (&x.shape, &idx.shape) else {
                return one(None);
            };
            let Some(a) = axis(attr_i(attrs, "axis").unwrap_or(0), xs.len()) else {
                return one(None);
            };
            let shape: Vec<Dim> = xs[..a]
                .iter()
                .chain(is.iter())
                .chain(xs[a + 1..].iter())
                .cloned()
                .collect();
            let value = match (&x.value, known_ints(&idx)) {
                (Some(v), Some(ix)) if xs.len() == 1 => ix
                    .iter()
                    .map(|i| {
                        v.get(if *i < 0 {
                            (*i + v.len() as i64) as usize
                        } else {
                            *i as usize
                        })
                        .cloned()
                    })
                    .collect::<Option<Vec<_>>>(),
                _ => None,
            };
            one(Some(Facts {
                shape: Some(shape),
                value,
                float: x.float,
            }))
        }
        "Unsqueeze" | "Squeeze" => {
            let Some(xs) = &x.shape else { return one(None) };
            let axes = if n_inputs > 1 {
                known_ints(&input(1))
            } else {
                attr_ints(attrs, "axes")
            };
            let shape = if op == "Unsqueeze" {
                let Some(axes) = axes else { return one(None) };
                let rank = xs.len() + axes.len();
                let mut axes: Vec<usize> = match axes
                    .iter()
                    .map(|a| axis(*a, rank))
                    .collect::<Option<Vec<_>>>()
                {
                    Some(a) => a,
                    None => return one(None),
                };
                axes.sort();
                let mut out = xs.clone();
                for a in axes {
                    out.insert(a.min(out.len()), Dim::Known(1));
                }
                out
            } else {
                match axes {
                    Some(axes) => {
                        let axes: Vec<usize> =
                            axes.iter().filter_map(|a| axis(*a, xs.len())).collect();
                        xs.iter()
                            .enumerate()
                            .filter(|(i, _)| !axes.contains(i))
                            .map(|(_, d)| d.clone())
                            .collect()
                    }
                    None => xs
                        .iter()
                        .filter(|d| **d != Dim::Known(1))
                        .cloned()
                        .collect(),
                }
            };
            one(Some(Facts {
                shape: Some(shape),
                value: x.value.clone(),
                float: x.float,
            }))
        }
        "Concat" => {
            let parts: Vec<Facts> = (0..n_inputs).map(input).collect();
            let Some(shapes) = parts
                .iter()
                .map(|p| p.shape.clone())
                .collect::<Option<Vec<_>>>()
            else {
                return one(None);
            };
            let Some(first) = shapes.first() else {
                return one(None);
            };
            let Some(a) = axis(attr_i(attrs, "axis").unwrap_or(0), first.len()) else {
                return one(None);
            };
            let total = shapes
                .iter()
                .try_fold(Dim::Known(0), |acc, s| acc.add(s.get(a)?));
            let mut shape = first.clone();
            // 1-D (shape) concatenations: a part of known length but unknown value gives unknown sizes.
            let value = if first.len() == 1 {
                parts
                    .iter()
                    .map(|p| {
                        match (
                            &p.value,
                            p.shape
                                .as_ref()
                                .and_then(|s| s.first())
                                .and_then(Dim::known),
                        ) {
                            (Some(v), _) => Some(v.clone()),
                            (None, Some(k)) if !p.float && k <= MAX_VALUE_LEN as i64 => {
                                Some((0..k).map(|_| Num::I(fresh())).collect())
                            }
                            _ => None,
                        }
                    })
                    .collect::<Option<Vec<_>>>()
                    .map(|v| v.concat())
            } else {
                None
            };
            // A sum of different symbols is a size of its own.
            match total.or_else(|| Some(fresh())) {
                Some(t) => {
                    shape[a] = t;
                    one(Some(Facts {
                        shape: Some(shape),
                        value,
                        float: parts[0].float,
                    }))
                }
                None => one(None),
            }
        }
        "Slice" => {
            let Some(xs) = &x.shape else { return one(None) };
            let (Some(starts), Some(ends)) = (known_ints(&input(1)), known_ints(&input(2))) else {
                return one(None);
            };
            let axes = if n_inputs > 3 {
                known_ints(&input(3))
            } else {
                Some((0..starts.len() as i64).collect())
            };
            let steps = if n_inputs > 4 {
                known_ints(&input(4))
            } else {
                Some(vec![1; starts.len()])
            };
            let (Some(axes), Some(steps)) = (axes, steps) else {
                return one(None);
            };
            let mut shape = xs.clone();
            // The indices taken along each axis, where its length is known (for the value).
            let mut taken: Vec<Option<Vec<usize>>> = vec![None; xs.len()];
            for (((s, e), a), st) in starts.iter().zip(&ends).zip(&axes).zip(&steps) {
                let Some(a) = axis(*a, xs.len()) else {
                    return one(None);
                };
                match xs[a].known() {
                    Some(len) => {
                        let Some(idx) = slice_indices(len, *s, *e, *st) else {
                            return one(None);
                        };
                        shape[a] = Dim::Known(idx.len() as i64);
                        taken[a] = Some(idx);
                    }
                    _ if *st != 1 => return one(None),
                    // Symbolic length: only the whole axis, or a prefix of known length.
                    None if *s == 0 && *e >= i64::MAX / 2 => {}
                    None if *s >= 0 && *e >= *s && *e < i64::MAX / 2 => {
                        shape[a] = Dim::Known(e - s)
                    }
                    None => return one(None),
                }
            }
            let value = x.value.as_ref().and_then(|v| {
                let dims: Vec<usize> = xs
                    .iter()
                    .map(|d| usize::try_from(d.known()?).ok())
                    .collect::<Option<_>>()?;
                let idx: Vec<Vec<usize>> = taken
                    .into_iter()
                    .zip(&dims)
                    .map(|(t, n)| t.unwrap_or_else(|| (0..*n).collect()))
                    .collect();
                gather_value(v, &dims, &idx)
            });
            one(Some(Facts {
                shape: Some(shape),
                value,
                float: x.float,
            }))
        }
        "Split" => {
            let Some(xs) = &x.shape else { return vec![] };
            let Some(a) = axis(attr_i(attrs, "axis").unwrap_or(0), xs.len()) else {
                return vec![];
            };
            let sizes = if n_inputs > 1 {
                known_ints(&input(1))
            } else {
                attr_ints(attrs, "split")
            };
            let sizes: Vec<Dim> = match sizes {
                Some(s) => s.into_iter().map(Dim::Known).collect(),
                None => {
                    // Outputs are listed in the node, so a valid count is small.
                    let Some(n) =
                        attr_i(attrs, "num_outputs").filter(|n| (1..=MAX_SPLIT).contains(n))
                    else {
                        return vec![];
                    };
                    match xs[a].div(&Dim::Known(n)) {
                        Some(d) => vec![d; n as usize],
                        None => return vec![],
                    }
                }
            };
            sizes
                .into_iter()
                .map(|d| {
                    let mut s = xs.clone();
                    s[a] = d;
                    shaped(s, x.float)
                })
                .collect()
        }
        "Pad" => {
            let Some(xs) = &x.shape else { return one(None) };
            // Opset 11+: pads (and, from 18, axes) are inputs; before, the `pads` attribute.
            let pads = if n_inputs > 1 {
                known_ints(&input(1))
            } else {
                attr_ints(attrs, "pads")
            };
            let axes: Option<Vec<usize>> = if n_inputs > 3 {
                known_ints(&input(3)).and_then(|a| a.iter().map(|a| axis(*a, xs.len())).collect())
            } else {
                Some((0..xs.len()).collect())
            };
            let (Some(pads), Some(axes)) = (pads, axes) else {
                return one(Some(shaped(xs.iter().map(|_| fresh()).collect(), x.float)));
            };
            if pads.len() != 2 * axes.len() {
                return one(None);
            }
            let mut shape = xs.clone();
            for (i, a) in axes.iter().enumerate() {
                let total = pads[i].saturating_add(pads[i + axes.len()]);
                // A symbolic size padded is a size of its own (H + 1 is no monomial); a
                // strided Conv after it gets its size from the Pad's input (`padded_conv`).
                shape[*a] = match total {
                    0 => xs[*a].clone(),
                    t => xs[*a].add(&Dim::Known(t)).unwrap_or_else(&mut *fresh),
                };
            }
            one(Some(shaped(shape, x.float)))
        }
        "Expand" => {
            let t = input(1);
            let Some(target) = &t.value else {
                return one(None);
            };
            let target: Vec<Dim> = target
                .iter()
                .map(|n| n.dim().unwrap_or_else(&mut *fresh))
                .collect();
            match &x.shape {
                // The target first: of two symbols, the one Expand was asked for.
                Some(xs) => one(broadcast(&target, xs).map(|s| shaped(s, x.float))),
                // An input of unknown shape expanded to a target: the target's shape.
                None => one(Some(shaped(target, x.float))),
            }
        }
        "ConstantOfShape" => {
            let Some(dims) = x
                .value
                .as_ref()
                .and_then(|v| v.iter().map(Num::dim).collect::<Option<Vec<_>>>())
            else {
                return one(None);
            };
            let fill = match attr(attrs, "value").and_then(|a| a.t.as_ref()) {
                Some(t) => tensor_facts(&Tensor {
                    proto: t.clone(),
                    data: crate::weights::TensorData::Inline,
                }),
                None => with_value(vec![], vec![Num::F(0.0)], true),
            };
            let value = match (count(&dims), fill.value.as_ref().and_then(|v| v.first())) {
                (Some(n), Some(f)) if n <= MAX_VALUE_LEN => Some(vec![f.clone(); n]),
                _ => None,
            };
            one(Some(Facts {
                shape: Some(dims),
                value,
                float: fill.float,
            }))
        }
        "Resize" => {
            let Some(xs) = &x.shape else { return one(None) };
            if let Some(sizes) = (n_inputs > 3).then(|| input(3).value).flatten() {
                return one(sizes
                    .iter()
                    .map(Num::dim)
                    .collect::<Option<Vec<_>>>()
                    .map(|s| shaped(s, x.float)));
            }
            let Some(scales) = input(2).value else {
                return one(None);
            };
            let shape: Option<Vec<Dim>> = xs
                .iter()
                .zip(&scales)
                .map(|(d, s)| {
                    let s = s.as_f64()?;
                    if s.fract() == 0.0 {
                        d.mul(&Dim::Known(s as i64))
                    } else if (1.0 / s).fract() == 0.0 {
                        d.div(&Dim::Known((1.0 / s) as i64))
                    } else {
                        None
                    }
                })
                .collect();
            one(shape.map(|s| shaped(s, x.float)))
        }
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" => {
            let Some(xs) = &x.shape else { return one(None) };
            let axes = if n_inputs > 1 {
                known_ints(&input(1))
            } else {
                attr_ints(attrs, "axes")
            };
            let keep = attr_i(attrs, "keepdims").unwrap_or(1) == 1;
            let axes: Vec<usize> = match axes {
                Some(a) => a.iter().filter_map(|a| axis(*a, xs.len())).collect(),
                None => (0..xs.len()).collect(),
            };
            let shape = xs
                .iter()
                .enumerate()
                .filter_map(|(i, d)| {
                    if axes.contains(&i) {
                        keep.then_some(Dim::Known(1))
                    } else {
                        Some(d.clone())
                    }
                })
                .collect();
            one(Some(shaped(shape, x.float)))
        }
        "Constant" => one(constant_facts(attrs)),
        // Token merging's ops: outputs shaped like an input, or with a size known only at run time.
        "GatherElements" => one(input(1).shape.map(|s| shaped(s, x.float))),
        "GatherND" => {
            // indices [..., k] pick the k dims after the batch dims of data.
            let batch = attr_i(attrs, "batch_dims").unwrap_or(0).max(0) as usize;
            let shape = (|| {
                let (data, idx) = (x.shape.as_ref()?, input(1).shape?);
                let (k, lead) = idx.split_last()?;
                let rest = data.get(batch.checked_add(usize::try_from(k.known()?).ok()?)?..)?;
                Some(lead.iter().chain(rest).cloned().collect())
            })();
            one(shape.map(|s| shaped(s, x.float)))
        }
        "ScatterElements" | "ScatterND" | "LpNormalization" => {
            one(x.shape.clone().map(|s| shaped(s, x.float)))
        }
        "TopK" => {
            let Some(xs) = &x.shape else { return vec![] };
            let Some(a) = axis(attr_i(attrs, "axis").unwrap_or(-1), xs.len()) else {
                return vec![];
            };
            let k = input(1)
                .value
                .and_then(|v| v.first().and_then(Num::dim))
                .unwrap_or_else(&mut *fresh);
            let mut s = xs.clone();
            s[a] = k;
            vec![shaped(s.clone(), x.float), shaped(s, false)]
        }
        "NonZero" => one(x
            .shape
            .as_ref()
            .map(|s| shaped(vec![Dim::Known(s.len() as i64), fresh()], false))),
        "Einsum" => {
            let Some(eq) = attr(attrs, "equation").and_then(|a| std::str::from_utf8(&a.s).ok())
            else {
                return one(None);
            };
            let shapes: Option<Vec<Vec<Dim>>> = (0..n_inputs).map(|i| input(i).shape).collect();
            one(shapes
                .and_then(|s| einsum_shape(eq, &s))
                .map(|s| shaped(s, x.float)))
        }
        "Range" => {
            // Known start, limit and delta: ⌈(limit - start) / delta⌉ elements.
            let scalar = |f: &Facts| f.value.as_ref().filter(|v| v.len() == 1)?[0].as_f64();
            let (start, limit, delta) = (scalar(&x), scalar(&input(1)), scalar(&input(2)));
            let len = match (start, limit, delta) {
                (Some(a), Some(b), Some(d)) if d != 0.0 => {
                    Dim::Known(((b - a) / d).ceil().max(0.0) as i64)
                }
                _ => fresh(),
            };
            let value = match (start, delta, len.known()) {
                (Some(a), Some(d), Some(n)) if !x.float && n as usize <= MAX_VALUE_LEN => Some(
                    (0..n)
                        .map(|i| Num::I(Dim::Known((a + d * i as f64) as i64)))
                        .collect(),
                ),
                _ => None,
            };
            one(Some(Facts {
                shape: Some(vec![len]),
                value,
                float: x.float,
            }))
        }
        _ => vec![],
    }
}

/// The indices a Slice takes along an axis of known length `len` (ONNX's clamping: a
/// negative step walks back from `start`, clamped to `len - 1`, down to `end`, clamped to -1).
fn slice_indices(len: i64, start: i64, end: i64, step: i64) -> Option<Vec<usize>> {
    if step == 0 || len < 0 {
        return None;
    }
    let wrap = |v: i64| if v < 0 { v.saturating_add(len) } else { v };
    let (s, e) = (wrap(start), wrap(end));
    let range: Vec<i64> = if step > 0 {
        let (s, e) = (s.clamp(0, len), e.clamp(0, len));
        (s..e).step_by(step as usize).collect()
    } else {
        let (s, e) = (s.clamp(-1, len - 1), e.clamp(-1, len - 1));
        let n = if s > e { (s - e - 1) / -step + 1 } else { 0 };
        (0..n).map(|i| s + i * step).collect()
    };
    range.into_iter().map(|i| usize::try_from(i).ok()).collect()
}

/// A small tensor's elements at the given indices per axis (row-major, as [`Facts::value`]).
fn gather_value(v: &[Num], dims: &[usize], idx: &[Vec<usize>]) -> Option<Vec<Num>> {
    if v.len() != dims.iter().product::<usize>() {
        return None;
    }
    let mut out = vec![0usize];
    for (axis, picks) in idx.iter().enumerate() {
        let n = dims[axis];
        out = out
            .iter()
            .flat_map(|base| picks.iter().map(move |i| base * n + i))
            .collect();
    }
    out.into_iter().map(|i| v.get(i).cloned()).collect()
}

/// A small tensor's elements transposed by `perm`.
fn transpose_value(v: &[Num], shape: &[Dim], perm: &[i64]) -> Option<Vec<Num>> {
    let dims: Vec<usize> = shape
        .iter()
        .map(|d| usize::try_from(d.known()?).ok())
        .collect::<Option<_>>()?;
    if v.len() != dims.iter().product::<usize>() || perm.len() != dims.len() {
        return None;
    }
    let strides: Vec<usize> = (0..dims.len())
        .map(|i| dims[i + 1..].iter().product())
        .collect();
    let out_dims: Vec<usize> = perm
        .iter()
        .map(|p| dims.get(usize::try_from(*p).ok()?).copied())
        .collect::<Option<_>>()?;
    let mut out = Vec::with_capacity(v.len());
    let mut at = vec![0usize; out_dims.len()];
    for _ in 0..v.len() {
        let src: usize = at
            .iter()
            .zip(perm)
            .map(|(i, p)| i * strides[*p as usize])
            .sum();
        out.push(v.get(src)?.clone());
        for k in (0..at.len()).rev() {
            at[k] += 1;
            if at[k] < out_dims[k] {
                break;
            }
            at[k] = 0;
        }
    }
    Some(out)
}

/// Einsum's output shape: each output letter's size from the inputs (`m,d->md`, PixArt's
/// sin-cos position table; `nhwpqc->nchpwq`, its unpatchify), `...` broadcast across the
/// inputs; without `->`, the letters used once, in alphabetical order.
fn einsum_shape(equation: &str, shapes: &[Vec<Dim>]) -> Option<Vec<Dim>> {
    let eq: String = equation.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (eq.as_str(), None),
    };
    let terms: Vec<&str> = lhs.split(',').collect();
    if terms.len() != shapes.len() {
        return None;
    }
    let mut sizes: BTreeMap<char, Dim> = BTreeMap::new();
    let mut ellipsis: Vec<Dim> = Vec::new();
    let mut counts: BTreeMap<char, usize> = BTreeMap::new();
    for (term, shape) in terms.iter().zip(shapes) {
        let (before, after) = term.split_once("...").unwrap_or((term, ""));
        let named = before.len() + after.len();
        let spread = shape.len().checked_sub(named)?;
        if !term.contains("...") && spread != 0 {
            return None;
        }
        let dims_after = &shape[shape.len() - after.len()..];
        for (c, d) in before
            .chars()
            .zip(shape)
            .chain(after.chars().zip(dims_after))
        {
            *counts.entry(c).or_default() += 1;
            // A letter's size: its first, unless that was a broadcast 1.
            if sizes.get(&c).is_none_or(|prev| *prev == Dim::Known(1)) {
                sizes.insert(c, d.clone());
            }
        }
        ellipsis = broadcast(&ellipsis, &shape[before.len()..before.len() + spread])?;
    }
    let implicit: String = counts
        .iter()
        .filter(|(_, n)| **n == 1)
        .map(|(c, _)| *c)
        .collect();
    let rhs = rhs
        .map(str::to_string)
        .unwrap_or_else(|| format!("...{implicit}"));
    let (before, after) = rhs.split_once("...").unwrap_or((&rhs, ""));
    let letters =
        |t: &str| -> Option<Vec<Dim>> { t.chars().map(|c| sizes.get(&c).cloned()).collect() };
    let mut out = letters(before)?;
    if rhs.contains("...") {
        out.extend(ellipsis);
    }
    out.extend(letters(after)?);
    Some(out)
}

fn constant_facts(attrs: &[AttributeProto]) -> Option<Facts> {
    let a = attrs.first()?;
    match a.name.as_str() {
        "value" => {
            let t: &TensorProto = a.t.as_ref()?;
            let tensor = Tensor {
                proto: t.clone(),
                data: crate::weights::TensorData::Inline,
            };
            Some(tensor_facts(&tensor))
        }
        "value_float" => Some(with_value(vec![], vec![Num::F(a.f as f64)], true)),
        "value_floats" => Some(with_value(
            vec![Dim::Known(a.floats.len() as i64)],
            a.floats.iter().map(|f| Num::F(*f as f64)).collect(),
            true,
        )),
        "value_int" => Some(with_value(vec![], vec![Num::I(Dim::Known(a.i))], false)),
        "value_ints" => Some(with_value(
            vec![Dim::Known(a.ints.len() as i64)],
            a.ints.iter().map(|i| Num::I(Dim::Known(*i))).collect(),
            false,
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contrib_op_shapes() {
        let dims = |d: &[&str]| -> Vec<Dim> {
            d.iter()
                .map(|x| x.parse().map_or_else(|_| Dim::symbol(x), Dim::Known))
                .collect()
        };
        let infer = |op: &str, attrs: Vec<AttributeProto>, ins: Vec<Option<Vec<Dim>>>| {
            let input = |i: usize| Facts {
                shape: ins.get(i).cloned().flatten(),
                value: None,
                float: true,
            };
            let mut n = 0;
            let mut fresh = || {
                n += 1;
                Dim::unknown(n)
            };
            infer_contrib(op, &attrs, &input, &mut fresh)[0]
                .shape
                .clone()
        };
        // Packed QKV [B, S, N, 3, H] and packed KV [B, L, N, 2, H] give [B, S, N·H].
        let packed = infer(
            "MultiHeadAttention",
            vec![],
            vec![Some(dims(&["b", "s", "8", "3", "40"]))],
        );
        assert_eq!(packed, Some(dims(&["b", "s", "320"])));
        let kv = vec![
            Some(dims(&["b", "s", "320"])),
            Some(dims(&["b", "77", "8", "2", "40"])),
        ];
        assert_eq!(
            infer("MultiHeadAttention", vec![], kv),
            Some(dims(&["b", "s", "320"]))
        );
        let halved = infer(
            "BiasSplitGelu",
            vec![],
            vec![Some(dims(&["b", "s", "2560"]))],
        );
        assert_eq!(halved, Some(dims(&["b", "s", "1280"])));
        // NhwcConv: 3x3 padded 1 keeps H and W; stride 2 halves them (exact for even sizes).
        let ints = |name: &str, v: &[i64]| AttributeProto {
            name: name.into(),
            ints: v.to_vec(),
            ..Default::default()
        };
        let conv = |strides: &[i64]| {
            infer(
                "NhwcConv",
                vec![ints("pads", &[1, 1, 1, 1]), ints("strides", strides)],
                vec![
                    Some(dims(&["n", "h", "w", "4"])),
                    Some(dims(&["320", "3", "3", "4"])),
                ],
            )
            .unwrap()
        };
        assert_eq!(conv(&[1, 1]), dims(&["n", "h", "w", "320"]));
        let half = |d: &str| Dim::symbol(d).div(&Dim::Known(2)).unwrap();
        let down = vec![Dim::symbol("n"), half("h"), half("w"), Dim::Known(320)];
        assert_eq!(conv(&[2, 2]), down);
    }

    #[test]
    fn einsum_shapes() {
        let d = |names: &[&str]| -> Vec<Dim> { names.iter().map(|n| Dim::parse(n)).collect() };
        let show =
            |s: Option<Vec<Dim>>| s.map(|s| s.iter().map(Dim::to_string).collect::<Vec<_>>());
        // PixArt's sin-cos table (an outer product) and its unpatchify.
        assert_eq!(
            show(einsum_shape("m,d->md", &[d(&["n"]), d(&["4"])])),
            Some(vec!["n".into(), "4".into()])
        );
        assert_eq!(
            show(einsum_shape(
                "nhwpqc->nchpwq",
                &[d(&["b", "h", "w", "2", "2", "8"])]
            )),
            Some(["b", "8", "h", "2", "w", "2"].map(String::from).to_vec())
        );
        // Ellipsis broadcast across inputs; implicit output (letters used once, sorted).
        assert_eq!(
            show(einsum_shape(
                "...ij,...jk->...ik",
                &[d(&["b", "3", "4"]), d(&["1", "4", "5"])]
            )),
            Some(["b", "3", "5"].map(String::from).to_vec())
        );
        assert_eq!(
            show(einsum_shape("ij,jk", &[d(&["3", "4"]), d(&["4", "5"])])),
            Some(["3", "5"].map(String::from).to_vec())
        );
        // A term that does not fit its input's rank.
        assert_eq!(show(einsum_shape("ij->i", &[d(&["3"])])), None);
    }

    #[test]
    fn slices_with_steps_and_transposed_values() {
        // numpy's x[::-1], x[3:0:-2], x[-1:-10:-1] of 5 elements; x[1::2]; empty ranges.
        assert_eq!(
            slice_indices(5, -1, i64::MIN, -1),
            Some(vec![4, 3, 2, 1, 0])
        );
        assert_eq!(slice_indices(5, 3, 0, -2), Some(vec![3, 1]));
        assert_eq!(slice_indices(5, -1, -10, -1), Some(vec![4, 3, 2, 1, 0]));
        assert_eq!(slice_indices(5, 1, i64::MAX, 2), Some(vec![1, 3]));
        assert_eq!(slice_indices(5, 4, 2, 1), Some(vec![]));
        assert_eq!(slice_indices(5, 0, 4, 0), None);
        // torch's F.pad pads: [4, 2] rows reversed, transposed, flattened.
        let n = |v: &[i64]| v.iter().map(|x| Num::I(Dim::Known(*x))).collect::<Vec<_>>();
        let pairs = n(&[0, 1, 0, 1, 0, 0, 0, 0]);
        let rev = gather_value(&pairs, &[4, 2], &[vec![3, 2, 1, 0], vec![0, 1]]).unwrap();
        assert_eq!(rev, n(&[0, 0, 0, 0, 0, 1, 0, 1]));
        let t = transpose_value(&rev, &[Dim::Known(4), Dim::Known(2)], &[1, 0]).unwrap();
        assert_eq!(t, n(&[0, 0, 0, 0, 0, 0, 1, 1]));
        let x = n(&(0..24).collect::<Vec<_>>());
        let dims = [2, 3, 4].map(Dim::Known);
        let t = transpose_value(&x, &dims, &[2, 0, 1]).unwrap();
        // out[k, i, j] = x[i, j, k]
        assert_eq!(t[..4], n(&[0, 4, 8, 12])[..]);
        assert_eq!(t[6..8], n(&[1, 5])[..]);
    }

    #[test]
    fn dim_params() {
        assert_eq!(Dim::parse("8*height").to_string(), "8*height");
        assert_eq!(Dim::parse("batch"), Dim::symbol("batch"));
        assert_eq!(Dim::parse("s0 + 1"), Dim::symbol("s0 + 1"));
    }
}
