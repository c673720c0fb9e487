//! The 11 relations of the synthetic benchmark and the layout they imply: each subject's centre,
//! scale, rotation, flip and drawing depth, in units of a base radius before fitting to the
//! canvas.

use crate::util::Rng;
use rand::Rng as _;

/// (key stored in `meta.json`, phrase used in prompts).
pub const RELATIONS: [(&str, &str); 11] = [
    ("left_of", "to the left of"),
    ("right_of", "to the right of"),
    ("above", "above"),
    ("below", "below"),
    ("in_front_of", "in front of"),
    ("behind", "behind"),
    ("next_to", "next to"),
    ("on_top_of", "on top of"),
    ("under", "under"),
    ("far_from", "far from"),
    ("bigger_than", "bigger than"),
];

/// Where one subject goes, in base-radius units (before fitting) or pixels (after).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pose {
    pub cx: f32,
    pub cy: f32,
    /// Radius of the subject's unit disc.
    pub radius: f32,
    /// Rotation in radians (positive turns clockwise on screen).
    pub rot: f32,
    pub flip: bool,
    /// Drawing depth: higher is drawn later (in front).
    pub z: i32,
}

/// Every shape fits in this multiple of its radius (a square's corners reach 0.78 * sqrt 2).
pub const EXTENT: f32 = 1.12;

/// Poses for a chain of subjects where subject i stands in `rels[i]` to subject i + 1
/// ("a star to the left of a ring"), in base-radius units, centred loosely on 0.
pub fn layout(rels: &[usize], n: usize, rng: &mut Rng) -> Vec<Pose> {
    let mut poses: Vec<Pose> = (0..n)
        .map(|_| Pose {
            cx: 0.0,
            cy: 0.0,
            radius: rng.random_range(0.8..1.2),
            rot: rng.random_range(-30f32..30.0).to_radians(),
            flip: rng.random_bool(0.5),
            z: 0,
        })
        .collect();
    // Place from the last subject backwards: subject i relative to subject i + 1.
    for i in (0..n.saturating_sub(1)).rev() {
        let rel = rels[i];
        if RELATIONS[rel].0 == "bigger_than" {
            poses[i].radius = rng.random_range(1.15..1.25);
            poses[i + 1].radius = rng.random_range(0.75..0.85);
        }
        let b = poses[i + 1];
        let (sa, sb) = (poses[i].radius, b.radius);
        let sum = (sa + sb) * EXTENT;
        let side = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
        let (dx, dy, dz) = match RELATIONS[rel].0 {
            "left_of" => (-sum - rng.random_range(0.3..0.8), rng.random_range(-0.4..0.4), 0),
            "right_of" => (sum + rng.random_range(0.3..0.8), rng.random_range(-0.4..0.4), 0),
            "above" => (rng.random_range(-0.4..0.4), -sum - rng.random_range(0.3..0.8), 0),
            "below" => (rng.random_range(-0.4..0.4), sum + rng.random_range(0.3..0.8), 0),
            "in_front_of" | "behind" => {
                let d = rng.random_range(0.6..0.75) * (sa + sb);
                let up = if RELATIONS[rel].0 == "behind" { -1.0 } else { 1.0 };
                (side * d * 0.92, up * d * 0.4, up as i32)
            }
            "next_to" => (side * (sum + rng.random_range(0.0..0.15)), rng.random_range(-0.15..0.15), 0),
            "on_top_of" => (rng.random_range(-0.1..0.1), -(sa + sb) * 0.9, 1),
            "under" => (rng.random_range(-0.1..0.1), (sa + sb) * 0.9, -1),
            "far_from" => {
                let vside = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
                (side * (sum + 0.9), vside * rng.random_range(0.5..0.8) * (sa + sb), 0)
            }
            _ /* bigger_than */ => (side * (sum + rng.random_range(0.2..0.5)), rng.random_range(-0.2..0.2), 0),
        };
        poses[i].cx = b.cx + dx;
        poses[i].cy = b.cy + dy;
        poses[i].z = b.z + dz;
    }
    poses
}

/// Do two subjects not linked by an overlapping relation collide? (Used to reject chains of
/// three or more where, say, "left of" then "right of" would stack two subjects.)
pub fn collide(a: &Pose, b: &Pose) -> bool {
    let d = ((a.cx - b.cx).powi(2) + (a.cy - b.cy).powi(2)).sqrt();
    d < (a.radius + b.radius) * EXTENT
}

/// Scale and move the poses so every subject lies inside a `size` x `size` canvas with a
/// margin, the base radius at most `max_radius` pixels, placed at a random spot where it fits.
pub fn fit(poses: &mut [Pose], size: f32, max_radius: f32, rng: &mut Rng) {
    let margin = size * 0.04;
    let (mut x0, mut y0, mut x1, mut y1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
    for p in poses.iter() {
        let r = p.radius * EXTENT;
        x0 = x0.min(p.cx - r);
        y0 = y0.min(p.cy - r);
        x1 = x1.max(p.cx + r);
        y1 = y1.max(p.cy + r);
    }
    let avail = size - 2.0 * margin;
    let k = max_radius.min(avail / (x1 - x0)).min(avail / (y1 - y0));
    let (w, h) = ((x1 - x0) * k, (y1 - y0) * k);
    let ox = margin + rng.random_range(0.0..=(avail - w).max(0.0));
    let oy = margin + rng.random_range(0.0..=(avail - h).max(0.0));
    for p in poses.iter_mut() {
        p.cx = ox + (p.cx - x0) * k;
        p.cy = oy + (p.cy - y0) * k;
        p.radius *= k;
    }
}
