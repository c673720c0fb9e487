//! Generation: references + background + mask + prompt -> images; with a text-to-image model
//! (LlamaGen t2i: no condition images), prompt -> images.
//!
//! The images are encoded with the tokenizer, the prompt with the text encoder; the GPT
//! prefills the condition and the sampler decodes (with the chosen ITD strategy); the target
//! codes are decoded back to pixels. With `paste_back` the given background is kept exactly
//! outside the mask.

use super::bundle::Bundle;
use crate::error::{Error, Result};
use crate::imageio;
use crate::model::Condition;
use crate::sample::{self, DecodePlan, DecodeStats, ItdMode, SampleOptions};
use candle_core::{DType, Tensor};
use image::{GrayImage, RgbImage};

/// One generation request. Images may be any size; they are resized to the model's.
#[derive(Clone)]
pub struct GenerateRequest {
    pub refs: Vec<RgbImage>,
    /// The scene to place the subjects in; `None` = a white canvas to fill entirely.
    pub background: Option<RgbImage>,
    /// White where the subjects go; `None` with a background = the background is given as it
    /// is (already blacked out where the subjects go, as in InstructAR).
    pub mask: Option<GrayImage>,
    pub prompt: String,
    pub options: SampleOptions,
    /// `None` = the model's natural mode (exact for ITD models, off otherwise).
    pub itd: Option<ItdMode>,
    pub num_samples: usize,
    pub paste_back: bool,
    /// Also decode what the model wrote at the ITD positions ([`GenerateResult::itd_refs`]);
    /// two or three tokenizer decodes per sample that only a caller showing them needs.
    pub decode_itd: bool,
}

pub struct GenerateResult {
    pub images: Vec<RgbImage>,
    /// What the model wrote at the ITD positions, decoded (one list of references per sample;
    /// empty unless [`GenerateRequest::decode_itd`]).
    pub itd_refs: Vec<Vec<RgbImage>>,
    pub stats: DecodeStats,
    pub itd: ItdMode,
}

/// The ITD mode to use for a model: `exact` for models trained with ITD, `off` otherwise; an
/// explicit request is checked against the model.
pub fn resolve_itd(model_itd: bool, requested: Option<ItdMode>) -> Result<ItdMode> {
    match (model_itd, requested) {
        (true, None) => Ok(ItdMode::Exact),
        (false, None) | (false, Some(ItdMode::Off)) => Ok(ItdMode::Off),
        (true, Some(ItdMode::Off)) => Err(Error::invalid(
            "--itd",
            "this model was trained with ITD (it writes the references before the target); use exact, naive or forced",
        )),
        (false, Some(m)) => Err(Error::invalid("--itd", format!("`{m}` needs a model trained with ITD; this one was not (use off)"))),
        (true, Some(m)) => Ok(m),
    }
}

/// Encode images (each resized to `size`) to codes, one row of `h*w` codes per image.
fn encode_images(bundle: &Bundle, images: &[RgbImage], size: u32) -> Result<Vec<Vec<u32>>> {
    let dev = bundle.gpt.device();
    let mut ts = Vec::with_capacity(images.len());
    for img in images {
        let img = if img.width() != size || img.height() != size { imageio::resize_rgb(img, size, size) } else { img.clone() };
        ts.push(imageio::rgb_to_tensor(&img, dev)?);
    }
    let codes = bundle.vq.encode(&Tensor::stack(&ts, 0)?)?;
    let n = codes.dim(0)?;
    let flat = codes.reshape((n, ()))?.to_dtype(DType::U32)?;
    Ok(flat.to_vec2::<u32>()?)
}

fn decode_codes(bundle: &Bundle, codes: &[Vec<u32>]) -> Result<Vec<RgbImage>> {
    if codes.is_empty() {
        return Ok(Vec::new());
    }
    let (h, w) = bundle.gpt.config().grid;
    let flat: Vec<u32> = codes.iter().flatten().copied().collect();
    let t = Tensor::from_vec(flat, (codes.len(), h, w), bundle.gpt.device())?;
    let imgs = bundle.vq.decode(&t)?;
    (0..codes.len()).map(|i| imageio::tensor_to_rgb(&imgs.get(i)?)).collect()
}

/// Black out the mask in the background (the model's condition), at the model's size.
pub fn masked_background(bg: &RgbImage, mask: Option<&GrayImage>) -> RgbImage {
    let mut out = bg.clone();
    if let Some(m) = mask {
        for (x, y, p) in out.enumerate_pixels_mut() {
            if m.get_pixel(x, y)[0] > 127 {
                *p = image::Rgb([0, 0, 0]);
            }
        }
    }
    out
}

impl GenerateRequest {
    /// Checks that need no model: sampling options, sample count, mask size.
    pub fn validate(&self) -> Result<()> {
        self.options.validate()?;
        if self.num_samples == 0 {
            return Err(Error::invalid("--num-samples", "must be at least 1"));
        }
        if self.mask.is_some() && self.background.is_none() {
            return Err(Error::invalid("--mask", "a mask needs a background"));
        }
        if let (Some(bg), Some(m)) = (&self.background, &self.mask) {
            if bg.dimensions() != m.dimensions() {
                return Err(Error::invalid(
                    "--mask",
                    format!("mask is {}x{} but the background is {}x{}", m.width(), m.height(), bg.width(), bg.height()),
                ));
            }
        }
        Ok(())
    }
}

/// Check a request against the bundle and bring its images to the model's size.
fn prepare(bundle: &Bundle, req: &GenerateRequest) -> Result<(Vec<RgbImage>, RgbImage, Option<GrayImage>, Option<RgbImage>)> {
    req.validate()?;
    let cfg = bundle.gpt.config();
    let size = bundle.image_size() as u32;
    if req.refs.is_empty() && cfg.max_refs > 0 {
        return Err(Error::invalid("--ref", "give at least one reference image"));
    }
    if !cfg.background && req.background.is_some() {
        return Err(Error::invalid("--background", "this text-to-image model takes no condition image (give only a prompt)"));
    }
    if req.refs.len() > cfg.max_refs {
        return Err(Error::invalid(
            "--ref",
            format!("{} references given but this model supports at most {}", req.refs.len(), cfg.max_refs),
        ));
    }
    let refs: Vec<RgbImage> = req.refs.iter().map(|r| imageio::resize_rgb(r, size, size)).collect();
    let mask = req.mask.as_ref().map(|m| image::imageops::resize(m, size, size, image::imageops::FilterType::Nearest));
    let (bg_full, mask) = match &req.background {
        Some(bg) => (Some(imageio::resize_rgb(bg, size, size)), mask),
        // No background: a white canvas, all of it to be generated.
        None => (None, Some(GrayImage::from_pixel(size, size, image::Luma([255])))),
    };
    let canvas = bg_full.clone().unwrap_or_else(|| RgbImage::from_pixel(size, size, image::Rgb([255, 255, 255])));
    let cond_bg = masked_background(&canvas, mask.as_ref());
    Ok((refs, cond_bg, mask, bg_full))
}

/// The codes the model is conditioned on for `req`: each reference's and the masked
/// background's, at the model's image size (the request is checked as `generate` checks it).
pub fn condition_codes(bundle: &Bundle, req: &GenerateRequest) -> Result<(Vec<Vec<u32>>, Vec<u32>)> {
    let (refs, cond_bg, _, _) = prepare(bundle, req)?;
    encode_condition(bundle, refs, cond_bg)
}

/// Codes of the prepared references and masked background, in one tokenizer batch. A model
/// without condition images (LlamaGen text-to-image) reads neither: nothing is encoded, and the
/// background codes are zeros.
fn encode_condition(bundle: &Bundle, mut refs: Vec<RgbImage>, cond_bg: RgbImage) -> Result<(Vec<Vec<u32>>, Vec<u32>)> {
    let cfg = bundle.config();
    if refs.is_empty() && !cfg.background {
        return Ok((Vec::new(), vec![0; cfg.image_tokens()]));
    }
    refs.push(cond_bg);
    let mut codes = encode_images(bundle, &refs, bundle.image_size() as u32)?;
    let bg = codes.pop().unwrap_or_default();
    Ok((codes, bg))
}

/// Generate `num_samples` images for one request.
pub fn generate(
    bundle: &Bundle,
    req: &GenerateRequest,
    progress: Option<&dyn Fn(usize, usize)>,
) -> Result<GenerateResult> {
    let cfg = bundle.gpt.config();
    let itd = resolve_itd(cfg.itd, req.itd)?;
    let (refs, cond_bg, mask, bg_full) = prepare(bundle, req)?;
    let size = bundle.image_size() as u32;
    let dev = bundle.gpt.device();
    let n = req.num_samples;

    let (ref_codes, bg_codes) = encode_condition(bundle, refs, cond_bg)?;
    let hw = bg_codes.len();
    let nr = ref_codes.len();
    // One condition; the session repeats its prefix for the samples.
    let ref_flat: Vec<u32> = ref_codes.iter().flatten().copied().collect();
    let refs_t = Tensor::from_vec(ref_flat, (1, nr, hw), dev)?;
    let bg_t = Tensor::from_vec(bg_codes, (1, hw), dev)?;
    let (text, mask_t) = bundle.text.encode(std::slice::from_ref(&req.prompt), cfg.caption_len)?;
    let cond = Condition::new(refs_t, bg_t, text, Some(mask_t));
    let cond = match cfg.scheme {
        crate::layout::Scheme::Reference { pad_to: Some(slots), .. } if nr < slots => {
            let grey = RgbImage::from_pixel(size, size, image::Rgb([128, 128, 128]));
            let g = encode_images(bundle, &[grey], size)?;
            cond.pad_refs(slots, &Tensor::new(g[0].as_slice(), dev)?)?
        }
        _ => cond,
    };
    // The ITD draft: the reference codes as the model will see them (padded slots included).
    let known_one: Vec<u32> = cond.refs.get(0)?.flatten_all()?.to_vec1::<u32>()?;
    let guided = req.options.guides();
    let (mut session, first) = bundle.gpt.start_samples(&cond, guided, n)?;
    let plan = DecodePlan {
        known: if itd == ItdMode::Off { vec![Vec::new(); n] } else { vec![known_one; n] },
        n_target: hw,
        itd,
    };
    let mut rng = req.options.rng();
    let out = sample::generate(&mut session, &first, &plan, &req.options, &mut rng, progress)?;
    let mut imgs = decode_codes(bundle, &out.target)?;
    if req.paste_back {
        if let (Some(bg), Some(m)) = (&bg_full, &mask) {
            for img in &mut imgs {
                paste_back(img, bg, m);
            }
        }
    }
    let mut itd_refs = Vec::new();
    if req.decode_itd {
        let n_slots = cond.refs.dim(1)?;
        for p in &out.prefix {
            let per: Vec<Vec<u32>> = p.chunks(hw).take(n_slots).map(|c| c.to_vec()).collect();
            itd_refs.push(decode_codes(bundle, &per)?);
        }
    }
    Ok(GenerateResult { images: imgs, itd_refs, stats: out.stats, itd })
}

/// Keep `background` exactly where `mask` is black.
pub fn paste_back(img: &mut RgbImage, background: &RgbImage, mask: &GrayImage) {
    for (x, y, p) in img.enumerate_pixels_mut() {
        if mask.get_pixel(x, y)[0] <= 127 {
            *p = *background.get_pixel(x, y);
        }
    }
}
