//! ΔW of one adapted layer, in f32 and torch's layout ([out, in] or [out, in, kh, kw]):
//! LoRA/LoCon `up·down` (Tucker `mid` for convs), LoHa `(w1a·w1b) ⊙ (w2a·w2b)`, LoKr
//! `w1 ⊗ w2`, each times its scale (alpha/rank, rsLoRA alpha/√rank).
use super::file::{Factor, Layer, Part};

/// A weight delta and how it was made.
#[derive(Debug)]
pub struct Delta {
    pub data: Vec<f32>,
    pub rank: usize,
    pub scale: f32,
    pub kind: &'static str,
}

/// `a` [m, k] · `b` [k, n] (row-major) with a kernel that uses the CPU's SIMD.
pub fn matmul(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Vec<f32> {
    assert!(a.len() >= m * k && b.len() >= k * n);
    let mut c = vec![0f32; m * n];
    // SAFETY: the slices hold m·k, k·n and m·n elements, row-major strides as given.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
    c
}

fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; a.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = a[r * cols + c];
        }
    }
    t
}

/// Tucker rebuild: ΔW[p, q, s] = Σ_ij t[i, j, s] · wa[i, p] · wb[j, q]
/// (t [i, j, kernel..], wa [i, out], wb [j, in]); `kernel` is the layer's.
fn tucker(
    t: &Factor,
    wa: &[f32],
    wb: &[f32],
    out: usize,
    inp: usize,
    kernel: &[usize],
) -> Result<Vec<f32>, String> {
    let (i, j) = match t.shape[..] {
        [i, j, ..] => (i, j),
        _ => return Err(format!("'{}' must be at least 2-D", t.key)),
    };
    if !fits_kernel(&t.shape[2..], kernel) {
        return Err(format!(
            "'{}' has shape {:?}: its kernel does not match the layer's {kernel:?}",
            t.key, t.shape
        ));
    }
    let spatial = t.data.len() / (i * j).max(1);
    if wa.len() != i * out || wb.len() != j * inp {
        return Err(format!(
            "'{}' ({:?}) does not fit the factors around it",
            t.key, t.shape
        ));
    }
    let wa_t = transpose(wa, i, out); // [out, i]
    let mut result = vec![0f32; out * inp * spatial];
    for s in 0..spatial {
        let ts: Vec<f32> = (0..i * j).map(|x| t.data[x * spatial + s]).collect(); // [i, j]
        let tmp = matmul(&wa_t, out, i, &ts, j); // [out, j]
        let ws = matmul(&tmp, out, j, wb, inp); // [out, in]
        for (x, v) in ws.into_iter().enumerate() {
            result[x * spatial + s] = v;
        }
    }
    Ok(result)
}

fn scale(layer: &Layer, rank: usize) -> f32 {
    let alpha = layer.alpha.filter(|a| *a != 0.0).unwrap_or(rank as f32);
    if layer.rslora {
        alpha / (rank as f32).sqrt()
    } else {
        alpha / rank as f32
    }
}

fn need(layer: &Layer, part: Part) -> Result<&Factor, String> {
    layer
        .parts
        .get(&part)
        .ok_or_else(|| format!("layer {} has no {part:?} factor", layer.name))
}

/// ΔW (scale included) for a weight of torch shape `shape`.
pub fn delta(layer: &Layer, shape: &[usize]) -> Result<Delta, String> {
    if layer.parts.contains_key(&Part::DoraScale) {
        return Err("DoRA (weight-decomposed LoRA) is not supported".into());
    }
    let (out, inp) = match shape {
        [out, inp, ..] => (*out, *inp),
        _ => return Err(format!("the layer's weight {shape:?} is not a matrix")),
    };
    let kernel = &shape[2..];
    let spatial: usize = kernel.iter().product();
    let d = if layer.parts.contains_key(&Part::Down) {
        lora(layer, out, inp, kernel)?
    } else if layer.parts.contains_key(&Part::HadaW1A) {
        loha(layer, out, inp, kernel)?
    } else if layer.parts.keys().any(|p| {
        matches!(
            p,
            Part::LokrW1 | Part::LokrW1A | Part::LokrW2 | Part::LokrW2A
        )
    }) {
        lokr(layer, shape)?
    } else {
        return Err(format!(
            "layer {} has no factors attune knows (parts: {:?})",
            layer.name,
            layer.parts.keys().collect::<Vec<_>>()
        ));
    };
    if d.data.len() != out * inp * spatial {
        return Err(format!(
            "factors give {} values but the layer's weight {shape:?} has {}",
            d.data.len(),
            out * inp * spatial
        ));
    }
    Ok(d)
}

/// Trailing (kernel) dims of a factor against the layer's kernel: equal, or both 1x1 / none.
fn fits_kernel(dims: &[usize], kernel: &[usize]) -> bool {
    dims == kernel || (dims.iter().all(|d| *d == 1) && kernel.iter().all(|d| *d == 1))
}

/// An input-side factor stored unflattened ([rows, inner, kernel..]) must split its columns
/// as the layer does ([.., in, kernel..]); a flattened [rows, in·kernel] one is taken as is.
fn check_conv(f: &Factor, inner: usize, kernel: &[usize], what: &str) -> Result<(), String> {
    if f.shape.len() > 2 && (f.shape[1] != inner || !fits_kernel(&f.shape[2..], kernel)) {
        return Err(format!(
            "'{}' has shape {:?}, expected [_, {inner}, {}] for {what}",
            f.key,
            f.shape,
            kernel
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(())
}

fn check_dims(f: &Factor, rows: usize, cols: usize, what: &str) -> Result<(), String> {
    let (r, c) = f.rows_cols();
    if (r, c) != (rows, cols) {
        return Err(format!(
            "'{}' has shape {:?}, expected {rows}x{cols} for {what}",
            f.key, f.shape
        ));
    }
    Ok(())
}

fn lora(layer: &Layer, out: usize, inp: usize, kernel: &[usize]) -> Result<Delta, String> {
    let spatial: usize = kernel.iter().product();
    let (down, up) = (need(layer, Part::Down)?, need(layer, Part::Up)?);
    let rank = down.rows_cols().0;
    let s = scale(layer, rank);
    check_dims(up, out, rank, "the layer's output dim x rank")?;
    let mut data = match layer.parts.get(&Part::Mid) {
        Some(mid) => {
            check_dims(
                down,
                rank,
                inp,
                "rank x the layer's input dim (1x1 down with a mid)",
            )?;
            tucker(
                mid,
                &transpose(&up.data, out, rank),
                &down.data,
                out,
                inp,
                kernel,
            )?
        }
        None => {
            check_dims(down, rank, inp * spatial, "rank x the layer's input dims")?;
            check_conv(down, inp, kernel, "rank x the layer's input dims")?;
            matmul(&up.data, out, rank, &down.data, inp * spatial)
        }
    };
    data.iter_mut().for_each(|v| *v *= s);
    Ok(Delta {
        data,
        rank,
        scale: s,
        kind: if layer.parts.contains_key(&Part::Mid) {
            "locon-tucker"
        } else {
            "lora"
        },
    })
}

fn loha(layer: &Layer, out: usize, inp: usize, kernel: &[usize]) -> Result<Delta, String> {
    let spatial: usize = kernel.iter().product();
    let half = |a: Part, b: Part, t: Part| -> Result<(Vec<f32>, usize), String> {
        let (fa, fb) = (need(layer, a)?, need(layer, b)?);
        let (w, rank) = match layer.parts.get(&t) {
            // Tucker: wa [rank, out], wb [rank, in], t [rank, rank, kh, kw].
            Some(tf) => (
                tucker(tf, &fa.data, &fb.data, out, inp, kernel)?,
                fa.rows_cols().0,
            ),
            None => {
                let rank = fb.rows_cols().0;
                check_dims(fa, out, rank, "the layer's output dim x rank")?;
                check_dims(fb, rank, inp * spatial, "rank x the layer's input dims")?;
                check_conv(fb, inp, kernel, "rank x the layer's input dims")?;
                (matmul(&fa.data, out, rank, &fb.data, inp * spatial), rank)
            }
        };
        if w.len() != out * inp * spatial {
            return Err(format!(
                "'{}' and '{}' give {} values, expected {out}x{inp}x{kernel:?}",
                fa.key,
                fb.key,
                w.len()
            ));
        }
        Ok((w, rank))
    };
    let (w1, rank) = half(Part::HadaW1A, Part::HadaW1B, Part::HadaT1)?;
    let (w2, _) = half(Part::HadaW2A, Part::HadaW2B, Part::HadaT2)?;
    let s = scale(layer, rank);
    let data = w1.iter().zip(&w2).map(|(a, b)| a * b * s).collect();
    Ok(Delta {
        data,
        rank,
        scale: s,
        kind: "loha",
    })
}

fn lokr(layer: &Layer, shape: &[usize]) -> Result<Delta, String> {
    let get = |p: Part| layer.parts.get(&p);
    // w1 [a, c]: full or a·b decomposed.
    let (w1, a, c) = match (get(Part::LokrW1), get(Part::LokrW1A), get(Part::LokrW1B)) {
        (Some(w), _, _) => (w.data.clone(), w.rows_cols().0, w.rows_cols().1),
        (None, Some(wa), Some(wb)) => {
            let (a, r) = wa.rows_cols();
            check_dims(wb, r, wb.rows_cols().1, "w1b")?;
            (
                matmul(&wa.data, a, r, &wb.data, wb.rows_cols().1),
                a,
                wb.rows_cols().1,
            )
        }
        _ => {
            return Err(format!(
                "layer {} has no lokr_w1 (nor lokr_w1_a and lokr_w1_b)",
                layer.name
            ));
        }
    };
    let (out, inp) = (shape[0], shape.get(1).copied().unwrap_or(1));
    let kernel = &shape[2..];
    let spatial: usize = kernel.iter().product();
    if a == 0 || c == 0 || out % a != 0 || inp % c != 0 {
        return Err(format!(
            "lokr_w1 {a}x{c} does not divide the layer's weight {shape:?}"
        ));
    }
    let (b, d) = (out / a, inp / c);
    // w2 [b, d, spatial]: full, a·b decomposed (b reshaped), or Tucker.
    let w2 = match (
        get(Part::LokrW2),
        get(Part::LokrW2A),
        get(Part::LokrW2B),
        get(Part::LokrT2),
    ) {
        (Some(w), _, _, _) => {
            check_dims(w, b, d * spatial, "lokr_w2 (x kernel) for this layer")?;
            check_conv(w, d, kernel, "lokr_w2 for this layer")?;
            w.data.clone()
        }
        (None, Some(wa), Some(wb), Some(t)) => tucker(t, &wa.data, &wb.data, b, d, kernel)?,
        (None, Some(wa), Some(wb), None) => {
            let r = wa.rows_cols().1;
            check_dims(wa, b, r, "w2a")?;
            check_dims(wb, r, d * spatial, "w2b")?;
            check_conv(wb, d, kernel, "w2b")?;
            matmul(&wa.data, b, r, &wb.data, d * spatial)
        }
        _ => {
            return Err(format!(
                "layer {} has no lokr_w2 (nor lokr_w2_a and lokr_w2_b)",
                layer.name
            ));
        }
    };
    // kron(w1 [a, c], w2 [b, d, k..]) must give the layer's [out, in, k..] exactly.
    if w2.len() != b * d * spatial {
        return Err(format!(
            "lokr_w2 (rebuilt from its factors) has {} values, expected {b}x{d}x{kernel:?} = {} for the layer's weight {shape:?} (lokr_w1 {a}x{c})",
            w2.len(),
            b * d * spatial
        ));
    }
    // LyCORIS: the rank is w1a's (else w2a's) inner dim; full matrices use scale 1.
    let rank = get(Part::LokrW1A)
        .map(|w| w.rows_cols().1)
        .or_else(|| get(Part::LokrW2A).map(|w| w.shape.get(1).copied().unwrap_or(1)));
    let s = match rank {
        Some(r) => scale(layer, r),
        None => 1.0,
    };
    // kron(w1 [a, c, 1..], w2 [b, d, k..]) = [a·b, c·d, k..]
    let mut data = vec![0f32; out * inp * spatial];
    for i in 0..a {
        for j in 0..c {
            let w = w1[i * c + j] * s;
            for k in 0..b {
                for l in 0..d {
                    let (o, n) = (i * b + k, j * d + l);
                    for x in 0..spatial {
                        data[(o * inp + n) * spatial + x] = w * w2[(k * d + l) * spatial + x];
                    }
                }
            }
        }
    }
    Ok(Delta {
        data,
        rank: rank.unwrap_or(0),
        scale: s,
        kind: "lokr",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factor(shape: &[usize], data: Vec<f32>) -> Factor {
        Factor {
            shape: shape.to_vec(),
            data,
            key: "k".into(),
        }
    }

    #[test]
    fn lora_is_up_times_down_scaled() {
        let mut parts = std::collections::BTreeMap::new();
        parts.insert(Part::Down, factor(&[1, 2], vec![1.0, 2.0]));
        parts.insert(Part::Up, factor(&[2, 1], vec![3.0, 4.0]));
        let layer = Layer {
            module: "m".into(),
            name: "m".into(),
            parts,
            alpha: Some(0.5),
            rslora: false,
        };
        let d = delta(&layer, &[2, 2]).unwrap();
        assert_eq!(d.data, vec![1.5, 3.0, 2.0, 4.0]);
        assert!(delta(&layer, &[3, 2]).unwrap_err().contains("expected 3x1"));
    }

    #[test]
    fn kron_layout() {
        let mut parts = std::collections::BTreeMap::new();
        parts.insert(Part::LokrW1, factor(&[1, 2], vec![1.0, 10.0]));
        parts.insert(Part::LokrW2, factor(&[2, 1], vec![1.0, 2.0]));
        let layer = Layer {
            module: "m".into(),
            name: "m".into(),
            parts,
            alpha: None,
            rslora: false,
        };
        // kron([[1, 10]], [[1], [2]]) = [[1, 10], [2, 20]]
        assert_eq!(
            delta(&layer, &[2, 2]).unwrap().data,
            vec![1.0, 10.0, 2.0, 20.0]
        );
    }
}
