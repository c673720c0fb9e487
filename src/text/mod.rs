//! Text encoders behind one trait: T5 (flan-t5 weights, frozen) and a small built-in encoder
//! trained jointly with the GPT.
//!
//! Every encoder returns `max_len` feature rows per prompt plus a mask. Rows that hold no
//! token are zero and masked; where the valid rows sit (first or last) is the [`Padding`]
//! convention of the checkpoint family the features are meant for.

pub mod builtin;
pub mod t5;
pub mod vocab;

pub use builtin::{BuiltinConfig, BuiltinTextEncoder};
pub use t5::{T5Encoder, T5Options};
pub use vocab::WordVocab;

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// The caption length used by LlamaGen, EditAR and TokenAR.
pub const DEFAULT_MAX_LEN: usize = 120;

/// A text encoder: prompts in, `(features, mask)` out.
///
/// `features` is `(B, max_len, dim)` f32; `mask` is `(B, max_len)` f32 with 1.0 on rows that
/// hold a token and 0.0 on padded rows (which are zero in `features`).
pub trait TextEncoder {
    fn dim(&self) -> usize;
    fn max_len(&self) -> usize;
    fn encode(&self, prompts: &[String]) -> Result<(Tensor, Tensor)>;
}

/// Where the valid rows of a caption go inside the `max_len` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    /// Valid rows last, padded rows first (LlamaGen text-to-image checkpoints).
    Left,
    /// Valid rows first, padded rows last (EditAR and TokenAR checkpoints).
    Right,
}

impl std::str::FromStr for Padding {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "left" => Ok(Padding::Left),
            "right" => Ok(Padding::Right),
            other => Err(Error::invalid("padding", format!("`{other}` (expected `left` or `right`)"))),
        }
    }
}

/// Place per-prompt features `(n_i, dim)` (already truncated to at most `max_len` rows) into a
/// zero `(B, max_len, dim)` tensor following `padding`, and build the matching mask.
/// Differentiable with respect to the inputs (built from `pad` and `cat`).
pub fn pad_features(rows: &[Tensor], max_len: usize, dim: usize, padding: Padding, device: &Device) -> Result<(Tensor, Tensor)> {
    let mut feats = Vec::with_capacity(rows.len());
    let mut mask = Vec::with_capacity(rows.len() * max_len);
    for (i, r) in rows.iter().enumerate() {
        let (n, d) = r.dims2()?;
        if n > max_len || d != dim {
            return Err(Error::invalid(
                "text features",
                format!("prompt {i} has shape ({n}, {d}), expected at most ({max_len}, {dim})"),
            ));
        }
        let r = r.to_dtype(DType::F32)?;
        let (before, after) = match padding {
            Padding::Left => (max_len - n, 0),
            Padding::Right => (0, max_len - n),
        };
        let padded = if n == 0 {
            Tensor::zeros((max_len, dim), DType::F32, device)?
        } else {
            r.pad_with_zeros(0, before, after)?
        };
        feats.push(padded);
        mask.extend((0..max_len).map(|j| if j >= before && j < max_len - after { 1f32 } else { 0f32 }));
    }
    if rows.is_empty() {
        return Ok((
            Tensor::zeros((0, max_len, dim), DType::F32, device)?,
            Tensor::zeros((0, max_len), DType::F32, device)?,
        ));
    }
    let feats = Tensor::stack(&feats, 0)?;
    let mask = Tensor::from_vec(mask, (rows.len(), max_len), device)?;
    Ok((feats, mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_features_left_and_right() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let b = Tensor::zeros((0, 2), DType::F32, &dev).unwrap();
        let (f, m) = pad_features(&[a.clone(), b.clone()], 3, 2, Padding::Left, &dev).unwrap();
        assert_eq!(f.dims(), &[2, 3, 2]);
        assert_eq!(f.to_vec3::<f32>().unwrap()[0], vec![vec![0.0, 0.0], vec![1.0, 2.0], vec![3.0, 4.0]]);
        assert_eq!(m.to_vec2::<f32>().unwrap(), vec![vec![0.0, 1.0, 1.0], vec![0.0; 3]]);
        let (f, m) = pad_features(&[a, b], 3, 2, Padding::Right, &dev).unwrap();
        assert_eq!(f.to_vec3::<f32>().unwrap()[0], vec![vec![1.0, 2.0], vec![3.0, 4.0], vec![0.0, 0.0]]);
        assert_eq!(m.to_vec2::<f32>().unwrap()[0], vec![1.0, 1.0, 0.0]);
        let too_long = Tensor::zeros((4, 2), DType::F32, &dev).unwrap();
        assert!(pad_features(&[too_long], 3, 2, Padding::Left, &dev).is_err());
        assert!("middle".parse::<Padding>().is_err());
        assert_eq!("LEFT".parse::<Padding>().unwrap(), Padding::Left);
    }
}
