//! Rasterisation: procedural backgrounds and subjects drawn from their inside tests (no
//! anti-aliasing, so every pixel belongs to exactly one subject or to the background).

use super::patterns::{colour_at, PALETTE};
use super::relations::{Pose, EXTENT};
use super::shapes::inside;
use crate::util::Rng;
use image::{Rgb, RgbImage};
use rand::Rng as _;

/// A subject's identity: what a model must copy from its reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    pub category: usize,
    pub body: usize,
    /// Pattern colour; equal to `body` for solid subjects.
    pub accent: usize,
    pub pattern: usize,
}

impl Identity {
    /// A stable integer id (category, body, accent, pattern in mixed radix).
    pub fn id(&self) -> u32 {
        (((self.category * PALETTE.len() + self.body) * PALETTE.len() + self.accent) * 4 + self.pattern)
            as u32
    }
}

/// A low-saturation colour: every channel within 22 of a grey level in 130..215, so its
/// channel spread is at most 44 and no channel is below 108.
fn muted(rng: &mut Rng) -> [f32; 3] {
    let g: f32 = rng.random_range(130.0..215.0);
    std::array::from_fn(|_| g + rng.random_range(-22.0..22.0))
}

/// A simple procedural background: a linear gradient between two muted colours, one to three
/// large soft blobs, and sometimes a darker floor below a horizontal line. Every pixel is a
/// blend of muted colours (spread at most 44), darkened by at most 0.82, so it can never equal
/// a palette colour.
pub fn background(size: u32, rng: &mut Rng) -> RgbImage {
    let s = size as f32;
    let (c0, c1) = (muted(rng), muted(rng));
    let ang: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let (gx, gy) = (ang.cos(), ang.sin());
    let blobs: Vec<([f32; 2], f32, [f32; 3])> = (0..rng.random_range(1..=3))
        .map(|_| {
            let c = [rng.random_range(0.0..s), rng.random_range(0.0..s)];
            (c, rng.random_range(0.25..0.5) * s, muted(rng))
        })
        .collect();
    let floor = rng.random_bool(0.5).then(|| rng.random_range(0.55..0.8) * s);
    let mut img = RgbImage::new(size, size);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
        let t = (((fx / s - 0.5) * gx + (fy / s - 0.5) * gy) * 0.7 + 0.5).clamp(0.0, 1.0);
        let mut c: [f32; 3] = std::array::from_fn(|i| c0[i] * (1.0 - t) + c1[i] * t);
        for (bc, r, col) in &blobs {
            let d2 = (fx - bc[0]).powi(2) + (fy - bc[1]).powi(2);
            let w = 0.8 * (-d2 / (r * r)).exp();
            for i in 0..3 {
                c[i] = c[i] * (1.0 - w) + col[i] * w;
            }
        }
        let dark = match floor {
            Some(f) if fy >= f => 0.82 + 0.08 * ((fy - f) / s),
            _ => 1.0,
        };
        *px = Rgb(std::array::from_fn(|i| (c[i] * dark).round().clamp(0.0, 255.0) as u8));
    }
    img
}

/// Draw a subject into `img`; `owner` (one byte per pixel) records `tag` where it is drawn.
/// Returns the number of pixels drawn.
pub fn draw(img: &mut RgbImage, owner: &mut [u8], tag: u8, who: &Identity, pose: &Pose) -> usize {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let reach = pose.radius * EXTENT;
    let xs = ((pose.cx - reach).floor() as i64).max(0)..((pose.cx + reach).ceil() as i64).min(w);
    let ys = ((pose.cy - reach).floor() as i64).max(0)..((pose.cy + reach).ceil() as i64).min(h);
    let (sin, cos) = pose.rot.sin_cos();
    let inv = 1.0 / pose.radius;
    let mut n = 0;
    for y in ys {
        for x in xs.clone() {
            let dx = (x as f32 + 0.5 - pose.cx) * inv;
            let dy = (y as f32 + 0.5 - pose.cy) * inv;
            // Undo the rotation, then the flip, to get local coordinates.
            let mut u = cos * dx + sin * dy;
            let v = -sin * dx + cos * dy;
            if pose.flip {
                u = -u;
            }
            if !inside(who.category, u, v) {
                continue;
            }
            let c = colour_at(who.pattern, who.body, who.accent, u, v);
            img.put_pixel(x as u32, y as u32, Rgb(PALETTE[c].1));
            owner[(y * w + x) as usize] = tag;
            n += 1;
        }
    }
    n
}
