//! Numeric comparison of outputs: max abs error, relative L2 error, cosine similarity.
use serde::Serialize;

use crate::tensor::HostTensor;

#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub name: String,
    pub shape: Vec<usize>,
    pub max_abs: f64,
    /// ||a - b|| / ||a||, `a` the reference.
    pub rel_l2: f64,
    pub cosine: f64,
}

impl Comparison {
    /// Passes when the relative L2 error is at most `tol` (NaN never passes).
    pub fn within(&self, tol: f64) -> bool {
        self.rel_l2 <= tol
    }
}

/// Compares `b` against the reference `a`. Different shapes give `Err` with both shapes.
pub fn compare(name: &str, a: &HostTensor, b: &HostTensor) -> Result<Comparison, String> {
    if a.shape() != b.shape() {
        return Err(format!(
            "output '{name}': shapes differ: {:?} vs {:?}",
            a.shape(),
            b.shape()
        ));
    }
    let (x, y) = (a.to_f64(), b.to_f64());
    let (mut max_abs, mut diff2, mut a2, mut b2, mut dot) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (p, q) in x.iter().zip(&y) {
        let d = p - q;
        max_abs = if d.is_nan() {
            f64::NAN
        } else {
            max_abs.max(d.abs())
        };
        diff2 += d * d;
        a2 += p * p;
        b2 += q * q;
        dot += p * q;
    }
    let rel_l2 = if a2 == 0.0 {
        if diff2 == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        (diff2 / a2).sqrt()
    };
    let cosine = if a2 == 0.0 || b2 == 0.0 {
        if a2 == b2 { 1.0 } else { 0.0 }
    } else {
        dot / (a2.sqrt() * b2.sqrt())
    };
    Ok(Comparison {
        name: name.to_string(),
        shape: a.shape().to_vec(),
        max_abs,
        rel_l2,
        cosine,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr1;

    #[test]
    fn metrics() {
        let a = HostTensor::F32(arr1(&[3.0f32, 4.0]).into_dyn());
        let b = HostTensor::F32(arr1(&[3.0f32, 4.5]).into_dyn());
        let c = compare("x", &a, &b).unwrap();
        assert_eq!(c.max_abs, 0.5);
        assert!((c.rel_l2 - 0.1).abs() < 1e-12);
        assert!(c.cosine > 0.99 && c.cosine < 1.0);
        let nan = HostTensor::F32(arr1(&[f32::NAN, 4.0]).into_dyn());
        assert!(!compare("x", &a, &nan).unwrap().within(1.0));
        assert!(compare("x", &a, &HostTensor::F32(arr1(&[1.0f32]).into_dyn())).is_err());
    }
}
