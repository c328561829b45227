//! Latency statistics and memory readings for `attune bench` and the bench targets.
use std::time::Duration;

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub iters: usize,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// Median, p90 (nearest rank), min, max and mean of the samples.
pub fn stats(samples: &[Duration]) -> Stats {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    if n == 0 {
        return Stats {
            iters: 0,
            median_ms: f64::NAN,
            p90_ms: f64::NAN,
            min_ms: f64::NAN,
            max_ms: f64::NAN,
            mean_ms: f64::NAN,
        };
    }
    let median = if n % 2 == 1 {
        ms[n / 2]
    } else {
        (ms[n / 2 - 1] + ms[n / 2]) / 2.0
    };
    let p90 = ms[((n as f64 * 0.9).ceil() as usize).clamp(1, n) - 1];
    Stats {
        iters: n,
        median_ms: median,
        p90_ms: p90,
        min_ms: ms[0],
        max_ms: ms[n - 1],
        mean_ms: ms.iter().sum::<f64>() / n as f64,
    }
}

/// Resident memory of this process (kB): now and the peak since start (or the last reset).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Rss {
    pub current_kb: u64,
    pub peak_kb: u64,
}

pub fn rss() -> Rss {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Rss {
        current_kb: field("VmRSS:"),
        peak_kb: field("VmHWM:"),
    }
}

/// Resets the peak (VmHWM) to the current RSS, so a phase's own peak can be read.
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        let st = stats(&s);
        assert_eq!(st.median_ms, 5.5);
        assert_eq!(st.p90_ms, 9.0);
        assert_eq!(st.min_ms, 1.0);
        assert_eq!(st.max_ms, 10.0);
        assert!(rss().current_kb > 0);
    }
}
