//! The trainable linear layer `x @ w^T` as one op on the CPU.
//!
//! Composed, a linear layer over (B, S, in) activations is four graph nodes (flatten, weight
//! transpose, matmul, unflatten), and candle's backward pass gives every node's input a fresh
//! zero-filled gradient that it then adds into: two extra passes over the activations for
//! each view, and for the output head (logits of the whole batch) the largest tensors of the
//! step. Here the op reads the activations and the weight where they lie and its backward
//! pass is two matrix products.

use super::rows_of;
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `x @ w^T` over the last dimension: `x` (..., in), `w` (out, in) -> (..., out). Gradients
/// pass to both. On the CPU in f32 one op (forward and backward straight to the matrix
/// kernels); elsewhere candle's matmul on the flattened rows.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (dout, din) = w.dims2()?;
    if dims.last() != Some(&din) {
        return Err(crate::error::Error::invalid("linear", format!("input {dims:?} does not end in the weight's {din} inputs ({dout} x {din})")));
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op2(&w.contiguous()?, FusedLinear)?);
    }
    let n: usize = dims[..dims.len() - 1].iter().product();
    Ok(x.reshape((n, din))?.matmul(&w.t()?)?.reshape(with_last(&dims, dout))?)
}

/// `dims` with the last dimension replaced by `last`.
fn with_last(dims: &[usize], last: usize) -> Shape {
    let mut d = dims.to_vec();
    if let Some(l) = d.last_mut() {
        *l = last;
    }
    Shape::from(d)
}

/// `dst (m x n) = a (m x k) * b (k x n)`, matrices given by slice and (row, column) strides,
/// on rayon's pool when it has more than one thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm(m: usize, n: usize, k: usize, dst: &mut [f32], a: &[f32], a_rs: usize, a_cs: usize, b: &[f32], b_rs: usize, b_cs: usize) -> candle_core::Result<()> {
    let reach = |rows: usize, cols: usize, rs: usize, cs: usize| if rows == 0 || cols == 0 { 0 } else { (rows - 1) * rs + (cols - 1) * cs + 1 };
    if dst.len() < m * n || a.len() < reach(m, k, a_rs, a_cs) || b.len() < reach(k, n, b_rs, b_cs) {
        candle_core::bail!("matrix product: buffers too small for a {m} x {k} by {k} x {n} product");
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the extents were checked above; dst is a distinct, exclusively borrowed buffer.
    unsafe { super::gemm_strided(m, n, k, (dst.as_mut_ptr(), n), (a.as_ptr(), a_rs, a_cs), (b.as_ptr(), b_rs, b_cs), par) };
    Ok(())
}

/// Rows of `x` (n x in) and the weight's shape.
fn shapes(lx: &Layout, lw: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let &[dout, din] = lw.shape().dims() else { candle_core::bail!("linear: weight {:?} is not 2-D", lw.shape()) };
    let n = lx.shape().elem_count() / din.max(1);
    if lx.shape().dims().last() != Some(&din) {
        candle_core::bail!("linear: input {:?} for a {dout} x {din} weight", lx.shape());
    }
    Ok((n, dout, din))
}

struct FusedLinear;

impl CustomOp2 for FusedLinear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, dout, din) = shapes(lx, lw)?;
        let (x, _) = rows_of(sx, lx)?;
        let (w, _) = rows_of(sw, lw)?;
        let mut y = vec![0f32; n * dout];
        // y = x w^T: w^T (in x out) is w read with row stride 1, column stride in.
        mm(n, dout, din, &mut y, x, din, 1, w, 1, din)?;
        Ok((CpuStorage::F32(y), with_last(lx.shape().dims(), dout)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dx = g.apply_op2_no_bwd(w, &LinearGrad::Input)?;
        let dw = g.apply_op2_no_bwd(x, &LinearGrad::Weight)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The two products of the backward pass, from the output gradient `g` (n x out):
/// `Input`: `g w` (n x in) given `w`; `Weight`: `g^T x` (out x in) given `x`.
enum LinearGrad {
    Input,
    Weight,
}

impl CustomOp2 for LinearGrad {
    fn name(&self) -> &'static str {
        match self {
            Self::Input => "fused-linear-grad-input",
            Self::Weight => "fused-linear-grad-weight",
        }
    }

    fn cpu_fwd(&self, sg: &CpuStorage, lg: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, dout) = rows_of(sg, lg)?;
        let (b, width) = rows_of(s2, l2)?;
        let n = g.len() / dout.max(1);
        match self {
            Self::Input => {
                // b = w (out x in).
                let din = width;
                let mut dx = vec![0f32; n * din];
                mm(n, din, dout, &mut dx, g, dout, 1, b, din, 1)?;
                Ok((CpuStorage::F32(dx), with_last(lg.shape().dims(), din)))
            }
            Self::Weight => {
                // b = x (n x in); g^T (out x n) is g read with row stride 1, column stride out.
                let din = width;
                if b.len() != n * din {
                    candle_core::bail!("linear grad: {} input rows for {n} gradient rows", b.len() / din.max(1));
                }
                let mut dw = vec![0f32; dout * din];
                mm(dout, din, n, &mut dw, g, 1, dout, b, din, 1)?;
                Ok((CpuStorage::F32(dw), Shape::from((dout, din))))
            }
        }
    }
}

/// Rows up to which [`few_rows_matmul`] takes over from gemm.
pub const FEW_ROWS: usize = 4;

/// Weights from this many values on (512 KiB in f32) are past the caches, where
/// [`few_rows_matmul`] beats gemm; smaller ones stay cached and gemm's wider kernels win.
pub const FEW_ROWS_MIN_WEIGHT: usize = 1 << 17;

/// `x @ wt` for the few rows of a decoding step: `x` (n, in) with n <= [`FEW_ROWS`], `wt` a
/// pre-transposed (in, out) weight of at least [`FEW_ROWS_MIN_WEIGHT`] values. One pass over
/// the weight for all rows, with no packing: gemm copies the whole weight into its panel
/// layout on every call, which for one or two rows of a large weight doubles the memory
/// traffic the product is bound by. Inference only (no gradient). `None` where it does not
/// apply (more rows, a small weight, not f32 on the CPU).
pub fn few_rows_matmul(x: &Tensor, wt: &Tensor) -> Result<Option<Tensor>> {
    let (n, din) = x.dims2()?;
    let (k, _) = wt.dims2()?;
    if k != din {
        return Err(crate::error::Error::invalid("matmul", format!("rows of width {din} for a ({k}, ..) weight")));
    }
    if n == 0 || n > FEW_ROWS || wt.elem_count() < FEW_ROWS_MIN_WEIGHT || !x.device().is_cpu() || x.dtype() != DType::F32 || wt.dtype() != DType::F32 {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op2_no_bwd(&wt.contiguous()?, &FewRows)?))
}

struct FewRows;

/// Output columns per parallel job (a multiple of the vector width).
const COLUMN_BLOCK: usize = 256;

impl CustomOp2 for FewRows {
    fn name(&self) -> &'static str {
        "few-rows-matmul"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, k) = rows_of(sx, lx)?;
        let (w, m) = rows_of(sw, lw)?;
        let n = x.len() / k.max(1);
        if w.len() != k * m {
            candle_core::bail!("few-rows matmul: weight of {} values for ({k}, {m})", w.len());
        }
        // Columns c0..c0 + width of every row into `out` (n x width).
        let block = |c0: usize, width: usize, out: &mut [f32]| {
            for i in 0..k {
                let wr = &w[i * m + c0..i * m + c0 + width];
                for (r, o) in out.chunks_exact_mut(width).enumerate() {
                    crate::vmath::axpy(x[r * k + i], wr, o);
                }
            }
        };
        let mut y = vec![0f32; n * m];
        if rayon::current_num_threads() > 1 {
            let parts: Vec<(usize, Vec<f32>)> = (0..m)
                .step_by(COLUMN_BLOCK)
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(|c0| {
                    let width = COLUMN_BLOCK.min(m - c0);
                    let mut out = vec![0f32; n * width];
                    block(c0, width, &mut out);
                    (c0, out)
                })
                .collect();
            for (c0, out) in parts {
                let width = out.len() / n;
                for (r, o) in out.chunks_exact(width).enumerate() {
                    y[r * m + c0..r * m + c0 + width].copy_from_slice(o);
                }
            }
        } else {
            block(0, m, &mut y);
        }
        Ok((CpuStorage::F32(y), Shape::from((n, m))))
    }
}
