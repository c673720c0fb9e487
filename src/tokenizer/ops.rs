//! CPU kernels with their own backward for the two ops that dominate a tokenizer training step:
//!
//! - [`group_norm`]: GroupNorm with an optional fused SiLU, one pass over the data forward and
//!   two backward (the composition of elementary ops takes about a dozen passes each way);
//! - [`im2col`]: the patch matrix of a convolution forward and its scatter-add (col2im)
//!   backward (the composition of narrowed views and a stack builds a zero-padded copy of the
//!   whole input for every kernel tap in the backward).
//!
//! Work is split over the batch across the machine's cores. Both ops need f32 tensors on the
//! CPU; callers keep an elementary-op path for other devices.

use crate::error::{Error, Result};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};

/// Copy of the data of a tensor (any layout) as a contiguous f32 vector.
fn host_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// The contiguous f32 slice of a CPU storage with `layout`.
fn cpu_slice<'a>(s: &'a CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: the input must be contiguous"),
    }
}

/// Run `f(item, chunk)` for each of the `out.len() / item_len` batch items of `out`, spread
/// over as many threads as candle uses (`RAYON_NUM_THREADS`, else the physical cores).
fn par_items(out: &mut [f32], item_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let items = if item_len == 0 { 0 } else { out.len() / item_len };
    let threads = candle_core::utils::get_num_threads().min(items).max(1);
    if threads == 1 {
        for (i, chunk) in out.chunks_mut(item_len.max(1)).enumerate() {
            f(i, chunk);
        }
        return;
    }
    let per = items.div_ceil(threads);
    rayon::scope(|s| {
        for (t, part) in out.chunks_mut(per * item_len).enumerate() {
            let f = &f;
            s.spawn(move |_| {
                for (j, chunk) in part.chunks_mut(item_len).enumerate() {
                    f(t * per + j, chunk);
                }
            });
        }
    });
}

#[inline]
fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + (-a).exp())
}

/// GroupNorm over (B, C, spatial...) with per-channel affine, then SiLU when `silu`.
struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl GroupNormOp {
    /// (batch, channels, spatial size) of x.
    fn dims(&self, shape: &Shape) -> candle_core::Result<(usize, usize, usize)> {
        let d = shape.dims();
        if d.len() < 2 || d[1] % self.groups != 0 {
            candle_core::bail!("group_norm: shape {d:?} does not have a channel count divisible by {}", self.groups);
        }
        Ok((d[0], d[1], d[2..].iter().product()))
    }

    /// Mean and 1/std of one group's values.
    fn stats(&self, v: &[f32]) -> (f32, f32) {
        let (mean, var) = crate::vmath::mean_var(v);
        (mean as f32, (1.0 / (var + self.eps).sqrt()) as f32)
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "tokenar-group-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s1, l1, "group_norm x")?;
        let gamma = cpu_slice(s2, l2, "group_norm weight")?;
        let beta = cpu_slice(s3, l3, "group_norm bias")?;
        let (b, c, sp) = self.dims(l1.shape())?;
        if gamma.len() != c || beta.len() != c {
            candle_core::bail!("group_norm: {c} channels but weight {} and bias {}", gamma.len(), beta.len());
        }
        let cpg = c / self.groups;
        let mut out = vec![0f32; b * c * sp];
        par_items(&mut out, c * sp, |bi, o| {
            let xb = &x[bi * c * sp..(bi + 1) * c * sp];
            for g in 0..self.groups {
                let range = g * cpg * sp..(g + 1) * cpg * sp;
                let (mean, rstd) = self.stats(&xb[range.clone()]);
                for ci in g * cpg..(g + 1) * cpg {
                    let (scale, shift) = (rstd * gamma[ci], beta[ci] - mean * rstd * gamma[ci]);
                    let (xs, os) = (&xb[ci * sp..(ci + 1) * sp], &mut o[ci * sp..(ci + 1) * sp]);
                    crate::vmath::affine_silu(xs, scale, shift, self.silu, os);
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, gamma: &Tensor, beta: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, c, sp) = self.dims(x.shape())?;
        let cpg = c / self.groups;
        let (xv, gv, bv, dy) = (host_vec(x)?, host_vec(gamma)?, host_vec(beta)?, host_vec(grad)?);
        // Per batch item: dx (c * sp), then the item's share of d gamma (c) and d beta (c).
        let item = c * sp + 2 * c;
        let mut buf = vec![0f32; b * item];
        par_items(&mut buf, item, |bi, o| {
            let (dx, dgb) = o.split_at_mut(c * sp);
            let (dgamma, dbeta) = dgb.split_at_mut(c);
            let xb = &xv[bi * c * sp..(bi + 1) * c * sp];
            let db = &dy[bi * c * sp..(bi + 1) * c * sp];
            for g in 0..self.groups {
                let range = g * cpg * sp..(g + 1) * cpg * sp;
                let (mean, rstd) = self.stats(&xb[range.clone()]);
                // dx holds d xhat first; s1 = sum d xhat, s2 = sum d xhat * xhat.
                let (mut s1, mut s2) = (0f64, 0f64);
                for ci in g * cpg..(g + 1) * cpg {
                    let (mut dg, mut dbt) = (0f64, 0f64);
                    let (ga, be) = (gv[ci], bv[ci]);
                    for i in ci * sp..(ci + 1) * sp {
                        let xh = (xb[i] - mean) * rstd;
                        let da = if self.silu {
                            let a = xh * ga + be;
                            let sg = sigmoid(a);
                            db[i] * sg * (1.0 + a * (1.0 - sg))
                        } else {
                            db[i]
                        };
                        dg += (da * xh) as f64;
                        dbt += da as f64;
                        let dxh = da * ga;
                        s1 += dxh as f64;
                        s2 += (dxh * xh) as f64;
                        dx[i] = dxh;
                    }
                    dgamma[ci] = dg as f32;
                    dbeta[ci] = dbt as f32;
                }
                let n = (cpg * sp).max(1) as f64;
                let (m1, m2) = ((s1 / n) as f32, (s2 / n) as f32);
                for i in range {
                    let xh = (xb[i] - mean) * rstd;
                    dx[i] = rstd * (dx[i] - m1 - xh * m2);
                }
            }
        });
        let mut dx = Vec::with_capacity(b * c * sp);
        let (mut dgamma, mut dbeta) = (vec![0f32; c], vec![0f32; c]);
        for o in buf.chunks(item) {
            dx.extend_from_slice(&o[..c * sp]);
            for ci in 0..c {
                dgamma[ci] += o[c * sp + ci];
                dbeta[ci] += o[c * sp + c + ci];
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dgamma, gamma.shape(), dev)?),
            Some(Tensor::from_vec(dbeta, beta.shape(), dev)?),
        ))
    }
}

/// GroupNorm of `x` (B, C, ...) with `groups` groups and per-channel `weight` and `bias` (C),
/// followed by SiLU when `silu`; differentiable in all three inputs. CPU and f32 only.
pub fn group_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    if groups == 0 {
        return Err(Error::invalid("group_norm", "groups must be positive"));
    }
    let op = GroupNormOp { groups, eps, silu };
    Ok(x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?)
}

/// The patch matrix of a 2-D convolution: (B, C, H, W) -> (B, C*k*k, Ho*Wo), rows in
/// (c, ky, kx) order, with zero padding (top, bottom, left, right) and a stride.
struct Im2Col {
    k: usize,
    stride: usize,
    pad: [usize; 4],
    /// (B, C, H, W) of the input.
    dims: (usize, usize, usize, usize),
}

impl Im2Col {
    fn out_hw(&self) -> (usize, usize) {
        let (_, _, h, w) = self.dims;
        let [pt, pb, pl, pr] = self.pad;
        ((h + pt + pb - self.k) / self.stride + 1, (w + pl + pr - self.k) / self.stride + 1)
    }

    /// Visit every (input index, column index) pair of one image whose output row lies in
    /// `rows`: `f(src, dst, stride)`, with columns counted from the band's first row (the band's
    /// patch matrix is (C*k*k, rows.len() * Wo)).
    fn for_each_tap(&self, rows: std::ops::Range<usize>, mut f: impl FnMut(std::ops::Range<usize>, std::ops::Range<usize>, usize)) {
        let (_, c, h, w) = self.dims;
        let (k, s) = (self.k, self.stride);
        let [pt, _, pl, _] = self.pad;
        let (_, wo) = self.out_hw();
        let band = rows.len() * wo;
        for ci in 0..c {
            for ky in 0..k {
                for kx in 0..k {
                    let row = (ci * k + ky) * k + kx;
                    // Output columns whose input column is inside the image: ox*s + kx - pl in [0, w).
                    let ox0 = pl.saturating_sub(kx).div_ceil(s);
                    let ox1 = if w + pl > kx { ((w + pl - kx - 1) / s + 1).min(wo) } else { 0 };
                    if ox0 >= ox1 {
                        continue;
                    }
                    for oy in rows.clone() {
                        let iy = (oy * s + ky) as isize - pt as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        let ix0 = ox0 * s + kx - pl;
                        let src = (ci * h + iy as usize) * w + ix0;
                        let dst = row * band + (oy - rows.start) * wo + ox0;
                        f(src..src + (ox1 - ox0 - 1) * s + 1, dst..dst + ox1 - ox0, s);
                    }
                }
            }
        }
    }
}

impl Im2Col {
    /// Write the patch matrix of output rows `rows` of the image `xb` into `o` (zeros where
    /// the taps fall on padding are expected to be there already).
    fn fill(&self, xb: &[f32], rows: std::ops::Range<usize>, o: &mut [f32]) {
        self.for_each_tap(rows, |src, dst, st| {
            if st == 1 {
                o[dst].copy_from_slice(&xb[src]);
            } else {
                for (d, sv) in o[dst].iter_mut().zip(xb[src].iter().step_by(st)) {
                    *d = *sv;
                }
            }
        });
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "tokenar-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l, "im2col")?;
        let (b, c, h, w) = self.dims;
        let (ho, wo) = self.out_hw();
        let per_out = c * self.k * self.k * ho * wo;
        let mut out = vec![0f32; b * per_out];
        par_items(&mut out, per_out, |bi, o| self.fill(&x[bi * c * h * w..(bi + 1) * c * h * w], 0..ho, o));
        Ok((CpuStorage::F32(out), Shape::from((b, c * self.k * self.k, ho * wo))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (b, c, h, w) = self.dims;
        let (ho, wo) = self.out_hw();
        let per_out = c * self.k * self.k * ho * wo;
        let g = host_vec(grad)?;
        let mut dx = vec![0f32; b * c * h * w];
        par_items(&mut dx, c * h * w, |bi, o| {
            let gb = &g[bi * per_out..(bi + 1) * per_out];
            self.for_each_tap(0..ho, |src, dst, st| {
                for (d, gv) in o[src].iter_mut().step_by(st).zip(&gb[dst]) {
                    *d += *gv;
                }
            });
        });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Floats of one band's patch matrix: small enough to stay in a core's cache between being
/// written and being multiplied.
const BAND_FLOATS: usize = 64 << 10;

/// A convolution for inference (no backward): each image goes in bands of output rows; a
/// band's patch matrix is written into a small buffer and multiplied by the weight straight
/// into the output. The whole patch matrix (9x the input for a 3x3 kernel) is never built, so
/// its memory traffic and page faults are gone.
struct ConvInfer(Im2Col);

/// The output pointer shared by the bands (each writes its own columns).
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every band writes a disjoint set of output elements (its image, its rows).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl CustomOp3 for ConvInfer {
    fn name(&self) -> &'static str {
        "tokenar-conv-infer"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout, sb: &CpuStorage, lb: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let op = &self.0;
        let x = cpu_slice(sx, lx, "conv input")?;
        let wt = cpu_slice(sw, lw, "conv weight")?;
        let bias = cpu_slice(sb, lb, "conv bias")?;
        let (b, c, h, w) = op.dims;
        let (ho, wo) = op.out_hw();
        let kk = c * op.k * op.k;
        let o = bias.len();
        if wt.len() != o * kk {
            candle_core::bail!("conv: weight of {} values for {o} x {kk}", wt.len());
        }
        let rows_per_band = (BAND_FLOATS / (kk * wo).max(1)).clamp(1, ho.max(1));
        let bands = ho.div_ceil(rows_per_band);
        let plane = ho * wo;
        let mut out = vec![0f32; b * o * plane];
        let dst = OutPtr(out.as_mut_ptr());
        let band = |job: usize, patch: &mut Vec<f32>| {
            let (bi, r0) = (job / bands, (job % bands) * rows_per_band);
            let rows = r0..(r0 + rows_per_band).min(ho);
            let cols = rows.len() * wo;
            patch.clear();
            patch.resize(kk * cols, 0.0);
            op.fill(&x[bi * c * h * w..(bi + 1) * c * h * w], rows, patch);
            let at = bi * o * plane + r0 * wo;
            // SAFETY: `at + (o - 1) * plane + cols` is within this image's output, the band's
            // columns belong to it alone, and `patch`/`wt` are (kk x cols) and (o x kk).
            unsafe {
                let d = dst.get().add(at);
                crate::nn::gemm_strided(o, cols, kk, (d, plane), (wt.as_ptr(), kk, 1), (patch.as_ptr(), cols, 1), gemm::Parallelism::None);
                for (oc, &bv) in bias.iter().enumerate() {
                    for v in std::slice::from_raw_parts_mut(d.add(oc * plane), cols) {
                        *v += bv;
                    }
                }
            }
        };
        (0..b * bands).into_par_iter().for_each_init(Vec::new, |patch, job| band(job, patch));
        Ok((CpuStorage::F32(out), Shape::from((b, o, ho, wo))))
    }
}

/// A 2-D convolution of `x` (B, C, H, W) by `weight` (O, C*k*k) plus `bias` (O) for inference
/// (no gradient), the patch matrix built band by band (see `ConvInfer`); the same result as
/// [`im2col`] then the product, up to the order of the sums. CPU and f32 only.
pub fn conv_infer(x: &Tensor, weight: &Tensor, bias: &Tensor, k: usize, stride: usize, pad: [usize; 4]) -> Result<Tensor> {
    let dims = x.dims4()?;
    let (hp, wp) = (dims.2 + pad[0] + pad[1], dims.3 + pad[2] + pad[3]);
    if k == 0 || stride == 0 || hp < k || wp < k {
        return Err(Error::invalid("conv", format!("kernel {k} stride {stride} on a padded {hp}x{wp} input")));
    }
    let op = ConvInfer(Im2Col { k, stride, pad, dims });
    Ok(x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?)
}

/// The convolution patch matrix of `x` (B, C, H, W): (B, C*k*k, Ho*Wo), rows in (c, ky, kx)
/// order (the order of a flattened (O, C, k, k) weight), zero padding `pad` = (top, bottom,
/// left, right); differentiable. CPU and f32 only.
pub fn im2col(x: &Tensor, k: usize, stride: usize, pad: [usize; 4]) -> Result<Tensor> {
    let dims = x.dims4()?;
    let (hp, wp) = (dims.2 + pad[0] + pad[1], dims.3 + pad[2] + pad[3]);
    if k == 0 || stride == 0 || hp < k || wp < k {
        return Err(Error::invalid("im2col", format!("kernel {k} stride {stride} on a padded {hp}x{wp} input")));
    }
    let op = Im2Col { k, stride, pad, dims };
    Ok(x.contiguous()?.apply_op1(op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::Rng;
        let mut r = crate::util::rng(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.random::<f32>() * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// GroupNorm (+ SiLU) from elementary ops.
    fn composed_gn(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, silu: bool) -> Tensor {
        let (n, c, h, ww) = x.dims4().unwrap();
        let g = x.reshape((n, groups, ())).unwrap();
        let mean = g.mean_keepdim(D::Minus1).unwrap();
        let xc = g.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let xh = xc.broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap()).unwrap().reshape((n, c, h, ww)).unwrap();
        let y = xh.broadcast_mul(&w.reshape((1, c, 1, 1)).unwrap()).unwrap().broadcast_add(&b.reshape((1, c, 1, 1)).unwrap()).unwrap();
        if silu {
            (&y * candle_nn::ops::sigmoid(&y).unwrap()).unwrap()
        } else {
            y
        }
    }

    #[test]
    fn group_norm_matches_composition_forward_and_backward() {
        for silu in [false, true] {
            let x = Var::from_tensor(&randn(&[3, 8, 5, 4], 1).affine(3.0, 0.5).unwrap()).unwrap();
            let w = Var::from_tensor(&randn(&[8], 2).affine(1.0, 1.0).unwrap()).unwrap();
            let b = Var::from_tensor(&randn(&[8], 3)).unwrap();
            let probe = randn(&[3, 8, 5, 4], 4);
            let ours = group_norm(&x, &w, &b, 4, 1e-6, silu).unwrap();
            let reference = composed_gn(&x, &w, &b, 4, silu);
            assert!(max_diff(&ours, &reference) < 1e-4, "forward differs (silu {silu})");
            let g1 = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
                let (a, r) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                let d = max_diff(a, r);
                assert!(d < 1e-3, "gradient of {name} differs by {d} (silu {silu})");
                assert!(a.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
            }
        }
    }

    /// im2col from padded, shifted views (the definition).
    fn reference_im2col(x: &Tensor, k: usize, s: usize, pad: [usize; 4]) -> Tensor {
        let (b, c, h, w) = x.dims4().unwrap();
        let (ho, wo) = ((h + pad[0] + pad[1] - k) / s + 1, (w + pad[2] + pad[3] - k) / s + 1);
        let xp = x.pad_with_zeros(2, pad[0], pad[1] + s).unwrap().pad_with_zeros(3, pad[2], pad[3] + s).unwrap();
        let mut views = Vec::new();
        for ky in 0..k {
            for kx in 0..k {
                let mut rows = Vec::new();
                for oy in 0..ho {
                    let mut cols = Vec::new();
                    for ox in 0..wo {
                        cols.push(xp.narrow(2, oy * s + ky, 1).unwrap().narrow(3, ox * s + kx, 1).unwrap());
                    }
                    rows.push(Tensor::cat(&cols, 3).unwrap());
                }
                views.push(Tensor::cat(&rows, 2).unwrap());
            }
        }
        Tensor::stack(&views, 2).unwrap().reshape((b, c * k * k, ho * wo)).unwrap()
    }

    #[test]
    fn im2col_matches_definition_forward_and_backward() {
        for (k, s, pad) in [(3, 1, [1, 1, 1, 1]), (3, 2, [0, 1, 0, 1]), (1, 1, [0, 0, 0, 0]), (3, 2, [1, 1, 1, 1])] {
            let x = Var::from_tensor(&randn(&[2, 3, 6, 5], 5)).unwrap();
            let ours = im2col(&x, k, s, pad).unwrap();
            let reference = reference_im2col(&x, k, s, pad);
            assert_eq!(ours.dims(), reference.dims(), "k {k} s {s} pad {pad:?}");
            assert!(max_diff(&ours, &reference) == 0.0, "forward differs: k {k} s {s} pad {pad:?}");
            let probe = randn(ours.dims(), 6);
            let g1 = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let d = max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap());
            assert!(d < 1e-5, "gradient differs by {d}: k {k} s {s} pad {pad:?}");
        }
    }

    #[test]
    fn inference_conv_matches_the_patch_matrix_product() {
        // Shapes with one band per image and with many (64 px, 16 channels: 7 rows a band).
        for (dims, o, k, s, pad) in [
            ([2, 3, 6, 5], 4, 3, 1, [1, 1, 1, 1]),
            ([3, 3, 7, 6], 5, 3, 2, [0, 1, 0, 1]),
            ([1, 2, 5, 5], 3, 4, 1, [0, 0, 0, 0]),
            ([2, 16, 64, 64], 8, 3, 1, [1, 1, 1, 1]),
            ([1, 16, 64, 64], 8, 3, 2, [0, 1, 0, 1]),
        ] {
            let (c, kk) = (dims[1], dims[1] * k * k);
            let x = randn(&dims, 7);
            let w = randn(&[o, kk], 8);
            let b = randn(&[o], 9);
            let ours = conv_infer(&x, &w, &b, k, s, pad).unwrap();
            let cols = im2col(&x, k, s, pad).unwrap();
            let (ho, wo) = (ours.dim(2).unwrap(), ours.dim(3).unwrap());
            let reference = w
                .broadcast_matmul(&cols)
                .unwrap()
                .broadcast_add(&b.reshape((1, o, 1)).unwrap())
                .unwrap()
                .reshape((dims[0], o, ho, wo))
                .unwrap();
            assert_eq!(ours.dims(), reference.dims(), "{dims:?} k {k} s {s}");
            let d = max_diff(&ours, &reference);
            assert!(d < 1e-4, "differs by {d}: {dims:?} c {c} k {k} s {s} pad {pad:?}");
        }
        assert!(conv_infer(&randn(&[1, 1, 2, 2], 1), &randn(&[1, 9], 2), &randn(&[1], 3), 3, 1, [0; 4]).is_err());
        assert!(conv_infer(&randn(&[1, 2, 4, 4], 1), &randn(&[3, 9], 2), &randn(&[3], 3), 3, 1, [1; 4]).is_err());
    }

    #[test]
    fn bad_inputs_are_errors() {
        let x = randn(&[1, 2, 2, 2], 7);
        assert!(im2col(&x, 3, 1, [0; 4]).is_err());
        assert!(im2col(&x, 0, 1, [0; 4]).is_err());
        let w = randn(&[2], 8);
        assert!(group_norm(&x, &w, &w, 0, 1e-6, false).is_err());
        assert!(group_norm(&x, &w, &w, 3, 1e-6, false).is_err());
        assert!(group_norm(&x, &randn(&[3], 9), &w, 2, 1e-6, false).is_err());
    }
}
