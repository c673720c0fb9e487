//! Image files in and out: decode (PNG/JPEG/WebP), composite RGBA onto white, resize, convert
//! to and from tensors in [-1, 1], write PNGs atomically, and lay images out in grids.

use crate::error::{Error, Result};
use crate::util::atomic_write;
use candle_core::{DType, Device, Tensor};
use image::{imageops::FilterType, DynamicImage, GrayImage, Rgb, RgbImage};
use std::path::Path;

/// Largest side (pixels) of an image that is decoded at all. The side is read from the header
/// first: a larger image is refused before any pixel is decoded (a few hundred KB of PNG can
/// declare 20000 x 20000 pixels, 1.6 GB once decoded).
pub const MAX_DECODE_SIDE: u32 = 8192;
/// Largest pixel count decoded (about 40 megapixels: a 7000 x 5700 photo).
pub const MAX_DECODE_PIXELS: u64 = 40_000_000;
/// Most memory the decoder may allocate for one image (`image::Limits::max_alloc`).
pub const MAX_DECODE_ALLOC: u64 = 512 << 20;
/// Largest image file read (bytes).
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;

/// Decode an image file, naming the file in any error (missing, truncated, zero-size, too
/// large, ...).
pub fn open(path: impl AsRef<Path>) -> Result<DynamicImage> {
    let path = path.as_ref();
    let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    if len > MAX_IMAGE_FILE_BYTES {
        return Err(Error::bad_file(
            path,
            format!("{len} bytes is larger than the {MAX_IMAGE_FILE_BYTES} bytes an image file may have"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode(&bytes).map_err(|msg| Error::bad_file(path, msg))
}

/// Decode image bytes (PNG/JPEG/WebP) of at most [`MAX_DECODE_SIDE`] pixels a side; the error
/// says what is wrong, for the caller to name the source (a file, a field of a request).
pub fn decode(bytes: &[u8]) -> std::result::Result<DynamicImage, String> {
    decode_within(bytes, MAX_DECODE_SIDE)
}

/// [`decode`] with a smaller side limit (`max_side` is capped at [`MAX_DECODE_SIDE`]). The
/// dimensions are read from the header and checked before decoding; the decoder then runs
/// under `image::Limits` (sides and [`MAX_DECODE_ALLOC`]), so that a header that lies is
/// caught too.
pub fn decode_within(bytes: &[u8], max_side: u32) -> std::result::Result<DynamicImage, String> {
    if bytes.is_empty() {
        return Err("empty, not an image".into());
    }
    let max_side = max_side.min(MAX_DECODE_SIDE);
    let reader = || -> std::result::Result<image::ImageReader<std::io::Cursor<&[u8]>>, String> {
        let r = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| format!("cannot read image: {e}"))?;
        if r.format().is_none() {
            return Err("cannot decode image: not a PNG, JPEG or WebP file".into());
        }
        Ok(r)
    };
    let (w, h) = reader()?.into_dimensions().map_err(|e| format!("cannot decode image: {e}"))?;
    if w == 0 || h == 0 {
        return Err("image has zero width or height".into());
    }
    if w > max_side || h > max_side {
        return Err(format!("{w}x{h} pixels is larger than {max_side} pixels a side (refused before decoding)"));
    }
    if w as u64 * h as u64 > MAX_DECODE_PIXELS {
        return Err(format!("{w}x{h} pixels is more than {MAX_DECODE_PIXELS} pixels (refused before decoding)"));
    }
    let mut r = reader()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    r.limits(limits);
    let img = r.decode().map_err(|e| format!("cannot decode image: {e}"))?;
    if img.width() == 0 || img.height() == 0 {
        return Err("image has zero width or height".into());
    }
    Ok(img)
}

/// Width and height from an image's header, without decoding it.
pub fn dimensions(bytes: &[u8]) -> std::result::Result<(u32, u32), String> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read image: {e}"))?
        .into_dimensions()
        .map_err(|e| format!("cannot decode image: {e}"))
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

/// A channel value below which a pixel of a reference counts as subject, not its white
/// background (references are subjects composited onto white).
pub const WHITE_LEVEL: u8 = 235;

/// A reference as a model with references on a grid of their own sees it: the square around its
/// subject (the box of pixels with a channel below [`WHITE_LEVEL`], widened to a square about
/// its centre and kept inside the image), resized to `side` x `side`. An image with no such
/// pixel is resized whole. Training data and requests go through this one function.
pub fn reference_view(img: &RgbImage, side: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in img.enumerate_pixels() {
        if p.0.iter().any(|&c| c < WHITE_LEVEL) {
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        }
    }
    if x0 == u32::MAX {
        return resize_rgb(img, side, side);
    }
    let box_side = ((x1 - x0).max(y1 - y0) + 1).min(w.min(h));
    // The box's start, its slack split evenly on both sides, kept inside the image.
    let place = |lo: u32, hi: u32, extent: u32| lo.saturating_sub((box_side - (hi - lo + 1).min(box_side)) / 2).min(extent - box_side);
    let (left, top) = (place(x0, x1, w), place(y0, y1, h));
    let crop = image::imageops::crop_imm(img, left, top, box_side, box_side).to_image();
    resize_rgb(&crop, side, side)
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
    save_as(path.as_ref(), img, image::ImageFormat::Png)
}

fn save_as(path: &Path, img: &DynamicImage, format: image::ImageFormat) -> Result<()> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let name = format!("{format:?}").to_uppercase();
    img.write_to(&mut buf, format)
        .map_err(|e| Error::bad_file(path, format!("cannot encode {name}: {e}")))?;
    atomic_write(path, &buf.into_inner())
}

/// The image format an output path names by its extension: `.png` (or no extension), `.jpg` /
/// `.jpeg`, `.webp` (lossless). Any other extension is an error naming the path, so that a file
/// never holds another format than its name says.
pub fn output_format(path: impl AsRef<Path>) -> Result<image::ImageFormat> {
    let path = path.as_ref();
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase());
    match ext.as_deref() {
        None | Some("png") => Ok(image::ImageFormat::Png),
        Some("jpg") | Some("jpeg") => Ok(image::ImageFormat::Jpeg),
        Some("webp") => Ok(image::ImageFormat::WebP),
        Some(other) => Err(Error::bad_file(
            path,
            format!("cannot write images as `.{other}` (use .png, .jpg, .jpeg or .webp)"),
        )),
    }
}

/// Write an RGB image atomically in the format its extension names (see [`output_format`]).
pub fn save_rgb(path: impl AsRef<Path>, img: &RgbImage) -> Result<()> {
    let path = path.as_ref();
    let format = output_format(path)?;
    save_as(path, &DynamicImage::ImageRgb8(img.clone()), format)
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

    fn png_bytes(w: u32, h: u32) -> Vec<u8> {
        let mut buf = std::io::Cursor::new(Vec::new());
        DynamicImage::ImageLuma8(GrayImage::new(w, h)).write_to(&mut buf, image::ImageFormat::Png).unwrap();
        buf.into_inner()
    }

    /// A PNG whose header declares `w` x `h` pixels, with a tiny (invalid) body: what an
    /// attacker sends. The CRC of IHDR is correct so that decoders read the header.
    fn bomb_header(w: u32, h: u32) -> Vec<u8> {
        let mut png = png_bytes(1, 1);
        // IHDR data starts at byte 16 (8 signature + 4 length + 4 type).
        png[16..20].copy_from_slice(&w.to_be_bytes());
        png[20..24].copy_from_slice(&h.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        png
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }

    #[test]
    fn large_images_are_refused_before_decoding() {
        assert_eq!(dimensions(&bomb_header(20000, 20000)).unwrap(), (20000, 20000));
        let t0 = std::time::Instant::now();
        let e = decode(&bomb_header(20000, 20000)).unwrap_err();
        assert!(e.contains("20000x20000") && e.contains("8192") && e.contains("before decoding"), "{e}");
        // Within the side limit but above the pixel limit.
        let e = decode(&bomb_header(8000, 8000)).unwrap_err();
        assert!(e.contains("40000000"), "{e}");
        assert!(t0.elapsed().as_secs_f64() < 5.0);
        // A caller's smaller limit (the server's 4096).
        let e = decode_within(&png_bytes(40, 20), 32).unwrap_err();
        assert!(e.contains("40x20") && e.contains("32"), "{e}");
        assert_eq!(decode_within(&png_bytes(40, 20), 64).unwrap().width(), 40);
        // Not an image at all.
        assert!(decode(b"GIF89a...").is_err());
    }

    #[test]
    fn reference_view_crops_the_square_around_the_subject() {
        // A 10x6 px red subject at (20..30, 8..14) on a white 64 px image: the 10 px square
        // about its centre (rows 6..16), resized; the red rows fill 6 of every 10.
        let img = RgbImage::from_fn(64, 64, |x, y| if (20..30).contains(&x) && (8..14).contains(&y) { Rgb([200, 10, 10]) } else { Rgb([255; 3]) });
        let v = reference_view(&img, 20);
        assert_eq!(v.dimensions(), (20, 20));
        let red_rows: Vec<u32> = (0..20).filter(|&y| v.get_pixel(10, y)[1] < 128).collect();
        assert_eq!(red_rows, (4..16).collect::<Vec<_>>());
        assert!((0..20).all(|x| v.get_pixel(x, 10)[1] < 128), "every column is subject");
        // A subject at the border: the square stays inside the image.
        let corner = RgbImage::from_fn(16, 16, |x, y| if x >= 12 && y < 2 { Rgb([0; 3]) } else { Rgb([255; 3]) });
        let v = reference_view(&corner, 4);
        assert_eq!(v.get_pixel(3, 0)[0], 0);
        // Nothing but white: the whole image, resized.
        assert_eq!(reference_view(&RgbImage::from_pixel(16, 16, Rgb([255; 3])), 8), RgbImage::from_pixel(8, 8, Rgb([255; 3])));
    }

    #[test]
    fn output_format_follows_the_extension() {
        let dir = std::env::temp_dir().join(format!("tokenar-imageio-fmt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = RgbImage::from_fn(8, 8, |x, y| Rgb([(x * 30) as u8, (y * 30) as u8, 9]));
        for (name, magic) in [("a.png", &b"\x89PNG"[..]), ("a.jpg", &[0xFF, 0xD8][..]), ("a.JPEG", &[0xFF, 0xD8][..]), ("a.webp", &b"RIFF"[..])] {
            let p = dir.join(name);
            save_rgb(&p, &img).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            assert!(bytes.starts_with(magic), "{name}");
            let d = decode(&bytes).unwrap();
            assert_eq!((d.width(), d.height()), (8, 8));
        }
        let e = save_rgb(dir.join("a.gif"), &img).unwrap_err().to_string();
        assert!(e.contains("a.gif") && e.contains(".png"), "{e}");
        assert!(!dir.join("a.gif").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
