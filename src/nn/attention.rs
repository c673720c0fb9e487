//! Fused multi-head attention for the trainable path on the CPU.
//!
//! `softmax(q k^T + mask) v`, one (batch, head) pair at a time: its (S, L) scores live in a
//! scratch buffer that stays in cache, and the backward pass recomputes them from q and k
//! instead of keeping them (as flash attention does). The composed version (matmul, masked
//! softmax, matmul, transpose) materialises four (B, H, S, L) tensors forward and backward,
//! each also zero-filled and summed into by candle's gradient store, which made the attention
//! the largest non-matmul cost of a training step.
//!
//! Queries go in blocks of [`ROW_BLOCK`] rows, and each block stops at the last key any of its
//! rows can see (keys masked with `-inf` for the whole block are skipped): under a causal
//! mask the scores, the values' product and the backward products shrink to about the lower
//! triangle, with the same result (those keys' probabilities are exactly 0). The products
//! over keys (dV, dK) go by blocks of keys, from the first query row that sees one of them.

use super::rows_of;
use crate::error::Result;
use crate::vmath::softmax_in_place;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Self-attention of the fused projection `qkv` (B, S, 3 * H * D: the queries, keys and
/// values of the H heads side by side, as `wqkv` writes them): each head's q and k rotated
/// by the interleaved RoPE tables `cos`/`sin` (S, D / 2) ([`crate::nn::rope`]), q scaled by
/// `scale`, then `softmax(q k^T + mask) v` with an additive `mask` (1 or B, 1, S, S). Returns
/// (B, S, H * D), the heads side by side as the output projection reads them; the gradient
/// goes to `qkv` only. `None` where there is no fused kernel (off the CPU, not f32, other
/// shapes): the caller composes the same from elementary ops.
pub fn attention_qkv(qkv: &Tensor, cos: &Tensor, sin: &Tensor, scale: f64, heads: usize, mask: Option<&Tensor>) -> Result<Option<Tensor>> {
    let (b, s, _) = qkv.dims3()?;
    let d = head_width("attention", qkv, heads)?;
    let tables_ok = [cos, sin].iter().all(|t| t.dims() == [s, d / 2] && t.dtype() == DType::F32);
    let mask_ok = |m: &Tensor| matches!(m.dims4(), Ok((mb, 1, ms, ml)) if (mb == 1 || mb == b) && ms == s && ml == s) && m.dtype() == DType::F32;
    if !qkv.device().is_cpu() || qkv.dtype() != DType::F32 || !tables_ok || !mask.is_none_or(mask_ok) {
        return Ok(None);
    }
    let vec = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
    let mask = match mask {
        Some(m) => Some((m.dim(0)?, vec(m)?)),
        None => None,
    };
    // Per mask row: the number of keys up to the last one it does not mask with -inf.
    let seen = match &mask {
        Some((_, m)) => m.chunks_exact(s.max(1)).map(|row| row.iter().rposition(|&x| x != f32::NEG_INFINITY).map_or(0, |j| j + 1)).collect(),
        None => Vec::new(),
    };
    let op = FusedAttention { heads, scale: scale as f32, cos: vec(cos)?, sin: vec(sin)?, mask, seen };
    Ok(Some(qkv.contiguous()?.apply_op1(op)?))
}

/// The head width D of a fused projection `qkv` (.., 3 * H * D) of `heads` heads; an error
/// naming `what` unless it splits into heads of even width (RoPE rotates pairs).
pub(super) fn head_width(what: &str, qkv: &Tensor, heads: usize) -> Result<usize> {
    let w = *qkv.dims().last().unwrap_or(&0);
    if heads == 0 || w % (3 * heads) != 0 || (w / (3 * heads)) % 2 != 0 {
        return Err(crate::error::Error::invalid(what, format!("qkv {:?} does not split into {heads} heads of even width", qkv.dims())));
    }
    Ok(w / (3 * heads))
}

/// The op: heads, query scale, RoPE tables (S x D/2 each), the mask (its batch rows, its
/// (mb, 1, S, S) values) and per mask row the keys it can see (up to its last key not masked
/// with -inf).
struct FusedAttention {
    heads: usize,
    scale: f32,
    cos: Vec<f32>,
    sin: Vec<f32>,
    mask: Option<(usize, Vec<f32>)>,
    seen: Vec<usize>,
}

/// Query rows per block (see the module documentation).
pub(super) const ROW_BLOCK: usize = 64;

/// The query blocks of `s` rows: `(first row, rows)`.
pub(super) fn row_blocks(s: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..s).step_by(ROW_BLOCK).map(move |r0| (r0, ROW_BLOCK.min(s - r0)))
}

/// A pointer shared by the (batch, head) jobs, which write disjoint parts of its buffer.
#[derive(Clone, Copy)]
pub(super) struct Shared(pub(super) *mut f32);
// SAFETY: every job writes only its own (batch, head) columns (see the callers).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// `dst (m x n) = a (m x k) * b (k x n)` with row stride `dst_rs`, single-threaded (the
/// callers run one job per (batch, head) in parallel).
///
/// # Safety
/// As [`super::gemm_strided`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn mm(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, a: *const f32, a_rs: usize, a_cs: usize, b: *const f32, b_rs: usize, b_cs: usize) {
    // SAFETY: forwarded from the caller.
    unsafe { super::gemm_strided(m, n, k, (dst, dst_rs), (a, a_rs, a_cs), (b, b_rs, b_cs), gemm::Parallelism::None) }
}

/// Rotate the `s` rows of width `d` at `src` (row stride `src_rs`) by the interleaved RoPE
/// tables (row i of `cos`/`sin`, `d / 2` values each, rotates row i), times `scale`, into the
/// rows at `dst` (row stride `dst_rs`); with `inverse` the transposed rotation (the
/// gradient's).
///
/// # Safety
/// `dst` must cover `s` rows of `d` values at stride `dst_rs`, not overlapping `src`; the
/// tables must hold `s * d / 2` values.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn rotate_rows(src: &[f32], src_rs: usize, s: usize, d: usize, (cos, sin): (&[f32], &[f32]), scale: f32, inverse: bool, dst: *mut f32, dst_rs: usize) {
    let half = d / 2;
    let sign = if inverse { -scale } else { scale };
    for i in 0..s {
        let x = &src[i * src_rs..i * src_rs + d];
        // SAFETY: row i of the destination, within the extent the caller guarantees.
        let o = unsafe { std::slice::from_raw_parts_mut(dst.add(i * dst_rs), d) };
        let (c, sn) = (&cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
        for k in 0..half {
            let (x0, x1, cs, ss) = (x[2 * k], x[2 * k + 1], scale * c[k], sign * sn[k]);
            o[2 * k] = x0 * cs - x1 * ss;
            o[2 * k + 1] = x0 * ss + x1 * cs;
        }
    }
}

/// Per-job scratch: rotated q and k, probabilities, their gradient, and row dot products.
struct Scratch {
    q: Vec<f32>,
    k: Vec<f32>,
    p: Vec<f32>,
    dp: Vec<f32>,
    dot: Vec<f32>,
}

impl FusedAttention {
    /// [`rotate_rows`] with this op's tables.
    ///
    /// # Safety
    /// As [`rotate_rows`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn rotate(&self, src: &[f32], src_rs: usize, s: usize, d: usize, scale: f32, inverse: bool, dst: *mut f32, dst_rs: usize) {
        // SAFETY: forwarded from the caller.
        unsafe { rotate_rows(src, src_rs, s, d, (&self.cos, &self.sin), scale, inverse, dst, dst_rs) }
    }

    /// The keys the query rows `r0..r0 + rows` of batch `bi` need: up to the last one any of
    /// them sees (at least one, so a fully masked row still gives the composed op's NaN).
    fn keys(&self, bi: usize, (r0, rows): (usize, usize), s: usize) -> usize {
        let Some((mb, _)) = &self.mask else { return s };
        let base = if *mb == 1 { 0 } else { bi * s };
        self.seen[base + r0..base + r0 + rows].iter().copied().max().unwrap_or(s).max(1)
    }

    /// The first query row of batch `bi` that sees key `c0` or a later one (`s`: none does).
    fn first_query(&self, bi: usize, c0: usize, s: usize) -> usize {
        let Some((mb, _)) = &self.mask else { return 0 };
        let base = if *mb == 1 { 0 } else { bi * s };
        self.seen[base..base + s].iter().position(|&n| n > c0).unwrap_or(s)
    }

    /// For batch `bi`, head `hi` of `qkv` (B, S, W): the rotated, scaled queries and rotated
    /// keys into the scratch, and the probabilities `softmax(q k^T + mask)` (S x S; zero past
    /// each block's keys).
    fn probs(&self, qkv: &[f32], (bi, hi): (usize, usize), (s, d): (usize, usize), t: &mut Scratch) {
        let w = 3 * self.heads * d;
        let at = bi * s * w + hi * d;
        // SAFETY: the scratch q and k are S x D; all distinct from qkv.
        unsafe {
            self.rotate(&qkv[at..], w, s, d, self.scale, false, t.q.as_mut_ptr(), d);
            self.rotate(&qkv[at + self.heads * d..], w, s, d, 1.0, false, t.k.as_mut_ptr(), d);
        }
        for (r0, rows) in row_blocks(s) {
            let n = self.keys(bi, (r0, rows), s);
            // SAFETY: rows r0.. of p (S x S), columns 0..n; q rows r0.., k rows 0..n.
            unsafe { mm(rows, n, d, t.p.as_mut_ptr().add(r0 * s), s, t.q.as_ptr().add(r0 * d), d, 1, t.k.as_ptr(), 1, d) };
            for (i, row) in t.p[r0 * s..(r0 + rows) * s].chunks_exact_mut(s).enumerate() {
                let (head, tail) = row.split_at_mut(n);
                if let Some(m) = &self.mask {
                    let r = (if m.0 == 1 { 0 } else { bi }) * s + r0 + i;
                    for (x, &mv) in head.iter_mut().zip(&m.1[r * s..r * s + n]) {
                        *x += mv;
                    }
                }
                softmax_in_place(head);
                tail.fill(0.0);
            }
        }
    }

    /// (batch, positions, head width) of a `qkv` layout, checked against the tables and mask.
    fn dims(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let &[b, s, w] = l.shape().dims() else { candle_core::bail!("fused attention: qkv {:?} is not (B, S, 3 * H * D)", l.shape()) };
        let d = w / (3 * self.heads);
        let mask_ok = self.mask.as_ref().is_none_or(|m| (m.0 == 1 || m.0 == b) && m.1.len() == m.0 * s * s && self.seen.len() == m.0 * s);
        if d * 3 * self.heads != w || self.cos.len() != s * d / 2 || self.sin.len() != self.cos.len() || !mask_ok {
            candle_core::bail!("fused attention: qkv {:?} does not fit {} heads, the RoPE tables or the mask", l.shape(), self.heads);
        }
        Ok((b, s, d))
    }

    fn scratch(s: usize, d: usize) -> Scratch {
        Scratch { q: vec![0.0; s * d], k: vec![0.0; s * d], p: vec![0.0; s * s], dp: vec![0.0; s * s], dot: vec![0.0; s] }
    }
}

impl CustomOp1 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, s, d) = self.dims(l)?;
        let (qkv, _) = rows_of(st, l)?;
        let (h, w) = (self.heads, 3 * self.heads * d);
        let mut out = vec![0f32; b * s * h * d];
        let o = Shared(out.as_mut_ptr());
        (0..b * h).into_par_iter().for_each_init(
            || Self::scratch(s, d),
            |t, bh| {
                let (bi, hi) = (bh / h, bh % h);
                self.probs(qkv, (bi, hi), (s, d), t);
                let v = &qkv[bi * s * w + 2 * h * d + hi * d..];
                let o = o;
                for (r0, rows) in row_blocks(s) {
                    let n = self.keys(bi, (r0, rows), s);
                    // SAFETY: this job writes rows (bi, r0..), columns hi*D..(hi+1)*D of the
                    // (B, S, H*D) output, which no other job touches; v covers n rows of stride W.
                    unsafe { mm(rows, d, n, o.0.add((bi * s * h + r0 * h + hi) * d), h * d, t.p.as_ptr().add(r0 * s), s, 1, v.as_ptr(), w, 1) };
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, s, h * d))))
    }

    fn bwd(&self, qkv: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op3_no_bwd(res, &grad.contiguous()?, &AttentionGrad(self))?))
    }
}

/// The backward pass of [`FusedAttention`]: `(qkv, output, output gradient) -> d qkv`, read
/// from the tensors' storage where they lie.
struct AttentionGrad<'a>(&'a FusedAttention);

impl CustomOp3 for AttentionGrad<'_> {
    fn name(&self) -> &'static str {
        "fused-attention-grad"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, so: &CpuStorage, lo: &Layout, sg: &CpuStorage, lg: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.0;
        let (b, s, d) = op.dims(lx)?;
        let (h, w) = (op.heads, 3 * op.heads * d);
        let (x, _) = rows_of(sx, lx)?;
        let (ov, _) = rows_of(so, lo)?;
        let (gv, _) = rows_of(sg, lg)?;
        if ov.len() != b * s * h * d || gv.len() != ov.len() {
            candle_core::bail!("fused attention grad: output {:?} and gradient {:?} for qkv {:?}", lo.shape(), lg.shape(), lx.shape());
        }
        let mut dx = vec![0f32; x.len()];
        let px = Shared(dx.as_mut_ptr());
        (0..b * h).into_par_iter().for_each_init(
            || (FusedAttention::scratch(s, d), vec![0f32; s * d]),
            |(t, g), bh| {
                let (bi, hi) = (bh / h, bh % h);
                op.probs(x, (bi, hi), (s, d), t);
                // This head's output and output gradient: S rows of stride H*D.
                let at = (bi * s * h + hi) * d;
                for (i, c) in t.dot.iter_mut().enumerate() {
                    let r = at + i * h * d..at + i * h * d + d;
                    *c = gv[r.clone()].iter().zip(&ov[r]).map(|(a, b)| a * b).sum();
                }
                let base = bi * s * w + hi * d;
                let v = &x[base + 2 * h * d..];
                let px = px;
                // SAFETY: sources are alive and distinct from the destinations; this job
                // writes only rows (bi, 0..S), columns of head hi in dq, dk, dv (of stride W).
                // dV = P^T dO, straight into its columns, per block of keys from the first
                // query row that sees one of them (P is zero above it).
                for (c0, cols) in row_blocks(s) {
                    let r = op.first_query(bi, c0, s);
                    if r < s {
                        // SAFETY: dV rows c0.. of this head; P rows r.., columns c0..; dO rows r...
                        unsafe { mm(cols, d, s - r, px.0.add(base + 2 * h * d + c0 * w), w, t.p.as_ptr().add(r * s + c0), 1, s, gv[at + r * h * d..].as_ptr(), h * d, 1) };
                    }
                }
                for (r0, rows) in row_blocks(s) {
                    let n = op.keys(bi, (r0, rows), s);
                    // dP = dO V^T on the block's keys. SAFETY: rows r0.. of dp, columns 0..n.
                    unsafe { mm(rows, n, d, t.dp.as_mut_ptr().add(r0 * s), s, gv[at + r0 * h * d..].as_ptr(), h * d, 1, v.as_ptr(), 1, w) };
                    // dS = P * (dP - rowsum(dP * P)), with rowsum(dP * P) = dO . O; zero past n.
                    let rows_of_block = t.dp[r0 * s..(r0 + rows) * s].chunks_exact_mut(s).zip(t.p[r0 * s..].chunks_exact(s)).zip(&t.dot[r0..r0 + rows]);
                    for ((dr, pr), &c) in rows_of_block {
                        let (head, tail) = dr.split_at_mut(n);
                        for (x, &pi) in head.iter_mut().zip(pr) {
                            *x = pi * (*x - c);
                        }
                        tail.fill(0.0);
                    }
                    // dS k for the block's queries. SAFETY: rows r0.. of g, its own scratch.
                    unsafe { mm(rows, d, n, g.as_mut_ptr().add(r0 * d), d, t.dp.as_ptr().add(r0 * s), s, 1, t.k.as_ptr(), d, 1) };
                }
                // dq = scale R^T (dS k), dk = R^T (dS^T q): back through the rotation, into
                // their columns. SAFETY: as above; `g` is this job's scratch.
                unsafe {
                    op.rotate(g, d, s, d, op.scale, true, px.0.add(base), w);
                }
                // dS^T q per block of keys, as dV above (dS is zero where P is).
                for (c0, cols) in row_blocks(s) {
                    let r = op.first_query(bi, c0, s);
                    if r < s {
                        // SAFETY: rows c0.. of this job's scratch g; dS rows r.., columns c0...
                        unsafe { mm(cols, d, s - r, g.as_mut_ptr().add(c0 * d), d, t.dp.as_ptr().add(r * s + c0), 1, s, t.q.as_ptr().add(r * d), d, 1) };
                    } else {
                        g[c0 * d..(c0 + cols) * d].fill(0.0);
                    }
                }
                // SAFETY: as above.
                unsafe {
                    op.rotate(g, d, s, d, 1.0, true, px.0.add(base + h * d), w);
                }
            },
        );
        Ok((CpuStorage::F32(dx), lx.shape().clone()))
    }
}
