//! Identity metrics from pixels: for each subject's region in a generated image, is its own
//! reference the nearest of the sample's references? Two descriptors: a colour histogram
//! (`id_acc`, below) and a shape-aware colour correlogram (`id_shape`, further down), which a
//! blob of the subject's colours does not pass.
//!
//! Descriptor: a colour histogram on a 4 x 4 x 4 RGB lattice (levels 0, 85, 170, 255) with
//! trilinear soft binning (robust to small colour shifts and anti-aliasing), L1-normalised.
//! - a region's descriptor uses the generated pixels inside that subject's own mask;
//! - a reference's descriptor uses its foreground: pixels that are not near-white (some
//!   channel below [`WHITE_LEVEL`]), as references are subjects on white;
//! - distance = L1 between descriptors (0..2).
//!
//! Per sample with n >= 2 subjects: accuracy = fraction of subjects whose own reference is
//! strictly the nearest (ties count as wrong); swapped = the per-subject nearest references
//! form a permutation other than the identity (subjects exchanged identities). Samples whose
//! references have (nearly) the same colour distribution are not scored; subjects that differ
//! mainly in shape or in the layout of the same colours can still be confused (on the
//! synthetic 64 px test set, ground-truth targets score 0.994 without that exclusion, 1.0 on
//! the 497 of 500 samples scored with it).

use crate::error::{Error, Result};
use image::{GrayImage, RgbImage};

/// References whose descriptors are closer than this (L1) cannot be told apart by colour; a
/// sample with such a pair is not scored (identity = `None`).
pub const MIN_REFERENCE_DISTANCE: f64 = 0.1;

/// A pixel with all channels at or above this level counts as white background in a reference.
pub use crate::imageio::WHITE_LEVEL;
const LEVELS: usize = 4;

/// One subject: its region in the generated image and its reference image.
#[derive(Clone, Debug)]
pub struct Subject {
    /// Mask of the subject in generated-image pixels (> 127 = inside).
    pub mask: GrayImage,
    pub reference: RgbImage,
}

#[derive(Clone, Debug, PartialEq)]
pub struct IdentityScore {
    /// Fraction of subjects whose own reference is the nearest.
    pub accuracy: f64,
    /// The nearest references form a permutation other than the identity.
    pub swapped: bool,
    /// Nearest reference per subject (`None` on a tie).
    pub nearest: Vec<Option<usize>>,
    /// `distances[i][j]` = distance of subject i's region to reference j.
    pub distances: Vec<Vec<f64>>,
}

/// Soft colour histogram of a set of pixels; `None` when there are none.
pub fn colour_descriptor(pixels: impl Iterator<Item = [u8; 3]>) -> Option<Vec<f64>> {
    let mut hist = vec![0.0; LEVELS * LEVELS * LEVELS];
    let mut n = 0usize;
    for p in pixels {
        for (idx, wgt) in soft_bins(p) {
            hist[idx] += wgt;
        }
        n += 1;
    }
    (n > 0).then(|| hist.into_iter().map(|v| v / n as f64).collect())
}

/// Descriptor of the pixels of `img` inside `mask`.
pub fn region_descriptor(img: &RgbImage, mask: &GrayImage) -> Result<Option<Vec<f64>>> {
    if img.dimensions() != mask.dimensions() {
        return Err(Error::invalid(
            "subject mask",
            format!("mask is {:?} but the image is {:?}", mask.dimensions(), img.dimensions()),
        ));
    }
    Ok(colour_descriptor(img.pixels().zip(mask.pixels()).filter(|(_, m)| m[0] > 127).map(|(p, _)| p.0)))
}

/// Descriptor of a reference's foreground (non-white pixels).
pub fn reference_descriptor(reference: &RgbImage) -> Option<Vec<f64>> {
    colour_descriptor(reference.pixels().map(|p| p.0).filter(|p| p.iter().any(|&c| c < WHITE_LEVEL)))
}

fn l1(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum()
}

/// Identity score of one generated image; `None` with fewer than two subjects, when a region
/// or a reference foreground is empty, or when two references have (nearly) the same colour
/// distribution (closer than [`MIN_REFERENCE_DISTANCE`]): nothing to compare.
pub fn identity_score(pred: &RgbImage, subjects: &[Subject]) -> Result<Option<IdentityScore>> {
    if subjects.len() < 2 {
        return Ok(None);
    }
    let mut regions = Vec::new();
    let mut refs = Vec::new();
    for s in subjects {
        match (region_descriptor(pred, &s.mask)?, reference_descriptor(&s.reference)) {
            (Some(r), Some(f)) => {
                regions.push(r);
                refs.push(f);
            }
            _ => return Ok(None),
        }
    }
    for (i, a) in refs.iter().enumerate() {
        if refs[i + 1..].iter().any(|b| l1(a, b) < MIN_REFERENCE_DISTANCE) {
            return Ok(None);
        }
    }
    let distances: Vec<Vec<f64>> = regions.iter().map(|r| refs.iter().map(|f| l1(r, f)).collect()).collect();
    let nearest: Vec<Option<usize>> = distances
        .iter()
        .map(|row| {
            let best = row.iter().cloned().fold(f64::INFINITY, f64::min);
            let at: Vec<usize> = (0..row.len()).filter(|&j| row[j] <= best + 1e-12).collect();
            (at.len() == 1).then(|| at[0])
        })
        .collect();
    let correct = nearest.iter().enumerate().filter(|(i, n)| **n == Some(*i)).count();
    let is_perm = {
        let mut seen = vec![false; subjects.len()];
        nearest.iter().all(|n| match n {
            Some(j) if !seen[*j] => {
                seen[*j] = true;
                true
            }
            _ => false,
        })
    };
    Ok(Some(IdentityScore {
        accuracy: correct as f64 / subjects.len() as f64,
        swapped: is_perm && correct < subjects.len(),
        nearest,
        distances,
    }))
}

// ---------------------------------------------------------------------------------------------
// Shape-aware identity: colour correlograms.
//
// The colour histogram above cannot tell a subject from a blob of its colours. The structure
// descriptor counts which colours lie next to which at a few distances (a colour
// correlogram, as used in image retrieval): a striped heart has body/stripe pairs at the
// stripe spacing and body/body pairs along the stripes, a uniform blob of the body colour has
// body/body pairs only. Pairs are pooled over four directions (so rotation and flip change
// little) and the distances are fractions of the region's size (so scale changes little).
// Both descriptors are taken after a masked box blur of radius [`BLUR_FRACTION`] of the
// region's size: a tokenizer's round trip blurs fine patterns and shifts colours, and the blur
// makes the sharp reference comparable with it (without it the vq-small-f4 round trip of the
// ground truth sat farther from its reference than a shuffled blob of its colours).
// A subject counts as kept when its own reference is the nearest by this descriptor, closer
// than [`MAX_STRUCTURE_DISTANCE`], and no farther than its blob control (the reference's own
// foreground pixels in a fixed random order: its colours without its shape).

/// Pair distances as fractions of the region's size (the square root of its pixel count).
const CORRELOGRAM_STEPS: [f64; 3] = [0.06, 0.12, 0.24];
const BINS: usize = LEVELS * LEVELS * LEVELS;
/// Box-blur radius as a fraction of the region's size, applied before the correlogram.
const BLUR_FRACTION: f64 = 0.12;

/// A region whose structure distance to its own reference (mean L1 over the distances, 0..2)
/// is above this is not the subject. Set from measured distributions (docs/experiments.md,
/// "Shape-aware identity threshold"; the ignored test `measure_structure_distances` prints
/// them): on 200 two-subject test samples the vq-small-f4 round trip of the ground truth has
/// p95 0.63, another sample's subject p05 1.17.
pub const MAX_STRUCTURE_DISTANCE: f64 = 0.8;

/// Trilinear soft bins of one colour on the 4x4x4 lattice: (bin, weight) for the 8 corners.
fn soft_bins(p: [u8; 3]) -> [(usize, f64); 8] {
    soft_bins_f([p[0] as f64, p[1] as f64, p[2] as f64])
}

/// [`soft_bins`] of a colour with fractional channels (0..=255).
fn soft_bins_f(p: [f64; 3]) -> [(usize, f64); 8] {
    let step = 255.0 / (LEVELS - 1) as f64;
    let mut lo = [0usize; 3];
    let mut fr = [0.0f64; 3];
    for c in 0..3 {
        let v = (p[c] / step).clamp(0.0, (LEVELS - 1) as f64);
        lo[c] = (v.floor() as usize).min(LEVELS - 2);
        fr[c] = v - lo[c] as f64;
    }
    let mut out = [(0usize, 0.0f64); 8];
    for (corner, o) in out.iter_mut().enumerate() {
        let mut wgt = 1.0;
        let mut idx = 0;
        for c in 0..3 {
            let up = (corner >> c) & 1 == 1;
            wgt *= if up { fr[c] } else { 1.0 - fr[c] };
            idx = idx * LEVELS + lo[c] + up as usize;
        }
        *o = (idx, wgt);
    }
    out
}

/// Mean colour of the inside pixels of the (2r+1)^2 box around each inside pixel (masked box
/// blur: outside pixels never mix in); `None` outside.
fn masked_box_blur(img: &RgbImage, inside: &[bool], r: i64) -> Vec<Option<[f64; 3]>> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    // Summed-area tables of the inside pixels' channels and count, (w+1) x (h+1).
    let mut sat = vec![[0.0f64; 4]; (w + 1) * (h + 1)];
    for y in 0..h {
        for x in 0..w {
            let mut v = [0.0; 4];
            if inside[y * w + x] {
                let p = img.get_pixel(x as u32, y as u32).0;
                v = [p[0] as f64, p[1] as f64, p[2] as f64, 1.0];
            }
            for c in 0..4 {
                sat[(y + 1) * (w + 1) + x + 1][c] =
                    v[c] + sat[y * (w + 1) + x + 1][c] + sat[(y + 1) * (w + 1) + x][c] - sat[y * (w + 1) + x][c];
            }
        }
    }
    (0..h * w)
        .map(|i| {
            if !inside[i] {
                return None;
            }
            let (x, y) = ((i % w) as i64, (i / w) as i64);
            let (x0, y0) = ((x - r).max(0) as usize, (y - r).max(0) as usize);
            let (x1, y1) = ((x + r + 1).min(w as i64) as usize, (y + r + 1).min(h as i64) as usize);
            let at = |xx: usize, yy: usize| sat[yy * (w + 1) + xx];
            let mut s = [0.0; 4];
            for c in 0..4 {
                s[c] = at(x1, y1)[c] - at(x0, y1)[c] - at(x1, y0)[c] + at(x0, y0)[c];
            }
            Some([s[0] / s[3], s[1] / s[3], s[2] / s[3]])
        })
        .collect()
}

/// Colour correlogram of the pixels of `img` where `inside` holds: for each distance of
/// [`CORRELOGRAM_STEPS`], the normalised symmetric histogram of (colour, colour) pairs of
/// inside pixels that far apart along the rows, the columns and both diagonals. `None` when
/// the region is empty or no pair fits inside it.
pub fn structure_descriptor(img: &RgbImage, inside: impl Fn(u32, u32) -> bool) -> Option<Vec<Vec<f64>>> {
    let (w, h) = img.dimensions();
    let mut mask = Vec::with_capacity((w * h) as usize);
    for y in 0..h {
        for x in 0..w {
            mask.push(inside(x, y));
        }
    }
    let count = mask.iter().filter(|m| **m).count();
    if count == 0 {
        return None;
    }
    let size = (count as f64).sqrt();
    let radius = (BLUR_FRACTION * size).round() as i64;
    let cells: Vec<Option<[(usize, f64); 8]>> = if radius >= 1 {
        masked_box_blur(img, &mask, radius).into_iter().map(|c| c.map(soft_bins_f)).collect()
    } else {
        mask.iter().enumerate().map(|(i, &m)| m.then(|| soft_bins(img.get_pixel(i as u32 % w, i as u32 / w).0))).collect()
    };
    let mut out = Vec::with_capacity(CORRELOGRAM_STEPS.len());
    for step in CORRELOGRAM_STEPS {
        let d = (step * size).round().max(1.0) as i64;
        let diag = ((step * size) / std::f64::consts::SQRT_2).round().max(1.0) as i64;
        let mut hist = vec![0.0f64; BINS * BINS];
        let mut total = 0.0;
        for y in 0..h as i64 {
            for x in 0..w as i64 {
                let Some(a) = &cells[(y * w as i64 + x) as usize] else { continue };
                for (dx, dy) in [(d, 0), (0, d), (diag, diag), (diag, -diag)] {
                    let (qx, qy) = (x + dx, y + dy);
                    if qx < 0 || qy < 0 || qx >= w as i64 || qy >= h as i64 {
                        continue;
                    }
                    let Some(b) = &cells[(qy * w as i64 + qx) as usize] else { continue };
                    for &(i, wi) in a {
                        if wi == 0.0 {
                            continue;
                        }
                        for &(j, wj) in b {
                            let v = wi * wj;
                            hist[i * BINS + j] += v;
                            hist[j * BINS + i] += v;
                        }
                    }
                    total += 2.0;
                }
            }
        }
        if total == 0.0 {
            return None;
        }
        hist.iter_mut().for_each(|v| *v /= total);
        out.push(hist);
    }
    Some(out)
}

/// Mean L1 distance of two structure descriptors over their distances (0..2).
pub fn structure_distance(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter().zip(b).map(|(x, y)| l1(x, y)).sum::<f64>() / a.len().max(1) as f64
}

/// Shape-aware identity of one generated image.
#[derive(Clone, Debug, PartialEq)]
pub struct StructureScore {
    /// Fraction of subjects whose own reference is the strictly nearest by structure, closer
    /// than [`MAX_STRUCTURE_DISTANCE`] and no farther than the blob control.
    pub kept: f64,
    /// Per subject: kept or not.
    pub subject_kept: Vec<bool>,
    /// `distances[i][j]` = structure distance of subject i's region to reference j.
    pub distances: Vec<Vec<f64>>,
    /// Per subject: structure distance of its region to its blob control (the reference's
    /// foreground colours in a fixed random order: the subject's colours without its shape).
    pub control: Vec<f64>,
}

/// The reference with its foreground pixels permuted among the foreground positions in a fixed
/// pseudo-random order (the same for the same image): a blob of exactly its colours.
fn shuffled_foreground(reference: &RgbImage) -> RgbImage {
    let pos: Vec<(u32, u32)> = reference
        .enumerate_pixels()
        .filter(|(_, _, p)| p.0.iter().any(|&c| c < WHITE_LEVEL))
        .map(|(x, y, _)| (x, y))
        .collect();
    let mut order: Vec<usize> = (0..pos.len()).collect();
    order.sort_by_key(|&i| crate::util::splitmix64(0x5eed_b10b ^ i as u64));
    let mut out = reference.clone();
    for (k, &i) in order.iter().enumerate() {
        let (x, y) = pos[i];
        let (sx, sy) = pos[k];
        out.put_pixel(x, y, *reference.get_pixel(sx, sy));
    }
    out
}

/// Shape-aware identity score (see the section above); also scores single-subject samples.
/// `None` without subjects or when a region or a reference foreground is empty.
pub fn structure_score(pred: &RgbImage, subjects: &[Subject]) -> Result<Option<StructureScore>> {
    if subjects.is_empty() {
        return Ok(None);
    }
    let mut regions = Vec::new();
    let mut refs = Vec::new();
    let mut controls = Vec::new();
    for s in subjects {
        if pred.dimensions() != s.mask.dimensions() {
            return Err(Error::invalid(
                "subject mask",
                format!("mask is {:?} but the image is {:?}", s.mask.dimensions(), pred.dimensions()),
            ));
        }
        let region = structure_descriptor(pred, |x, y| s.mask.get_pixel(x, y)[0] > 127);
        let is_fg = |x: u32, y: u32| s.reference.get_pixel(x, y).0.iter().any(|&c| c < WHITE_LEVEL);
        let fg = structure_descriptor(&s.reference, is_fg);
        let blob = shuffled_foreground(&s.reference);
        let control = structure_descriptor(&blob, is_fg);
        match (region, fg, control) {
            (Some(r), Some(f), Some(c)) => {
                regions.push(r);
                refs.push(f);
                controls.push(c);
            }
            _ => return Ok(None),
        }
    }
    let distances: Vec<Vec<f64>> =
        regions.iter().map(|r| refs.iter().map(|f| structure_distance(r, f)).collect()).collect();
    let control: Vec<f64> = regions.iter().zip(&controls).map(|(r, c)| structure_distance(r, c)).collect();
    let subject_kept: Vec<bool> = distances
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let own = row[i];
            own <= MAX_STRUCTURE_DISTANCE
                && own <= control[i]
                && row.iter().enumerate().all(|(j, &d)| j == i || d > own)
        })
        .collect();
    let kept = subject_kept.iter().filter(|k| **k).count() as f64 / subjects.len() as f64;
    Ok(Some(StructureScore { kept, subject_kept, distances, control }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use image::{Luma, Rgb};

    /// A subject drawn as a disc: body colour with stripes of a second colour.
    pub(crate) fn paint(img: &mut RgbImage, cx: f64, cy: f64, r: f64, body: [u8; 3], stripe: [u8; 3]) {
        for (x, y, p) in img.enumerate_pixels_mut() {
            let (dx, dy) = (x as f64 - cx, y as f64 - cy);
            if dx * dx + dy * dy < r * r {
                *p = Rgb(if (y / 3) % 2 == 0 { body } else { stripe });
            }
        }
    }

    pub(crate) fn disc_mask(w: u32, h: u32, cx: f64, cy: f64, r: f64) -> GrayImage {
        GrayImage::from_fn(w, h, |x, y| {
            let (dx, dy) = (x as f64 - cx, y as f64 - cy);
            Luma([if dx * dx + dy * dy < r * r { 255 } else { 0 }])
        })
    }

    /// Ground-truth and swapped scenes with three subjects of distinct colours.
    pub(crate) fn scenes() -> (RgbImage, RgbImage, Vec<Subject>) {
        let ids = [([220, 30, 30], [250, 220, 0]), ([20, 60, 200], [255, 255, 255]), ([30, 160, 60], [120, 40, 160])];
        let pos = [(14.0, 16.0), (46.0, 18.0), (30.0, 46.0)];
        let bg = |x: u32, y: u32| Rgb([(100 + x) as u8, (90 + y) as u8, 110]);
        let mut truth = RgbImage::from_fn(64, 64, bg);
        let mut swapped = truth.clone();
        let mut subjects = Vec::new();
        for (i, (body, stripe)) in ids.iter().enumerate() {
            let (cx, cy) = pos[i];
            paint(&mut truth, cx, cy, 10.0, *body, *stripe);
            let (sb, ss) = ids[(i + 1) % 3];
            paint(&mut swapped, cx, cy, 10.0, sb, ss);
            // The reference: same subject, larger, on white, at another place.
            let mut reference = RgbImage::from_pixel(40, 40, Rgb([255, 255, 255]));
            paint(&mut reference, 20.0, 21.0, 14.0, *body, *stripe);
            subjects.push(Subject { mask: disc_mask(64, 64, cx, cy, 10.0), reference });
        }
        (truth, swapped, subjects)
    }

    #[test]
    fn ground_truth_is_right_and_swapped_is_wrong() {
        let (truth, swapped, subjects) = scenes();
        let s = identity_score(&truth, &subjects).unwrap().unwrap();
        assert_eq!((s.accuracy, s.swapped), (1.0, false), "{s:?}");
        let s = identity_score(&swapped, &subjects).unwrap().unwrap();
        assert_eq!((s.accuracy, s.swapped), (0.0, true), "{s:?}");
        assert_eq!(s.nearest, vec![Some(1), Some(2), Some(0)]);
        // One subject: nothing to confuse.
        assert!(identity_score(&truth, &subjects[..1]).unwrap().is_none());
        // Two references of the same colours: not scored.
        let mut twins = subjects.clone();
        twins[1].reference = twins[0].reference.clone();
        assert!(identity_score(&truth, &twins).unwrap().is_none());
        // A wrong-sized mask is an error, not a panic.
        let mut bad = subjects.clone();
        bad[0].mask = GrayImage::new(3, 3);
        assert!(identity_score(&truth, &bad).is_err());
    }

    #[test]
    fn descriptor_is_a_distribution_and_tolerates_small_shifts() {
        let a = colour_descriptor([[10u8, 200, 90], [255, 0, 128]].into_iter()).unwrap();
        assert!((a.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let b = colour_descriptor([[13u8, 197, 92], [252, 3, 125]].into_iter()).unwrap();
        let c = colour_descriptor([[200u8, 20, 20], [0, 0, 255]].into_iter()).unwrap();
        assert!(l1(&a, &b) < 0.25 && l1(&a, &c) > 1.5, "{} {}", l1(&a, &b), l1(&a, &c));
        assert!(colour_descriptor(std::iter::empty()).is_none());
    }

    /// Ground truth, and two blobs with the right colours in each subject's mask: filled with
    /// the reference's most common foreground colour, and filled with the reference's
    /// foreground pixels in random order (the same colour histogram, no structure).
    pub(crate) fn truth_and_blobs(seed: u64) -> (RgbImage, RgbImage, RgbImage, Vec<Subject>) {
        use rand::seq::SliceRandom;
        let s = crate::data::synth::render_sample(seed, 64, (1, 3));
        let subjects: Vec<Subject> =
            s.subject_masks.iter().zip(&s.refs).map(|(m, r)| Subject { mask: m.clone(), reference: r.clone() }).collect();
        let mut uniform = s.target.clone();
        let mut shuffled = s.target.clone();
        let mut rng = crate::util::rng(seed ^ 0x5eed);
        for sub in &subjects {
            let mut fg: Vec<[u8; 3]> =
                sub.reference.pixels().map(|p| p.0).filter(|p| p.iter().any(|&c| c < WHITE_LEVEL)).collect();
            let mut counts = std::collections::HashMap::new();
            for p in &fg {
                *counts.entry(*p).or_insert(0usize) += 1;
            }
            let common = counts.into_iter().max_by_key(|(p, n)| (*n, *p)).map(|(p, _)| p).unwrap();
            fg.shuffle(&mut rng);
            let mut k = 0;
            for (x, y, m) in sub.mask.enumerate_pixels() {
                if m[0] > 127 {
                    uniform.put_pixel(x, y, Rgb(common));
                    shuffled.put_pixel(x, y, Rgb(fg[k % fg.len()]));
                    k += 1;
                }
            }
        }
        (s.target, uniform, shuffled, subjects)
    }

    /// Whether a reference shows a pattern: its most common foreground colour covers less than
    /// 90% of the foreground (a one-colour subject and a blob of its colour are the same thing
    /// inside its mask).
    pub(crate) fn patterned(reference: &RgbImage) -> bool {
        let fg: Vec<[u8; 3]> = reference.pixels().map(|p| p.0).filter(|p| p.iter().any(|&c| c < WHITE_LEVEL)).collect();
        let mut counts = std::collections::HashMap::new();
        for p in &fg {
            *counts.entry(*p).or_insert(0usize) += 1;
        }
        counts.values().max().is_some_and(|&m| m * 10 < fg.len() * 9)
    }

    #[test]
    fn structure_keeps_subjects_and_rejects_blobs_of_their_colours() {
        // Kept subjects (all / patterned only) for truth, uniform blobs, shuffled blobs.
        let mut kept = [[0usize; 2]; 3];
        let (mut all, mut with_pattern) = (0usize, 0usize);
        let mut colour_right = 0.0;
        let mut colour_scored = 0usize;
        for seed in 0..40 {
            let (truth, uniform, shuffled, subjects) = truth_and_blobs(9000 + seed);
            let pat: Vec<bool> = subjects.iter().map(|s| patterned(&s.reference)).collect();
            all += subjects.len();
            with_pattern += pat.iter().filter(|p| **p).count();
            for (k, img) in [&truth, &uniform, &shuffled].into_iter().enumerate() {
                let s = structure_score(img, &subjects).unwrap().unwrap();
                for (i, &ok) in s.subject_kept.iter().enumerate() {
                    kept[k][0] += ok as usize;
                    kept[k][1] += (ok && pat[i]) as usize;
                }
            }
            if let Some(c) = identity_score(&shuffled, &subjects).unwrap() {
                colour_right += c.accuracy;
                colour_scored += 1;
            }
        }
        let rate = |k: usize, j: usize| kept[k][j] as f64 / if j == 0 { all } else { with_pattern } as f64;
        assert!(with_pattern * 2 > all, "{with_pattern} of {all} subjects patterned");
        assert!(rate(0, 0) >= 0.95, "ground truth kept {:.3}", rate(0, 0));
        assert!(rate(1, 1) <= 0.12, "uniform blobs of patterned subjects kept {:.3}", rate(1, 1));
        assert!(rate(2, 1) <= 0.12, "shuffled blobs of patterned subjects kept {:.3}", rate(2, 1));
        // The colour histogram alone calls the shuffled blobs right.
        assert!(colour_scored > 10 && colour_right / colour_scored as f64 >= 0.9);
        // A one-subject sample is scored too; a wrong-sized mask is an error.
        let (truth, _, _, subjects) = truth_and_blobs(9100);
        assert!(structure_score(&truth, &subjects[..1]).unwrap().is_some());
        let mut bad = subjects.clone();
        bad[0].mask = GrayImage::new(3, 3);
        assert!(structure_score(&truth, &bad).is_err());
        eprintln!("kept: truth {:.3}, uniform {:.3}/{:.3}, shuffled {:.3}/{:.3} ({with_pattern} of {all} patterned)",
            rate(0, 0), rate(1, 0), rate(1, 1), rate(2, 0), rate(2, 1));
    }
}

#[cfg(test)]
mod round_trip {
    use super::*;
    use crate::data::synth::{render_sample, sample_seed, Split};

    /// The first eight samples of the 2-subject test split (seed 20261205) and their ground
    /// truth after the vq-small-f4 tokenizer's round trip (tests/fixtures/identity/rt-f4-*.png,
    /// written by `tokenar tokenizer roundtrip`).
    fn fixtures() -> Vec<(RgbImage, Vec<Subject>)> {
        (0..8)
            .map(|i| {
                let s = render_sample(sample_seed(20261205, Split::Test, i), 64, (2, 2));
                let path = format!("{}/tests/fixtures/identity/rt-f4-{i}.png", env!("CARGO_MANIFEST_DIR"));
                let rt = image::open(&path).unwrap_or_else(|e| panic!("{path}: {e}")).to_rgb8();
                let subs = s.subject_masks.iter().zip(&s.refs).map(|(m, r)| Subject { mask: m.clone(), reference: r.clone() }).collect();
                (rt, subs)
            })
            .collect()
    }

    #[test]
    fn round_tripped_ground_truth_is_kept_and_other_subjects_are_not() {
        let fx = fixtures();
        let mut kept = Vec::new();
        let mut wrong = Vec::new();
        for (i, (rt, subs)) in fx.iter().enumerate() {
            kept.push(structure_score(rt, subs).unwrap().unwrap().subject_kept);
            // The next sample's references in these regions: the wrong subjects.
            let other: Vec<Subject> = subs
                .iter()
                .zip(&fx[(i + 1) % fx.len()].1)
                .map(|(s, o)| Subject { mask: s.mask.clone(), reference: o.reference.clone() })
                .collect();
            wrong.push(structure_score(rt, &other).unwrap().unwrap().subject_kept);
        }
        assert_eq!(kept, vec![vec![true, true]; 8], "round-tripped ground truth");
        assert_eq!(wrong, vec![vec![false, false]; 8], "other samples' subjects");
        // The sharp ground truth is kept too.
        let s = render_sample(sample_seed(20261205, Split::Test, 0), 64, (2, 2));
        assert_eq!(structure_score(&s.target, &fx[0].1).unwrap().unwrap().subject_kept, vec![true, true]);
    }
}

#[cfg(test)]
mod calibration {
    use super::tests::truth_and_blobs;
    use super::*;
    use crate::data::synth::{render_sample, sample_seed, Split};

    fn quantiles(mut v: Vec<f64>) -> String {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        format!("n {} min {:.3} p05 {:.3} p50 {:.3} p95 {:.3} max {:.3}", v.len(), q(0.0), q(0.05), q(0.5), q(0.95), q(1.0))
    }

    /// Reference round trips through vq-small-f4 at 64 px (16 x 16 codes), downscaled to 32 px
    /// (8 x 8 codes) and cropped to the subject's box then 32 px: the structure distance of each
    /// round trip's foreground to the original reference's (run by hand, as below).
    #[test]
    #[ignore]
    fn measure_reference_round_trips() {
        use image::imageops::{resize, FilterType};
        let dev = candle_core::Device::Cpu;
        let (vq, _) = crate::tokenizer::load(std::path::Path::new("assets/vq-small-f4.safetensors"), None, &dev).unwrap();
        let n: usize = std::env::var("CAL_N").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
        let rt = |img: &RgbImage| -> RgbImage {
            let x = crate::imageio::rgb_to_tensor(img, &dev).unwrap().unsqueeze(0).unwrap();
            crate::imageio::tensor_to_rgb(&vq.decode(&vq.encode(&x).unwrap()).unwrap().get(0).unwrap()).unwrap()
        };
        let fg = |img: &RgbImage| structure_descriptor(img, |x, y| img.get_pixel(x, y).0.iter().any(|&c| c < WHITE_LEVEL));
        let mut d = [vec![], vec![], vec![]];
        let mut psnr = [0.0f64; 3];
        for i in 0..n {
            let s = render_sample(sample_seed(20261205, Split::Test, i), 64, (2, 2));
            for r in &s.refs {
                let orig = fg(r).unwrap();
                // The subject crop as the recipe makes it (`data encode --ref-size 32`).
                let variants = [r.clone(), resize(r, 32, 32, FilterType::Triangle), crate::imageio::reference_view(r, 32)];
                for (k, v) in variants.iter().enumerate() {
                    let out = rt(v);
                    let mse = v.as_raw().iter().zip(out.as_raw()).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>()
                        / v.as_raw().len() as f64;
                    psnr[k] += 10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10();
                    d[k].push(fg(&out).map(|o| structure_distance(&orig, &o)).unwrap_or(2.0));
                }
            }
        }
        for (k, name) in ["64 px, 16x16 codes", "whole ref at 32 px, 8x8 codes", "subject crop at 32 px, 8x8 codes"].iter().enumerate() {
            let m = d[k].len() as f64;
            let within = d[k].iter().filter(|&&x| x <= MAX_STRUCTURE_DISTANCE).count() as f64 / m;
            eprintln!("{name}: PSNR {:.2} dB, within threshold {within:.3}, {}", psnr[k] / m, quantiles(d[k].clone()));
        }
    }

    /// Distributions behind the structure threshold, printed (run by hand with `cargo test
    /// --release --lib measure_structure_distances -- --ignored --nocapture`; CAL_N samples,
    /// default 200, of the 2-subject test split, seed 20261205, through vq-small-f4).
    #[test]
    #[ignore]
    fn measure_structure_distances() {
        let dev = candle_core::Device::Cpu;
        let (vq, _) = crate::tokenizer::load(std::path::Path::new("assets/vq-small-f4.safetensors"), None, &dev).unwrap();
        let n: usize = std::env::var("CAL_N").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
        let samples: Vec<_> = (0..n).map(|i| render_sample(sample_seed(20261205, Split::Test, i), 64, (2, 2))).collect();
        let mut rts = Vec::new();
        for chunk in samples.chunks(25) {
            let xs: Vec<_> = chunk.iter().map(|s| crate::imageio::rgb_to_tensor(&s.target, &dev).unwrap()).collect();
            let x = candle_core::Tensor::stack(&xs, 0).unwrap();
            let y = vq.decode(&vq.encode(&x).unwrap()).unwrap();
            for k in 0..chunk.len() {
                rts.push(crate::imageio::tensor_to_rgb(&y.get(k).unwrap()).unwrap());
            }
        }
        let subj = |s: &crate::data::synth::SynthSample| -> Vec<Subject> {
            s.subject_masks.iter().zip(&s.refs).map(|(m, r)| Subject { mask: m.clone(), reference: r.clone() }).collect()
        };
        let (mut gt, mut rt, mut other_same, mut other_rt, mut wrong, mut wrong_rt, mut uni, mut shuf) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut kept = [0.0f64; 2];
        for (i, s) in samples.iter().enumerate() {
            let subs = subj(s);
            let a = structure_score(&s.target, &subs).unwrap().unwrap();
            let b = structure_score(&rts[i], &subs).unwrap().unwrap();
            kept[0] += a.kept;
            kept[1] += b.kept;
            for k in 0..subs.len() {
                gt.push(a.distances[k][k]);
                rt.push(b.distances[k][k]);
                for j in 0..subs.len() {
                    if j != k {
                        other_same.push(a.distances[k][j]);
                        other_rt.push(b.distances[k][j]);
                    }
                }
                // Another sample's subject in this region: its reference against this region.
                let o = &samples[(i + 1) % n];
                let wrong_subs: Vec<Subject> =
                    vec![Subject { mask: subs[k].mask.clone(), reference: o.refs[k % o.refs.len()].clone() }];
                wrong.push(structure_score(&s.target, &wrong_subs).unwrap().unwrap().distances[0][0]);
                wrong_rt.push(structure_score(&rts[i], &wrong_subs).unwrap().unwrap().distances[0][0]);
            }
        }
        for seed in 0..n as u64 {
            let (_, u, sh, subs) = truth_and_blobs(9000 + seed);
            let a = structure_score(&u, &subs).unwrap().unwrap();
            let b = structure_score(&sh, &subs).unwrap().unwrap();
            for k in 0..subs.len() {
                if !super::tests::patterned(&subs[k].reference) {
                    continue;
                }
                uni.push(a.distances[k][k]);
                shuf.push(b.distances[k][k]);
            }
        }
        eprintln!("full rule kept (threshold {MAX_STRUCTURE_DISTANCE}): gt {:.3} rt {:.3} (n {n})", kept[0] / n as f64, kept[1] / n as f64);
        let mut blob_kept = [0usize; 3];
        let mut blob_n = 0usize;
        for seed in 0..n as u64 {
            let (_, u, sh, subs) = truth_and_blobs(9000 + seed);
            let a = structure_score(&u, &subs).unwrap().unwrap();
            let b = structure_score(&sh, &subs).unwrap().unwrap();
            for k in 0..subs.len() {
                if super::tests::patterned(&subs[k].reference) {
                    blob_n += 1;
                    blob_kept[0] += a.subject_kept[k] as usize;
                    blob_kept[1] += b.subject_kept[k] as usize;
                }
            }
        }
        let mut wrong_kept = [0usize; 2];
        for (i, s) in samples.iter().enumerate() {
            let o = &samples[(i + 1) % n];
            let subs: Vec<Subject> = s.subject_masks.iter().zip(&o.refs).map(|(m, r)| Subject { mask: m.clone(), reference: r.clone() }).collect();
            wrong_kept[0] += (structure_score(&s.target, &subs).unwrap().unwrap().kept * 2.0).round() as usize;
            wrong_kept[1] += (structure_score(&rts[i], &subs).unwrap().unwrap().kept * 2.0).round() as usize;
        }
        eprintln!("full rule kept: uniform {:.3} shuffled {:.3} (of {blob_n} patterned); wrong subject gt {:.3} rt {:.3}",
            blob_kept[0] as f64 / blob_n as f64, blob_kept[1] as f64 / blob_n as f64,
            wrong_kept[0] as f64 / (2 * n) as f64, wrong_kept[1] as f64 / (2 * n) as f64);
        let below = |v: &[f64], t: f64| v.iter().filter(|&&d| d <= t).count() as f64 / v.len() as f64;
        for t in [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1] {
            eprintln!("t {t:.2}: gt {:.3} rt {:.3} wrong {:.3} wrong_rt {:.3} uniform {:.3} shuffled {:.3}",
                below(&gt, t), below(&rt, t), below(&wrong, t), below(&wrong_rt, t), below(&uni, t), below(&shuf, t));
        }
        for (name, v) in [("gt own", gt), ("rt own", rt), ("gt other ref same sample", other_same), ("rt other ref same sample", other_rt),
            ("gt wrong subject", wrong), ("rt wrong subject", wrong_rt), ("uniform blob", uni), ("shuffled blob", shuf)] {
            eprintln!("{name}: {}", quantiles(v));
        }
    }
}
