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
    /// White where the subjects go, of the background's size or at least its aspect ratio
    /// (resized with it); `None` with a background = the background is given as it is
    /// (already blacked out where the subjects go, as in InstructAR).
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
    /// The generated target codes behind each image (h*w per sample).
    pub target_codes: Vec<Vec<u32>>,
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

/// Images of code lists on the grid `(h, w)`.
fn decode_codes(bundle: &Bundle, codes: &[Vec<u32>], (h, w): (usize, usize)) -> Result<Vec<RgbImage>> {
    if codes.is_empty() {
        return Ok(Vec::new());
    }
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
        crate::util::check_samples("--num-samples", self.num_samples)?;
        if self.mask.is_some() && self.background.is_none() {
            return Err(Error::invalid("--mask", "a mask needs a background"));
        }
        if let (Some(bg), Some(m)) = (&self.background, &self.mask) {
            if !same_aspect(bg.dimensions(), m.dimensions()) {
                return Err(Error::invalid(
                    "--mask",
                    format!(
                        "mask is {}x{} but the background is {}x{}: the mask must have the background's size or at least its aspect ratio (both are resized to the model's image size together)",
                        m.width(),
                        m.height(),
                        bg.width(),
                        bg.height()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Whether two image sizes have the same aspect ratio, up to a pixel of rounding (a mask
/// saved at half or twice the background's size).
fn same_aspect(a: (u32, u32), b: (u32, u32)) -> bool {
    if a == b {
        return true;
    }
    let (aw, ah, bw, bh) = (a.0 as f64, a.1 as f64, b.0 as f64, b.1 as f64);
    // The height b would have at a's aspect, within one pixel (and 1%).
    let expect = bw * ah / aw;
    (bh - expect).abs() <= 1.0f64.max(0.01 * bh)
}

/// How much an image may be shrunk (its longer side over the model's image size) before
/// [`warnings`] says so.
pub const SHRINK_WARNING: f64 = 4.0;

/// Words the user should read before waiting for a result: prompt words the built-in text
/// encoder does not know (they read as `<unk>`; what it knows is listed), and references or a
/// background shrunk more than [`SHRINK_WARNING`] times to the model's image size. Nothing
/// here stops the generation.
pub fn warnings(bundle: &Bundle, req: &GenerateRequest) -> Vec<String> {
    let mut out = Vec::new();
    if let super::bundle::TextModel::Builtin(enc) = &bundle.text {
        let unknown = enc.unknown_words(&req.prompt);
        if !unknown.is_empty() {
            let known = enc.known_words();
            out.push(format!(
                "the built-in text encoder does not know {} of the prompt's words ({}); they read as \"unknown\". It knows {} words: {}",
                unknown.len(),
                unknown.join(", "),
                known.len(),
                known.join(" ")
            ));
        }
    }
    let size = bundle.image_size() as u32;
    let mut shrunk = |what: String, img: &RgbImage| {
        let side = img.width().max(img.height());
        let factor = side as f64 / size as f64;
        if factor > SHRINK_WARNING {
            out.push(format!(
                "{what} is {}x{} px; this model works at {size}x{size} px, so it is shrunk {factor:.0}x and fine detail is lost",
                img.width(),
                img.height()
            ));
        }
    };
    for (i, r) in req.refs.iter().enumerate() {
        shrunk(format!("reference {}", i + 1), r);
    }
    if let Some(bg) = &req.background {
        shrunk("the background".to_string(), bg);
    }
    out
}

/// The memory a generation of `n` samples needs for its key/value cache (two rows per
/// sample with guidance), about: the budget checked before the cache is made.
fn cache_bytes(cfg: &crate::model::GptConfig, n: usize, guided: bool) -> u64 {
    let rows = n as u64 * if guided { 2 } else { 1 };
    rows * cfg.n_layer as u64 * 2 * cfg.max_seq_len() as u64 * cfg.dim as u64 * 4
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
    // The references as the model sees them: at the image size, or cropped to their subject at
    // the reference size of a model with references on a grid of their own (as `data encode
    // --ref-size` stores them for training).
    let refs: Vec<RgbImage> = req
        .refs
        .iter()
        .map(|r| {
            let r = imageio::resize_rgb(r, size, size);
            match cfg.ref_grid {
                Some(_) => imageio::reference_view(&r, bundle.ref_image_size() as u32),
                None => r,
            }
        })
        .collect();
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
    if cfg.ref_grid.is_some() {
        let bg = encode_images(bundle, &[cond_bg], bundle.image_size() as u32)?.pop().unwrap_or_default();
        let codes = if refs.is_empty() { Vec::new() } else { encode_images(bundle, &refs, bundle.ref_image_size() as u32)? };
        return Ok((codes, bg));
    }
    refs.push(cond_bg);
    let mut codes = encode_images(bundle, &refs, bundle.image_size() as u32)?;
    let bg = codes.pop().unwrap_or_default();
    Ok((codes, bg))
}

/// The model's condition (one row) for prepared references, masked background and prompt:
/// the images' codes, the prompt's features, and for a scheme with padded reference slots the
/// mid-grey image's codes in the unused slots.
fn build_condition(bundle: &Bundle, refs: Vec<RgbImage>, cond_bg: RgbImage, prompt: &str) -> Result<Condition> {
    let cfg = bundle.gpt.config();
    let dev = bundle.gpt.device();
    let size = bundle.image_size() as u32;
    let (ref_codes, bg_codes) = encode_condition(bundle, refs, cond_bg)?;
    let hw = bg_codes.len();
    let nr = ref_codes.len();
    // One condition; the session repeats its prefix for the samples.
    let ref_flat: Vec<u32> = ref_codes.iter().flatten().copied().collect();
    let refs_t = Tensor::from_vec(ref_flat, (1, nr, cfg.ref_tokens()), dev)?;
    let bg_t = Tensor::from_vec(bg_codes, (1, hw), dev)?;
    let (text, mask_t) = bundle.text.encode(&[prompt.to_string()], cfg.caption_len)?;
    let cond = Condition::new(refs_t, bg_t, text, Some(mask_t));
    Ok(match cfg.scheme {
        crate::layout::Scheme::Reference { pad_to: Some(slots), .. } if nr < slots => {
            let grey = RgbImage::from_pixel(size, size, image::Rgb([128, 128, 128]));
            let g = encode_images(bundle, &[grey], size)?;
            cond.pad_refs(slots, &Tensor::new(g[0].as_slice(), dev)?)?
        }
        _ => cond,
    })
}

/// A request's condition as the model sees it (see [`generate`]) and the images it was made
/// from at the model's size: the references and the masked background.
pub fn request_condition(bundle: &Bundle, req: &GenerateRequest) -> Result<(Condition, Vec<RgbImage>, RgbImage)> {
    let (refs, cond_bg, _, _) = prepare(bundle, req)?;
    let cond = build_condition(bundle, refs.clone(), cond_bg.clone(), &req.prompt)?;
    Ok((cond, refs, cond_bg))
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
    let n = req.num_samples;
    crate::util::check_memory("--num-samples", cache_bytes(cfg, n, req.options.guides()))?;

    let cond = build_condition(bundle, refs, cond_bg, &req.prompt)?;
    let hw = cfg.image_tokens();
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
    let mut imgs = decode_codes(bundle, &out.target, cfg.grid)?;
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
            let per: Vec<Vec<u32>> = p.chunks(cfg.ref_tokens()).take(n_slots).map(|c| c.to_vec()).collect();
            itd_refs.push(decode_codes(bundle, &per, cfg.ref_grid())?);
        }
    }
    Ok(GenerateResult { images: imgs, target_codes: out.target, itd_refs, stats: out.stats, itd })
}

/// Keep `background` exactly where `mask` is black.
pub fn paste_back(img: &mut RgbImage, background: &RgbImage, mask: &GrayImage) {
    for (x, y, p) in img.enumerate_pixels_mut() {
        if mask.get_pixel(x, y)[0] <= 127 {
            *p = *background.get_pixel(x, y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn request(bg: (u32, u32), mask: Option<(u32, u32)>) -> GenerateRequest {
        GenerateRequest {
            refs: vec![RgbImage::new(32, 32)],
            background: Some(RgbImage::new(bg.0, bg.1)),
            mask: mask.map(|(w, h)| GrayImage::from_pixel(w, h, image::Luma([255]))),
            prompt: "a dog next to a cat".into(),
            options: SampleOptions::default(),
            itd: None,
            num_samples: 1,
            paste_back: false,
            decode_itd: false,
        }
    }

    #[test]
    fn sample_count_is_bounded() {
        for n in [0, 65, 100_000, usize::MAX] {
            let e = GenerateRequest { num_samples: n, ..request((16, 16), None) }.validate().unwrap_err().to_string();
            assert!(e.contains("--num-samples") && e.contains("1 to 64"), "{e}");
        }
        GenerateRequest { num_samples: 64, ..request((16, 16), None) }.validate().unwrap();
    }

    #[test]
    fn masks_need_the_background_aspect_not_its_size() {
        // The background's own size, half of it, and one pixel of rounding are accepted.
        for m in [(300, 200), (150, 100), (151, 100), (75, 50)] {
            request((300, 200), Some(m)).validate().unwrap();
        }
        for m in [(200, 200), (300, 100), (8, 4)] {
            let e = request((300, 200), Some(m)).validate().unwrap_err().to_string();
            assert!(e.contains("--mask") && e.contains(&format!("{}x{}", m.0, m.1)) && e.contains("aspect"), "{e}");
        }
    }

    #[test]
    fn newcomer_warnings_and_resized_masks_on_the_builtin_model() {
        if !super::super::bundle::has_builtin() {
            return;
        }
        let bundle = Bundle::builtin(&Device::Cpu).unwrap();
        let size = bundle.image_size() as u32;
        // A background 5x the model's size with a mask of half its size: accepted, and
        // resized with the background.
        let big = size * 5;
        let req = request((big, big), Some((big / 2, big / 2)));
        let (refs, bg) = condition_codes(&bundle, &req).unwrap();
        assert_eq!((refs.len(), bg.len()), (1, bundle.config().image_tokens()));
        let w = warnings(&bundle, &req);
        let words = w.iter().find(|m| m.contains("does not know")).unwrap_or_else(|| panic!("{w:?}"));
        assert!(words.contains("dog") && words.contains("words:"), "{words}");
        let shrink = w.iter().find(|m| m.contains("the background")).unwrap_or_else(|| panic!("{w:?}"));
        assert!(shrink.contains(&format!("{big}x{big}")) && shrink.contains(&format!("{size}x{size}")), "{shrink}");
        // The reference (32 px) is not shrunk; a prompt of known words gives no warning.
        assert!(!w.iter().any(|m| m.contains("reference")), "{w:?}");
        let known = match &bundle.text {
            super::super::bundle::TextModel::Builtin(e) => e.known_words().iter().take(3).map(|s| s.to_string()).collect::<Vec<_>>().join(" "),
            _ => unreachable!("the built-in model has the built-in text encoder"),
        };
        let quiet = GenerateRequest { prompt: known, background: None, mask: None, ..req };
        assert!(warnings(&bundle, &quiet).is_empty(), "{:?}", warnings(&bundle, &quiet));
    }
}
