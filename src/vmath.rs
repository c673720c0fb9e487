//! Elementwise math over slices, written so the compiler vectorises it: `exp` and the kernels
//! built on it (softmax rows, SwiGLU) for the fused CPU paths of the models.
//!
//! libm's `expf` is a scalar call per element; in a small model's attention softmax and SiLU it
//! was the largest cost after the matrix products. [`exp`] is the Cephes single-precision
//! algorithm (range reduction by ln 2, a degree-5 polynomial, the exponent built from integer
//! bits) with no branches or calls, so every loop over it vectorises: 4 lanes with the
//! baseline x86-64 instructions, 8 when the CPU has AVX2 and FMA (detected at run time; the
//! same code is compiled twice). Relative error about 2e-7 (a few ulp) on the whole range.

/// Above this `exp` overflows f32; inputs are clamped here (exp(88.3) ~ 2.2e38).
const EXP_HI: f32 = 88.3;
/// Below this `exp` is under the smallest normal f32; the result is 0.
const EXP_LO: f32 = -87.3;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two parts (Cephes): `C1` has few mantissa bits, so `n * C1` is exact.
const C1: f32 = 0.693_359_4;
const C2: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding and subtracting it rounds an f32 of magnitude < 2^22 to an integer.
const ROUND: f32 = 12_582_912.0;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    5.000_000_1e-1,
];

/// `e^x` for one value: no branches, so loops over it vectorise. `-inf` and anything below
/// -87.3 give 0, NaN gives NaN, values above 88.3 give exp(88.3).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(EXP_LO, EXP_HI);
    // n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2].
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let bits_n = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = xc - n * C1 - n * C2;
    let r2 = r * r;
    let mut p = P[0];
    for c in &P[1..] {
        p = p * r + c;
    }
    let y = p * r2 + r + 1.0;
    // 2^n from its exponent bits; n lies in [-126, 127].
    let scale = f32::from_bits(((bits_n + 127) as u32) << 23);
    let v = y * scale;
    let v = if x < EXP_LO { 0.0 } else { v };
    if x.is_nan() {
        x
    } else {
        v
    }
}

/// Run `f` compiled for AVX-512 when the CPU has it, else for AVX2 + FMA when it has them,
/// else for the baseline.
macro_rules! multiversion {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `avx512` was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

/// Softmax of one row in place, max-subtracted. `-inf` entries get 0; a row of only `-inf`
/// gives NaN (as the composed softmax).
pub fn softmax_in_place(row: &mut [f32]) {
    softmax_in_place_lse(row);
}

multiversion! {
    /// [`softmax_in_place`] that also returns the row's log-sum-exp (`max + ln(sum e^(x - max))`).
    pub fn softmax_in_place_lse(row: &mut [f32]) -> f32 {
        let m = max(row);
        for x in row.iter_mut() {
            *x = exp(*x - m);
        }
        let total = sum(row);
        let inv = 1.0 / total;
        for x in row.iter_mut() {
            *x *= inv;
        }
        m + total.ln()
    }
}

multiversion! {
    /// `y += a * x` (the few-rows matrix product's inner loop).
    pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y += a * x;
        }
    }
}

/// `sum(x[i] * y[i])` in eight lanes (vectorises without reassociation flags).
#[inline(always)]
fn dot_lanes(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: f32 = xc.remainder().iter().zip(yc.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in xc.zip(yc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out[r] = w . x[r * k..(r + 1) * k]` for `R` rows of `x` (`k = w.len()`), in `L` lanes per
/// row: the weight is read once for all rows.
#[inline(always)]
fn dots_fixed<const R: usize, const L: usize>(w: &[f32], x: &[f32], out: &mut [f32]) {
    let k = w.len();
    let x = &x[..R * k];
    let out = &mut out[..R];
    let mut acc = [[0f32; L]; R];
    let chunks = k / L;
    for c in 0..chunks {
        let base = c * L;
        for (r, a) in acc.iter_mut().enumerate() {
            for (l, al) in a.iter_mut().enumerate() {
                // SAFETY: base + l < chunks * L <= k = w.len(), and r * k + base + l < R * k =
                // x.len(): no bounds checks in the loop that must vectorise.
                unsafe { *al += *w.get_unchecked(base + l) * *x.get_unchecked(r * k + base + l) };
            }
        }
    }
    for (r, o) in out.iter_mut().enumerate() {
        let mut s = 0f32;
        for a in acc[r] {
            s += a;
        }
        for i in chunks * L..k {
            s += w[i] * x[r * k + i];
        }
        *o = s;
    }
}

multiversion! {
    /// `out[r] = w . x[r * k..(r + 1) * k]` for the `out.len()` (at most 4) rows of `x`,
    /// `k = w.len()`: one weight row against the few rows of a decoding step.
    pub fn dot_rows(w: &[f32], x: &[f32], out: &mut [f32]) {
        match out.len() {
            1 => dots_fixed::<1, 32>(w, x, out),
            2 => dots_fixed::<2, 32>(w, x, out),
            3 => dots_fixed::<3, 16>(w, x, out),
            4 => dots_fixed::<4, 16>(w, x, out),
            n => {
                let k = w.len();
                for (r, o) in out.iter_mut().enumerate().take(n) {
                    *o = dot_lanes(w, &x[r * k..(r + 1) * k]);
                }
            }
        }
    }
}

multiversion! {
    /// Sum of a slice, vectorised (the memory-bandwidth probe's read).
    pub fn sum_slice(xs: &[f32]) -> f32 {
        sum(xs)
    }
}

multiversion! {
    /// ggml Q8_0 blocks (an f16 scale, little-endian, then 32 i8 values; 34 bytes) to f32:
    /// `out` holds 32 values per block of `src`.
    pub fn dequantize_q8_0(src: &[u8], out: &mut [f32]) {
        for (b, o) in src.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
            let d = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            let qs = &b[2..34];
            for (v, &q) in o.iter_mut().zip(qs) {
                *v = (q as i8) as f32 * d;
            }
        }
    }
}

multiversion! {
    /// bf16 values (their bits) widened to f32: the bits shifted into the high half.
    pub fn widen_bf16(src: &[u16], out: &mut [f32]) {
        for (o, &b) in out.iter_mut().zip(src) {
            *o = f32::from_bits((b as u32) << 16);
        }
    }
}

multiversion! {
    /// `out[j] = sum_k w[k] * rows[k * stride + j]` for `j < out.len()`: a (1 x K) by (K x n)
    /// product with the K rows `stride` apart (one query against keys stored transposed), 64
    /// outputs at a time in registers.
    pub fn combine_rows(w: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
        const B: usize = 64;
        let n = out.len();
        let mut j0 = 0;
        while j0 + B <= n {
            let mut acc = [0f32; B];
            for (k, &wk) in w.iter().enumerate() {
                let row = &rows[k * stride + j0..][..B];
                for l in 0..B {
                    acc[l] += wk * row[l];
                }
            }
            out[j0..j0 + B].copy_from_slice(&acc);
            j0 += B;
        }
        let tail = &mut out[j0..];
        tail.fill(0.0);
        for (k, &wk) in w.iter().enumerate() {
            let row = &rows[k * stride + j0..k * stride + n];
            for (o, &x) in tail.iter_mut().zip(row) {
                *o += wk * x;
            }
        }
    }
}

multiversion! {
    /// `out[k] += x . rows[k * stride..k * stride + x.len()]` for `k < out.len()` (probabilities
    /// times values stored transposed).
    pub fn add_strided_dots(x: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
        let n = x.len();
        for (k, o) in out.iter_mut().enumerate() {
            *o += dot_lanes(x, &rows[k * stride..k * stride + n]);
        }
    }
}

/// SiLU, `x / (1 + e^-x)`, with [`exp`] (inlined into the kernels that use it).
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

multiversion! {
    /// `out[i] = a * scale + shift` with `a = x[i]`, passed through SiLU (`a / (1 + e^-a)`)
    /// when `activate` (a normalisation's affine step and its activation in one pass).
    pub fn affine_silu(x: &[f32], scale: f32, shift: f32, activate: bool, out: &mut [f32]) {
        if activate {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = silu(v * scale + shift);
            }
        } else {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v * scale + shift;
            }
        }
    }
}

multiversion! {
    /// Mean and (biased) variance of a slice, accumulated in f64 over `LANES` partial sums in
    /// two passes (the variance from deviations, not from the mean of squares).
    pub fn mean_var(xs: &[f32]) -> (f64, f64) {
        let n = xs.len().max(1) as f64;
        let chunks = xs.chunks_exact(LANES);
        let tail = chunks.remainder();
        let mut acc = [0f64; LANES];
        for c in chunks.clone() {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a += x as f64;
            }
        }
        let mean = (acc.iter().sum::<f64>() + tail.iter().map(|&x| x as f64).sum::<f64>()) / n;
        let mut acc = [0f64; LANES];
        for c in chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                let d = x as f64 - mean;
                *a += d * d;
            }
        }
        let var = (acc.iter().sum::<f64>() + tail.iter().map(|&x| (x as f64 - mean) * (x as f64 - mean)).sum::<f64>()) / n;
        (mean, var)
    }
}

multiversion! {
    /// SwiGLU: `out[i] = silu(gate[i]) * up[i]`, `silu(g) = g / (1 + e^-g)`.
    pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = silu(g) * u;
        }
    }
}

multiversion! {
    /// `log(sum(e^x))` of a row, max-subtracted (`-inf` for an empty or all-`-inf` row is NaN,
    /// as in the composed op).
    pub fn log_sum_exp(row: &[f32]) -> f32 {
        let m = max(row);
        m + sum_of(row, |x| exp(x - m)).ln()
    }
}

multiversion! {
    /// `out[i] = e^(x[i] - shift) * scale` (softmax rows from a known log-sum-exp).
    pub fn exp_shifted_scaled(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = exp(v - shift) * scale;
        }
    }
}

multiversion! {
    /// Gradients of [`swiglu`] from the output gradient `dout`, with `s = sigmoid(gate)`:
    /// `dgate = dout * up * s * (1 + gate * (1 - s))`, `dup = dout * gate * s`.
    pub fn swiglu_grad(gate: &[f32], up: &[f32], dout: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
        let n = gate.len();
        let (up, dout, dgate, dup) = (&up[..n], &dout[..n], &mut dgate[..n], &mut dup[..n]);
        for i in 0..n {
            let g = gate[i];
            let s = 1.0 / (1.0 + exp(-g));
            let gs = g * s;
            dgate[i] = dout[i] * up[i] * (s + gs * (1.0 - s));
            dup[i] = dout[i] * gs;
        }
    }
}

/// Lanes of the partial sums and maxima (a whole AVX2 register).
const LANES: usize = 8;

/// Maximum of a slice (`-inf` when empty; NaN entries are ignored, as `f32::max` does).
#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    tail.iter().copied().fold(m, f32::max)
}

/// Sum of a slice with `LANES` partial sums (vectorises; the order differs from a serial sum
/// by rounding only).
#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    sum_of(xs, |x| x)
}

/// `sum(f(x))` over a slice, as [`sum`].
#[inline(always)]
fn sum_of(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|&x| f(x)).sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: f32, b: f32) -> f32 {
        ((a - b) / b).abs()
    }

    #[test]
    fn exp_matches_libm_over_the_range() {
        let mut worst = 0f32;
        let mut xs: Vec<f32> = (0..=200_000).map(|i| -87.0 + i as f32 * (175.0 / 200_000.0)).collect();
        xs.extend([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, std::f32::consts::LN_2]);
        let mut ys = vec![0f32; xs.len()];
        exp_shifted_scaled(&xs, 0.0, 1.0, &mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            worst = worst.max(rel(y, x.exp()));
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn exp_edges() {
        let x = [f32::NEG_INFINITY, -1000.0, -87.5, f32::NAN, 100.0, f32::INFINITY];
        let mut xs = [0f32; 6];
        exp_shifted_scaled(&x, 0.0, 1.0, &mut xs);
        assert_eq!(&xs[..3], &[0.0, 0.0, 0.0]);
        assert!(xs[3].is_nan());
        assert!(xs[4].is_finite() && xs[4] > 1e38, "{}", xs[4]);
        assert!(xs[5].is_finite() && xs[5] > 1e38, "{}", xs[5]);
    }

    #[test]
    fn strided_row_products() {
        // Lengths around the 64-wide blocks and the 8 lanes; rows `stride` apart with junk
        // between them that must not be read into the result.
        let (k, stride) = (5usize, 150usize);
        let rows: Vec<f32> = (0..k * stride).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let w: Vec<f32> = (0..k).map(|i| i as f32 * 0.5 - 1.0).collect();
        for n in [1usize, 7, 8, 63, 64, 65, 130] {
            let mut out = vec![f32::NAN; n];
            combine_rows(&w, &rows, stride, &mut out);
            for (j, &o) in out.iter().enumerate() {
                let want: f32 = (0..k).map(|kk| w[kk] * rows[kk * stride + j]).sum();
                assert!((o - want).abs() < 1e-4, "combine_rows n {n} j {j}: {o} vs {want}");
            }
            let x: Vec<f32> = (0..n).map(|j| (j as f32 * 0.1).sin()).collect();
            let mut acc = vec![1.0f32; k];
            add_strided_dots(&x, &rows, stride, &mut acc);
            for (kk, &a) in acc.iter().enumerate() {
                let want: f32 = 1.0 + (0..n).map(|j| x[j] * rows[kk * stride + j]).sum::<f32>();
                assert!((a - want).abs() < 1e-4, "add_strided_dots n {n} row {kk}: {a} vs {want}");
            }
        }
    }

    #[test]
    fn softmax_rows() {
        // Every length around the lane count, with masked entries.
        for n in 1..20 {
            let mut row: Vec<f32> = (0..n).map(|i| ((i * 7 % 5) as f32 - 2.0) * 1.3).collect();
            if n > 2 {
                row[1] = f32::NEG_INFINITY;
            }
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = row.iter().map(|&x| ((x - m) as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            let mut got = row.clone();
            softmax_in_place(&mut got);
            for (g, w) in got.iter().zip(&e) {
                assert!((*g as f64 - w / s).abs() < 1e-6, "n {n}: {got:?}");
            }
            if n > 2 {
                assert_eq!(got[1], 0.0);
            }
        }
        let mut dead = vec![f32::NEG_INFINITY; 3];
        softmax_in_place(&mut dead);
        assert!(dead.iter().all(|x| x.is_nan()));
    }

    #[test]
    fn log_sum_exp_and_shifted_exp() {
        for n in [1usize, 7, 8, 9, 33] {
            let row: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let want = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            let got = log_sum_exp(&row);
            assert!((got as f64 - want).abs() < 1e-5, "n {n}: {got} vs {want}");
            let mut p = vec![0f32; n];
            exp_shifted_scaled(&row, got, 2.0, &mut p);
            let total: f32 = p.iter().sum();
            assert!((total - 2.0).abs() < 1e-5, "n {n}: {total}");
        }
    }

    #[test]
    fn swiglu_grad_matches_finite_differences() {
        let g = [-3.0f32, -0.5, 0.0, 0.7, 4.0, 1.5, -1.2, 2.2, 0.3];
        let u = [2.0f32, 1.0, 5.0, -1.0, 0.5, 3.0, 2.0, -0.7, 1.1];
        let d = [1.0f32, -2.0, 0.5, 1.5, 1.0, 0.25, -1.0, 2.0, 0.8];
        let (mut dg, mut du) = ([0f32; 9], [0f32; 9]);
        swiglu_grad(&g, &u, &d, &mut dg, &mut du);
        let f = |g: f64, u: f64| g / (1.0 + (-g).exp()) * u;
        let h = 1e-4;
        for i in 0..9 {
            let (gi, ui, di) = (g[i] as f64, u[i] as f64, d[i] as f64);
            let want_g = di * (f(gi + h, ui) - f(gi - h, ui)) / (2.0 * h);
            let want_u = di * (f(gi, ui + h) - f(gi, ui - h)) / (2.0 * h);
            assert!((dg[i] as f64 - want_g).abs() < 1e-4, "{i}: dgate {} vs {want_g}", dg[i]);
            assert!((du[i] as f64 - want_u).abs() < 1e-4, "{i}: dup {} vs {want_u}", du[i]);
        }
    }

    #[test]
    fn affine_silu_and_mean_var() {
        for n in [1usize, 7, 8, 9, 100] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin() * 5.0 + 3.0).collect();
            for silu in [false, true] {
                let mut out = vec![0f32; n];
                affine_silu(&x, 1.5, -0.25, silu, &mut out);
                for (o, &v) in out.iter().zip(&x) {
                    let a = v as f64 * 1.5 - 0.25;
                    let want = if silu { a / (1.0 + (-a).exp()) } else { a };
                    assert!((*o as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "n {n} silu {silu}: {o} vs {want}");
                }
            }
            let (m, v) = mean_var(&x);
            let wm = x.iter().map(|&a| a as f64).sum::<f64>() / n as f64;
            let wv = x.iter().map(|&a| (a as f64 - wm).powi(2)).sum::<f64>() / n as f64;
            assert!((m - wm).abs() < 1e-12 && (v - wv).abs() < 1e-9, "n {n}: ({m}, {v}) vs ({wm}, {wv})");
        }
    }

    #[test]
    fn swiglu_values() {
        let g = [-3.0f32, -0.5, 0.0, 0.7, 4.0, -100.0, 100.0];
        let u = [2.0f32, 1.0, 5.0, -1.0, 0.5, 3.0, 2.0];
        let mut out = [0f32; 7];
        swiglu(&g, &u, &mut out);
        for i in 0..7 {
            let want = g[i] as f64 / (1.0 + (-g[i] as f64).exp()) * u[i] as f64;
            assert!((out[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "{i}: {} vs {want}", out[i]);
        }
    }
}
