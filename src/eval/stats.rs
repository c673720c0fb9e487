//! Summary statistics over samples: mean, sample standard deviation and a 95% confidence
//! interval for the mean from Student's t distribution (`mean +- t(0.975, n-1) s / sqrt(n)`).
//! The t quantile is found by bisection on the t CDF, computed from the regularised
//! incomplete beta function (continued fraction, as in Numerical Recipes).

use serde::{Deserialize, Serialize};

/// Aggregate of one metric over samples. With one sample the interval is degenerate (`ci95`
/// = `None`); values that are `None` for a sample (e.g. masked metrics without a mask) are
/// left out and `n` counts the rest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    pub std: f64,
    /// Half width of the 95% t interval.
    pub ci95: Option<f64>,
    pub min: f64,
    pub max: f64,
}

pub fn summarize(values: &[f64]) -> Option<Summary> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let var = if n > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
    let std = var.sqrt();
    let ci95 = (n > 1).then(|| t_quantile(0.975, (n - 1) as f64) * std / (n as f64).sqrt());
    let min = values.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    Some(Summary { n, mean, std, ci95, min, max })
}

fn ln_gamma(x: f64) -> f64 {
    // Lanczos approximation (g = 7, n = 9), accurate to ~1e-15 for x > 0.
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    let tiny = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < tiny {
        d = tiny;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < tiny { tiny } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < tiny { tiny } else { c };
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < tiny { tiny } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < tiny { tiny } else { c };
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// Regularised incomplete beta I_x(a, b).
fn inc_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_cf(a, b, x) / a
    } else {
        1.0 - ln_front.exp() * beta_cf(b, a, 1.0 - x) / b
    }
}

/// CDF of Student's t with `df` degrees of freedom.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let tail = 0.5 * inc_beta(df / 2.0, 0.5, df / (df + t * t));
    if t >= 0.0 { 1.0 - tail } else { tail }
}

/// Quantile of Student's t (p in (0, 1)), by bisection to ~1e-12.
pub fn t_quantile(p: f64, df: f64) -> f64 {
    let (mut lo, mut hi) = (-1e4, 1e4);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-12 {
            break;
        }
    }
    0.5 * (lo + hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_quantiles_match_tables() {
        for (df, q) in [(1.0, 12.706_204_736), (2.0, 4.302_652_730), (10.0, 2.228_138_852), (30.0, 2.042_272_456), (1e6, 1.959_966_4)] {
            let t = t_quantile(0.975, df);
            assert!((t - q).abs() < 1e-5, "df {df}: {t} vs {q}");
        }
    }

    #[test]
    fn summary_of_known_values() {
        let s = summarize(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!((s.n, s.mean, s.min, s.max), (4, 2.5, 1.0, 4.0));
        assert!((s.std - 1.290_994_448_7).abs() < 1e-9);
        // t(0.975, 3) = 3.182446305
        assert!((s.ci95.unwrap() - 3.182_446_305 * s.std / 2.0).abs() < 1e-6);
        assert!(summarize(&[]).is_none());
        assert_eq!(summarize(&[5.0]).unwrap().ci95, None);
    }

    #[test]
    fn interval_covers_the_mean_about_95_percent() {
        // Coverage check over many seeded normal samples of size 8 (true mean 0).
        use rand::Rng;
        let mut rng = crate::util::rng(7);
        let trials = 2000;
        let mut covered = 0;
        for _ in 0..trials {
            let v: Vec<f64> = (0..8)
                .map(|_| {
                    // Box-Muller
                    let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
                    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
                })
                .collect();
            let s = summarize(&v).unwrap();
            if s.mean.abs() <= s.ci95.unwrap() {
                covered += 1;
            }
        }
        let rate = covered as f64 / trials as f64;
        assert!((0.93..0.97).contains(&rate), "coverage {rate}");
    }
}
