//! Fréchet distance between Gaussians fitted to feature sets (FID when the features are
//! InceptionV3 pool3 activations), computed in f64.
//!
//! FID = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), covariances with n - 1.
//! tr sqrt(S1 S2) is the sum of square roots of the eigenvalues of S1 S2, which are those of
//! the symmetric PSD matrix sqrt(S1) S2 sqrt(S1); eigenvalues come from
//! [`super::eigen::sym_eigen`]. When one set has fewer samples than dimensions (the usual case: a few
//! hundred images, 2048-d features) the same eigenvalues are found from an n x n matrix:
//! with S1 = X1^T X1 / (n1 - 1) (X1 centred), eig(S1 S2) = eig(X1 S2 X1^T) / (n1 - 1)
//! plus zeros. Tiny negative eigenvalues from rounding (the imaginary-part fallback of
//! scipy-based code) are clipped to zero.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::eigen::sym_eigen;
use crate::weights::{save_safetensors, TensorFile};
use crate::{Error, Result};

/// Mean and covariance (n - 1 normalisation) of a feature set.
#[derive(Clone, Debug)]
pub struct GaussianStats {
    pub dim: usize,
    pub n: usize,
    pub mu: Vec<f64>,
    /// Row-major (dim, dim).
    pub sigma: Vec<f64>,
}

/// Centred features as a row-major (n, d) matrix, with the mean.
fn centred(features: &[Vec<f64>], what: &str) -> Result<(Vec<f64>, Vec<f64>, usize, usize)> {
    let n = features.len();
    if n < 2 {
        return Err(Error::invalid(what, format!("need at least 2 feature vectors, got {n}")));
    }
    let d = features[0].len();
    if d == 0 {
        return Err(Error::invalid(what, "feature vectors are empty"));
    }
    let mut mu = vec![0f64; d];
    for (i, f) in features.iter().enumerate() {
        if f.len() != d {
            return Err(Error::invalid(what, format!("feature {i} has {} values, feature 0 has {d}", f.len())));
        }
        if f.iter().any(|v| !v.is_finite()) {
            return Err(Error::Numerical(format!("{what}: feature {i} is not finite")));
        }
        for (m, v) in mu.iter_mut().zip(f) {
            *m += v;
        }
    }
    mu.iter_mut().for_each(|m| *m /= n as f64);
    let mut x = Vec::with_capacity(n * d);
    for f in features {
        x.extend(f.iter().zip(&mu).map(|(v, m)| v - m));
    }
    Ok((x, mu, n, d))
}

/// a (r, k) @ b^T where b is (c, k); row-major in and out, f64 via candle's gemm.
fn matmul_t(a: &[f64], r: usize, b: &[f64], c: usize, k: usize) -> Result<Vec<f64>> {
    let ta = Tensor::from_slice(a, (r, k), &Device::Cpu)?;
    let tb = Tensor::from_slice(b, (c, k), &Device::Cpu)?;
    Ok(ta.matmul(&tb.t()?)?.flatten_all()?.to_vec1::<f64>()?)
}

/// a (r, k) @ b (k, c).
fn matmul(a: &[f64], r: usize, b: &[f64], k: usize, c: usize) -> Result<Vec<f64>> {
    let ta = Tensor::from_slice(a, (r, k), &Device::Cpu)?;
    let tb = Tensor::from_slice(b, (k, c), &Device::Cpu)?;
    Ok(ta.matmul(&tb)?.flatten_all()?.to_vec1::<f64>()?)
}

fn transpose(a: &[f64], r: usize, c: usize) -> Vec<f64> {
    let mut t = vec![0f64; r * c];
    for i in 0..r {
        for j in 0..c {
            t[j * r + i] = a[i * c + j];
        }
    }
    t
}

impl GaussianStats {
    pub fn from_features(features: &[Vec<f64>]) -> Result<Self> {
        let (x, mu, n, d) = centred(features, "feature set")?;
        let xt = transpose(&x, n, d);
        let mut sigma = matmul_t(&xt, d, &xt, d, n)?;
        sigma.iter_mut().for_each(|s| *s /= (n - 1) as f64);
        Ok(Self { dim: d, n, mu, sigma })
    }

    /// Fréchet distance to another set of statistics (d x d eigen-problem).
    pub fn frechet_distance(&self, other: &GaussianStats) -> Result<f64> {
        check_dims(self, other)?;
        let d = self.dim;
        let mut eps = 0.0;
        for _ in 0..4 {
            let s1 = with_ridge(&self.sigma, d, eps);
            let s2 = with_ridge(&other.sigma, d, eps);
            let (vals, vecs) = sym_eigen(&s1, d, true)?;
            // sqrt(S1) = V diag(sqrt(l)) V^T
            let mut vs = vecs.clone();
            for i in 0..d {
                for (j, l) in vals.iter().enumerate() {
                    vs[i * d + j] *= l.max(0.0).sqrt();
                }
            }
            let a = matmul_t(&vs, d, &vecs, d, d)?;
            let m = matmul(&matmul(&a, d, &s2, d, d)?, d, &a, d, d)?;
            let tr_sqrt = sum_sqrt_eigenvalues(&m, d)?;
            if tr_sqrt.is_finite() {
                return Ok(combine(self, other, tr_sqrt));
            }
            eps = if eps == 0.0 { 1e-6 } else { eps * 10.0 };
        }
        Err(Error::Numerical("FID: matrix square root is not finite even with a ridge".into()))
    }

    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mu = Tensor::from_slice(&self.mu, self.dim, &Device::Cpu)?;
        let sigma = Tensor::from_slice(&self.sigma, (self.dim, self.dim), &Device::Cpu)?;
        let meta = [("n".to_string(), self.n.to_string())].into_iter().collect();
        save_safetensors(path, &[("mu".to_string(), mu), ("sigma".to_string(), sigma)].into_iter().collect(), &meta)
    }

    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let f = TensorFile::load(path.as_ref(), &Device::Cpu)?;
        let mu = f.tensors.get("mu").ok_or_else(|| Error::MissingKey {
            path: f.path.clone(),
            key: "mu".into(),
            expected: vec![],
        })?;
        let dim = mu.dim(0)?;
        let sigma = f.get("sigma", &[dim, dim])?;
        let n = f.metadata.get("n").and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok(Self {
            dim,
            n,
            mu: mu.to_dtype(candle_core::DType::F64)?.to_vec1()?,
            sigma: sigma.to_dtype(candle_core::DType::F64)?.flatten_all()?.to_vec1()?,
        })
    }
}

fn check_dims(a: &GaussianStats, b: &GaussianStats) -> Result<()> {
    if a.dim != b.dim {
        return Err(Error::invalid("FID statistics", format!("dimensions differ: {} vs {}", a.dim, b.dim)));
    }
    Ok(())
}

fn with_ridge(s: &[f64], d: usize, eps: f64) -> Vec<f64> {
    let mut s = s.to_vec();
    for i in 0..d {
        s[i * d + i] += eps;
    }
    s
}

fn combine(a: &GaussianStats, b: &GaussianStats, tr_sqrt: f64) -> f64 {
    let d = a.dim;
    let dmu: f64 = a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y) * (x - y)).sum();
    let tr1: f64 = (0..d).map(|i| a.sigma[i * d + i]).sum();
    let tr2: f64 = (0..d).map(|i| b.sigma[i * d + i]).sum();
    dmu + tr1 + tr2 - 2.0 * tr_sqrt
}

fn sum_sqrt_eigenvalues(m: &[f64], d: usize) -> Result<f64> {
    let (vals, _) = sym_eigen(m, d, false)?;
    let scale = vals.iter().fold(0f64, |a, v| a.max(v.abs())).max(f64::MIN_POSITIVE);
    // Eigenvalues below the numerical-rank tolerance are rounding noise of a zero eigenvalue
    // (rank-deficient covariances); their square roots would add ~sqrt(eps) errors.
    let tol = d as f64 * f64::EPSILON * scale;
    let mut s = 0.0;
    for v in vals {
        if v < -1e-6 * scale {
            return Ok(f64::NAN);
        }
        if v > tol {
            s += v.sqrt();
        }
    }
    Ok(s)
}

/// FID between two feature sets (rows = samples). Uses the n x n form when a set has fewer
/// samples than dimensions.
pub fn fid_from_features(a: &[Vec<f64>], b: &[Vec<f64>]) -> Result<f64> {
    let sa = GaussianStats::from_features(a)?;
    let sb = GaussianStats::from_features(b)?;
    check_dims(&sa, &sb)?;
    let (small, other, feats) = if sa.n <= sb.n { (&sa, &sb, a) } else { (&sb, &sa, b) };
    let d = sa.dim;
    if small.n > d {
        return sa.frechet_distance(&sb);
    }
    let (x, _, n, _) = centred(feats, "feature set")?;
    // M = X S_other X^T / (n - 1), (n, n) symmetric PSD
    let xs = matmul(&x, n, &other.sigma, d, d)?;
    let mut m = matmul_t(&xs, n, &x, n, d)?;
    m.iter_mut().for_each(|v| *v /= (n - 1) as f64);
    symmetrise(&mut m, n);
    let tr_sqrt = sum_sqrt_eigenvalues(&m, n)?;
    if !tr_sqrt.is_finite() {
        return sa.frechet_distance(&sb);
    }
    Ok(combine(&sa, &sb, tr_sqrt))
}

fn symmetrise(m: &mut [f64], n: usize) {
    for i in 0..n {
        for j in i + 1..n {
            let v = 0.5 * (m[i * n + j] + m[j * n + i]);
            m[i * n + j] = v;
            m[j * n + i] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use rand_distr_free::normal;

    /// Box-Muller normal draws from the project's seeded RNG.
    mod rand_distr_free {
        use rand::Rng;
        pub fn normal(rng: &mut impl Rng) -> f64 {
            let u1: f64 = rng.random::<f64>().max(1e-300);
            let u2: f64 = rng.random();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        }
    }

    fn sample(n: usize, mu: &[f64], scales: &[f64], seed: u64) -> Vec<Vec<f64>> {
        let mut rng = crate::util::rng(seed);
        (0..n)
            .map(|_| mu.iter().zip(scales).map(|(m, s)| m + s * normal(&mut rng)).collect())
            .collect()
    }

    #[test]
    fn jacobi_reconstructs_matrix() -> Result<()> {
        let n = 6;
        let mut rng = crate::util::rng(3);
        let b: Vec<f64> = (0..n * n).map(|_| rng.random::<f64>() - 0.5).collect();
        let a = matmul_t(&b, n, &b, n, n)?;
        let (vals, vecs) = sym_eigen(&a, n, true)?;
        let mut vl = vecs.clone();
        for i in 0..n {
            for j in 0..n {
                vl[i * n + j] *= vals[j];
            }
        }
        let r = matmul_t(&vl, n, &vecs, n, n)?;
        for (x, y) in r.iter().zip(&a) {
            assert!((x - y).abs() < 1e-10, "{x} vs {y}");
        }
        Ok(())
    }

    #[test]
    fn fid_of_a_set_with_itself_is_zero() -> Result<()> {
        // fewer samples than dims (n x n path) and more (d x d path)
        for (n, d) in [(10, 16), (40, 5), (90, 40)] {
            let a = sample(n, &vec![0.3; d], &vec![1.5; d], 7);
            let f = fid_from_features(&a, &a)?;
            assert!(f.abs() < 1e-8, "n={n} d={d}: FID {f}");
        }
        Ok(())
    }

    #[test]
    fn fid_matches_closed_form_for_known_statistics() -> Result<()> {
        // Closed form for diagonal covariances: |dmu|^2 + sum (s1 - s2)^2 (std devs).
        let d = 4;
        let s1 = GaussianStats { dim: d, n: 0, mu: vec![0.0; d], sigma: diag(&[1.0, 4.0, 9.0, 0.25]) };
        let s2 = GaussianStats { dim: d, n: 0, mu: vec![1.0, -2.0, 0.0, 0.5], sigma: diag(&[4.0, 1.0, 9.0, 1.0]) };
        let expect = 1.0 + 4.0 + 0.25 + (1.0f64 + 1.0 + 0.0 + 0.25);
        let got = s1.frechet_distance(&s2)?;
        assert!((got - expect).abs() < 1e-9, "{got} vs {expect}");
        // non-commuting covariances: compare with the closed form for 2x2 matrices,
        // tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2.
        let a = GaussianStats { dim: 2, n: 0, mu: vec![0.0, 0.0], sigma: vec![2.0, 0.5, 0.5, 1.0] };
        let b = GaussianStats { dim: 2, n: 0, mu: vec![3.0, 4.0], sigma: vec![1.0, -0.3, -0.3, 3.0] };
        let m: [f64; 4] = [2.0 * 1.0 + 0.5 * -0.3, 2.0 * -0.3 + 0.5 * 3.0, 0.5 * 1.0 + 1.0 * -0.3, 0.5 * -0.3 + 3.0];
        let det = m[0] * m[3] - m[1] * m[2];
        let tr_sqrt = (m[0] + m[3] + 2.0 * det.sqrt()).sqrt();
        let expect = 25.0 + 3.0 + 4.0 - 2.0 * tr_sqrt;
        let got = a.frechet_distance(&b)?;
        assert!((got - expect).abs() < 1e-9, "{got} vs {expect}");
        Ok(())
    }

    fn diag(v: &[f64]) -> Vec<f64> {
        let d = v.len();
        let mut m = vec![0.0; d * d];
        v.iter().enumerate().for_each(|(i, x)| m[i * d + i] = *x);
        m
    }

    #[test]
    fn fid_of_shifted_sample_sets_matches_stats_path_and_closed_form() -> Result<()> {
        let d = 8;
        let a = sample(6, &vec![0.0; d], &vec![1.0; d], 11);
        let shift: Vec<f64> = (0..d).map(|i| i as f64 * 0.1).collect();
        let b: Vec<f64> = vec![0.0; d];
        let bset: Vec<Vec<f64>> = sample(9, &b, &vec![2.0; d], 12);
        let bset: Vec<Vec<f64>> = bset.iter().map(|r| r.iter().zip(&shift).map(|(x, s)| x + s).collect()).collect();
        let fast = fid_from_features(&a, &bset)?;
        // and at a size where the stats path uses the tridiagonal solver
        let big_a = sample(20, &vec![0.0; 48], &vec![1.0; 48], 21);
        let big_b = sample(30, &vec![0.5; 48], &vec![1.5; 48], 22);
        let f1 = fid_from_features(&big_a, &big_b)?;
        let f2 = GaussianStats::from_features(&big_a)?.frechet_distance(&GaussianStats::from_features(&big_b)?)?;
        assert!((f1 - f2).abs() < 1e-6 * f1.abs().max(1.0), "{f1} vs {f2}");
        let slow = GaussianStats::from_features(&a)?.frechet_distance(&GaussianStats::from_features(&bset)?)?;
        assert!((fast - slow).abs() < 1e-8 * slow.abs().max(1.0), "{fast} vs {slow}");
        // the same set moved by a constant: FID = |shift|^2 exactly
        let moved: Vec<Vec<f64>> = a.iter().map(|r| r.iter().zip(&shift).map(|(x, s)| x + s).collect()).collect();
        let f = fid_from_features(&a, &moved)?;
        let expect: f64 = shift.iter().map(|s| s * s).sum();
        assert!((f - expect).abs() < 1e-8, "{f} vs {expect}");
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(fid_from_features(&[vec![1.0]], &[vec![1.0], vec![2.0]]).is_err());
        assert!(fid_from_features(&[vec![1.0, 2.0], vec![1.0]], &[vec![1.0], vec![2.0]]).is_err());
        assert!(fid_from_features(&[vec![1.0, 2.0], vec![1.0, f64::NAN]], &[vec![1.0, 0.0], vec![2.0, 1.0]]).is_err());
    }

    #[test]
    fn stats_round_trip_through_a_file() -> Result<()> {
        let a = sample(5, &[1.0, 2.0, 3.0], &[1.0, 1.0, 1.0], 5);
        let s = GaussianStats::from_features(&a)?;
        let dir = std::env::temp_dir().join(format!("tokenar_fid_stats_{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let p = dir.join("stats.safetensors");
        s.save(&p)?;
        let r = GaussianStats::load(&p)?;
        assert_eq!(r.n, 5);
        assert_eq!(r.mu, s.mu);
        assert_eq!(r.sigma, s.sigma);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
