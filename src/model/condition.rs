//! The conditions of one batch, and the per-row CFG dropout flags.

use crate::error::Result;
use candle_core::Tensor;

/// One batch of conditions. All rows share the number of references.
///
/// - `refs`: (B, n_refs, h*w) u32 codes; `n_refs` may be 0 (t2i, EditAR); a scheme with
///   padded slots needs `n_refs` equal to the slot count (see [`Condition::pad_refs`]);
/// - `background`: (B, h*w) u32 codes (ignored by configurations without a background);
/// - `text`: (B, caption_len, caption_dim) f32 features, `text_mask`: (B, caption_len), 1 = token;
/// - `drop_text` / `drop_image`: per-row CFG dropout flags (empty = none). A dropped text uses
///   `cls_embedding.uncond_embedding`; dropped images use the rows of `img_uncond_embedding`
///   of their slots (EditAR style). The trainer sets them; [`TokenAr::start`](super::TokenAr::start) sets `drop_text`
///   on its unconditional rows.
#[derive(Clone, Debug)]
pub struct Condition {
    pub refs: Tensor,
    pub background: Tensor,
    pub text: Tensor,
    pub text_mask: Option<Tensor>,
    pub drop_text: Vec<bool>,
    pub drop_image: Vec<bool>,
}

impl Condition {
    pub fn new(refs: Tensor, background: Tensor, text: Tensor, text_mask: Option<Tensor>) -> Self {
        Self { refs, background, text, text_mask, drop_text: Vec::new(), drop_image: Vec::new() }
    }

    pub fn batch(&self) -> Result<usize> {
        Ok(self.text.dim(0)?)
    }

    /// Fill the reference slots up to `slots` with `pad_codes` (h*w,) u32 (the codes of a
    /// mid-grey image, as the reference code does for missing references).
    pub fn pad_refs(&self, slots: usize, pad_codes: &Tensor) -> Result<Self> {
        let (b, n, hw) = self.refs.dims3()?;
        if n >= slots {
            return Ok(self.clone());
        }
        let pad = pad_codes.reshape((1, 1, hw))?.broadcast_as((b, slots - n, hw))?;
        let refs = if n == 0 { pad.contiguous()? } else { Tensor::cat(&[&self.refs, &pad], 1)? };
        Ok(Self { refs, ..self.clone() })
    }

    /// Rows `[self; self with drop_text]`: the CFG batch.
    pub(crate) fn with_uncond_rows(&self) -> Result<Self> {
        let b = self.batch()?;
        let flags = |v: &Vec<bool>| if v.is_empty() { vec![false; b] } else { v.clone() };
        let mut drop_text = flags(&self.drop_text);
        drop_text.extend(std::iter::repeat_n(true, b));
        let mut drop_image = flags(&self.drop_image);
        drop_image.extend(drop_image.clone());
        let cat = |t: &Tensor| Tensor::cat(&[t, t], 0);
        Ok(Self {
            refs: cat(&self.refs)?,
            background: cat(&self.background)?,
            text: cat(&self.text)?,
            text_mask: self.text_mask.as_ref().map(cat).transpose()?,
            drop_text,
            drop_image,
        })
    }
}
