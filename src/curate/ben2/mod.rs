//! BEN2 (BEN_Base, Prama LLC's "background erase network" as the TokenAR scripts use it to cut
//! the subjects out of generated targets), for inference.
//!
//! ## The network
//!
//! Input: one RGB image resized to 1024 x 1024 (Pillow's Lanczos), scaled to [0, 1] and
//! normalised with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).
//! Five views go through the backbone as one batch: the four 512 x 512 quarters (top-left,
//! top-right, bottom-left, bottom-right) and the whole image resized to 512 (bilinear,
//! align_corners=False, no antialiasing).
//!
//! Backbone ([`swin`]): Swin-B as published: patch 4, width 128 doubling per stage (128, 256,
//! 512, 1024), depths (2, 2, 18, 2), heads (4, 8, 16, 32), window 12 (shift 6), MLP ratio 4,
//! LayerNorm eps 1e-5, GELU (erf). The 128/64/32/16 token grids of a 512 view are padded to
//! whole windows (132, 72, 36, 24). Outputs f0 (the patch embedding) and f1..f4 (each stage).
//!
//! Decoder ([`decoder`], width 128): `output1..5` (3x3 conv, InstanceNorm, GELU: "cbr") bring
//! f0..f4 to 128 channels (e1..e5). MCLM (1 head, pools 1/4/8 of the joined local views, sine
//! position embeddings) mixes the views of e5; then for k = 4, 3, 2, 1:
//! `e_k = conv_k(MCRM_k(e_k + bilinear(e_{k+1})))` (MCRM: 1 head, pools 2/4/8). The four local
//! views of e1 are joined into one 256 x 256 map, plus the global view (bilinear); the
//! refinement head `insmask_head` (conv 128->384, IN, GELU, conv 384->384, IN, GELU, conv
//! 384->128); plus the shallow features (one 3x3 conv 3->128 of the 1024 input, bilinear to
//! 256); nearest x2, `upsample1` (cbr); plus the shallow features at 512; nearest x2;
//! `upsample2` (cbr); `output` (3x3 conv 128->1); sigmoid: the matte, 1024 x 1024 in [0, 1].
//! (`sideout1..5` are in the checkpoint but unused at inference.)
//!
//! Every number but the decoder's heads and pool ratios is read from the checkpoint's shapes,
//! so reduced test models load as the published one does. The published weights,
//! `BEN2_Base.pth` (`{"model_state_dict": ...}`) or `model.safetensors`, come from the
//! PramaLLC/BEN2 repository on Hugging Face.
//!
//! ## Post-processing ([`cut_out`])
//!
//! As `BEN_Base.inference(image, refine_foreground=True)`: the matte becomes 8 bits (x 255,
//! truncated), is resized to the original size (Pillow bicubic) and is the alpha; the
//! foreground colours are refined by blur fusion ([`refine`]). The TokenAR scripts then black
//! out every pixel with alpha > 0 for the background; [`crate::curate::matte`] applies that
//! rule with a threshold (0 by default).

pub mod decoder;
pub mod ops;
pub mod refine;
pub mod resample;
pub mod swin;
pub mod synthetic;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage, RgbaImage};

use self::decoder::{Mclm, Mcrm};
use self::ops::{bilinear, conv3, conv_out, image_to_patches, patches_to_image, Cbr};
use self::resample::{resize_gray, resize_rgb, Filter};
use self::swin::{Swin, SwinConfig};
use crate::eval::nets::preprocess::{IMAGENET_MEAN, IMAGENET_STD};
use crate::eval::nets::Conv;
use crate::weights::{TensorFile, PT_STATE_KEYS};
use crate::{Error, Result};

/// The side of the square the reference resizes every image to.
pub const INPUT_SIZE: usize = 1024;

/// Where the weights come from, for the error about a missing file.
pub const BEN2_NEEDS: &str = "BEN2 needs BEN2_Base.pth (or model.safetensors) from the PramaLLC/BEN2 repository on Hugging Face";

/// The shape of a BEN2 checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Ben2Config {
    pub swin: SwinConfig,
    /// Decoder width (128 as published).
    pub decoder: usize,
    /// Hidden width of the refinement head (384 as published).
    pub head_hidden: usize,
}

pub struct Ben2 {
    pub cfg: Ben2Config,
    backbone: Swin,
    outputs: Vec<Cbr>, // output1..5
    mclm: Mclm,
    convs: Vec<Cbr>,   // conv1..4
    blocks: Vec<Mcrm>, // dec_blk1..4
    head: [Conv; 3],
    shallow: Conv,
    upsample1: Cbr,
    upsample2: Cbr,
    output: Conv,
    device: Device,
}

/// Read a BEN2 checkpoint: `.pth`/`.pt` (the state dict under `model_state_dict`, as published,
/// or the usual keys) or `.safetensors`.
pub fn open_checkpoint(path: &Path, device: &Device) -> Result<TensorFile> {
    if !path.is_file() {
        return Err(Error::bad_file(path, format!("weight file not found. {BEN2_NEEDS}")));
    }
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    if matches!(ext.as_str(), "pth" | "pt" | "bin" | "ckpt") {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut keys = vec!["model_state_dict"];
        keys.extend(PT_STATE_KEYS);
        let tensors = crate::weights::pickle::read_torch_zip(path, std::io::BufReader::new(file), len, &keys, device)?;
        Ok(TensorFile { path: path.to_path_buf(), tensors, metadata: Default::default() })
    } else {
        TensorFile::load(path, device)
    }
}

impl Ben2 {
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::from_file(&open_checkpoint(path, device)?, device)
    }

    pub fn from_file(f: &TensorFile, device: &Device) -> Result<Self> {
        let f = if f.contains("module.backbone.patch_embed.proj.weight") { f.strip_prefix("module.") } else { f.clone() };
        let backbone = Swin::load(&f.strip_prefix("backbone."))?;
        let sw = backbone.cfg.clone();
        if sw.depths.len() != 4 {
            return Err(Error::bad_file(&f.path, format!("BEN2's backbone has 4 stages, this one {}", sw.depths.len())));
        }
        let e = conv_out(&f, "output5.0.")?;
        let head_hidden = conv_out(&f, "insmask_head.0.")?;
        let ins = [sw.embed, sw.width(0), sw.width(1), sw.width(2), sw.width(3)];
        let outputs = (0..5).map(|i| Cbr::load(&f, &format!("output{}.", i + 1), ins[i], e)).collect::<Result<Vec<_>>>()?;
        let convs = (1..=4).map(|i| Cbr::load(&f, &format!("conv{i}."), e, e)).collect::<Result<Vec<_>>>()?;
        let blocks = (1..=4).map(|i| Mcrm::load(&f, &format!("dec_blk{i}."), e)).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: Ben2Config { swin: sw, decoder: e, head_hidden },
            backbone,
            outputs,
            mclm: Mclm::load(&f, "multifieldcrossatt.", e)?,
            convs,
            blocks,
            head: [
                conv3(&f, "insmask_head.0.", e, head_hidden)?,
                conv3(&f, "insmask_head.3.", head_hidden, head_hidden)?,
                conv3(&f, "insmask_head.6.", head_hidden, e)?,
            ],
            shallow: conv3(&f, "shallow.0.", 3, e)?,
            upsample1: Cbr::load(&f, "upsample1.", e, e)?,
            upsample2: Cbr::load(&f, "upsample2.", e, e)?,
            output: conv3(&f, "output.0.", e, 1)?,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The smallest input side and the multiple every side must be: the coarsest decoder
    /// level (1/64 of the input) must be even and pool to at least 1 x 1 at ratio 8.
    pub fn check_size(size: usize) -> Result<()> {
        if size < 512 || size % 128 != 0 {
            return Err(Error::invalid("BEN2 input size", format!("{size} (must be a multiple of 128, at least 512)")));
        }
        Ok(())
    }

    /// The matte (1, 1, S, S) in [0, 1] of a normalised image (1, 3, S, S).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if b != 1 || c != 3 || h != w {
            return Err(Error::invalid("BEN2 input", format!("expects one square RGB image (1, 3, S, S), got {:?}", x.dims())));
        }
        Self::check_size(h)?;
        let shallow = self.shallow.forward(x)?;
        let glb = bilinear(x, h / 2, w / 2)?;
        let views = Tensor::cat(&[&image_to_patches(x)?, &glb], 0)?;
        let feats = self.backbone.forward(&views)?;
        let mut e: Vec<Tensor> = feats.iter().zip(&self.outputs).map(|(f, o)| o.forward(f)).collect::<Result<_>>()?;
        let mut up = self.mclm.forward(&e[4])?;
        for k in (0..4).rev() {
            let (_, _, th, tw) = e[k].dims4()?;
            let x = (&e[k] + bilinear(&up, th, tw)?)?;
            up = self.convs[k].forward(&self.blocks[k].forward(&x)?)?;
            e[k] = up.clone();
        }
        let e1 = &e[0];
        let joined = patches_to_image(&e1.narrow(0, 0, 4)?)?;
        let (_, _, jh, jw) = joined.dims4()?;
        let y = (&joined + bilinear(&e1.narrow(0, 4, 1)?, jh, jw)?)?;
        let y = ops::instance_norm(&self.head[0].forward(&y)?)?.gelu_erf()?;
        let y = ops::instance_norm(&self.head[1].forward(&y)?)?.gelu_erf()?;
        let y = self.head[2].forward(&y)?;
        let y = (&y + bilinear(&shallow, jh, jw)?)?;
        let y = self.upsample1.forward(&y.upsample_nearest2d(2 * jh, 2 * jw)?)?;
        let y = (&y + bilinear(&shallow, 2 * jh, 2 * jw)?)?.upsample_nearest2d(4 * jh, 4 * jw)?;
        let y = self.output.forward(&self.upsample2.forward(&y)?)?;
        Ok(candle_nn::ops::sigmoid(&y)?)
    }
}

/// The network input of an image: Pillow's Lanczos resize to `size` x `size`, / 255, ImageNet
/// normalisation; (1, 3, size, size) f32.
pub fn preprocess(img: &RgbImage, size: usize, device: &Device) -> Result<Tensor> {
    let r = if img.dimensions() == (size as u32, size as u32) { img.clone() } else { resize_rgb(img, size as u32, size as u32, Filter::Lanczos) };
    let n = size * size;
    let mut data = vec![0f32; 3 * n];
    for (i, p) in r.pixels().enumerate() {
        for c in 0..3 {
            data[c * n + i] = (p[c] as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, size, size), device)?)
}

/// What BEN2 makes of one image.
#[derive(Debug, Clone)]
pub struct Cutout {
    /// The network's matte at its input size, in [0, 1].
    pub matte: Tensor,
    /// The matte as 8 bits at the image's size (the foreground's alpha).
    pub alpha: GrayImage,
    /// The refined foreground colours with `alpha`.
    pub foreground: RgbaImage,
}

/// Run BEN2 on `img` (network input `size`, 1024 as published) and post-process as
/// `BEN_Base.inference(refine_foreground=True)`.
pub fn cut_out(net: &Ben2, img: &RgbImage, size: usize) -> Result<Cutout> {
    Ben2::check_size(size)?;
    let x = preprocess(img, size, net.device())?;
    let matte = net.forward(&x)?.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    // ToPILImage: x 255, truncated to 8 bits
    let m8: Vec<u8> = matte.flatten_all()?.to_vec1::<f32>()?.iter().map(|&v| (v * 255.0) as u8).collect();
    let m8 = GrayImage::from_raw(size as u32, size as u32, m8).expect("matte size");
    let (w, h) = img.dimensions();
    let alpha = if (w, h) == (size as u32, size as u32) { m8 } else { resize_gray(&m8, w, h, Filter::Bicubic) };
    let fg = refine::refine_foreground(img, &alpha);
    let foreground = RgbaImage::from_fn(w, h, |x, y| {
        let [r, g, b] = fg.get_pixel(x, y).0;
        image::Rgba([r, g, b, alpha.get_pixel(x, y)[0]])
    });
    Ok(Cutout { matte, alpha, foreground })
}
