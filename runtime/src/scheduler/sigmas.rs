//! Noise levels σ = √((1−ᾱ)/ᾱ) of a DDPM-trained schedule and the spacings diffusers' σ-based
//! schedulers put on them: Karras's ρ = 7 ramp, exponential (log-linear) and beta-quantile
//! (Lee et al., α = β = 0.6) sigmas, and the map back from a σ to a fractional timestep.

/// Which σs the inference steps take, between the schedule's largest and smallest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SigmaSpacing {
    /// The σs of the spaced timesteps themselves.
    #[default]
    Timesteps,
    Karras,
    Exponential,
    Beta,
}

impl SigmaSpacing {
    /// The config key that turns it on.
    pub fn key(self) -> &'static str {
        match self {
            SigmaSpacing::Timesteps => "",
            SigmaSpacing::Karras => "use_karras_sigmas",
            SigmaSpacing::Exponential => "use_exponential_sigmas",
            SigmaSpacing::Beta => "use_beta_sigmas",
        }
    }
}

/// σ per training step, in f32 as diffusers computes them from its f32 ᾱ.
pub fn training_sigmas(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod
        .iter()
        .map(|&a| {
            let a = a as f32;
            ((1.0 - a) / a).sqrt() as f64
        })
        .collect()
}

/// np.interp of the training σs at (fractional) timesteps.
pub fn interpolate(train: &[f64], timesteps: &[f64]) -> Vec<f64> {
    let last = train.len() - 1;
    timesteps
        .iter()
        .map(|&t| {
            let t = t.clamp(0.0, last as f64);
            let lo = (t.floor() as usize).min(last);
            let hi = (lo + 1).min(last);
            train[lo] + (t - lo as f64) * (train[hi] - train[lo])
        })
        .collect()
}

/// `n` σs from `max` down to `min` as `spacing` spreads them (not `Timesteps`).
pub fn spaced(spacing: SigmaSpacing, max: f64, min: f64, n: usize) -> Vec<f64> {
    let ramp = |i: usize| {
        if n > 1 {
            i as f64 / (n - 1) as f64
        } else {
            0.0
        }
    };
    match spacing {
        SigmaSpacing::Timesteps => unreachable!("spaced timesteps give their own σs"),
        SigmaSpacing::Karras => {
            let rho = 7.0;
            let (lo, hi) = (min.powf(1.0 / rho), max.powf(1.0 / rho));
            (0..n)
                .map(|i| (hi + ramp(i) * (lo - hi)).powf(rho))
                .collect()
        }
        SigmaSpacing::Exponential => {
            let (lo, hi) = (min.ln(), max.ln());
            (0..n).map(|i| (hi + ramp(i) * (lo - hi)).exp()).collect()
        }
        SigmaSpacing::Beta => (0..n)
            .map(|i| min + beta_quantile(1.0 - ramp(i), 0.6, 0.6) * (max - min))
            .collect(),
    }
}

/// The fractional training timestep of `sigma`: linear in log σ between the two training steps
/// around it (diffusers' `_sigma_to_t`; `log_sigmas` in f32 as numpy keeps them).
pub fn sigma_to_t(sigma: f64, train: &[f64]) -> f64 {
    let log_sigmas: Vec<f64> = train.iter().map(|&s| (s as f32).ln() as f64).collect();
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // The last training step whose log σ is at most log σ (0 if none), below the last pair.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// The `q` quantile of the Beta(a, b) distribution, by bisection on its CDF.
fn beta_quantile(q: f64, a: f64, b: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if regularized_beta(mid, a, b) < q {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-16 {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// I_x(a, b), the regularized incomplete beta function, by its continued fraction (evaluated
/// with the modified Lentz method) on the side where it converges fast.
fn regularized_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - regularized_beta(1.0 - x, b, a);
    }
    let ln_front =
        a * x.ln() + b * (1.0 - x).ln() - (libm::lgamma(a) + libm::lgamma(b) - libm::lgamma(a + b));
    let tiny = 1e-300;
    let (mut c, mut d) = (1.0, 1.0 - (a + b) * x / (a + 1.0));
    d = 1.0 / if d.abs() < tiny { tiny } else { d };
    let mut f = d;
    for m in 1..500 {
        let m = m as f64;
        // The even then the odd term of the fraction.
        for numerator in [
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
        ] {
            d = 1.0 + numerator * d;
            d = 1.0 / if d.abs() < tiny { tiny } else { d };
            c = 1.0 + numerator / c;
            if c.abs() < tiny {
                c = tiny;
            }
            f *= c * d;
        }
        if (c * d - 1.0).abs() < 1e-16 {
            break;
        }
    }
    ln_front.exp() * f / a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beta_quantiles_are_scipys() {
        // scipy.stats.beta.ppf(q, 0.6, 0.6)
        for (q, want) in [
            (0.1, 0.039_584_405_588_780_85),
            (0.25, 0.175_680_378_652_694_98),
            (0.5, 0.5),
            (0.9, 0.960_415_594_411_219_2),
        ] {
            let got = beta_quantile(q, 0.6, 0.6);
            assert!((got - want).abs() < 1e-9, "{q}: {got} vs {want}");
        }
    }

    #[test]
    fn sigma_to_t_inverts_the_training_sigmas() {
        let train: Vec<f64> = (0..10).map(|i| 0.1 * 1.5f64.powi(i)).collect();
        assert!((sigma_to_t(train[4], &train) - 4.0).abs() < 1e-6);
        let mid = (train[4] * train[5]).sqrt();
        assert!((sigma_to_t(mid, &train) - 4.5).abs() < 1e-6);
        assert_eq!(sigma_to_t(1e-6, &train), 0.0);
        assert_eq!(sigma_to_t(1e6, &train), 9.0);
    }
}
