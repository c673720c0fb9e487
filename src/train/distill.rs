//! The distillation term of the EditAR/TokenAR recipe: the GPT's `alignment` head on the
//! final-norm features of the positions that predict the target image, regressed (MSE) onto a
//! frozen image encoder's patch features of the target image (DINOv2-base in the reference,
//! weight 0.5). The features are computed once by `tokenar data encode --distill-dinov2` and
//! read from the code cache, so training never runs the encoder.
//!
//! As in the reference, every sample of the batch counts (also those whose conditions the CFG
//! dropout removed), and with ITD the aligned positions are those of the final target image
//! (the last h*w of the sequence), not the subjects' copies.

use crate::data::cache::CachedSample;
use crate::error::{Error, Result};
use crate::model::TokenAr;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// The reference recipe's weight of the term.
pub const REFERENCE_WEIGHT: f64 = 0.5;

/// Check that every sample of a code cache (at `cache`, for error messages) carries
/// distillation features of one shape matching a `grid` code grid (tokens = grid/2 cells), and
/// return their width (the alignment head's output width).
pub fn feature_width(cache: &Path, samples: &[CachedSample], grid: (usize, usize)) -> Result<usize> {
    let encode_hint = "encode it with `tokenar data encode ... --distill-dinov2 WEIGHTS` (into a new --out folder, or with --force)";
    let mut shape = None;
    for s in samples {
        let Some(f) = &s.distill else {
            return Err(Error::bad_file(
                cache,
                format!("distill_weight > 0 needs each target image's distillation features, and this code cache has none for sample {}: {encode_hint}", s.id),
            ));
        };
        let d = f.dims2().map_err(|_| Error::bad_file(cache, format!("sample {}: distillation features of shape {:?}", s.id, f.dims())))?;
        match shape {
            Some(p) if p != d => return Err(Error::bad_file(cache, format!("sample {} has distillation features {d:?}, others {p:?}", s.id))),
            _ => shape = Some(d),
        }
    }
    let (n, width) = shape.ok_or_else(|| Error::bad_file(cache, "the code cache holds no sample"))?;
    let want = (grid.0 / 2) * (grid.1 / 2);
    if n != want || width == 0 {
        return Err(Error::bad_file(
            cache,
            format!("distillation features are {n} x {width}, but the alignment head on a {}x{} code grid gives {want} tokens: {encode_hint}", grid.0, grid.1),
        ));
    }
    Ok(width)
}

/// The batch's distillation targets (B, n, D) f32 on `device`.
pub fn batch_targets(samples: &[CachedSample], idx: &[usize], device: &Device) -> Result<Tensor> {
    let rows = idx
        .iter()
        .map(|&i| {
            let s = &samples[i];
            s.distill.as_ref().ok_or_else(|| Error::invalid("distillation", format!("sample {} has no distillation features", s.id)))?.to_dtype(DType::F32).map_err(Error::from)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?.to_device(device)?)
}

/// The unweighted distillation loss: mean squared error between the alignment head on
/// `target_features` (B, h*w, dim) and `targets` (B, h*w/4, D) (`F.mse_loss`, mean over all
/// elements).
pub fn distill_loss(gpt: &TokenAr, target_features: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let pred = gpt.align(target_features)?;
    if pred.dims() != targets.dims() {
        return Err(Error::invalid("distillation targets", format!("shape {:?}, the alignment head gives {:?}", targets.dims(), pred.dims())));
    }
    Ok((pred - targets.to_dtype(target_features.dtype())?)?.sqr()?.mean_all()?)
}
