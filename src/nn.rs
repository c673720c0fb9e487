//! Differentiable building blocks shared by the trainable models.
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm` (and the `RmsNorm`/`LayerNorm`
//! modules built on them) and the fused RoPE kernels compute no gradient. Everything on a
//! trainable path uses the versions here instead (fused CPU kernels with their own backward
//! passes, compositions of elementary ops elsewhere); frozen encoders may use candle's.

mod attention;
pub mod attention_record;
mod kv_attention;
mod kv_cache;
mod linear;
pub mod rope;

pub use attention::attention_qkv;
pub use kv_attention::{cached_attention, CachedStep};
pub use kv_cache::LayerCache;
pub use linear::{autocast, bf16_products_available, linear, AutocastGuard, Weight, WeightDtype, FEW_ROWS};
pub(crate) use linear::mm;

use crate::error::Result;
use crate::vmath::softmax_in_place;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, Var, D};
use candle_nn::VarBuilder;

/// `dst = a * b` for an (m x k) `a` and a (k x n) `b` into the (m x n) `dst`, each given as
/// a pointer with its row stride (and column stride for the sources; `dst`'s columns are
/// contiguous), with the `gemm` crate's kernels (those candle's CPU matmul runs on).
///
/// # Safety
/// The pointers must cover their strided extents, and `dst` must overlap neither source nor
/// be written by anyone else during the call.
pub(crate) unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    (dst, dst_rs): (*mut f32, usize),
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs, b_cs): (*const f32, usize, usize),
    par: gemm::Parallelism,
) {
    // SAFETY: forwarded from the caller; `read_dst = false` (dst is overwritten: dst = 1 * a b).
    unsafe {
        gemm::gemm(m, n, k, dst, 1, dst_rs as isize, false, a, a_cs as isize, a_rs as isize, b, b_cs as isize, b_rs as isize, 0.0, 1.0, false, false, false, par)
    }
}

/// Softmax over the last dimension that passes gradients.
///
/// On the CPU in f32 this is one fused pass per row forward and one backward
/// (`dx = y * (dy - sum(dy * y))`); the composed version (max, sub, exp, sum, div) makes about
/// ten full passes over the attention scores, which dominated small models' training steps.
/// Elsewhere the composed op is used. Rows that are entirely `-inf` give NaN, as the composed op.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() == 0 {
        return Ok(candle_nn::ops::softmax(x, D::Minus1)?);
    }
    Ok(x.contiguous()?.apply_op1(FusedSoftmax)?)
}

struct FusedSoftmax;

/// `softmax_last_dim(x + mask)` for attention scores `x` (B, H, S, L) and an additive mask
/// (1 or B, 1, S, L), passing gradients to `x`. On the CPU in f32 the mask is added inside the
/// fused softmax pass (no (B, H, S, L) sum is materialised, forward or backward); otherwise,
/// or for other mask shapes, the mask is broadcast-added first.
pub fn masked_softmax_last_dim(x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let Some(m) = mask else { return softmax_last_dim(x) };
    let fusable = x.device().is_cpu()
        && x.dtype() == DType::F32
        && m.dtype() == DType::F32
        && x.rank() == 4
        && m.rank() == 4
        && matches!((x.dims4(), m.dims4()), (Ok((b, _, s, l)), Ok((mb, 1, ms, ml))) if (mb == 1 || mb == b) && ms == s && ml == l);
    if !fusable {
        return softmax_last_dim(&x.broadcast_add(m)?);
    }
    let heads = x.dim(1)?;
    Ok(x.contiguous()?.apply_op2(&m.contiguous()?, FusedMaskedSoftmax { heads })?)
}

/// Softmax of `scores + mask` row by row; see [`masked_softmax_last_dim`].
struct FusedMaskedSoftmax {
    heads: usize,
}

impl CustomOp2 for FusedMaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax-last-dim"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, v) = rows_of(s1, l1)?;
        let (mask, _) = rows_of(s2, l2)?;
        let (mb, s) = match (l1.shape().dims(), l2.shape().dims()) {
            ([_, _, s, _], [mb, 1, ms, ml]) if ms == s && *ml == v => (*mb, *s),
            (a, b) => candle_core::bail!("fused masked softmax: scores {a:?} and mask {b:?} do not match"),
        };
        let per_batch = self.heads * s;
        if per_batch == 0 || (mb != 1 && mb * per_batch * v != data.len()) {
            candle_core::bail!("fused masked softmax: {mb} mask rows for scores {:?} with {} heads", l1.shape(), self.heads);
        }
        let mut out = vec![0f32; data.len()];
        par_rows(data, v, &mut out, v, |r0, d, o| {
            for (i, (row, o)) in d.chunks_exact(v).zip(o.chunks_exact_mut(v)).enumerate() {
                let r = r0 + i;
                let b = if mb == 1 { 0 } else { r / per_batch };
                let mrow = (b * s + r % s) * v;
                for ((oi, &x), &mi) in o.iter_mut().zip(row).zip(&mask[mrow..mrow + v]) {
                    *oi = x + mi;
                }
                softmax_in_place(o);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _mask: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(res.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &FusedSoftmaxGrad)?), None))
    }
}

/// The contiguous f32 data of a CPU tensor and its last dimension (the row width), for the
/// fused CPU kernels.
pub(crate) fn rows_of<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [f32], usize)> {
    let v = *l.shape().dims().last().unwrap_or(&1);
    match l.contiguous_offsets() {
        Some((a, b)) => Ok((&s.as_slice::<f32>()?[a..b], v)),
        None => candle_core::bail!("fused CPU kernels need a contiguous tensor, got {:?}", l.shape()),
    }
}

/// The values of a contiguous f32 storage, writable (the destination of an in-place op).
pub(crate) fn rows_of_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("in-place CPU kernels need a contiguous tensor, got {:?}", l.shape()) };
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("in-place CPU kernels need an f32 tensor"),
    }
}

impl CustomOp1 for FusedSoftmax {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, v) = rows_of(s, l)?;
        let mut out = vec![0f32; data.len()];
        par_rows(data, v, &mut out, v, |_, d, o| {
            for (row, o) in d.chunks_exact(v).zip(o.chunks_exact_mut(v)) {
                o.copy_from_slice(row);
                softmax_in_place(o);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &FusedSoftmaxGrad)?))
    }
}

/// `(y, dy) -> y * (dy - sum(dy * y))` row by row.
struct FusedSoftmaxGrad;

impl CustomOp2 for FusedSoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        map_row_pairs("fused softmax grad", s1, l1, s2, l2, |yr, gr, o| {
            let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((oi, &yi), &gi) in o.iter_mut().zip(yr).zip(gr) {
                *oi = yi * (gi - dot);
            }
        })
    }
}

/// SwiGLU `silu(gate) * up` that passes gradients to both inputs (the LlamaGen feed-forward's
/// `silu(w1 x) * w3 x`). On the CPU in f32 one fused pass forward and one backward (candle's
/// `silu` and `mul` with their backward make about ten passes over the hidden activations);
/// elsewhere the composed ops.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let fusable = gate.device().is_cpu() && gate.dtype() == DType::F32 && up.dtype() == DType::F32 && gate.shape() == up.shape();
    if !fusable {
        return Ok((candle_nn::ops::silu(gate)? * up)?);
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, FusedSwiglu)?)
}

/// [`swiglu`] followed by a constant dropout `mask` (`silu(gate) * up * mask`), one op on the
/// CPU in f32 (no node of its own for the dropout); gradients to `gate` and `up`.
pub fn swiglu_masked(gate: &Tensor, up: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let Some(m) = mask else { return swiglu(gate, up) };
    if !elementwise_fusable(&[gate, up, m]) {
        return mul_mask(&swiglu(gate, up)?, m);
    }
    Ok(gate.contiguous()?.apply_op3(&up.contiguous()?, &m.contiguous()?, FusedSwigluMasked)?)
}

struct FusedSwigluMasked;

impl CustomOp3 for FusedSwigluMasked {
    fn name(&self) -> &'static str {
        "fused-swiglu-masked"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        map_triples("fused swiglu masked", (s1, l1), (s2, l2), (s3, l3), |g, u, m, o| {
            crate::vmath::swiglu(g, u, o);
            o.iter_mut().zip(m).for_each(|(o, &m)| *o *= m);
        })
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, mask: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dout = grad.contiguous()?.apply_op2_no_bwd(mask, &MulMask)?;
        let both = gate.apply_op3_no_bwd(up, &dout, &FusedSwigluGrad)?;
        let shape = gate.shape();
        Ok((Some(both.get(0)?.reshape(shape)?), Some(both.get(1)?.reshape(shape)?), None))
    }
}

struct FusedSwiglu;

/// Split `n` elements into one chunk per worker thread (at least `min` elements each).
fn chunk_len(n: usize, min: usize) -> usize {
    let threads = candle_core::utils::get_num_threads().max(1);
    n.div_ceil(threads).max(min)
}

impl CustomOp2 for FusedSwiglu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        map_row_pairs("fused swiglu", s1, l1, s2, l2, crate::vmath::swiglu)
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &FusedSwigluGrad)?;
        let shape = gate.shape();
        Ok((Some(both.get(0)?.reshape(shape)?), Some(both.get(1)?.reshape(shape)?)))
    }
}

/// `(gate, up, dout) -> [dgate; dup]` as one (2, n) tensor.
struct FusedSwigluGrad;

impl CustomOp3 for FusedSwigluGrad {
    fn name(&self) -> &'static str {
        "fused-swiglu-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, _) = rows_of(s1, l1)?;
        let (u, _) = rows_of(s2, l2)?;
        let (d, _) = rows_of(s3, l3)?;
        if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
            candle_core::bail!("fused swiglu grad: shapes {:?}, {:?}, {:?}", l1.shape(), l2.shape(), l3.shape());
        }
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        let (dg, du) = out.split_at_mut(n);
        let per = chunk_len(n, 4096);
        rayon::scope(|sc| {
            for ((((g, u), d), dg), du) in g.chunks(per).zip(u.chunks(per)).zip(d.chunks(per)).zip(dg.chunks_mut(per)).zip(du.chunks_mut(per)) {
                sc.spawn(move |_| crate::vmath::swiglu_grad(g, u, d, dg, du));
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((2, n))))
    }
}

/// `n` dropout multipliers: 0 with probability `p`, else `1 / (1 - p)`, drawn from a
/// SplitMix64 stream started at `seed`, 16 bits per entry (so `p` is rounded to a multiple of
/// 2^-16). A crate RNG draw per entry cost about 4% of a training step; this is a few times
/// cheaper and still a function of the seed alone.
pub fn dropout_mask_values(n: usize, p: f32, seed: u64) -> Vec<f32> {
    let keep = 1.0 - p.clamp(0.0, 1.0);
    let threshold = (keep * 65536.0).round() as u32;
    let scale = if keep > 0.0 { 1.0 / keep } else { 0.0 };
    let mut state = seed;
    let mut out = vec![0f32; n];
    for chunk in out.chunks_mut(4) {
        let z = crate::util::splitmix64(state);
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        for (i, o) in chunk.iter_mut().enumerate() {
            let bits = ((z >> (16 * i)) & 0xFFFF) as u32;
            *o = if bits < threshold { scale } else { 0.0 };
        }
    }
    out
}

/// `x * mask` for a constant `mask` of `x`'s shape (a dropout mask): the gradient passes to
/// `x` only (candle's `mul` also computes and accumulates a gradient for the mask, two more
/// passes and a zero-filled buffer). On the CPU in f32 one op; elsewhere candle's `mul`.
pub fn mul_mask(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if !elementwise_fusable(&[x, mask]) {
        return Ok((x * mask.detach())?);
    }
    Ok(x.contiguous()?.apply_op2(&mask.contiguous()?, MulMask)?)
}

/// `x + y * mask` for a constant `mask` (a residual connection around a dropped-out branch),
/// with gradients to `x` and `y` only: one op on the CPU in f32 instead of a `mul` and an
/// `add` node; elsewhere the composed ops.
pub fn add_masked(x: &Tensor, y: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if !elementwise_fusable(&[x, y, mask]) {
        return Ok((x + (y * mask.detach())?)?);
    }
    Ok(x.contiguous()?.apply_op3(&y.contiguous()?, &mask.contiguous()?, AddMasked)?)
}

/// CPU f32 tensors of one shape.
fn elementwise_fusable(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.shape() == ts[0].shape())
}

struct MulMask;

impl CustomOp2 for MulMask {
    fn name(&self) -> &'static str {
        "mul-mask"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        map_row_pairs("mul mask", s1, l1, s2, l2, |a, m, o| {
            for ((o, &a), &m) in o.iter_mut().zip(a).zip(m) {
                *o = a * m;
            }
        })
    }

    fn bwd(&self, _x: &Tensor, mask: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.contiguous()?.apply_op2_no_bwd(mask, &MulMask)?), None))
    }
}

struct AddMasked;

impl CustomOp3 for AddMasked {
    fn name(&self) -> &'static str {
        "add-masked"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        map_triples("add masked", (s1, l1), (s2, l2), (s3, l3), |x, y, m, o| {
            for (((o, &x), &y), &m) in o.iter_mut().zip(x).zip(y).zip(m) {
                *o = x + y * m;
            }
        })
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, mask: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?.apply_op2_no_bwd(mask, &MulMask)?;
        Ok((Some(grad.clone()), Some(dy), None))
    }
}

/// SwiGLU over the two halves of the last dimension: `(.., 2f) -> (.., f)`,
/// `silu(x[.., :f]) * x[.., f:]`, for a fused `w1 | w3` projection. Inference only: the fused
/// CPU kernel passes no gradient (the trainable path uses [`swiglu`] on separate inputs).
pub fn swiglu_halves(x: &Tensor) -> Result<Tensor> {
    let last = x.rank().saturating_sub(1);
    let two_f = x.dim(last)?;
    if two_f % 2 != 0 {
        return Err(crate::error::Error::invalid("swiglu input", format!("last dimension {two_f} is odd")));
    }
    let f = two_f / 2;
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok((candle_nn::ops::silu(&x.narrow(last, 0, f)?)? * x.narrow(last, f, f)?)?);
    }
    Ok(x.contiguous()?.apply_op1_no_bwd(&FusedSwigluHalves)?)
}

struct FusedSwigluHalves;

impl CustomOp1 for FusedSwigluHalves {
    fn name(&self) -> &'static str {
        "fused-swiglu-halves"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, v) = rows_of(s, l)?;
        let f = v / 2;
        let mut out = vec![0f32; data.len() / 2];
        par_rows(data, v, &mut out, f, |_, d, o| {
            for (row, o) in d.chunks_exact(v).zip(o.chunks_exact_mut(f)) {
                crate::vmath::swiglu(&row[..f], &row[f..], o);
            }
        });
        let mut dims = l.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = f;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `f(a_row, b_row, out_row)` over the rows of two contiguous f32 CPU tensors of one shape
/// (the fused backward kernels: output and gradient, or input and gradient); `what` names
/// the op in a shape error.
fn map_row_pairs(
    what: &str,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (a, v) = rows_of(s1, l1)?;
    let (b, _) = rows_of(s2, l2)?;
    if l1.shape() != l2.shape() {
        candle_core::bail!("{what}: shapes {:?} and {:?}", l1.shape(), l2.shape());
    }
    let mut out = vec![0f32; a.len()];
    par_rows(a, v, &mut out, v, |r0, ad, o| {
        let bd = &b[r0 * v..r0 * v + ad.len()];
        for ((ar, br), o) in ad.chunks_exact(v).zip(bd.chunks_exact(v)).zip(o.chunks_exact_mut(v)) {
            f(ar, br, o);
        }
    });
    Ok((CpuStorage::F32(out), l1.shape().clone()))
}

/// An element-wise op over three same-shape contiguous f32 CPU tensors: `f(a, b, c, out)` on
/// matching chunks, one chunk per worker thread.
fn map_triples(
    what: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
    f: impl Fn(&[f32], &[f32], &[f32], &mut [f32]) + Sync,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (a, _) = rows_of(s1, l1)?;
    let (b, _) = rows_of(s2, l2)?;
    let (c, _) = rows_of(s3, l3)?;
    if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
        candle_core::bail!("{what}: shapes {:?}, {:?}, {:?}", l1.shape(), l2.shape(), l3.shape());
    }
    let mut out = vec![0f32; a.len()];
    let per = chunk_len(a.len(), 4096);
    rayon::scope(|sc| {
        for (((a, b), c), o) in a.chunks(per).zip(b.chunks(per)).zip(c.chunks(per)).zip(out.chunks_mut(per)) {
            let f = &f;
            sc.spawn(move |_| f(a, b, c, o));
        }
    });
    Ok((CpuStorage::F32(out), l1.shape().clone()))
}

/// Run `f(first_row, rows_chunk, out_chunk)` over blocks of rows of width `v` on the threads
/// candle's CPU kernels use; `out` has `width_out` entries per row.
pub(crate) fn par_rows<F>(data: &[f32], v: usize, out: &mut [f32], width_out: usize, f: F)
where
    F: Fn(usize, &[f32], &mut [f32]) + Sync,
{
    let n = data.len() / v.max(1);
    let threads = candle_core::utils::get_num_threads().clamp(1, n.max(1));
    let per = n.div_ceil(threads).max(1);
    rayon::scope(|sc| {
        for (i, (d, o)) in data.chunks(per * v).zip(out.chunks_mut(per * width_out)).enumerate() {
            let f = &f;
            sc.spawn(move |_| f(i * per, d, o));
        }
    });
}

/// RMSNorm as LlamaGen computes it: in f32, `x * rsqrt(mean(x^2) + eps) * weight`.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        Ok(Self { weight, eps })
    }

    /// On the CPU in f32 the normalisation is one fused pass with a fused backward
    /// ([`FusedRmsNormalize`]); elsewhere, and for other dtypes, a composition of elementary ops.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() > 0 {
            let n = x.contiguous()?.apply_op1(FusedRmsNormalize { eps: self.eps })?;
            return Ok(n.broadcast_mul(&self.weight.to_dtype(DType::F32)?)?);
        }
        self.forward_composed(x)
    }

    /// The same from elementary ops (any device and dtype; candle derives the gradient).
    pub(crate) fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xf.broadcast_div(&(ms + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        Ok(y.broadcast_mul(&self.weight.to_dtype(dtype)?)?)
    }
}

/// `n = x / sqrt(mean(x^2) + eps)` row by row (the weight is applied outside, so that its
/// gradient comes from the ordinary broadcast product).
struct FusedRmsNormalize {
    eps: f64,
}

/// `1 / sqrt(mean(row^2) + eps)`.
fn inv_rms(row: &[f32], eps: f64) -> f32 {
    let ms = row.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / row.len().max(1) as f64;
    (1.0 / (ms + eps).sqrt()) as f32
}

impl CustomOp1 for FusedRmsNormalize {
    fn name(&self) -> &'static str {
        "fused-rms-normalize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, v) = rows_of(s, l)?;
        let mut out = vec![0f32; data.len()];
        par_rows(data, v, &mut out, v, |_, d, o| {
            for (row, o) in d.chunks_exact(v).zip(o.chunks_exact_mut(v)) {
                let r = inv_rms(row, self.eps);
                o.iter_mut().zip(row).for_each(|(oi, &x)| *oi = x * r);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &FusedRmsNormalizeGrad { eps: self.eps })?))
    }
}

/// `(x, dn) -> r * (dn - n * mean(dn * n))` row by row, with `r = 1 / rms(x)` and `n = x * r`.
struct FusedRmsNormalizeGrad {
    eps: f64,
}

impl CustomOp2 for FusedRmsNormalizeGrad {
    fn name(&self) -> &'static str {
        "fused-rms-normalize-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        map_row_pairs("fused rms-normalize grad", s1, l1, s2, l2, |xr, gr, o| {
            let r = inv_rms(xr, self.eps);
            let dot = xr.iter().zip(gr).map(|(a, b)| a * r * b).sum::<f32>() / xr.len() as f32;
            for ((oi, &xi), &gi) in o.iter_mut().zip(xr).zip(gr) {
                *oi = r * (gi - xi * r * dot);
            }
        })
    }
}

/// Interleaved 2D RoPE of `x` (B, H, S, D) by tables (S, D / 2) that passes gradients to `x`
/// (the tables are constants): on the CPU in f32 one fused pass forward and one backward (the
/// backward is the rotation by the opposite angles); elsewhere `None`, and the caller
/// composes it from elementary ops.
pub fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() != 4 {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, FusedRope { inverse: false })?))
}

/// Rotates each pair `(x[2k], x[2k+1])` of a row at position `s` by the angle whose cosine and
/// sine are `cos[s, k]`, `sin[s, k]` (by its opposite when `inverse`).
struct FusedRope {
    inverse: bool,
}

impl CustomOp3 for FusedRope {
    fn name(&self) -> &'static str {
        "fused-rope-interleaved"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, d) = rows_of(s1, l1)?;
        let (cos, half) = rows_of(s2, l2)?;
        let (sin, _) = rows_of(s3, l3)?;
        let dims = l1.shape().dims();
        let positions = dims[dims.len() - 2];
        if d != 2 * half || cos.len() != positions * half || sin.len() != cos.len() {
            candle_core::bail!("fused rope: x {:?} needs tables ({positions}, {}), got {:?} and {:?}", dims, d / 2, l2.shape(), l3.shape());
        }
        let sign = if self.inverse { -1f32 } else { 1.0 };
        let mut out = vec![0f32; x.len()];
        par_rows(x, d, &mut out, d, |r0, xd, o| {
            for (i, (row, o)) in xd.chunks_exact(d).zip(o.chunks_exact_mut(d)).enumerate() {
                let p = (r0 + i) % positions;
                let (c, sn) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
                for k in 0..half {
                    let (x0, x1, s) = (row[2 * k], row[2 * k + 1], sign * sn[k]);
                    o[2 * k] = x0 * c[k] - x1 * s;
                    o[2 * k + 1] = x0 * s + x1 * c[k];
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &FusedRope { inverse: !self.inverse })?;
        Ok((Some(dx), None, None))
    }
}

/// LayerNorm over the last dimension with weight and optional bias, differentiable.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        let bias = if bias {
            Some(vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self { weight, bias, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let xc = xf.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        let y = y.broadcast_mul(&self.weight.to_dtype(dtype)?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(dtype)?)?,
            None => y,
        })
    }
}

/// Names of the variables in `vars` whose gradient under `grads` is missing or all zero.
/// Tests use it to prove that every trainable parameter learns.
pub fn vars_without_grad(
    vars: &[(String, Var)],
    grads: &candle_core::backprop::GradStore,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (name, var) in vars {
        match grads.get(var.as_tensor()) {
            None => out.push(name.clone()),
            Some(g) => {
                let m = g.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                if m == 0.0 || !m.is_finite() {
                    out.push(name.clone());
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// All variables of a `VarMap`, sorted by name.
pub fn named_vars(varmap: &candle_nn::VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn fused_softmax_matches_composed_value_and_gradient() {
        let dev = Device::Cpu;
        let mut data = Tensor::randn(0f32, 3.0, (2, 3, 5, 7), &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // A causal-style mask: large negative entries, as attention adds them.
        for (i, v) in data.iter_mut().enumerate() {
            if i % 7 > (i / 7) % 5 + 2 {
                *v -= 1e9;
            }
        }
        let x = Var::from_tensor(&Tensor::from_vec(data, (2, 3, 5, 7), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 3, 5, 7), &dev).unwrap();
        let fused = softmax_last_dim(x.as_tensor()).unwrap();
        let composed = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        let close = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-6, "max difference {d}");
        };
        close(&fused, &composed);
        let gf = (&fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&composed * &w).unwrap().sum_all().unwrap().backward().unwrap();
        close(gf.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap());
        // A non-contiguous input gives the same as its contiguous copy.
        let t = x.as_tensor().transpose(2, 3).unwrap();
        close(&softmax_last_dim(&t).unwrap(), &candle_nn::ops::softmax(&t, D::Minus1).unwrap());
    }

    #[test]
    fn fused_swiglu_matches_composed_value_and_gradients() {
        let dev = Device::Cpu;
        let g = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, 700), &dev).unwrap()).unwrap();
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 700), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 3, 700), &dev).unwrap();
        let fused = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
        let composed = (candle_nn::ops::silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap();
        let close = |a: &Tensor, b: &Tensor| {
            let d = max_diff(a, b);
            assert!(d < 1e-5, "max difference {d}");
        };
        close(&fused, &composed);
        let gf = (&fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&composed * &w).unwrap().sum_all().unwrap().backward().unwrap();
        close(gf.get(g.as_tensor()).unwrap(), gc.get(g.as_tensor()).unwrap());
        close(gf.get(u.as_tensor()).unwrap(), gc.get(u.as_tensor()).unwrap());
        // A non-contiguous input gives the same as the composed op on it.
        let gt = g.as_tensor().transpose(1, 2).unwrap();
        let ut = u.as_tensor().transpose(1, 2).unwrap();
        close(&swiglu(&gt, &ut).unwrap(), &(candle_nn::ops::silu(&gt).unwrap() * &ut).unwrap());
    }

    #[test]
    fn dropout_masks_keep_the_expected_share_and_scale() {
        let m = dropout_mask_values(100_003, 0.1, 7);
        assert_eq!(m.len(), 100_003);
        let kept = m.iter().filter(|&&x| x != 0.0).count() as f64 / m.len() as f64;
        // 0.9 +- 5 standard deviations of a binomial share over 1e5 draws.
        assert!((kept - 0.9).abs() < 5.0 * (0.09f64 / 1e5).sqrt(), "{kept}");
        assert!(m.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.9).abs() < 1e-6));
        assert_eq!(m, dropout_mask_values(100_003, 0.1, 7));
        assert_ne!(m, dropout_mask_values(100_003, 0.1, 8));
        assert!(dropout_mask_values(10, 0.0, 1).iter().all(|&x| x == 1.0));
        assert!(dropout_mask_values(10, 1.0, 1).iter().all(|&x| x == 0.0));
    }

    #[test]
    fn masked_swiglu_matches_swiglu_then_mask() {
        let dev = Device::Cpu;
        let g = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, 70), &dev).unwrap()).unwrap();
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 70), &dev).unwrap()).unwrap();
        let m = Tensor::from_vec(dropout_mask_values(420, 0.3, 3), (2, 3, 70), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 3, 70), &dev).unwrap();
        let fused = swiglu_masked(g.as_tensor(), u.as_tensor(), Some(&m)).unwrap();
        let composed = (swiglu(g.as_tensor(), u.as_tensor()).unwrap() * &m).unwrap();
        assert!(max_diff(&fused, &composed) < 1e-6);
        let gf = (&fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&composed * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&g, &u] {
            assert!(max_diff(gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap()) < 1e-5);
        }
        assert!(max_diff(&swiglu_masked(g.as_tensor(), u.as_tensor(), None).unwrap(), &swiglu(g.as_tensor(), u.as_tensor()).unwrap()) == 0.0);
    }

    #[test]
    fn masked_ops_match_composed_and_leave_the_mask_without_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 33), &dev).unwrap()).unwrap();
        let y = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 33), &dev).unwrap()).unwrap();
        let keep: Vec<f32> = (0..2 * 5 * 33).map(|i| if i % 3 == 0 { 0.0 } else { 1.25 }).collect();
        let m = Tensor::from_vec(keep, (2, 5, 33), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 5, 33), &dev).unwrap();
        let fused = add_masked(x.as_tensor(), &mul_mask(y.as_tensor(), &m).unwrap(), &m).unwrap();
        let composed = (x.as_tensor() + ((y.as_tensor() * &m).unwrap() * &m).unwrap()).unwrap();
        assert!(max_diff(&fused, &composed) == 0.0);
        let gf = (&fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&composed * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &y] {
            assert!(max_diff(gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap()) < 1e-6);
        }
        assert!(gf.get(&m).is_none());
        // Dropped entries pass no gradient to y.
        let gy = gf.get(y.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(gy.iter().step_by(3).all(|&g| g == 0.0));
        assert!(mul_mask(x.as_tensor(), &m.narrow(2, 0, 32).unwrap()).is_err());
        assert!(add_masked(x.as_tensor(), y.as_tensor(), &m.narrow(2, 0, 32).unwrap()).is_err());
    }

    #[test]
    fn fused_attention_matches_composed_value_and_gradients() {
        let dev = Device::Cpu;
        // 6 positions: one query block; 150: two full blocks and a partial one.
        for s in [6usize, 150] {
            check_fused_attention(&dev, s);
        }
    }

    fn check_fused_attention(dev: &Device, s: usize) {
        use crate::layout::RopeCell;
        let dev = dev.clone();
        let (b, h, d) = (2usize, 3usize, 8usize);
        let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, s, 3 * h * d), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (b, s, h * d), &dev).unwrap();
        // A caption row (LlamaGen's zero tables) and image cells.
        let cells: Vec<RopeCell> = (0..s).map(|i| if i == 0 { RopeCell::Zero } else { RopeCell::Cell(i / 3, i % 3) }).collect();
        let (cos, sin) = super::rope::tables(&cells, d, 10000.0, &dev).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        // Causal, and a per-sample mask that also hides sample 1's first key.
        let causal: Vec<f32> = (0..s * s).map(|i| if i % s > i / s { f32::NEG_INFINITY } else { 0.0 }).collect();
        let causal = Tensor::from_vec(causal, (1, 1, s, s), &dev).unwrap();
        let pad = Tensor::from_vec((0..b * s).map(|i| if i == s { -1e9f32 } else { 0.0 }).collect::<Vec<_>>(), (b, 1, 1, s), &dev).unwrap();
        let per_sample = causal.broadcast_add(&pad).unwrap();
        // Sample 1 also never sees its last third of keys (-inf in every row): its query
        // blocks stop earlier than sample 0's.
        let late: Vec<f32> = (0..b * s).map(|i| if i >= s && i % s >= s - s / 3 && i % s > 0 { f32::NEG_INFINITY } else { 0.0 }).collect();
        let late = per_sample.broadcast_add(&Tensor::from_vec(late, (b, 1, 1, s), &dev).unwrap()).unwrap();
        let composed = |mask: Option<&Tensor>| {
            let x = qkv.as_tensor().reshape((b, s, 3, h, d)).unwrap().permute((2, 0, 3, 1, 4)).unwrap();
            let q = (super::rope::apply_composed(&x.get(0).unwrap(), &cos, &sin).unwrap() * scale).unwrap();
            let k = super::rope::apply_composed(&x.get(1).unwrap(), &cos, &sin).unwrap();
            let scores = q.matmul(&k.t().unwrap()).unwrap();
            let scores = match mask {
                Some(m) => scores.broadcast_add(m).unwrap(),
                None => scores,
            };
            let p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
            p.matmul(&x.get(2).unwrap()).unwrap().transpose(1, 2).unwrap().reshape((b, s, h * d)).unwrap()
        };
        for mask in [None, Some(&causal), Some(&per_sample), Some(&late)] {
            let fused = attention_qkv(qkv.as_tensor(), &cos, &sin, scale, h, mask).unwrap().unwrap();
            assert_eq!(fused.dims(), &[b, s, h * d]);
            let want = composed(mask);
            assert!(max_diff(&fused, &want) < 1e-5, "values differ by {}", max_diff(&fused, &want));
            let gf = (&fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (&want * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, c) = (gf.get(qkv.as_tensor()).unwrap(), gc.get(qkv.as_tensor()).unwrap());
            assert!(max_diff(a, c) < 1e-5, "gradients differ by {}", max_diff(a, c));
        }
        // A non-contiguous input gives the same as its contiguous copy.
        let t = qkv.as_tensor().transpose(1, 2).unwrap().contiguous().unwrap().transpose(1, 2).unwrap();
        let a = attention_qkv(&t, &cos, &sin, scale, h, Some(&causal)).unwrap().unwrap();
        assert!(max_diff(&a, &composed(Some(&causal))) < 1e-5);
        // No kernel for other dtypes (the caller composes); a width that does not split is an
        // error naming the shape.
        let f64_qkv = qkv.as_tensor().to_dtype(DType::F64).unwrap();
        assert!(attention_qkv(&f64_qkv, &cos, &sin, scale, h, None).unwrap().is_none());
        let e = attention_qkv(&qkv.as_tensor().narrow(2, 0, 3 * h * d - 3).unwrap(), &cos, &sin, scale, h, None).unwrap_err().to_string();
        assert!(e.contains("heads"), "{e}");
    }

    #[test]
    fn inference_weights_match_matmul() {
        let dev = Device::Cpu;
        // Few rows (dot products, serial and parallel) and many rows (gemm), widths that are
        // not multiples of the lanes or of the output block.
        for (n, k, m) in [(1usize, 300usize, 437usize), (2, 512, 384), (3, 96, 70), (4, 300, 1000), (9, 64, 130)] {
            let x = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let y = Weight::Dense(w.clone()).forward(&x).unwrap();
            assert_eq!(y.dims(), &[n, m]);
            assert!(max_diff(&y, &want) < 1e-3, "f32 {n}x{k}x{m}: {}", max_diff(&y, &want));
            // 16-bit weights: the product of the rounded weight, to f32 accuracy. Many rows of
            // a bf16 weight on a CPU with AVX-512 BF16 are multiplied in bf16: the rows are
            // rounded to bf16 too.
            for dt in [WeightDtype::Bf16, WeightDtype::F16] {
                let wr = Weight::Dense(w.clone()).convert(dt).unwrap();
                assert_eq!(wr.dtype(), dt);
                assert_eq!(wr.bytes(), m * k * 2);
                let xr = if dt == WeightDtype::Bf16 && n > crate::nn::FEW_ROWS && crate::nn::bf16_products_available() { x.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap() } else { x.clone() };
                let exact = xr.matmul(&wr.to_f32().unwrap().t().unwrap()).unwrap();
                let y = wr.forward(&x).unwrap();
                assert!(max_diff(&y, &exact) < 1e-3, "{dt} {n}x{k}x{m}: {}", max_diff(&y, &exact));
            }
        }
        // Exact on integers: row r of x is r + 1 everywhere, the weight all ones (f32 and bf16).
        let (k, m) = (512usize, 256usize);
        let x = Tensor::from_vec((0..2 * k).map(|i| (i / k + 1) as f32).collect::<Vec<_>>(), (2, k), &dev).unwrap();
        for dt in [WeightDtype::F32, WeightDtype::Bf16] {
            let w = Weight::Dense(Tensor::ones((m, k), DType::F32, &dev).unwrap()).convert(dt).unwrap();
            let y = w.forward(&x).unwrap();
            assert!(y.to_vec2::<f32>().unwrap().iter().enumerate().all(|(r, row)| row.iter().all(|&v| v == ((r + 1) * k) as f32)), "{dt}");
        }
        // Q8_0: close to the f32 product (8-bit rounding), a quarter of the bytes plus scales.
        let x = Tensor::randn(0f32, 1.0, (3, 256), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (96, 256), &dev).unwrap();
        let q = Weight::Dense(w.clone()).convert(WeightDtype::Q8_0).unwrap();
        assert_eq!(q.dtype(), WeightDtype::Q8_0);
        assert_eq!(q.bytes(), 96 * 256 / 32 * 34);
        let want = x.matmul(&w.t().unwrap()).unwrap();
        let rel = max_diff(&q.forward(&x).unwrap(), &want) / want.abs().unwrap().max_keepdim(1).unwrap().max(0).unwrap().squeeze(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(rel < 0.02, "q8_0 relative error {rel}");
        // A width off Q8_0's blocks, a mismatched input, and training on a converted weight are errors.
        let e = Weight::Dense(Tensor::zeros((4, 40), DType::F32, &dev).unwrap()).convert(WeightDtype::Q8_0).unwrap_err().to_string();
        assert!(e.contains("multiple of 32"), "{e}");
        assert!(Weight::Dense(Tensor::zeros((4, 3), DType::F32, &dev).unwrap()).forward(&Tensor::zeros((1, 4), DType::F32, &dev).unwrap()).is_err());
        let e = q.tensor().unwrap_err().to_string();
        assert!(e.contains("inference only"), "{e}");
        assert_eq!("Q8_0".parse::<WeightDtype>().unwrap(), WeightDtype::Q8_0);
        assert!("int4".parse::<WeightDtype>().unwrap_err().contains("expected f32, bf16, f16, q8_0 or q4_k"));
    }

    #[test]
    fn autocast_multiplies_in_bf16_and_keeps_f32_gradients() {
        let dev = Device::Cpu;
        // Values and products exact in bf16 (8 significant bits).
        let x = candle_core::Var::new(&[[1f32, 2., 3.], [0.5, -1., 4.]], &dev).unwrap();
        let w = candle_core::Var::new(&[[1f32, 0., -1.], [2., 0.25, 1.]], &dev).unwrap();
        let want = vec![vec![-2f32, 5.5], vec![-3.5, 4.75]];
        // 1 + 2^-10 is not a bf16 value: it rounds to 1 under autocast only.
        let fine = Tensor::new(&[[1.0f32 + 1.0 / 1024.0]], &dev).unwrap();
        let one = Tensor::new(&[[1f32]], &dev).unwrap();
        {
            let _bf16 = autocast(Some(DType::BF16));
            let y = linear(x.as_tensor(), w.as_tensor()).unwrap();
            assert_eq!(y.dtype(), DType::F32);
            assert_eq!(y.to_vec2::<f32>().unwrap(), want);
            let g = y.sum_all().unwrap().backward().unwrap();
            let gw = g.get(w.as_tensor()).unwrap();
            assert_eq!(gw.dtype(), DType::F32);
            // d(sum)/dw[o][i] = sum over rows of x[.][i].
            assert_eq!(gw.to_vec2::<f32>().unwrap(), vec![vec![1.5f32, 1., 7.], vec![1.5, 1., 7.]]);
            assert_eq!(g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap(), vec![vec![3f32, 0.25, 0.], vec![3., 0.25, 0.]]);
            assert_eq!(linear(&fine, &one).unwrap().to_vec2::<f32>().unwrap(), vec![vec![1f32]]);
        }
        // The guard restored f32 products.
        assert_eq!(linear(&fine, &one).unwrap().to_vec2::<f32>().unwrap(), vec![vec![1.0f32 + 1.0 / 1024.0]]);
        assert_eq!(linear(x.as_tensor(), w.as_tensor()).unwrap().to_vec2::<f32>().unwrap(), want);
    }

    #[test]
    fn fused_linear_matches_matmul_value_and_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 7), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap()).unwrap();
        let m = Tensor::randn(0f32, 1.0, (2, 5, 3), &dev).unwrap();
        let fused = linear(x.as_tensor(), w.as_tensor()).unwrap();
        assert_eq!(fused.dims(), &[2, 5, 3]);
        let composed = x.as_tensor().broadcast_matmul(&w.as_tensor().t().unwrap()).unwrap();
        assert!(max_diff(&fused, &composed) < 1e-5);
        // Exact on a small case: [1, 2] . [3, 4] = 11.
        let one = linear(&Tensor::new(&[[1f32, 2.0]], &dev).unwrap(), &Tensor::new(&[[3f32, 4.0]], &dev).unwrap()).unwrap();
        assert_eq!(one.to_vec2::<f32>().unwrap(), vec![vec![11f32]]);
        let gf = (&fused * &m).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&composed * &m).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            let (a, c) = (gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
            assert_eq!(a.dims(), v.dims());
            assert!(max_diff(a, c) < 1e-5, "gradients differ by {}", max_diff(a, c));
        }
        // A non-contiguous input; a weight that does not fit is an error naming the shapes.
        let xt = x.as_tensor().transpose(0, 1).unwrap();
        let want = xt.contiguous().unwrap().broadcast_matmul(&w.as_tensor().t().unwrap()).unwrap();
        assert!(max_diff(&linear(&xt, w.as_tensor()).unwrap(), &want) < 1e-5);
        let e = linear(x.as_tensor(), &w.as_tensor().t().unwrap()).unwrap_err().to_string();
        assert!(e.contains("7 x 3"), "{e}");
    }

    #[test]
    fn swiglu_halves_matches_silu_times_up() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 3, 10), &dev).unwrap();
        let fused = swiglu_halves(&x).unwrap();
        assert_eq!(fused.dims(), &[2, 3, 5]);
        let want = (candle_nn::ops::silu(&x.narrow(2, 0, 5).unwrap()).unwrap() * x.narrow(2, 5, 5).unwrap()).unwrap();
        let d = max_diff(&fused, &want);
        assert!(d < 1e-5, "max difference {d}");
        let err = swiglu_halves(&Tensor::zeros((2, 3), DType::F32, &dev).unwrap()).unwrap_err().to_string();
        assert!(err.contains("odd"), "{err}");
    }

    #[test]
    fn rms_norm_values_and_grad() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let n = RmsNorm::new(2, 0.0, vb.pp("n")).unwrap();
        let x = Var::new(&[[3f32, 4.0]], &Device::Cpu).unwrap();
        let y = n.forward(x.as_tensor()).unwrap();
        // rms = sqrt((9 + 16) / 2)
        let r = (12.5f32).sqrt();
        let got = y.to_vec2::<f32>().unwrap();
        assert!((got[0][0] - 3.0 / r).abs() < 1e-6 && (got[0][1] - 4.0 / r).abs() < 1e-6);
        let loss = (y * Tensor::new(&[[1f32, -2.0]], &Device::Cpu).unwrap()).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
        let vars = named_vars(&vm);
        assert!(vars_without_grad(&vars, &g).unwrap().is_empty());
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn masked_softmax_matches_softmax_of_the_sum() {
        let dev = Device::Cpu;
        let (b, h, s, l) = (2usize, 3usize, 4usize, 6usize);
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (b, h, s, l), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (b, h, s, l), &dev).unwrap();
        // Causal after 2 cached keys (-inf), plus a padded key in batch row 1 (-1e9).
        let causal: Vec<f32> = (0..s).flat_map(|i| (0..l).map(move |j| if j <= 2 + i { 0.0 } else { f32::NEG_INFINITY })).collect();
        let causal = Tensor::from_vec(causal, (1, 1, s, l), &dev).unwrap();
        let pad = Tensor::from_vec(vec![0f32, 0., 0., 0., 0., 0., 0., -1e9, 0., 0., 0., 0.], (b, 1, 1, l), &dev).unwrap();
        for mask in [causal.clone(), causal.broadcast_add(&pad).unwrap()] {
            let fused = masked_softmax_last_dim(x.as_tensor(), Some(&mask)).unwrap();
            let composed = candle_nn::ops::softmax(&x.as_tensor().broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
            assert!(max_diff(&fused, &composed) < 1e-6);
            let gf = (&fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (&composed * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(max_diff(gf.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap()) < 1e-6);
        }
        // Masked keys get exactly zero weight.
        let flat = masked_softmax_last_dim(x.as_tensor(), Some(&causal)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat[l - 1], 0.0);
        // A mask of another shape falls back to the broadcast sum (or its error).
        let odd = Tensor::zeros((1, 1, 1, l), DType::F32, &dev).unwrap();
        let y = masked_softmax_last_dim(x.as_tensor(), Some(&odd)).unwrap();
        assert!(max_diff(&y, &softmax_last_dim(x.as_tensor()).unwrap()) < 1e-6);
        assert!(masked_softmax_last_dim(x.as_tensor(), Some(&Tensor::zeros((1, 1, 1, l + 1), DType::F32, &dev).unwrap())).is_err());
    }

    #[test]
    fn fused_rms_norm_matches_composed_value_and_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 5, 6), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, 6, &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (2, 5, 6), &dev).unwrap();
        let norm = RmsNorm { weight: w.as_tensor().clone(), eps: 1e-5 };
        let fused = norm.forward(x.as_tensor()).unwrap();
        let composed = norm.forward_composed(x.as_tensor()).unwrap();
        assert!(max_diff(&fused, &composed) < 1e-5, "{}", max_diff(&fused, &composed));
        let gf = (&fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&composed * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [x.as_tensor(), w.as_tensor()] {
            let d = max_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(d < 1e-4, "gradient differs by {d}");
        }
    }

    #[test]
    fn fused_rope_matches_composed_value_and_gradient() {
        let dev = Device::Cpu;
        let (s, d) = (5usize, 8usize);
        let cells: Vec<_> = (0..s).map(|i| crate::layout::RopeCell::Cell(i, 2 * i + 1)).collect();
        let (cos, sin) = super::rope::tables(&cells, d, 100.0, &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, s, d), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (2, 3, s, d), &dev).unwrap();
        let fused = rope_interleaved(x.as_tensor(), &cos, &sin).unwrap().unwrap();
        let reference = candle_nn::rotary_emb::rope_i(x.as_tensor(), &cos, &sin).unwrap();
        assert!(max_diff(&fused, &reference) < 1e-6);
        // Composed: the same rotation from elementary ops, whose gradient candle derives.
        let composed = super::rope::apply_composed(x.as_tensor(), &cos, &sin).unwrap();
        assert!(max_diff(&fused, &composed) < 1e-6);
        let gf = (&fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&composed * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let dg = max_diff(gf.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap());
        assert!(dg < 1e-6, "gradient differs by {dg}");
        // Tables of the wrong length are an error, not a panic.
        let short = cos.narrow(0, 0, s - 1).unwrap();
        assert!(rope_interleaved(x.as_tensor(), &short, &short).is_err());
    }

    #[test]
    fn layer_norm_zero_mean_unit_var() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let n = LayerNorm::new(4, 1e-5, true, vb).unwrap();
        let x = Tensor::new(&[[1f32, 2.0, 3.0, 4.0]], &Device::Cpu).unwrap();
        let y = n.forward(&x).unwrap();
        let m = y.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(m.abs() < 1e-6);
        let v = y.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((v - 1.0).abs() < 1e-3);
    }
}
