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
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
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

/// Rows up to which an inference product reads the weight row by row (dot products, one pass
/// over the weight for all rows) instead of going through gemm.
pub const FEW_ROWS: usize = 4;

/// Weights from this many values on are split across threads in the few-rows product; smaller
/// ones are one job (the pool's overhead would outweigh the work).
const PARALLEL_MIN_WEIGHT: usize = 1 << 15;

/// Output rows of the weight per parallel job of the few-rows product.
const OUTPUT_BLOCK: usize = 64;

/// How inference weights are stored: the trained f32, 16-bit floats (bf16 keeps f32's range,
/// f16 keeps 3 more mantissa bits), or 8-bit blocks (ggml's Q8_0: 32 values of i8 and one f16
/// scale, 8.5 bits per value). Activations stay f32 throughout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    #[default]
    F32,
    Bf16,
    F16,
    Q8_0,
}

impl WeightDtype {
    pub const ALL: [WeightDtype; 4] = [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16, WeightDtype::Q8_0];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
        }
    }

    /// The candle dtype of a dense weight of this kind (`None` for the quantized kind).
    fn dense(self) -> Option<DType> {
        match self {
            Self::F32 => Some(DType::F32),
            Self::Bf16 => Some(DType::BF16),
            Self::F16 => Some(DType::F16),
            Self::Q8_0 => None,
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" | "half" => Ok(Self::F16),
            "q8_0" | "q8" | "int8" | "8bit" => Ok(Self::Q8_0),
            _ => Err(format!("unknown weight dtype `{s}` (expected f32, bf16, f16 or q8_0)")),
        }
    }
}

/// A linear layer's weight, `(out, in)`, as inference reads it: dense (f32, which training
/// also uses, or bf16/f16) or quantized. [`Weight::forward`] takes and returns f32 rows.
#[derive(Clone, Debug)]
pub enum Weight {
    Dense(Tensor),
    Quantized(std::sync::Arc<QTensor>),
}

impl Weight {
    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Self::Dense(w) => w.dims2()?,
            Self::Quantized(q) => q.shape().dims2()?,
        })
    }

    pub fn dtype(&self) -> WeightDtype {
        match self {
            Self::Dense(w) if w.dtype() == DType::BF16 => WeightDtype::Bf16,
            Self::Dense(w) if w.dtype() == DType::F16 => WeightDtype::F16,
            Self::Dense(_) => WeightDtype::F32,
            Self::Quantized(_) => WeightDtype::Q8_0,
        }
    }

    /// Bytes the weight occupies (what a pass over it reads).
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Self::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    /// The trainable f32 tensor; an error once the weight was converted for inference.
    pub fn tensor(&self) -> Result<&Tensor> {
        match self {
            Self::Dense(w) if w.dtype() == DType::F32 => Ok(w),
            _ => Err(crate::error::Error::invalid("weights", format!("weights converted to {} serve inference only; training and teacher-forced passes need f32", self.dtype()))),
        }
    }

    /// The values as an f32 `(out, in)` tensor (a copy unless already f32).
    pub fn to_f32(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(w) => w.to_dtype(DType::F32)?,
            Self::Quantized(q) => q.dequantize(&q.device())?,
        })
    }

    /// This weight stored as `dtype` (from f32 values; a reduced weight is widened first).
    /// Q8_0 needs the input width to be a multiple of its block of 32 values.
    pub fn convert(&self, dtype: WeightDtype) -> Result<Weight> {
        if self.dtype() == dtype {
            return Ok(self.clone());
        }
        let w = self.to_f32()?;
        match dtype.dense() {
            Some(d) => Ok(Self::Dense(w.to_dtype(d)?)),
            None => {
                let (out, inp) = w.dims2()?;
                let block = GgmlDType::Q8_0.block_size();
                if inp % block != 0 {
                    return Err(crate::error::Error::invalid("weights", format!("a ({out}, {inp}) weight cannot be stored as q8_0: its input width is not a multiple of {block}")));
                }
                Ok(Self::Quantized(std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?)))
            }
        }
    }

    /// `x @ w^T` over the last dimension of `x` (f32, `(..., in)`) -> f32 `(..., out)`, for
    /// inference (no gradient). On the CPU, up to [`FEW_ROWS`] rows read the weight once, row
    /// by row, widening bf16/f16 on the fly (a decoding step is bound by reading the weights);
    /// more rows go through gemm (a 16-bit weight widened to f32 first). Q8_0 weights use
    /// candle's quantized kernels.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (dout, din) = self.dims()?;
        if dims.last() != Some(&din) {
            return Err(crate::error::Error::invalid("linear", format!("input {dims:?} does not end in the weight's {din} inputs ({dout} x {din})")));
        }
        let n: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((n, din))?;
        let y = match self {
            Self::Dense(w) if x.device().is_cpu() && x.dtype() == DType::F32 => x2.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &DenseProduct)?,
            Self::Dense(w) => x2.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(x.dtype())?,
            Self::Quantized(q) => {
                use candle_core::Module;
                QMatMul::from_arc(q.clone())?.forward(&x2.contiguous()?)?
            }
        };
        Ok(y.reshape(with_last(&dims, dout))?)
    }
}

/// `x (n, in) @ w^T` for a dense `(out, in)` weight in f32, bf16 or f16; see [`Weight::forward`].
struct DenseProduct;

/// `dst[r] = x_r . w_row` for the `dst.len()` rows of `x` (each `w_row.len()` wide), with the
/// weight row widened to f32 into `scratch` unless it is f32 already.
fn dot_row<T: Widen>(w_row: &[T], x: &[f32], scratch: &mut [f32], dst: &mut [f32]) {
    let w = T::widen(w_row, scratch);
    crate::vmath::dot_rows(w, x, dst);
}

/// Element types of dense weights, widened to f32.
trait Widen: Copy + Send + Sync + candle_core::WithDType {
    /// `src` as f32: itself for f32, else converted into `scratch`.
    fn widen<'a>(src: &'a [Self], scratch: &'a mut [f32]) -> &'a [f32];
}

impl Widen for f32 {
    fn widen<'a>(src: &'a [f32], _: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl Widen for half::bf16 {
    fn widen<'a>(src: &'a [Self], scratch: &'a mut [f32]) -> &'a [f32] {
        let out = &mut scratch[..src.len()];
        // SAFETY: bf16 is a transparent wrapper of its u16 bits.
        let bits = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const u16, src.len()) };
        crate::vmath::widen_bf16(bits, out);
        out
    }
}

impl Widen for half::f16 {
    fn widen<'a>(src: &'a [Self], scratch: &'a mut [f32]) -> &'a [f32] {
        use half::slice::HalfFloatSliceExt;
        let out = &mut scratch[..src.len()];
        src.convert_to_f32_slice(out);
        out
    }
}

/// The product for one element type: few rows by dot products over the weight's rows (in
/// parallel blocks of outputs), more rows by gemm on the f32 weight.
fn dense_product<T: Widen>(x: &[f32], n: usize, w: &[T], dout: usize, din: usize) -> candle_core::Result<Vec<f32>> {
    if n <= FEW_ROWS {
        // Transposed result (out, n), one block of outputs per job; transposed back below.
        let mut yt = vec![0f32; dout * n];
        let job = |(b, out): (usize, &mut [f32]), scratch: &mut Vec<f32>| {
            for (j, dst) in out.chunks_exact_mut(n).enumerate() {
                let o = b * OUTPUT_BLOCK + j;
                dot_row(&w[o * din..(o + 1) * din], x, scratch, dst);
            }
        };
        if rayon::current_num_threads() > 1 && dout * din >= PARALLEL_MIN_WEIGHT {
            yt.par_chunks_mut(OUTPUT_BLOCK * n).enumerate().for_each_init(|| vec![0f32; din], |s, item| job(item, s));
        } else {
            let mut scratch = vec![0f32; din];
            yt.chunks_mut(OUTPUT_BLOCK * n).enumerate().for_each(|item| job(item, &mut scratch));
        }
        if n == 1 {
            return Ok(yt);
        }
        let mut y = vec![0f32; n * dout];
        for (o, v) in yt.chunks_exact(n).enumerate() {
            for (r, &val) in v.iter().enumerate() {
                y[r * dout + o] = val;
            }
        }
        return Ok(y);
    }
    let mut y = vec![0f32; n * dout];
    let mut wide = Vec::new();
    let w32: &[f32] = if T::DTYPE == DType::F32 {
        // SAFETY: T is f32 here (checked by its dtype).
        unsafe { std::slice::from_raw_parts(w.as_ptr() as *const f32, w.len()) }
    } else {
        wide.resize(w.len(), 0f32);
        // For the 16-bit types `widen` writes into its scratch, here the row of `wide`.
        wide.par_chunks_mut(din).zip(w.par_chunks(din)).for_each(|(o, r)| {
            T::widen(r, o);
        });
        &wide
    };
    // y = x w^T: w^T (in x out) is w read with row stride 1, column stride in.
    mm(n, dout, din, &mut y, x, din, 1, w32, 1, din)?;
    Ok(y)
}

impl CustomOp2 for DenseProduct {
    fn name(&self) -> &'static str {
        "inference-linear"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, din) = rows_of(sx, lx)?;
        let n = x.len() / din.max(1);
        let &[dout, wd] = lw.shape().dims() else { candle_core::bail!("linear: weight {:?} is not 2-D", lw.shape()) };
        let Some((a, b)) = lw.contiguous_offsets() else { candle_core::bail!("linear: the weight is not contiguous") };
        if wd != din || b - a != dout * din {
            candle_core::bail!("linear: rows of width {din} for a {:?} weight", lw.shape());
        }
        let y = match sw {
            CpuStorage::F32(w) => dense_product(x, n, &w[a..b], dout, din)?,
            CpuStorage::BF16(w) => dense_product(x, n, &w[a..b], dout, din)?,
            CpuStorage::F16(w) => dense_product(x, n, &w[a..b], dout, din)?,
            _ => candle_core::bail!("linear: weights of an unsupported dtype (expected f32, bf16 or f16)"),
        };
        Ok((CpuStorage::F32(y), Shape::from((n, dout))))
    }
}
