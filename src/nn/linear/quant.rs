//! Products of a few f32 rows with quantized weights, in integer arithmetic.
//!
//! A decoding step multiplies one or two rows (the guidance pair) by every weight: it should
//! be bound by reading the weights. Widening each 8-bit weight to f32 before a float dot
//! product (what the first Q8_0 path did) made it bound by the unpacking instead: about four
//! instructions per weight and row. Here, as in ggml, the rows are quantized once per product
//! to the weight's block format (Q8_0: 32 values of i8 and a scale per block; Q8_K for the
//! k-quants) and each block's dot product is an integer one: with AVX-512 VNNI, `vpdpbusd`
//! multiplies and adds 64 pairs of 8-bit values per instruction, two Q8_0 blocks at a time.
//! CPUs without it use candle's block dot products (AVX2 or portable code).
//!
//! The weight is read once for all rows, in parallel blocks of output rows on rayon's pool
//! (the pool every other kernel runs on; candle's own quantized matmul spins a pool of its
//! own, and on x86 keeps a repacked second copy of every weight).

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ8K, BlockQ8_0, GgmlType};
use rayon::prelude::*;

/// Values per Q8_0 block, and bytes per block (an f16 scale, then 32 i8).
pub(super) const Q8_BLOCK: usize = 32;
pub(super) const Q8_BLOCK_BYTES: usize = 34;
/// Values per k-quant super-block (Q4_K, Q8_K).
pub(super) const QK_K: usize = 256;

/// Output rows per parallel job.
const OUTPUT_BLOCK: usize = 64;
/// Weights from this many bytes on are split across threads.
const PARALLEL_MIN_BYTES: usize = 1 << 15;

/// Rows of activations quantized to Q8_0 for the VNNI kernel: each row's i8 values
/// contiguous, and per block its scale repeated 8 times (one 512-bit register holds the
/// scales of two blocks, lane by lane against `vpdpbusd`'s 16 partial sums).
struct Q8Rows {
    q: Vec<i8>,
    d: Vec<f32>,
    din: usize,
}

impl Q8Rows {
    fn new(x: &[f32], n: usize, din: usize) -> Self {
        let nb = din / Q8_BLOCK;
        let mut q = vec![0i8; n * din];
        let mut d = vec![0f32; n * nb * 8];
        for ((xb, qb), db) in x[..n * din].chunks_exact(Q8_BLOCK).zip(q.chunks_exact_mut(Q8_BLOCK)).zip(d.chunks_exact_mut(8)) {
            let scale = quantize_block(xb, qb);
            db.fill(scale);
        }
        Self { q, d, din }
    }

    fn row(&self, r: usize) -> (&[i8], &[f32]) {
        let nb = self.din / Q8_BLOCK;
        (&self.q[r * self.din..(r + 1) * self.din], &self.d[r * nb * 8..(r + 1) * nb * 8])
    }
}

/// One block of f32 to i8 values and their scale (ggml's Q8_0: the largest magnitude maps
/// to 127, values rounded to nearest).
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (v * id).round() as i8;
    }
    // The scale as the weight's block format stores it (f16), so that both paths agree.
    half::f16::from_f32(d).to_f32()
}

/// Whether the CPU runs the VNNI kernel.
pub fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which kernel a product runs (a parameter so that tests cover both on a VNNI machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 VNNI (only where [`has_vnni`]).
    Vnni,
    /// candle's block dot products.
    Blocks,
}

impl Kernel {
    pub fn best() -> Self {
        if has_vnni() {
            Self::Vnni
        } else {
            Self::Blocks
        }
    }
}

/// The weight's bytes as blocks of `T` (candle's storage is a `Vec<T>`, so they are aligned;
/// checked all the same).
fn as_blocks<T>(bytes: &[u8]) -> candle_core::Result<&[T]> {
    let size = std::mem::size_of::<T>();
    if bytes.len() % size != 0 || (bytes.as_ptr() as usize) % std::mem::align_of::<T>() != 0 {
        candle_core::bail!("quantized weight: {} bytes are not whole aligned blocks of {size}", bytes.len());
    }
    // SAFETY: the length and alignment were checked; the block types are plain old data
    // (`repr(C)` integers and f16), valid for any bits.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) })
}

/// Run `job(first_output_row, outputs)` over `yt` (the transposed result, `n` values per
/// output row) in blocks of [`OUTPUT_BLOCK`] output rows, in parallel for large weights.
fn for_output_blocks(yt: &mut [f32], n: usize, weight_bytes: usize, job: impl Fn(usize, &mut [f32]) + Sync) {
    if rayon::current_num_threads() > 1 && weight_bytes >= PARALLEL_MIN_BYTES {
        yt.par_chunks_mut(OUTPUT_BLOCK * n).enumerate().for_each(|(b, out)| job(b * OUTPUT_BLOCK, out));
    } else {
        yt.chunks_mut(OUTPUT_BLOCK * n).enumerate().for_each(|(b, out)| job(b * OUTPUT_BLOCK, out));
    }
}

/// `(out, n)` transposed back to `(n, out)`.
fn untranspose(yt: Vec<f32>, n: usize, dout: usize) -> Vec<f32> {
    if n == 1 {
        return yt;
    }
    let mut y = vec![0f32; n * dout];
    for (o, v) in yt.chunks_exact(n).enumerate() {
        for (r, &val) in v.iter().enumerate() {
            y[r * dout + o] = val;
        }
    }
    y
}

/// `x (n, din) @ w^T` for a Q8_0 weight `(dout, din)` given as its blocks' bytes; `n` at most
/// 4, `din` a multiple of 32.
pub fn q8_0_rows(x: &[f32], n: usize, w: &[u8], dout: usize, din: usize, kernel: Kernel) -> candle_core::Result<Vec<f32>> {
    let row_bytes = din / Q8_BLOCK * Q8_BLOCK_BYTES;
    if n == 0 || n > 4 || din % Q8_BLOCK != 0 || x.len() < n * din || w.len() != dout * row_bytes {
        candle_core::bail!("q8_0 product: {n} rows of {din} against {} bytes for {dout} outputs", w.len());
    }
    let mut yt = vec![0f32; dout * n];
    match kernel {
        Kernel::Vnni if has_vnni() => {
            let xq = Q8Rows::new(x, n, din);
            for_output_blocks(&mut yt, n, w.len(), |o0, out| {
                for (j, dst) in out.chunks_exact_mut(n).enumerate() {
                    let row = &w[(o0 + j) * row_bytes..(o0 + j + 1) * row_bytes];
                    // SAFETY: the CPU has the features (has_vnni); the row holds din / 32
                    // blocks and every x row din values (checked above).
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        vnni::dot_rows(row, &xq, dst)
                    };
                }
            });
        }
        _ => {
            let blocks: &[BlockQ8_0] = as_blocks(w)?;
            let nb = din / Q8_BLOCK;
            let mut xb = vec![BlockQ8_0::zeros(); n * nb];
            for (r, dst) in xb.chunks_exact_mut(nb).enumerate() {
                BlockQ8_0::from_float(&x[r * din..(r + 1) * din], dst);
            }
            for_output_blocks(&mut yt, n, w.len(), |o0, out| {
                for (j, dst) in out.chunks_exact_mut(n).enumerate() {
                    let row = &blocks[(o0 + j) * nb..(o0 + j + 1) * nb];
                    for (r, d) in dst.iter_mut().enumerate() {
                        *d = BlockQ8_0::vec_dot(din, row, &xb[r * nb..(r + 1) * nb]);
                    }
                }
            });
        }
    }
    Ok(untranspose(yt, n, dout))
}

/// `x (n, din) @ w^T` for a Q4_K weight `(dout, din)` given as its blocks' bytes (`din` a
/// multiple of 256): the rows quantized to Q8_K, candle's Q4_K x Q8_K block dot products.
pub fn q4k_rows(x: &[f32], n: usize, w: &[u8], dout: usize, din: usize) -> candle_core::Result<Vec<f32>> {
    let nb = din / QK_K;
    if n == 0 || din % QK_K != 0 || x.len() < n * din || w.len() != dout * nb * std::mem::size_of::<BlockQ4K>() {
        candle_core::bail!("q4_k product: {n} rows of {din} against {} bytes for {dout} outputs", w.len());
    }
    let blocks: &[BlockQ4K] = as_blocks(w)?;
    let mut xb = vec![BlockQ8K::zeros(); n * nb];
    for (r, dst) in xb.chunks_exact_mut(nb).enumerate() {
        BlockQ8K::from_float(&x[r * din..(r + 1) * din], dst);
    }
    let mut yt = vec![0f32; dout * n];
    for_output_blocks(&mut yt, n, w.len(), |o0, out| {
        for (j, dst) in out.chunks_exact_mut(n).enumerate() {
            let row = &blocks[(o0 + j) * nb..(o0 + j + 1) * nb];
            for (r, d) in dst.iter_mut().enumerate() {
                *d = BlockQ4K::vec_dot(din, row, &xb[r * nb..(r + 1) * nb]);
            }
        }
    });
    Ok(untranspose(yt, n, dout))
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Q8Rows, Q8_BLOCK, Q8_BLOCK_BYTES};
    use std::arch::x86_64::*;

    /// `out[r] = w . x_r` for one Q8_0 weight row against every row of `x` (1 to 4).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI; `w` holds `x.din / 32` blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows(w: &[u8], x: &Q8Rows, out: &mut [f32]) {
        match out.len() {
            1 => dot_fixed::<1>(w, x, out),
            2 => dot_fixed::<2>(w, x, out),
            3 => dot_fixed::<3>(w, x, out),
            _ => dot_fixed::<4>(w, x, out),
        }
    }

    /// An f16 scale at `p` (little-endian bits) as f32.
    #[inline(always)]
    unsafe fn scale(p: *const u8) -> f32 {
        half::f16::from_bits(u16::from_le_bytes([*p, *p.add(1)])).to_f32()
    }

    #[inline(always)]
    unsafe fn dot_fixed<const R: usize>(w: &[u8], x: &Q8Rows, out: &mut [f32]) {
        let nb = x.din / Q8_BLOCK;
        debug_assert_eq!(w.len(), nb * Q8_BLOCK_BYTES);
        let rows: [(&[i8], &[f32]); R] = std::array::from_fn(|r| x.row(r));
        let mut acc = [_mm512_setzero_ps(); R];
        let zero = _mm512_setzero_si512();
        let wp = w.as_ptr();
        let pairs = nb / 2;
        for p in 0..pairs {
            let b0 = wp.add(2 * p * Q8_BLOCK_BYTES);
            let b1 = b0.add(Q8_BLOCK_BYTES);
            // Two blocks' 64 values in one register, their scales lane by lane.
            let lo = _mm256_loadu_si256(b0.add(2) as *const __m256i);
            let hi = _mm256_loadu_si256(b1.add(2) as *const __m256i);
            let wv = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            // vpdpbusd multiplies unsigned by signed bytes: |w| against x with w's sign.
            let wabs = _mm512_abs_epi8(wv);
            let neg = _mm512_movepi8_mask(wv);
            let dw = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(scale(b0)), _mm512_set1_ps(scale(b1)));
            for r in 0..R {
                let (xq, xd) = rows[r];
                let xv = _mm512_loadu_si512(xq.as_ptr().add(p * 64) as *const __m512i);
                let xs = _mm512_mask_sub_epi8(xv, neg, zero, xv);
                let dot = _mm512_dpbusd_epi32(zero, wabs, xs);
                let dx = _mm512_loadu_ps(xd.as_ptr().add(p * 16));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, dx), acc[r]);
            }
        }
        for r in 0..R {
            let mut s = _mm512_reduce_add_ps(acc[r]);
            if nb % 2 == 1 {
                // The last block of an odd count.
                let b = nb - 1;
                let blk = wp.add(b * Q8_BLOCK_BYTES);
                let (xq, xd) = rows[r];
                let mut isum = 0i32;
                for i in 0..Q8_BLOCK {
                    isum += (*blk.add(2 + i) as i8) as i32 * xq[b * Q8_BLOCK + i] as i32;
                }
                s += isum as f32 * scale(blk) * xd[b * 8];
            }
            out[r] = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::util::rng(seed);
        (0..n).map(|_| crate::model::load::normal(&mut rng)).collect()
    }

    /// The reference: the weight dequantized, a plain f64 product.
    fn reference(x: &[f32], n: usize, w: &[f32], dout: usize, din: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * dout];
        for r in 0..n {
            for o in 0..dout {
                y[r * dout + o] = (0..din).map(|k| x[r * din + k] as f64 * w[o * din + k] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    /// Largest error relative to the largest reference magnitude.
    fn rel_err(got: &[f32], want: &[f32]) -> f32 {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
    }

    fn quantized(dout: usize, din: usize, dtype: GgmlDType, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let w = Tensor::from_vec(values(dout * din, seed), (dout, din), &Device::Cpu).expect("w");
        let q = QTensor::quantize(&w, dtype).expect("quantize");
        let deq = q.dequantize(&Device::Cpu).expect("deq").flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
        (q.data().expect("data").into_owned(), deq)
    }

    /// Both kernels against the dequantized weight in f64, for 1 to 4 rows, even and odd
    /// block counts, output counts on and off the parallel block size: the only error left
    /// is the rows' own 8-bit rounding (about 1% of the outputs' range at most).
    #[test]
    fn q8_0_rows_match_the_dequantized_product() {
        for (dout, din) in [(70, 64), (130, 96), (3, 32), (600, 1280)] {
            let (w, deq) = quantized(dout, din, GgmlDType::Q8_0, (dout * din) as u64);
            for n in 1..=4 {
                let x = values(n * din, n as u64);
                let want = reference(&x, n, &deq, dout, din);
                let mut kernels = vec![Kernel::Blocks];
                if has_vnni() {
                    kernels.push(Kernel::Vnni);
                }
                for k in kernels {
                    let got = q8_0_rows(&x, n, &w, dout, din, k).expect("product");
                    let e = rel_err(&got, &want);
                    assert!(e < 1.5e-2, "{k:?} {n} x ({dout}, {din}): relative error {e}");
                }
            }
        }
    }

    /// The VNNI kernel computes exactly the integer dot products the block kernel does: the
    /// two agree to float rounding.
    #[test]
    fn q8_0_kernels_agree() {
        if !has_vnni() {
            eprintln!("no AVX-512 VNNI on this CPU: the block kernel alone is tested");
            return;
        }
        let (dout, din) = (200, 224);
        let (w, _) = quantized(dout, din, GgmlDType::Q8_0, 9);
        let x = values(2 * din, 10);
        let a = q8_0_rows(&x, 2, &w, dout, din, Kernel::Vnni).expect("vnni");
        let b = q8_0_rows(&x, 2, &w, dout, din, Kernel::Blocks).expect("blocks");
        assert!(rel_err(&a, &b) < 1e-5, "{}", rel_err(&a, &b));
    }

    #[test]
    fn q4k_rows_match_the_dequantized_product() {
        let (dout, din) = (90, 512);
        let (w, deq) = quantized(dout, din, GgmlDType::Q4K, 4);
        for n in [1, 2, 5] {
            let x = values(n * din, 20 + n as u64);
            let got = q4k_rows(&x, n, &w, dout, din).expect("product");
            let e = rel_err(&got, &reference(&x, n, &deq, dout, din));
            assert!(e < 1.5e-2, "{n} rows: relative error {e}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let (w, _) = quantized(4, 64, GgmlDType::Q8_0, 1);
        assert!(q8_0_rows(&[0.0; 64], 1, &w, 5, 64, Kernel::Blocks).is_err());
        assert!(q8_0_rows(&[0.0; 320], 5, &w, 4, 64, Kernel::Blocks).is_err());
        assert!(q8_0_rows(&[0.0; 48], 1, &w[..w.len() / 2], 4, 48, Kernel::Blocks).is_err());
        assert!(q4k_rows(&[0.0; 64], 1, &w, 4, 64).is_err());
    }
}
