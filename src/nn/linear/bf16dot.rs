//! Products of many f32 rows with bf16 or Q8_0 weights in bf16 arithmetic, on CPUs with
//! AVX-512 BF16 (`vdpbf16ps`: 32 bf16 products summed into 16 f32 lanes per instruction,
//! twice the multiply-adds of an f32 FMA).
//!
//! A prefill or verification pass multiplies hundreds of rows by every weight: there the
//! kernels decide, not the memory. Widening a reduced weight to f32 for gemm (the portable
//! path) runs at f32's rate and pays the widening; here the weight stays 16-bit. Each job
//! takes a panel of [`PANEL`] output rows, repacks it once as bf16 pairs (for Q8_0: each block
//! dequantized and rounded to bf16), then runs every tile of [`TILE_ROWS`] input rows against
//! it: the panel (`PANEL` x in x 2 bytes, 320 KiB for GPT-XL's widest input) stays in L2 while
//! the rows stream past. The rows are rounded to bf16 once per product.
//!
//! Rounding: a bf16 weight is used exactly; a Q8_0 weight's values (8-bit integer times f16
//! scale) lose their bits below bf16's 8-bit mantissa (relative error at most 2^-9, finer
//! than the 8-bit step itself); each input value is rounded to bf16 (relative 2^-9, where
//! the few-row Q8_0 path rounds it to one of 255 steps of its block's range). Products and
//! sums are f32.

use rayon::prelude::*;

/// Output rows per panel (two 16-lane registers).
pub const PANEL: usize = 32;
/// Input rows per tile of the kernel (16 accumulators).
pub const TILE_ROWS: usize = 8;

/// Whether this CPU runs the kernel (x86-64 with AVX-512 F, BW and BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The weight a product reads, `(dout, din)` row-major.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// bf16 values (their bits).
    Bf16(&'a [u16]),
    /// ggml Q8_0 blocks (an f16 scale, then 32 i8 values; 34 bytes per 32 values).
    Q8_0(&'a [u8]),
}

/// f32 to bf16 bits, rounded to nearest even (NaN kept a NaN).
pub fn to_bf16(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

/// `x (n, din) @ w^T` for a `(dout, din)` weight, f32 in and out; `din` even (a multiple of
/// 32 for Q8_0). An error where the CPU lacks the instructions ([`available`]) or the shapes
/// do not agree.
pub fn product(x: &[f32], n: usize, w: Source, dout: usize, din: usize) -> candle_core::Result<Vec<f32>> {
    if !available() {
        candle_core::bail!("bf16 product: this CPU has no AVX-512 BF16");
    }
    let ok = match w {
        Source::Bf16(v) => v.len() == dout * din,
        Source::Q8_0(b) => din % 32 == 0 && b.len() == dout * (din / 32) * 34,
    };
    if !ok || din % 2 != 0 || x.len() < n * din {
        candle_core::bail!("bf16 product: {n} rows of {din} values against a ({dout}, {din}) weight of another size");
    }
    let mut y = vec![0f32; n * dout];
    if n == 0 || dout == 0 {
        return Ok(y);
    }
    // The rows as bf16 pairs, padded with zero rows to whole tiles.
    let tiles = n.div_ceil(TILE_ROWS);
    let half = din / 2;
    let mut xp = vec![0u32; tiles * TILE_ROWS * half];
    xp[..n * half].par_chunks_mut(half).zip(x[..n * din].par_chunks(din)).for_each(|(dst, src)| pack_row(src, dst));
    let out = SharedOut(y.as_mut_ptr());
    let panels = dout.div_ceil(PANEL);
    (0..panels).into_par_iter().for_each_init(
        || (vec![0u32; half * PANEL], vec![0f32; din + half]),
        |(panel, scratch), p| {
            let o0 = p * PANEL;
            let rows = PANEL.min(dout - o0);
            pack_panel(w, o0, rows, din, panel, scratch);
            let mut tile = [0f32; TILE_ROWS * PANEL];
            for t in 0..tiles {
                let xs = &xp[t * TILE_ROWS * half..(t + 1) * TILE_ROWS * half];
                // SAFETY: available() was checked; the panel holds half pairs of PANEL
                // outputs and the tile TILE_ROWS rows of half pairs.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    kernel::tile(xs, panel, half, &mut tile)
                };
                for r in 0..TILE_ROWS.min(n - t * TILE_ROWS) {
                    let row = t * TILE_ROWS + r;
                    // SAFETY: this job alone writes outputs o0..o0 + rows of every row (the
                    // panels are disjoint), inside y's n x dout values.
                    unsafe { std::ptr::copy_nonoverlapping(tile[r * PANEL..].as_ptr(), out.at(row * dout + o0), rows) };
                }
            }
        },
    );
    Ok(y)
}

/// y's buffer, written by the panel jobs at disjoint places.
struct SharedOut(*mut f32);
// SAFETY: every job writes its own outputs (see `product`).
unsafe impl Sync for SharedOut {}
impl SharedOut {
    fn at(&self, i: usize) -> *mut f32 {
        // SAFETY (of the caller's write): i is inside the buffer.
        unsafe { self.0.add(i) }
    }
}

/// One f32 row as bf16 pairs: element k of `dst` holds values 2k (low half) and 2k + 1.
fn pack_row(src: &[f32], dst: &mut [u32]) {
    let whole = src.len() / 32 * 32;
    // SAFETY: `product` checked available(); whole values of src and whole / 2 of dst.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        kernel::to_pairs(&src[..whole], &mut dst[..whole / 2])
    };
    #[cfg(not(target_arch = "x86_64"))]
    let whole = 0;
    for (d, pair) in dst[whole / 2..].iter_mut().zip(src[whole..].chunks_exact(2)) {
        *d = to_bf16(pair[0]) as u32 | (to_bf16(pair[1]) as u32) << 16;
    }
}

/// Output rows `o0..o0 + rows` of the weight as the kernel reads them: for each pair of
/// inputs k, the pair of every output row (PANEL lanes, rows past `rows` zero).
fn pack_panel(w: Source, o0: usize, rows: usize, din: usize, panel: &mut [u32], scratch: &mut [f32]) {
    let half = din / 2;
    if rows < PANEL {
        panel.fill(0);
    }
    for j in 0..rows {
        let o = o0 + j;
        match w {
            Source::Bf16(v) => {
                let src = &v[o * din..(o + 1) * din];
                for (k, pair) in src.chunks_exact(2).enumerate() {
                    panel[k * PANEL + j] = pair[0] as u32 | (pair[1] as u32) << 16;
                }
            }
            Source::Q8_0(b) => {
                let row_bytes = din / 32 * 34;
                let (wide, pairs) = scratch.split_at_mut(din);
                crate::vmath::dequantize_q8_0(&b[o * row_bytes..(o + 1) * row_bytes], wide);
                // SAFETY: f32 and u32 have one size and alignment; every bit pattern is valid.
                let pairs: &mut [u32] = unsafe { std::slice::from_raw_parts_mut(pairs.as_mut_ptr() as *mut u32, half) };
                pack_row(wide, pairs);
                for (k, &pair) in pairs.iter().enumerate() {
                    panel[k * PANEL + j] = pair;
                }
            }
        }
    }
    debug_assert_eq!(panel.len(), half * PANEL);
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{PANEL, TILE_ROWS};
    use std::arch::x86_64::*;

    /// 32 f32 values at a time to 16 bf16 pairs (rounded to nearest even), `dst.len()` =
    /// `src.len() / 2`, a multiple of 16.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn to_pairs(src: &[f32], dst: &mut [u32]) {
        debug_assert!(src.len() % 32 == 0 && dst.len() * 2 == src.len());
        for (s, d) in src.chunks_exact(32).zip(dst.chunks_exact_mut(16)) {
            let lo = _mm512_loadu_ps(s.as_ptr());
            let hi = _mm512_loadu_ps(s.as_ptr().add(16));
            // Lanes 0-15 from the second operand: values 0-15 first, in order.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(d.as_mut_ptr() as *mut __m512i, v);
        }
    }

    /// `tile[r * PANEL + c] = sum_k x_r[k] w_c[k]` for the TILE_ROWS rows of `xs` (each `half`
    /// bf16 pairs) against the packed panel (`half` groups of PANEL pairs).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BF16; `xs` holds TILE_ROWS x half pairs, `panel` half x
    /// PANEL.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn tile(xs: &[u32], panel: &[u32], half: usize, tile: &mut [f32; TILE_ROWS * PANEL]) {
        debug_assert!(xs.len() >= TILE_ROWS * half && panel.len() >= half * PANEL);
        let mut acc = [[_mm512_setzero_ps(); 2]; TILE_ROWS];
        let wp = panel.as_ptr();
        let xp = xs.as_ptr();
        for k in 0..half {
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(wp.add(k * PANEL) as *const __m512i));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(wp.add(k * PANEL + 16) as *const __m512i));
            for r in 0..TILE_ROWS {
                let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(*xp.add(r * half + k) as i32));
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xv, w0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xv, w1);
            }
        }
        for r in 0..TILE_ROWS {
            _mm512_storeu_ps(tile.as_mut_ptr().add(r * PANEL), acc[r][0]);
            _mm512_storeu_ps(tile.as_mut_ptr().add(r * PANEL + 16), acc[r][1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::util::rng(seed);
        (0..n).map(|_| crate::model::load::normal(&mut rng)).collect()
    }

    fn bf16s(v: &[f32]) -> Vec<u16> {
        v.iter().map(|&x| to_bf16(x)).collect()
    }

    fn widen(v: u16) -> f64 {
        f32::from_bits((v as u32) << 16) as f64
    }

    /// The product of the rows rounded to bf16 and the weight as given (f64 sums).
    fn rounded_reference(x: &[f32], n: usize, w: &[u16], dout: usize, din: usize) -> Vec<f64> {
        let xb = bf16s(&x[..n * din]);
        let mut y = vec![0f64; n * dout];
        for r in 0..n {
            for o in 0..dout {
                y[r * dout + o] = (0..din).map(|k| widen(xb[r * din + k]) * widen(w[o * din + k])).sum();
            }
        }
        y
    }

    fn max_err(got: &[f32], want: &[f64]) -> (f64, f64) {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        (got.iter().zip(want).fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs())), scale)
    }

    /// bf16 weights: the kernel computes the product of the bf16-rounded rows and the weight
    /// exactly up to f32 summation (rows 1 to 19, outputs on and off the panel width, odd
    /// pair counts).
    #[test]
    fn bf16_product_is_the_rounded_rows_times_the_weight() {
        if !available() {
            eprintln!("no AVX-512 BF16 on this CPU: the kernel is not run");
            return;
        }
        for (dout, din) in [(1, 2), (33, 6), (70, 130), (64, 1280)] {
            let w = bf16s(&values(dout * din, (dout + din) as u64));
            for n in [1, 7, 8, 9, 19] {
                let x = values(n * din, n as u64 + 100);
                let got = product(&x, n, Source::Bf16(&w), dout, din).expect("product");
                let (e, scale) = max_err(&got, &rounded_reference(&x, n, &w, dout, din));
                assert!(e <= 2e-6 * scale.max(1.0) * (din as f64).sqrt(), "{n} x ({dout}, {din}): error {e} of {scale}");
            }
        }
    }

    /// The vector conversion rounds as `half` does (to nearest, ties to even) for normal
    /// values, the ties themselves included, whole vectors and the scalar tail alike.
    #[test]
    fn rows_round_to_bf16_like_half() {
        if !available() {
            return;
        }
        let mut x = values(70, 3);
        // Exact ties (the low 16 bits 0x8000) below and above an even mantissa, and large values.
        x[0] = f32::from_bits(0x3f80_8000);
        x[1] = f32::from_bits(0x3f81_8000);
        x[33] = -f32::from_bits(0x4049_8000);
        x[40] = 3.0e38;
        x[69] = -1.0e-30;
        let mut got = vec![0u32; 35];
        pack_row(&x, &mut got);
        for (k, &p) in got.iter().enumerate() {
            assert_eq!((p & 0xffff) as u16, to_bf16(x[2 * k]), "value {}", 2 * k);
            assert_eq!((p >> 16) as u16, to_bf16(x[2 * k + 1]), "value {}", 2 * k + 1);
        }
    }

    /// Q8_0 weights: the product equals the rounded rows times the weight's values rounded to
    /// bf16 (what the panel holds).
    #[test]
    fn q8_0_product_is_the_rounded_rows_times_the_rounded_weight() {
        if !available() {
            return;
        }
        use candle_core::quantized::{GgmlDType, QTensor};
        let (dout, din) = (45, 96);
        let w = candle_core::Tensor::from_vec(values(dout * din, 5), (dout, din), &candle_core::Device::Cpu).expect("w");
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize");
        let deq = q.dequantize(&candle_core::Device::Cpu).expect("deq").flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
        let data = q.data().expect("data").into_owned();
        for n in [1, 8, 13] {
            let x = values(n * din, 50 + n as u64);
            let got = product(&x, n, Source::Q8_0(&data), dout, din).expect("product");
            let (e, scale) = max_err(&got, &rounded_reference(&x, n, &bf16s(&deq), dout, din));
            assert!(e <= 2e-6 * scale.max(1.0) * (din as f64).sqrt(), "{n} rows: error {e} of {scale}");
        }
    }

    /// Bad shapes are errors that name them.
    #[test]
    fn mismatched_shapes_are_errors() {
        if !available() {
            return;
        }
        let w = vec![0u16; 4 * 6];
        let e = product(&[0.0; 12], 2, Source::Bf16(&w), 5, 6).unwrap_err().to_string();
        assert!(e.contains("(5, 6)"), "{e}");
        assert!(product(&[0.0; 10], 2, Source::Bf16(&w), 4, 6).is_err());
        assert!(product(&[0.0; 64], 2, Source::Q8_0(&[0u8; 34]), 2, 32).is_err());
    }
}
