//! Attention over a KV cache on the CPU: the inference path (prefill, decoding steps, ITD
//! verification passes).
//!
//! A step writes its rotated keys and its values into the layer's cache in place, then
//! attends each (row, head) straight from the projection `qkv` and the cache: query i (at
//! position `start + i`) sees the keys `0..=start + i` (causal) plus an additive per-key mask
//! (caption padding). The composed path (permute, RoPE, cache copy, scores, mask tensor,
//! masked softmax, values, transpose) runs about a dozen ops per layer and materialises the
//! (rows, H, T, L) scores and an (T, L) mask; here it is three ops, and masked keys are
//! never touched. The caches hold keys and values transposed, (rows, H, D, capacity): a
//! decoding step's scores are then a sum of D contiguous rows scaled by the query (no
//! horizontal sums per key) and its output D contiguous dot products. More queries than
//! [`FEW_QUERIES`] go in blocks of [`ROW_BLOCK`] rows through the matrix kernel, each block
//! stopping at the last key its rows see (about the lower triangle of a prefill).
//!
//! The caches may hold f16 instead of f32 (half the memory, for models whose weights are
//! reduced): keys are rounded to f16 as they are appended, and each (row, head) job widens
//! its head's valid columns, D x `len` values, into a scratch block of its own before the
//! same f32 kernels run; there is no f32 copy of the cache.

use super::attention::{head_width, mm, rotate_rows, row_blocks, Shared, ROW_BLOCK};
use super::rows_of;
use crate::error::{Error, Result};
use crate::vmath::{add_strided_dots, combine_rows, softmax_in_place};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, InplaceOp2, Layout, Shape, Tensor};
use half::{f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

/// Up to this many queries a step goes key by key instead of through the matrix kernel.
const FEW_QUERIES: usize = 4;

/// What one cached attention step needs besides its tensors.
#[derive(Debug, Clone, Copy)]
pub struct CachedStep<'a> {
    /// Keys already in the cache: the position of the step's first query.
    pub start: usize,
    /// Interleaved RoPE tables of the step's positions, `T * head_dim / 2` values each
    /// ([`crate::nn::rope::tables`] rows `start..start + T`).
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    /// Additive per-key mask: one row of `stride` values per batch row, of which the first
    /// `start + T` are read (e.g. -1e9 on padded caption positions).
    pub keypad: Option<(&'a [f32], usize)>,
}

/// Append the step's keys (rotated) and values from `qkv` (R, T, 3 * H * D: queries, keys and
/// values of the H heads side by side) to the caches `k` and `v` (R, H, D, capacity: position
/// j of a head's key is column j; written in place at columns `start..start + T`), then
/// attend from the last `queries` of the T positions (T for all; fewer where only the last
/// positions' outputs are needed, as in a prefill's last layer): returns (R, queries, H * D),
/// the heads side by side, queries scaled by `scale`. The caches are f32 or f16 (both the
/// same); `qkv` is f32. `None` off the CPU or for other dtypes: the caller composes the same
/// from elementary ops.
pub fn cached_attention(qkv: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64, step: &CachedStep, queries: usize) -> Result<Option<Tensor>> {
    let on_cpu = [qkv, k, v].into_iter().all(|t| t.device().is_cpu());
    if !on_cpu || qkv.dtype() != DType::F32 || !matches!(k.dtype(), DType::F32 | DType::F16) || v.dtype() != k.dtype() {
        return Ok(None);
    }
    let (r, t, _) = qkv.dims3()?;
    let bad = |what: String| Error::invalid("cached attention", what);
    let d = head_width("cached attention", qkv, heads)?;
    let (kr, kh, kd, cap) = k.dims4()?;
    if (kr, kh, kd) != (r, heads, d) || v.dims() != k.dims() || !k.is_contiguous() || !v.is_contiguous() {
        return Err(bad(format!("caches {:?} / {:?} for qkv {:?} with {heads} heads (expected contiguous ({r}, {heads}, {d}, capacity))", k.dims(), v.dims(), qkv.dims())));
    }
    if queries == 0 || queries > t {
        return Err(bad(format!("{queries} queries asked of a step of {t} positions")));
    }
    let len = step.start + t;
    if len > cap {
        return Err(bad(format!("{} cached + {t} new positions exceed the capacity {cap}", step.start)));
    }
    if step.cos.len() != t * d / 2 || step.sin.len() != step.cos.len() {
        return Err(bad(format!("RoPE tables of {} / {} values for {t} positions of head width {d}", step.cos.len(), step.sin.len())));
    }
    if let Some((m, stride)) = step.keypad {
        if stride < len || m.len() != r * stride {
            return Err(bad(format!("key mask of {} values with stride {stride} for {r} rows of {len} keys", m.len())));
        }
    }
    let qkv = qkv.contiguous()?;
    let shape = Dims { rows: r, t, heads, d, cap };
    k.inplace_op2(&qkv, &Append { shape, start: step.start, part: 1, rope: Some((step.cos, step.sin)) })?;
    v.inplace_op2(&qkv, &Append { shape, start: step.start, part: 2, rope: None })?;
    let op = Attend { shape, first: t - queries, scale: scale as f32, step };
    Ok(Some(qkv.apply_op3_no_bwd(k, v, &op)?))
}

/// Rows, new positions, heads, head width, cache capacity.
#[derive(Debug, Clone, Copy)]
struct Dims {
    rows: usize,
    t: usize,
    heads: usize,
    d: usize,
    cap: usize,
}

impl Dims {
    /// Checks a `qkv` layout and a cache layout against these dimensions.
    fn check(&self, lq: &Layout, lc: &Layout) -> candle_core::Result<()> {
        let Dims { rows, t, heads, d, cap } = *self;
        if lq.shape().dims() != [rows, t, 3 * heads * d] || lc.shape().dims() != [rows, heads, d, cap] {
            candle_core::bail!("cached attention: qkv {:?} / cache {:?} changed shape", lq.shape(), lc.shape());
        }
        Ok(())
    }
}

/// Write part `part` (1: keys, rotated by `rope`; 2: values) of `qkv` into a cache.
struct Append<'a> {
    shape: Dims,
    start: usize,
    part: usize,
    rope: Option<(&'a [f32], &'a [f32])>,
}

impl InplaceOp2 for Append<'_> {
    fn name(&self) -> &'static str {
        "kv-cache-append"
    }

    fn cpu_fwd(&self, sc: &mut CpuStorage, lc: &Layout, sq: &CpuStorage, lq: &Layout) -> candle_core::Result<()> {
        self.shape.check(lq, lc)?;
        let Dims { rows, t, heads, d, cap } = self.shape;
        let Some((a, b)) = lc.contiguous_offsets() else { candle_core::bail!("cached attention: the cache is not contiguous") };
        let mut cache = match sc {
            CpuStorage::F32(v) => CacheMut::F32(&mut v[a..b]),
            CpuStorage::F16(v) => CacheMut::F16(&mut v[a..b]),
            _ => candle_core::bail!("cached attention: a cache of {:?} (f32 or f16 expected)", sc.dtype()),
        };
        let (qkv, w) = rows_of(sq, lq)?;
        let mut rotated = vec![0f32; if self.rope.is_some() { t * d } else { 0 }];
        for r in 0..rows {
            for h in 0..heads {
                let src = &qkv[r * t * w + self.part * heads * d + h * d..];
                let (src, src_rs) = match self.rope {
                    Some(tables) => {
                        // SAFETY: `rotated` holds t rows of d values; it is scratch, not qkv.
                        unsafe { rotate_rows(src, w, t, d, tables, 1.0, false, rotated.as_mut_ptr(), d) };
                        (&rotated[..], d)
                    }
                    None => (src, w),
                };
                // Column start + i of the head's (D, capacity) block is position i's vector.
                let at = (r * heads + h) * d * cap;
                for i in 0..t {
                    let col = src[i * src_rs..i * src_rs + d].iter().enumerate();
                    match &mut cache {
                        CacheMut::F32(c) => col.for_each(|(k, &x)| c[at + k * cap + self.start + i] = x),
                        CacheMut::F16(c) => col.for_each(|(k, &x)| c[at + k * cap + self.start + i] = f16::from_f32(x)),
                    }
                }
            }
        }
        Ok(())
    }
}

/// A cache's values, writable, in its storage dtype.
enum CacheMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
}

/// A cache's values in its storage dtype.
#[derive(Clone, Copy)]
enum CacheRef<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> CacheRef<'a> {
    fn of(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<Self> {
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("cached attention: the cache is not contiguous") };
        Ok(match s {
            CpuStorage::F32(v) => Self::F32(&v[a..b]),
            CpuStorage::F16(v) => Self::F16(&v[a..b]),
            _ => candle_core::bail!("cached attention: a cache of {:?} (f32 or f16 expected)", s.dtype()),
        })
    }

    /// One head's (D, capacity) block starting at `at`, its columns `0..len` as f32 with the
    /// row stride it returns: the cache itself for f32 (stride `cap`), else widened into
    /// `scratch` (stride `len`).
    fn head<'s>(self, at: usize, d: usize, cap: usize, len: usize, scratch: &'s mut Vec<f32>) -> (&'s [f32], usize)
    where
        'a: 's,
    {
        match self {
            Self::F32(c) => (&c[at..at + d * cap], cap),
            Self::F16(c) => {
                scratch.resize(d * len, 0.0);
                for (k, dst) in scratch.chunks_exact_mut(len).enumerate() {
                    c[at + k * cap..at + k * cap + len].convert_to_f32_slice(dst);
                }
                (&scratch[..], len)
            }
        }
    }
}

/// The attention itself (the caches already hold the step's keys and values), from the step's
/// positions `first..T`.
struct Attend<'a> {
    shape: Dims,
    first: usize,
    scale: f32,
    step: &'a CachedStep<'a>,
}

impl Attend<'_> {
    /// Add row `r`'s key mask to the scores of keys `0..scores.len()`.
    fn mask(&self, r: usize, scores: &mut [f32]) {
        if let Some((m, stride)) = self.step.keypad {
            for (x, &mv) in scores.iter_mut().zip(&m[r * stride..]) {
                *x += mv;
            }
        }
    }
}

impl CustomOp3 for Attend<'_> {
    fn name(&self) -> &'static str {
        "kv-cache-attention"
    }

    fn cpu_fwd(&self, sq: &CpuStorage, lq: &Layout, sk: &CpuStorage, lk: &Layout, sv: &CpuStorage, lv: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.shape.check(lq, lk)?;
        self.shape.check(lq, lv)?;
        let Dims { rows, t, heads: h, d, cap } = self.shape;
        let (qkv, w) = rows_of(sq, lq)?;
        let (kc, vc) = (CacheRef::of(sk, lk)?, CacheRef::of(sv, lv)?);
        let len = self.step.start + t;
        // Queries: the step's positions first..t, i.e. absolute positions start + first + i.
        let (m, at) = (t - self.first, self.step.start + self.first);
        let mut out = vec![0f32; rows * m * h * d];
        let o = Shared(out.as_mut_ptr());
        let block = if m <= FEW_QUERIES { 1 } else { ROW_BLOCK.min(m) };
        (0..rows * h).into_par_iter().for_each_init(
            || (vec![0f32; m * d], vec![0f32; block * len], Vec::new(), Vec::new()),
            |(q, p, wide_k, wide_v), rh| {
                let (r, hi) = (rh / h, rh % h);
                let o = o;
                let half = d / 2;
                let tables = (&self.step.cos[self.first * half..], &self.step.sin[self.first * half..]);
                // SAFETY: q holds m rows of d values; it is scratch, not qkv.
                unsafe { rotate_rows(&qkv[(r * t + self.first) * w + hi * d..], w, m, d, tables, self.scale, false, q.as_mut_ptr(), d) };
                // This (row, head)'s keys and values, (D, stride) each, columns 0..len valid.
                let (keys, stride) = kc.head((r * h + hi) * d * cap, d, cap, len, wide_k);
                let (values, _) = vc.head((r * h + hi) * d * cap, d, cap, len, wide_v);
                // Output row i of this (row, head): (r, i, hi) of (R, m, H, D).
                let out_at = |i: usize| ((r * m + i) * h + hi) * d;
                if m <= FEW_QUERIES {
                    for i in 0..m {
                        let s = &mut p[..at + i + 1];
                        combine_rows(&q[i * d..(i + 1) * d], keys, stride, s);
                        self.mask(r, s);
                        softmax_in_place(s);
                        // SAFETY: this job alone writes the (r, i, hi) output rows.
                        let dst = unsafe { std::slice::from_raw_parts_mut(o.0.add(out_at(i)), d) };
                        add_strided_dots(s, values, stride, dst);
                    }
                    return;
                }
                for (r0, nr) in row_blocks(m) {
                    // Row i of the block sees keys 0..=at + r0 + i.
                    let n = at + r0 + nr;
                    // SAFETY: p holds nr x n scores (stride n); q rows r0..; the keys' (D x n)
                    // columns 0..n (row stride `stride`).
                    unsafe { mm(nr, n, d, p.as_mut_ptr(), n, q.as_ptr().add(r0 * d), d, 1, keys.as_ptr(), stride, 1) };
                    for (i, row) in p[..nr * n].chunks_exact_mut(n).enumerate() {
                        let (seen, unseen) = row.split_at_mut(at + r0 + i + 1);
                        self.mask(r, seen);
                        softmax_in_place(seen);
                        unseen.fill(0.0);
                    }
                    // SAFETY: this job alone writes the (r, r0.., hi) output rows (stride H * D);
                    // p as above; the values read as (n x D): row stride 1, column stride `stride`.
                    unsafe { mm(nr, d, n, o.0.add(out_at(r0)), h * d, p.as_ptr(), n, 1, values.as_ptr(), 1, stride) };
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((rows, m, h * d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    /// The composed reference: rotate, cache concatenation, scores, causal + key mask,
    /// softmax, values.
    /// `cache`: the dtype the new keys (after rotation) and values are rounded to, as a cache
    /// of that dtype stores them.
    fn composed(qkv: &Tensor, past: Option<(&Tensor, &Tensor)>, heads: usize, scale: f64, cos: &Tensor, sin: &Tensor, keypad: Option<&Tensor>, cache: DType) -> (Tensor, Tensor, Tensor) {
        let (b, s, w) = qkv.dims3().unwrap();
        let d = w / (3 * heads);
        let x = qkv.reshape((b, s, 3, heads, d)).unwrap().permute((2, 0, 3, 1, 4)).unwrap().contiguous().unwrap();
        let q = (candle_nn::rotary_emb::rope_i(&x.get(0).unwrap().contiguous().unwrap(), cos, sin).unwrap() * scale).unwrap();
        let k = candle_nn::rotary_emb::rope_i(&x.get(1).unwrap().contiguous().unwrap(), cos, sin).unwrap();
        let v = x.get(2).unwrap();
        let round = |t: Tensor| t.to_dtype(cache).unwrap().to_dtype(DType::F32).unwrap();
        let (k, v) = (round(k), round(v));
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2).unwrap(), Tensor::cat(&[pv, &v], 2).unwrap()),
            None => (k, v),
        };
        let l = k.dim(2).unwrap();
        let start = l - s;
        let causal: Vec<f32> = (0..s).flat_map(|i| (0..l).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY })).collect();
        let mut scores = q.matmul(&k.t().unwrap()).unwrap().broadcast_add(&Tensor::from_vec(causal, (1, 1, s, l), &Device::Cpu).unwrap()).unwrap();
        if let Some(m) = keypad {
            scores = scores.broadcast_add(&m.narrow(3, 0, l).unwrap()).unwrap();
        }
        let p = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let y = p.matmul(&v.contiguous().unwrap()).unwrap().transpose(1, 2).unwrap().reshape((b, s, heads * d)).unwrap();
        (y, k, v)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// A prefill of `first` positions and then steps of the given sizes (few-query and block
    /// paths, blocks crossing ROW_BLOCK), with a key mask on some early keys of row 1: every
    /// step's output and the cache contents equal the composed attention over the same keys.
    #[test]
    fn cached_steps_match_the_composed_attention() {
        steps_match_the_composed_attention(DType::F32);
    }

    /// The same with f16 caches: equal to the composed attention over keys and values rounded
    /// to f16 (the only difference from f32 is that rounding; the cache holds exactly those
    /// values), and within 1e-2 of the f32 attention on N(0, 1) inputs.
    #[test]
    fn f16_cached_steps_match_the_composed_attention_over_rounded_keys() {
        steps_match_the_composed_attention(DType::F16);
    }

    fn steps_match_the_composed_attention(dtype: DType) {
        let dev = Device::Cpu;
        let (rows, heads, d, cap) = (2, 3, 8, 200);
        let steps = [70usize, 1, 3, 9, 1, 80];
        let total: usize = steps.iter().sum();
        let cells: Vec<_> = (0..total).map(|i| crate::layout::RopeCell::Cell(i / 11, i % 11)).collect();
        let (cos, sin) = crate::nn::rope::tables(&cells, d, 10000.0, &dev).unwrap();
        let mut pad = vec![0f32; rows * cap];
        for j in [0usize, 2, 5] {
            pad[cap + j] = -1e9;
        }
        let keypad = Tensor::from_vec(pad.clone(), (rows, 1, 1, cap), &dev).unwrap();
        let kc = Tensor::zeros((rows, heads, d, cap), dtype, &dev).unwrap();
        let vc = kc.zeros_like().unwrap();
        let mut past: Option<(Tensor, Tensor)> = None;
        let mut past32: Option<(Tensor, Tensor)> = None;
        let mut start = 0;
        for (n, &t) in steps.iter().enumerate() {
            let qkv = Tensor::randn(0f32, 1.0, (rows, t, 3 * heads * d), &dev).unwrap();
            let (c, s) = (cos.narrow(0, start, t).unwrap(), sin.narrow(0, start, t).unwrap());
            let (cv, sv) = (c.flatten_all().unwrap().to_vec1::<f32>().unwrap(), s.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            let step = CachedStep { start, cos: &cv, sin: &sv, keypad: Some((&pad, cap)) };
            let y = cached_attention(&qkv, &kc, &vc, heads, 0.35, &step, t).unwrap().unwrap();
            let (want, k, v) = composed(&qkv, past.as_ref().map(|(k, v)| (k, v)), heads, 0.35, &c, &s, Some(&keypad), dtype);
            assert_eq!(y.dims(), [rows, t, heads * d]);
            assert!(max_diff(&y, &want) < 1e-5, "{dtype:?} step {n} ({t} positions after {start}): {}", max_diff(&y, &want));
            let (exact, k32, v32) = composed(&qkv, past32.as_ref().map(|(k, v)| (k, v)), heads, 0.35, &c, &s, Some(&keypad), DType::F32);
            assert!(max_diff(&y, &exact) < 1e-2, "{dtype:?} step {n} against f32: {}", max_diff(&y, &exact));
            start += t;
            let cached = |c: &Tensor| c.i((.., .., .., ..start)).unwrap().to_dtype(DType::F32).unwrap().transpose(2, 3).unwrap();
            assert!(max_diff(&cached(&kc), &k) < 1e-6, "keys after step {n}");
            assert!(max_diff(&cached(&vc), &v) < 1e-6, "values after step {n}");
            past = Some((k, v));
            past32 = Some((k32, v32));
        }
    }

    /// Rewriting positions after a truncation (the ITD verifier's rollback) overwrites them.
    #[test]
    fn a_step_overwrites_positions_after_a_rollback() {
        let dev = Device::Cpu;
        let (rows, heads, d, cap) = (1, 2, 4, 16);
        let cells: Vec<_> = (0..cap).map(|i| crate::layout::RopeCell::Cell(0, i)).collect();
        let (cos, sin) = crate::nn::rope::tables(&cells, d, 10000.0, &dev).unwrap();
        let table = |t: &Tensor, a: usize, n: usize| t.narrow(0, a, n).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let kc = Tensor::zeros((rows, heads, d, cap), DType::F32, &dev).unwrap();
        let vc = kc.zeros_like().unwrap();
        let run = |qkv: &Tensor, start: usize| {
            let t = qkv.dim(1).unwrap();
            let (c, s) = (table(&cos, start, t), table(&sin, start, t));
            cached_attention(qkv, &kc, &vc, heads, 0.5, &CachedStep { start, cos: &c, sin: &s, keypad: None }, t).unwrap().unwrap()
        };
        let a = Tensor::randn(0f32, 1.0, (rows, 6, 3 * heads * d), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (rows, 3, 3 * heads * d), &dev).unwrap();
        run(&a, 0);
        // Keep 4 positions, write 3 new ones: as if a's first 4 and b had been fed in one go.
        let y = run(&b, 4);
        let kc2 = Tensor::zeros((rows, heads, d, cap), DType::F32, &dev).unwrap();
        let vc2 = kc2.zeros_like().unwrap();
        let both = Tensor::cat(&[&a.narrow(1, 0, 4).unwrap(), &b], 1).unwrap();
        let (c, s) = (table(&cos, 0, 7), table(&sin, 0, 7));
        let full = cached_attention(&both, &kc2, &vc2, heads, 0.5, &CachedStep { start: 0, cos: &c, sin: &s, keypad: None }, 7).unwrap().unwrap();
        assert!(max_diff(&y, &full.narrow(1, 4, 3).unwrap()) < 1e-5);
        // Attending from the last 3 positions only: every key and value is still appended.
        let (kc3, vc3) = (kc2.zeros_like().unwrap(), vc2.zeros_like().unwrap());
        let last = cached_attention(&both, &kc3, &vc3, heads, 0.5, &CachedStep { start: 0, cos: &c, sin: &s, keypad: None }, 3).unwrap().unwrap();
        assert_eq!(last.dims(), [rows, 3, heads * d]);
        assert!(max_diff(&last, &full.narrow(1, 4, 3).unwrap()) < 1e-6);
        assert!(max_diff(&kc3, &kc2) == 0.0 && max_diff(&vc3, &vc2) == 0.0);
        let e = cached_attention(&both, &kc3, &vc3, heads, 0.5, &CachedStep { start: 0, cos: &c, sin: &s, keypad: None }, 8).unwrap_err().to_string();
        assert!(e.contains("8 queries asked of a step of 7"), "{e}");
    }

    #[test]
    fn bad_shapes_are_refused() {
        let dev = Device::Cpu;
        let qkv = Tensor::zeros((1, 2, 24), DType::F32, &dev).unwrap();
        let kc = Tensor::zeros((1, 2, 4, 3), DType::F32, &dev).unwrap();
        let tables = vec![0f32; 4];
        let step = CachedStep { start: 2, cos: &tables, sin: &tables, keypad: None };
        let e = cached_attention(&qkv, &kc, &kc.zeros_like().unwrap(), 2, 1.0, &step, 2).unwrap_err().to_string();
        assert!(e.contains("exceed the capacity 3"), "{e}");
        let step = CachedStep { start: 0, cos: &tables[..2], sin: &tables[..2], keypad: None };
        let e = cached_attention(&qkv, &kc, &kc.zeros_like().unwrap(), 2, 1.0, &step, 2).unwrap_err().to_string();
        assert!(e.contains("RoPE tables"), "{e}");
        let e = cached_attention(&qkv, &kc, &kc.zeros_like().unwrap(), 3, 1.0, &step, 2).unwrap_err().to_string();
        assert!(e.contains("does not split"), "{e}");
    }
}
