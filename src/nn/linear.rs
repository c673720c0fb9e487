//! The trainable linear layer `x @ w^T` as one op on the CPU.
//!
//! Composed, a linear layer over (B, S, in) activations is four graph nodes (flatten, weight
//! transpose, matmul, unflatten), and candle's backward pass gives every node's input a fresh
//! zero-filled gradient that it then adds into: two extra passes over the activations for
//! each view, and for the output head (logits of the whole batch) the largest tensors of the
//! step. Here the op reads the activations and the weight where they lie and its backward
//! pass is two matrix products.

mod bf16dot;
mod quant;

pub use bf16dot::available as bf16_products_available;

use super::rows_of;
use crate::error::Result;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

thread_local! {
    static AUTOCAST: std::cell::Cell<Option<DType>> = const { std::cell::Cell::new(None) };
}

/// Until the returned guard is dropped, [`linear`] on this thread multiplies f32 inputs and
/// weights in `dtype` (bf16 or f16) and returns f32: mixed-precision training with f32 master
/// weights (their gradients come back in f32 through the casts). `None`: f32 products.
pub fn autocast(dtype: Option<DType>) -> AutocastGuard {
    AutocastGuard(AUTOCAST.with(|a| a.replace(dtype)))
}

/// Restores the previous [`autocast`] setting when dropped.
pub struct AutocastGuard(Option<DType>);

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        AUTOCAST.with(|a| a.set(self.0));
    }
}

/// `x @ w^T` over the last dimension: `x` (..., in), `w` (out, in) -> (..., out). Gradients
/// pass to both. On the CPU in f32 one op (forward and backward straight to the matrix
/// kernels); elsewhere candle's matmul on the flattened rows. Under [`autocast`] the product of
/// f32 operands runs in the autocast dtype.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (dout, din) = w.dims2()?;
    if dims.last() != Some(&din) {
        return Err(crate::error::Error::invalid("linear", format!("input {dims:?} does not end in the weight's {din} inputs ({dout} x {din})")));
    }
    if let Some(dt) = AUTOCAST.with(|a| a.get()).filter(|_| x.dtype() == DType::F32 && w.dtype() == DType::F32) {
        let n: usize = dims[..dims.len() - 1].iter().product();
        let y = x.reshape((n, din))?.to_dtype(dt)?.matmul(&w.to_dtype(dt)?.t()?)?.to_dtype(DType::F32)?;
        return Ok(y.reshape(with_last(&dims, dout))?);
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
/// f16 keeps 3 more mantissa bits), 8-bit blocks (ggml's Q8_0: 32 values of i8 and one f16
/// scale, 8.5 bits per value), or 4-bit k-quant super-blocks (ggml's Q4_K: 256 values of 4
/// bits in 8 groups with 6-bit scales and minimums, 4.5 bits per value; a weight whose input
/// width is not a multiple of 256 is stored as Q8_0 instead). Activations stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    #[default]
    F32,
    Bf16,
    F16,
    Q8_0,
    Q4K,
}

impl WeightDtype {
    pub const ALL: [WeightDtype; 5] = [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16, WeightDtype::Q8_0, WeightDtype::Q4K];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
        }
    }

    /// The candle dtype of a dense weight of this kind (`None` for the quantized kind).
    fn dense(self) -> Option<DType> {
        match self {
            Self::F32 => Some(DType::F32),
            Self::Bf16 => Some(DType::BF16),
            Self::F16 => Some(DType::F16),
            Self::Q8_0 | Self::Q4K => None,
        }
    }

    /// The ggml block format of a quantized kind for a weight `in_width` values wide.
    fn ggml(self, in_width: usize) -> Option<GgmlDType> {
        match self {
            Self::Q8_0 => Some(GgmlDType::Q8_0),
            Self::Q4K if in_width % GgmlDType::Q4K.block_size() == 0 => Some(GgmlDType::Q4K),
            Self::Q4K => Some(GgmlDType::Q8_0),
            _ => None,
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
            "q4_k" | "q4k" | "4bit" => Ok(Self::Q4K),
            _ => Err(format!("unknown weight dtype `{s}` (expected f32, bf16, f16, q8_0 or q4_k)")),
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
            Self::Quantized(q) if q.dtype() == GgmlDType::Q4K => WeightDtype::Q4K,
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
    /// Q8_0 needs the input width to be a multiple of its block of 32 values; Q4_K falls back
    /// to Q8_0 where it is not a multiple of 256.
    pub fn convert(&self, dtype: WeightDtype) -> Result<Weight> {
        if self.dtype() == dtype {
            return Ok(self.clone());
        }
        Self::from_f32(&self.to_f32()?, dtype)
    }

    /// An f32 `(out, in)` tensor stored as `dtype` (see [`Weight::convert`]).
    pub fn from_f32(w: &Tensor, dtype: WeightDtype) -> Result<Weight> {
        let (out, inp) = w.dims2()?;
        match (dtype.dense(), dtype.ggml(inp)) {
            (Some(DType::F32), _) => Ok(Self::Dense(w.to_dtype(DType::F32)?)),
            (Some(d), _) => Ok(Self::Dense(w.to_dtype(d)?)),
            (None, Some(g)) => {
                let block = g.block_size();
                if inp % block != 0 {
                    return Err(crate::error::Error::invalid("weights", format!("a ({out}, {inp}) weight cannot be stored as {dtype}: its input width is not a multiple of {block}")));
                }
                Ok(Self::Quantized(std::sync::Arc::new(QTensor::quantize(&w.to_dtype(DType::F32)?, g)?)))
            }
            (None, None) => Err(crate::error::Error::invalid("weights", format!("no storage for {dtype}"))),
        }
    }

    /// `x @ w^T` over the last dimension of `x` (f32, `(..., in)`) -> f32 `(..., out)`, for
    /// inference (no gradient). On the CPU, up to [`FEW_ROWS`] rows read the weight once, row
    /// by row, widening bf16/f16 on the fly (a decoding step is bound by reading the weights);
    /// more rows go through gemm, except bf16 and Q8_0 weights on a CPU with AVX-512 BF16,
    /// multiplied in bf16 (`bf16dot`; elsewhere widened to f32 for gemm). Quantized
    /// weights are read in place from candle's blocks, a few rows by integer dot products
    /// against the rows quantized likewise (`quant`); candle's own quantized matmul, whose
    /// thread pool spins, serves other devices.
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
            Self::Quantized(q) if x.device().is_cpu() && x.dtype() == DType::F32 && matches!(q.dtype(), GgmlDType::Q8_0 | GgmlDType::Q4K) => quant_forward(&x2, q)?,
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

/// A weight's storage on the CPU, `(out, in)` row-major, read one row at a time as f32.
#[derive(Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
    F16(&'a [half::f16]),
    /// ggml Q8_0 blocks: per 32 values an f16 scale (little-endian) and 32 i8.
    Q8(&'a [u8]),
}

/// Bytes of one Q8_0 block (f16 scale, 32 i8 values) and the values it holds.
use quant::{Q8_BLOCK, Q8_BLOCK_BYTES};

impl<'a> Rows<'a> {
    /// Row `o` of `din` values as f32: the storage itself for f32, else widened into `scratch`.
    fn row<'s>(&'s self, o: usize, din: usize, scratch: &'s mut [f32]) -> &'s [f32] {
        match *self {
            Rows::F32(w) => &w[o * din..(o + 1) * din],
            Rows::Bf16(w) => {
                let src = &w[o * din..(o + 1) * din];
                // SAFETY: bf16 is a transparent wrapper of its u16 bits.
                let bits = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const u16, din) };
                crate::vmath::widen_bf16(bits, &mut scratch[..din]);
                &scratch[..din]
            }
            Rows::F16(w) => {
                use half::slice::HalfFloatSliceExt;
                w[o * din..(o + 1) * din].convert_to_f32_slice(&mut scratch[..din]);
                &scratch[..din]
            }
            Rows::Q8(b) => {
                let row_bytes = din / Q8_BLOCK * Q8_BLOCK_BYTES;
                crate::vmath::dequantize_q8_0(&b[o * row_bytes..(o + 1) * row_bytes], &mut scratch[..din]);
                &scratch[..din]
            }
        }
    }
}

/// `x (n, din) @ w^T` for a `(dout, din)` weight: up to [`FEW_ROWS`] rows by dot products over
/// the weight's rows (one pass over the weight, parallel blocks of outputs, each row widened
/// on the fly); more rows by gemm on the weight as f32 (widened first unless it is f32).
fn rows_product(x: &[f32], n: usize, w: Rows, dout: usize, din: usize) -> candle_core::Result<Vec<f32>> {
    if n <= FEW_ROWS {
        // Transposed result (out, n), one block of outputs per job; transposed back below.
        let mut yt = vec![0f32; dout * n];
        let job = |(b, out): (usize, &mut [f32]), scratch: &mut Vec<f32>| {
            for (j, dst) in out.chunks_exact_mut(n).enumerate() {
                let row = w.row(b * OUTPUT_BLOCK + j, din, scratch);
                crate::vmath::dot_rows(row, x, dst);
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
    if let Rows::F32(w32) = w {
        let mut y = vec![0f32; n * dout];
        // y = x w^T: w^T (in x out) is w read with row stride 1, column stride in.
        mm(n, dout, din, &mut y, x, din, 1, w32, 1, din)?;
        return Ok(y);
    }
    // bf16 and Q8_0 weights (an even input width) on a CPU with AVX-512 BF16: products in
    // bf16 (`bf16dot`).
    if bf16dot::available() && din % 2 == 0 {
        match w {
            Rows::Bf16(v) => {
                // SAFETY: bf16 is a transparent wrapper of its u16 bits.
                let bits = unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u16, v.len()) };
                return bf16dot::product(x, n, bf16dot::Source::Bf16(bits), dout, din);
            }
            Rows::Q8(b) => return bf16dot::product(x, n, bf16dot::Source::Q8_0(b), dout, din),
            _ => {}
        }
    }
    widened_product(x, n, w, dout, din)
}

/// `x (n, din) @ w^T` for a reduced weight, widened to f32 a block
/// of output rows at a time (never the whole weight in f32: GPT-XL's largest is 80 MiB), each
/// block's columns of y computed by gemm.
fn widened_product(x: &[f32], n: usize, w: Rows, dout: usize, din: usize) -> candle_core::Result<Vec<f32>> {
    let mut y = vec![0f32; n * dout];
    let block = WIDEN_BLOCK.min(dout);
    let mut wide = vec![0f32; block * din];
    let mut part = vec![0f32; n * block];
    for o0 in (0..dout).step_by(block) {
        let rows = block.min(dout - o0);
        wide[..rows * din].par_chunks_mut(din).enumerate().for_each(|(o, dst)| {
            // `row` writes into its scratch, here the destination row itself.
            w.row(o0 + o, din, dst);
        });
        mm(n, rows, din, &mut part[..n * rows], x, din, 1, &wide[..rows * din], 1, din)?;
        for (r, src) in part[..n * rows].chunks_exact(rows).enumerate() {
            y[r * dout + o0..r * dout + o0 + rows].copy_from_slice(src);
        }
    }
    Ok(y)
}

/// Output rows of a reduced weight widened to f32 at a time for gemm (many rows).
const WIDEN_BLOCK: usize = 512;

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
        let rows = match sw {
            CpuStorage::F32(w) => Rows::F32(&w[a..b]),
            CpuStorage::BF16(w) => Rows::Bf16(&w[a..b]),
            CpuStorage::F16(w) => Rows::F16(&w[a..b]),
            _ => candle_core::bail!("linear: weights of an unsupported dtype (expected f32, bf16 or f16)"),
        };
        Ok((CpuStorage::F32(rows_product(x, n, rows, dout, din)?), Shape::from((n, dout))))
    }
}

/// `x (n, in) @ w^T` for a Q8_0 or Q4_K weight on the CPU, its blocks read in place: up to
/// [`FEW_ROWS`] rows by integer block dot products (`quant`), more in bf16 (`bf16dot`, Q8_0
/// on AVX-512 BF16) or by gemm on the weight widened to f32.
fn quant_forward(x: &Tensor, q: &QTensor) -> Result<Tensor> {
    let (dout, din) = q.shape().dims2()?;
    let (n, _) = x.dims2()?;
    let data = q.data()?;
    let x = x.contiguous()?;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let y = match q.dtype() {
        GgmlDType::Q8_0 if data.len() != dout * din / Q8_BLOCK * Q8_BLOCK_BYTES || din % Q8_BLOCK != 0 => {
            return Err(crate::error::Error::invalid("linear", format!("a q8_0 weight of {} bytes for ({dout}, {din})", data.len())));
        }
        GgmlDType::Q8_0 if n <= FEW_ROWS => quant::q8_0_rows(&xs, n, &data, dout, din, quant::Kernel::best())?,
        GgmlDType::Q8_0 => rows_product(&xs, n, Rows::Q8(&data), dout, din)?,
        _ if n <= FEW_ROWS => quant::q4k_rows(&xs, n, &data, dout, din)?,
        _ => {
            let w = q.dequantize(x.device())?.flatten_all()?.to_vec1::<f32>()?;
            let mut y = vec![0f32; n * dout];
            mm(n, dout, din, &mut y, &xs, din, 1, &w, 1, din)?;
            y
        }
    };
    Ok(Tensor::from_vec(y, (n, dout), x.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `x w^T` in f64 from f32 values.
    fn reference(x: &[f32], n: usize, w: &[f32], dout: usize, din: usize) -> Vec<f64> {
        let mut y = vec![0f64; n * dout];
        for r in 0..n {
            for o in 0..dout {
                y[r * dout + o] = (0..din).map(|k| x[r * din + k] as f64 * w[o * din + k] as f64).sum();
            }
        }
        y
    }

    /// Largest error of `got` relative to the largest magnitude of `want`.
    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        got.iter().zip(want).fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs())) / scale
    }

    /// Many rows (1 to 600) through reduced weights, sizes on and off the kernels' tiles and
    /// panels (600 outputs: wider than one widening block): the product of the weight's own
    /// values (as widened to f32), every block in its place. The widened path (gemm) agrees to
    /// f32 rounding (1e-5 of the largest output); the bf16 kernel, where the CPU has it,
    /// rounds each input to bf16 (relative 2^-9; 1e-2 of the largest output bounds it here).
    #[test]
    fn many_rows_through_reduced_weights_match_the_widened_product() {
        let dev = Device::Cpu;
        for (dout, din) in [(600, 64), (37, 96), (70, 32)] {
            let w = Tensor::randn(0f32, 1.0, (dout, din), &dev).expect("w");
            for dtype in [WeightDtype::Bf16, WeightDtype::Q8_0] {
                let q = Weight::from_f32(&w, dtype).expect("convert");
                let wide = q.to_f32().expect("f32").flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
                for n in [1, 3, 5, 8, 9, 61, 600] {
                    let x = Tensor::randn(0f32, 1.0, (n, din), &dev).expect("x");
                    let xs = x.flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
                    let want = reference(&xs, n, &wide, dout, din);
                    let got = q.forward(&x.reshape((1, n, din)).expect("r")).expect("forward");
                    assert_eq!(got.dims(), [1, n, dout]);
                    let got = got.flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
                    let tol = if n > FEW_ROWS && bf16dot::available() { 1e-2 } else if n > FEW_ROWS || dtype == WeightDtype::Bf16 { 1e-5 } else { 1.5e-2 };
                    let e = rel_err(&got, &want);
                    assert!(e < tol, "{dtype} {n} x ({dout}, {din}): relative error {e}");
                    // The portable path (widening for gemm) on every CPU.
                    if n > FEW_ROWS {
                        let data;
                        let bits;
                        let rows = match &q {
                            Weight::Dense(t) => {
                                bits = t.flatten_all().expect("flat").to_vec1::<half::bf16>().expect("vec");
                                Rows::Bf16(&bits)
                            }
                            Weight::Quantized(qt) => {
                                data = qt.data().expect("data").into_owned();
                                Rows::Q8(&data)
                            }
                        };
                        let e = rel_err(&widened_product(&xs, n, rows, dout, din).expect("widened"), &want);
                        assert!(e < 1e-5, "widened {dtype} {n} x ({dout}, {din}): relative error {e}");
                    }
                }
            }
        }
    }

    /// An odd input width cannot go through bf16 pairs: the bf16 weight is widened instead,
    /// with the same result.
    #[test]
    fn odd_input_widths_take_the_widened_path() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (45, 33), &dev).expect("w");
        let q = Weight::from_f32(&w, WeightDtype::Bf16).expect("convert");
        let wide = q.to_f32().expect("f32").flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
        let x = Tensor::randn(0f32, 1.0, (17, 33), &dev).expect("x");
        let xs = x.flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
        let got = q.forward(&x).expect("forward").flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
        let e = rel_err(&got, &reference(&xs, 17, &wide, 45, 33));
        assert!(e < 1e-5, "{e}");
    }
}
