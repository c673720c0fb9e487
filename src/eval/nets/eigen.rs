//! Symmetric eigen-decomposition in f64 for the FID matrix square root: Householder
//! tridiagonalisation followed by the implicit QL algorithm (the EISPACK tred2/tql2 pair),
//! O(n^3) with a small constant, so 2048 x 2048 covariances stay practical; cyclic Jacobi
//! for small matrices.

use crate::{Error, Result};

/// Eigenvalues (unsorted) and, when `vectors`, the eigenvectors as the columns of a
/// row-major (n, n) matrix (empty otherwise).
pub fn sym_eigen(a: &[f64], n: usize, vectors: bool) -> Result<(Vec<f64>, Vec<f64>)> {
    if a.len() != n * n {
        return Err(Error::invalid("matrix", format!("expected {n}x{n} values, got {}", a.len())));
    }
    if a.iter().any(|v| !v.is_finite()) {
        return Err(Error::Numerical("eigen-decomposition: matrix is not finite".into()));
    }
    if n <= 32 {
        jacobi(a, n, vectors)
    } else {
        tridiagonal_ql(a, n, vectors)
    }
}

fn symmetrised(a: &[f64], n: usize) -> Vec<f64> {
    let mut m = a.to_vec();
    for i in 0..n {
        for j in i + 1..n {
            let v = 0.5 * (m[i * n + j] + m[j * n + i]);
            m[i * n + j] = v;
            m[j * n + i] = v;
        }
    }
    m
}

/// Cyclic Jacobi rotations.
pub(crate) fn jacobi(a: &[f64], n: usize, vectors: bool) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut a = symmetrised(a, n);
    let mut v = vec![0f64; if vectors { n * n } else { 0 }];
    if vectors {
        (0..n).for_each(|i| v[i * n + i] = 1.0);
    }
    let norm: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    for _sweep in 0..100 {
        let off: f64 = (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j))).map(|(i, j)| a[i * n + j].powi(2)).sum();
        if off == 0.0 || off.sqrt() <= 1e-15 * norm {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() <= 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = if theta == 0.0 { 1.0 } else { theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt()) };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                a[p * n + q] = 0.0;
                a[q * n + p] = 0.0;
                if vectors {
                    for k in 0..n {
                        let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                        v[k * n + p] = c * vkp - s * vkq;
                        v[k * n + q] = s * vkp + c * vkq;
                    }
                }
            }
        }
    }
    Ok(((0..n).map(|i| a[i * n + i]).collect(), v))
}

/// Householder reduction to tridiagonal form (tred2), then implicit QL (tql2).
pub(crate) fn tridiagonal_ql(a: &[f64], n: usize, vectors: bool) -> Result<(Vec<f64>, Vec<f64>)> {
    // The algorithm walks down columns; `v` is kept column-major (element (r, c) at
    // c * n + r) so that those walks are contiguous. The input is symmetric, so it reads
    // the same either way.
    let mut v = symmetrised(a, n);
    let mut d = vec![0f64; n];
    let mut e = vec![0f64; n];
    let ix = |r: usize, c: usize| c * n + r;
    // ---- tred2
    for j in 0..n {
        d[j] = v[ix(n - 1, j)];
    }
    for i in (1..n).rev() {
        let mut scale = 0.0;
        let mut h = 0.0;
        scale += d[..i].iter().map(|x| x.abs()).sum::<f64>();
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[ix(i - 1, j)];
                v[ix(i, j)] = 0.0;
                v[ix(j, i)] = 0.0;
            }
        } else {
            for dk in d[..i].iter_mut() {
                *dk /= scale;
                h += *dk * *dk;
            }
            let mut f = d[i - 1];
            let mut g = if f > 0.0 { -h.sqrt() } else { h.sqrt() };
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for ej in e.iter_mut().take(i) {
                *ej = 0.0;
            }
            for j in 0..i {
                f = d[j];
                v[ix(j, i)] = f;
                g = e[j] + v[ix(j, j)] * f;
                for k in j + 1..i {
                    g += v[ix(k, j)] * d[k];
                    e[k] += v[ix(k, j)] * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                f = d[j];
                g = e[j];
                for k in j..i {
                    v[ix(k, j)] -= f * e[k] + g * d[k];
                }
                d[j] = v[ix(i - 1, j)];
                v[ix(i, j)] = 0.0;
            }
        }
        d[i] = h;
    }
    // Accumulate the transformations (only needed for eigenvectors); the diagonal of the
    // tridiagonal form is left on the diagonal of `v`.
    if vectors {
        for i in 0..n.saturating_sub(1) {
            v[ix(n - 1, i)] = v[ix(i, i)];
            v[ix(i, i)] = 1.0;
            let h = d[i + 1];
            if h != 0.0 {
                for k in 0..=i {
                    d[k] = v[ix(k, i + 1)] / h;
                }
                for j in 0..=i {
                    let mut g = 0.0;
                    for k in 0..=i {
                        g += v[ix(k, i + 1)] * v[ix(k, j)];
                    }
                    for k in 0..=i {
                        v[ix(k, j)] -= g * d[k];
                    }
                }
            }
            for k in 0..=i {
                v[ix(k, i + 1)] = 0.0;
            }
        }
        for j in 0..n {
            d[j] = v[ix(n - 1, j)];
            v[ix(n - 1, j)] = 0.0;
        }
        v[ix(n - 1, n - 1)] = 1.0;
    } else {
        for j in 0..n {
            d[j] = v[ix(j, j)];
        }
    }
    e[0] = 0.0;
    // ---- tql2
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0;
    let mut tst1: f64 = 0.0;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            let mut iter = 0;
            loop {
                iter += 1;
                if iter > 200 {
                    return Err(Error::Numerical("eigen-decomposition: QL iteration did not converge".into()));
                }
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in d.iter_mut().skip(l + 2) {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let (mut c, mut c2, mut c3) = (1.0, 1.0, 1.0);
                let el1 = e[l + 1];
                let (mut s, mut s2) = (0.0, 0.0);
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    if vectors {
                        for k in 0..n {
                            let hk = v[ix(k, i + 1)];
                            v[ix(k, i + 1)] = s * v[ix(k, i)] + c * hk;
                            v[ix(k, i)] = c * v[ix(k, i)] - s * hk;
                        }
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    let vectors_row_major = if vectors {
        let mut t = vec![0f64; n * n];
        for r in 0..n {
            for c in 0..n {
                t[r * n + c] = v[ix(r, c)];
            }
        }
        t
    } else {
        Vec::new()
    };
    Ok((d, vectors_row_major))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn random_psd(n: usize, rank: usize, seed: u64) -> Vec<f64> {
        let mut rng = crate::util::rng(seed);
        let b: Vec<f64> = (0..n * rank).map(|_| rng.random::<f64>() - 0.5).collect();
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..rank).map(|k| b[i * rank + k] * b[j * rank + k]).sum();
            }
        }
        a
    }

    fn check_decomposition(a: &[f64], n: usize, vals: &[f64], vecs: &[f64]) {
        for i in 0..n {
            for j in 0..n {
                let r: f64 = (0..n).map(|k| vecs[i * n + k] * vals[k] * vecs[j * n + k]).sum();
                assert!((r - a[i * n + j]).abs() < 1e-10, "({i},{j}): {r} vs {}", a[i * n + j]);
            }
        }
    }

    #[test]
    fn both_solvers_reconstruct_and_agree() -> Result<()> {
        for (n, rank) in [(1, 1), (2, 2), (7, 7), (40, 40), (40, 12)] {
            let a = random_psd(n, rank, n as u64);
            let (vj, wj) = jacobi(&a, n, true)?;
            let (vt, wt) = tridiagonal_ql(&a, n, true)?;
            check_decomposition(&a, n, &vj, &wj);
            check_decomposition(&a, n, &vt, &wt);
            let (mut sj, mut st) = (vj.clone(), vt.clone());
            sj.sort_by(f64::total_cmp);
            st.sort_by(f64::total_cmp);
            for (x, y) in sj.iter().zip(&st) {
                assert!((x - y).abs() < 1e-10, "n={n}: {x} vs {y}");
            }
            let (vo, _) = tridiagonal_ql(&a, n, false)?;
            let mut so = vo.clone();
            so.sort_by(f64::total_cmp);
            assert!(so.iter().zip(&st).all(|(x, y)| (x - y).abs() < 1e-10));
        }
        assert!(sym_eigen(&[1.0, f64::NAN, 0.0, 1.0], 2, false).is_err());
        assert!(sym_eigen(&[1.0, 0.0, 0.0], 2, false).is_err());
        Ok(())
    }
}

/// Timing of the large-matrix solver; `TOKENAR_EIGEN_N=2048 cargo test --lib eigen_timing -- --ignored --nocapture`.
#[cfg(test)]
#[test]
#[ignore]
fn eigen_timing() -> Result<()> {
    let n: usize = std::env::var("TOKENAR_EIGEN_N").ok().and_then(|s| s.parse().ok()).unwrap_or(512);
    let mut rng = crate::util::rng(1);
    let b: Vec<f64> = (0..n * n).map(|_| rand::Rng::random::<f64>(&mut rng) - 0.5).collect();
    let a: Vec<f64> = (0..n * n).map(|k| b[k] + b[(k % n) * n + k / n]).collect();
    for vectors in [false, true] {
        let t = std::time::Instant::now();
        let (vals, _) = tridiagonal_ql(&a, n, vectors)?;
        eprintln!("n={n} vectors={vectors}: {:.2?} (trace {:.6})", t.elapsed(), vals.iter().sum::<f64>());
    }
    Ok(())
}
