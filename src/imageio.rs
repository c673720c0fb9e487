//! Image files in and out: decode (PNG/JPEG/WebP), composite RGBA onto white, resize, convert
//! to and from tensors in [-1, 1], write PNGs atomically, and lay images out in grids.

use crate::error::{Error, Result};
use crate::util::atomic_write;
use candle_core::{DType, Device, Tensor};
use image::{imageops::FilterType, DynamicImage, GrayImage, Rgb, RgbImage};
use std::path::Path;

/// Decode an image file, naming the file in any error (missing, truncated, zero-size, ...).
pub fn open(path: impl AsRef<Path>) -> Result<DynamicImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode(&bytes).map_err(|msg| Error::bad_file(path, msg))
}

/// Decode image bytes (PNG/JPEG/WebP); the error says what is wrong, for the caller to name
/// the source (a file, a field of a request).
pub fn decode(bytes: &[u8]) -> std::result::Result<DynamicImage, String> {
    if bytes.is_empty() {
        return Err("empty, not an image".into());
    }
    let img = image::load_from_memory(bytes).map_err(|e| format!("cannot decode image: {e}"))?;
    if img.width() == 0 || img.height() == 0 {
        return Err("image has zero width or height".into());
    }
    Ok(img)
}

/// A `data:image/png;base64,...` URL of PNG bytes (images in JSON requests and answers).
pub fn png_data_url(png: &[u8]) -> String {
    use base64::Engine;
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}

/// Threshold a luminance image into a mask: 255 where luminance > 127 ("inside"), else 0.
pub fn binarize(img: &GrayImage) -> GrayImage {
    GrayImage::from_fn(img.width(), img.height(), |x, y| image::Luma([if img.get_pixel(x, y)[0] > 127 { 255 } else { 0 }]))
}

/// RGB with any alpha composited onto white (as the reference data loader does).
pub fn to_rgb_on_white(img: &DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = p[3] as f32 / 255.0;
        for c in 0..3 {
            o[c] = (p[c] as f32 * a + 255.0 * (1.0 - a)).round() as u8;
        }
    }
    out
}

/// Open an image, composite onto white and resize straight to `size` x `size` (no crop),
/// as the reference code does. `None` keeps the original size.
pub fn load_rgb(path: impl AsRef<Path>, size: Option<u32>) -> Result<RgbImage> {
    let img = to_rgb_on_white(&open(path)?);
    Ok(match size {
        Some(s) if img.width() != s || img.height() != s => resize_rgb(&img, s, s),
        _ => img,
    })
}

pub fn resize_rgb(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    image::imageops::resize(img, w, h, FilterType::CatmullRom)
}

/// Open a mask (any format; luminance > 127 is "inside"), resized with nearest neighbour.
pub fn load_mask(path: impl AsRef<Path>, size: Option<u32>) -> Result<GrayImage> {
    let img = open(path)?.to_luma8();
    let img = match size {
        Some(s) if img.width() != s || img.height() != s => {
            image::imageops::resize(&img, s, s, FilterType::Nearest)
        }
        _ => img,
    };
    Ok(binarize(&img))
}

/// (3, H, W) f32 tensor in [-1, 1].
pub fn rgb_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = img.as_raw().iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
    Ok(Tensor::from_vec(data, (h, w, 3), device)?.permute((2, 0, 1))?.contiguous()?)
}

/// (1, H, W) f32 tensor in {0, 1}.
pub fn mask_to_tensor(mask: &GrayImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let data: Vec<f32> = mask.as_raw().iter().map(|&v| if v > 127 { 1.0 } else { 0.0 }).collect();
    Ok(Tensor::from_vec(data, (1, h, w), device)?)
}

/// From a (3, H, W) tensor in [-1, 1] (values outside are clamped).
pub fn tensor_to_rgb(t: &Tensor) -> Result<RgbImage> {
    let (c, h, w) = t.dims3()?;
    if c != 3 {
        return Err(Error::invalid("image tensor", format!("expected 3 channels, got {c}")));
    }
    let t = ((t.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let data: Vec<u8> = t.iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect();
    RgbImage::from_raw(w as u32, h as u32, data)
        .ok_or_else(|| Error::invalid("image tensor", "buffer size mismatch"))
}

/// Encode as PNG and write atomically.
pub fn save_png(path: impl AsRef<Path>, img: &DynamicImage) -> Result<()> {
    let path = path.as_ref();
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| Error::bad_file(path, format!("cannot encode PNG: {e}")))?;
    atomic_write(path, &buf.into_inner())
}

pub fn save_rgb(path: impl AsRef<Path>, img: &RgbImage) -> Result<()> {
    save_png(path, &DynamicImage::ImageRgb8(img.clone()))
}

/// Lay out images row by row, `cols` per row, each cell the size of the largest image,
/// separated by `pad` white pixels.
pub fn grid(images: &[RgbImage], cols: usize, pad: u32) -> RgbImage {
    if images.is_empty() {
        return RgbImage::from_pixel(1, 1, Rgb([255, 255, 255]));
    }
    let cols = cols.max(1).min(images.len());
    let rows = images.len().div_ceil(cols);
    let cw = images.iter().map(|i| i.width()).max().unwrap_or(1);
    let ch = images.iter().map(|i| i.height()).max().unwrap_or(1);
    let w = cols as u32 * cw + (cols as u32 + 1) * pad;
    let h = rows as u32 * ch + (rows as u32 + 1) * pad;
    let mut out = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    for (i, img) in images.iter().enumerate() {
        let (r, c) = ((i / cols) as u32, (i % cols) as u32);
        let x = pad + c * (cw + pad);
        let y = pad + r * (ch + pad);
        image::imageops::replace(&mut out, img, x as i64, y as i64);
    }
    out
}

/// A mask shown as an RGB image (white inside).
pub fn mask_to_rgb(mask: &GrayImage) -> RgbImage {
    RgbImage::from_fn(mask.width(), mask.height(), |x, y| {
        let v = mask.get_pixel(x, y)[0];
        Rgb([v, v, v])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_round_trip_is_exact() {
        let img = RgbImage::from_fn(5, 3, |x, y| Rgb([(x * 50) as u8, (y * 80) as u8, 7]));
        let t = rgb_to_tensor(&img, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 3, 5]);
        assert_eq!(tensor_to_rgb(&t).unwrap(), img);
    }

    #[test]
    fn rgba_composites_on_white() {
        let mut rgba = image::RgbaImage::new(2, 1);
        rgba.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        rgba.put_pixel(1, 0, image::Rgba([10, 20, 30, 255]));
        let rgb = to_rgb_on_white(&DynamicImage::ImageRgba8(rgba));
        assert_eq!(rgb.get_pixel(0, 0), &Rgb([255, 255, 255]));
        assert_eq!(rgb.get_pixel(1, 0), &Rgb([10, 20, 30]));
    }

    #[test]
    fn bad_files_name_the_path() {
        let dir = std::env::temp_dir().join(format!("tokenar-imageio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.png");
        std::fs::write(&empty, b"").unwrap();
        let junk = dir.join("junk.png");
        std::fs::write(&junk, b"not a png at all").unwrap();
        for p in [&empty, &junk, &dir.join("missing.png")] {
            let e = load_rgb(p, Some(8)).unwrap_err().to_string();
            assert!(e.contains(&*p.file_name().unwrap().to_string_lossy()), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn grid_size() {
        let a = RgbImage::new(4, 4);
        let g = grid(&[a.clone(), a.clone(), a], 2, 1);
        assert_eq!((g.width(), g.height()), (2 * 4 + 3, 2 * 4 + 3));
    }
}
