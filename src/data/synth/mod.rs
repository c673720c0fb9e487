//! A procedural multi-subject benchmark in the InstructAR layout.
//!
//! Each subject has an identity (shape category x body colour x pattern colour x pattern) that a
//! model can only learn from its reference image: the prompt names just the categories and the
//! relation ("a star to the left of a ring"). References show one subject alone in a canonical
//! pose on white; the target shows the subjects in one of 11 relations on a procedural
//! background with pose changes (scale, rotation, flip) and occlusion. `mask.png` covers the
//! subjects' visible pixels, `background.png` is the target with the mask blacked out, and
//! `meta.json` records each subject's identity, box and own mask.

pub mod patterns;
pub mod relations;
pub mod render;
pub mod shapes;

use super::format::{Meta, SubjectMeta};
use super::instructar::{write_sample, SampleImages};
use crate::error::{Error, IoContext, Result};
use crate::util::{rng, splitmix64, Rng};
use image::{GrayImage, Luma, Rgb, RgbImage};
use patterns::{PALETTE, PATTERNS};
use rand::seq::SliceRandom;
use rand::Rng as _;
use relations::{Pose, RELATIONS};
use render::Identity;
use serde::{Deserialize, Serialize};
use shapes::CATEGORIES;
use std::path::Path;

/// Train and test draw from disjoint seed streams, so test samples never occur in training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

impl std::str::FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            _ => Err(Error::invalid("split", format!("`{s}` (expected train or test)"))),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SynthOptions {
    pub n: usize,
    pub seed: u64,
    /// Image side in pixels (targets, references, masks).
    pub size: u32,
    /// Inclusive range of the number of subjects per sample (1..=4).
    pub subjects: (usize, usize),
    /// How a range of counts is spread over the samples: `false` draws each sample's count
    /// from its seed; `true` cycles through the range by sample index (`lo + i % (hi-lo+1)`),
    /// so every count gets an equal share of any prefix of the split (`--subjects mix`).
    #[serde(default)]
    pub mix: bool,
    pub split: Split,
    /// Worker threads (0: all available cores).
    #[serde(skip)]
    pub threads: usize,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            n: 100,
            seed: 0,
            size: 64,
            subjects: (2, 2),
            mix: false,
            split: Split::Train,
            threads: 0,
        }
    }
}

impl SynthOptions {
    /// The subject-count range sample `i` is drawn from: one count with `mix`, else the range.
    pub fn subjects_of(&self, i: usize) -> (usize, usize) {
        let (lo, hi) = self.subjects;
        if self.mix && hi >= lo {
            let k = lo + i % (hi - lo + 1);
            (k, k)
        } else {
            self.subjects
        }
    }

    fn validate(&self) -> Result<()> {
        let (lo, hi) = self.subjects;
        if lo < 1 || hi > 4 || lo > hi {
            return Err(Error::invalid("subjects", format!("{lo}..={hi} (must lie within 1..=4, min <= max)")));
        }
        if self.size < 16 {
            return Err(Error::invalid("size", format!("{} px (at least 16)", self.size)));
        }
        Ok(())
    }
}

/// One rendered sample, before it is written.
#[derive(Debug, Clone)]
pub struct SynthSample {
    pub refs: Vec<RgbImage>,
    pub target: RgbImage,
    /// The target with the subjects' pixels blacked out (what `background.png` holds).
    pub background: RgbImage,
    /// The procedural background before any subject was drawn.
    pub clean_background: RgbImage,
    /// Union of the subjects' visible pixels.
    pub mask: GrayImage,
    /// Each subject's visible pixels.
    pub subject_masks: Vec<GrayImage>,
    pub meta: Meta,
}

/// The seed of sample `index` of a split: independent streams for train and test.
pub fn sample_seed(seed: u64, split: Split, index: usize) -> u64 {
    let stream = match split {
        Split::Train => 0x7472_6169_6e00_0000u64,
        Split::Test => 0x7465_7374_0000_0000u64,
    };
    splitmix64(splitmix64(seed ^ stream) ^ splitmix64(index as u64))
}

fn draw_identity(rng: &mut Rng, category: usize) -> Identity {
    let body = rng.random_range(0..PALETTE.len());
    let pattern = rng.random_range(0..PATTERNS.len());
    let accent = if pattern == 0 {
        body
    } else {
        (body + rng.random_range(1..PALETTE.len())) % PALETTE.len()
    };
    Identity { category, body, accent, pattern }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// "a star to the left of a ring", chained for more subjects: ", and the ring above a heart".
pub fn prompt(cats: &[usize], rels: &[usize]) -> String {
    let name = |i: usize| CATEGORIES[cats[i]];
    let mut s = format!("{} {}", article(name(0)), name(0));
    for (i, &r) in rels.iter().enumerate() {
        if i > 0 {
            s.push_str(&format!(", and the {}", name(i)));
        }
        s.push_str(&format!(" {} {} {}", RELATIONS[r].1, article(name(i + 1)), name(i + 1)));
    }
    s
}

/// Render one sample from its seed. Deterministic: the same arguments give the same pixels.
pub fn render_sample(seed: u64, size: u32, subjects: (usize, usize)) -> SynthSample {
    let mut rng = rng(seed);
    let lo = subjects.0.clamp(1, 4);
    let n = rng.random_range(lo..=subjects.1.clamp(lo, 4));
    let mut cats: Vec<usize> = (0..CATEGORIES.len()).collect();
    cats.shuffle(&mut rng);
    cats.truncate(n);
    let ids: Vec<Identity> = cats.iter().map(|&c| draw_identity(&mut rng, c)).collect();
    let clean = render::background(size, &mut rng);
    let npx = (size * size) as usize;
    // Draw a layout until every subject stays at least 40% visible and unrelated subjects do
    // not collide; after many tries accept the last one (it is still a valid sample).
    let mut attempt = 0;
    let (rels, target, owner) = loop {
        attempt += 1;
        let rels: Vec<usize> = (1..n).map(|_| rng.random_range(0..RELATIONS.len())).collect();
        let mut poses = relations::layout(&rels, n, &mut rng);
        let far_ok = (0..n).all(|i| (i + 2..n).all(|j| !relations::collide(&poses[i], &poses[j])));
        relations::fit(&mut poses, size as f32, size as f32 * 0.2, &mut rng);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| poses[i].z);
        let mut target = clean.clone();
        let mut owner = vec![0u8; npx];
        let mut full = vec![0usize; n];
        for &i in &order {
            full[i] = render::draw(&mut target, &mut owner, i as u8 + 1, &ids[i], &poses[i]);
        }
        let visible_ok = (0..n).all(|i| {
            let vis = owner.iter().filter(|&&o| o == i as u8 + 1).count();
            vis * 10 >= full[i] * 4 && vis > 0
        });
        if (far_ok && visible_ok) || attempt >= 20 {
            break (rels, target, owner);
        }
    };
    let mask = GrayImage::from_fn(size, size, |x, y| Luma([if owner[(y * size + x) as usize] > 0 { 255 } else { 0 }]));
    let mut background = target.clone();
    for (px, &o) in background.pixels_mut().zip(owner.iter()) {
        if o > 0 {
            *px = Rgb([0, 0, 0]);
        }
    }
    let mut subject_masks = Vec::with_capacity(n);
    let mut subjects_meta = Vec::with_capacity(n);
    for (i, who) in ids.iter().enumerate() {
        let tag = i as u8 + 1;
        let m = GrayImage::from_fn(size, size, |x, y| Luma([if owner[(y * size + x) as usize] == tag { 255 } else { 0 }]));
        subjects_meta.push(SubjectMeta {
            category: CATEGORIES[who.category].to_string(),
            colors: vec![PALETTE[who.body].0.to_string(), PALETTE[who.accent].0.to_string()],
            pattern: PATTERNS[who.pattern].to_string(),
            identity: Some(who.id()),
            bbox: mask_box(&m),
            mask: Some(format!("mask_{i}.png")),
            reference: Some(format!("ref/{i}.png")),
        });
        subject_masks.push(m);
    }
    let refs = ids.iter().map(|who| reference(who, size)).collect();
    let prompt = prompt(&cats, &rels);
    SynthSample {
        refs,
        target,
        background,
        clean_background: clean,
        mask,
        subject_masks,
        meta: Meta {
            relation: rels.first().map(|&r| RELATIONS[r].0.to_string()).unwrap_or_default(),
            relations: if rels.len() > 1 { rels.iter().map(|&r| RELATIONS[r].0.to_string()).collect() } else { Vec::new() },
            prompt,
            subjects: subjects_meta,
        },
    }
}

/// The subject alone, canonical pose (no rotation, no flip), centred on white.
pub fn reference(who: &Identity, size: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(size, size, Rgb([255, 255, 255]));
    let mut owner = vec![0u8; (size * size) as usize];
    let c = size as f32 / 2.0;
    let pose = Pose { cx: c, cy: c, radius: size as f32 * 0.4, rot: 0.0, flip: false, z: 0 };
    render::draw(&mut img, &mut owner, 1, who, &pose);
    img
}

/// Bounding box (x0, y0 inclusive; x1, y1 exclusive) of a mask's set pixels.
pub fn mask_box(m: &GrayImage) -> Option<[u32; 4]> {
    let mut b: Option<[u32; 4]> = None;
    for (x, y, p) in m.enumerate_pixels() {
        if p[0] > 127 {
            let bb = b.get_or_insert([x, y, x + 1, y + 1]);
            bb[0] = bb[0].min(x);
            bb[1] = bb[1].min(y);
            bb[2] = bb[2].max(x + 1);
            bb[3] = bb[3].max(y + 1);
        }
    }
    b
}

/// Folder name of sample `i`.
pub fn sample_name(i: usize) -> String {
    format!("sample_{i}")
}

/// The index of a sample folder name (`sample_<i>`), when it is one.
fn sample_index(name: &str) -> Option<usize> {
    name.strip_prefix("sample_").and_then(|i| i.parse().ok()).filter(|i| sample_name(*i) == name)
}

/// Whether a folder entry is one `generate` writes: a sample folder (or its temporary),
/// `dataset.json` (or its temporary) or `contact.png`.
fn is_synth_entry(name: &str) -> bool {
    let tmp_of = |n: &str| n.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")).map(str::to_string);
    sample_index(name).is_some()
        || matches!(name, "dataset.json" | "contact.png")
        || tmp_of(name).is_some_and(|n| sample_index(&n).is_some() || n.starts_with("dataset.json.") || n.starts_with("contact.png."))
}

/// Check that `out` may receive the samples of `opts`: it is absent or empty, or it holds a
/// dataset written by this generator with the same seed, size, subjects and split (an
/// interrupted or shorter run, which `generate` completes) and no sample beyond `opts.n`.
/// Anything else would mix two datasets and is an error naming the folder and the difference.
fn check_output(out: &Path, opts: &SynthOptions) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        return Err(Error::bad_file(out, "exists and is not a folder"));
    }
    let names: Vec<String> =
        std::fs::read_dir(out).with_path(out)?.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    if names.is_empty() {
        return Ok(());
    }
    let refuse = |why: String| {
        Err(Error::bad_file(out, format!("{why}; writing here would mix two datasets: choose another --out, or --force to delete the old samples first")))
    };
    if let Some(other) = names.iter().find(|n| !is_synth_entry(n)) {
        return refuse(format!("is not empty and was not written by `data synth` (it holds `{other}`)"));
    }
    let info_path = out.join("dataset.json");
    let old: Option<SynthOptions> = std::fs::read_to_string(&info_path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| serde_json::from_value(v.get("options")?.clone()).ok());
    let Some(old) = old else {
        return refuse(format!("holds samples but no readable {}", info_path.display()));
    };
    let mut diff = Vec::new();
    if old.seed != opts.seed {
        diff.push(format!("seed {} (asked {})", old.seed, opts.seed));
    }
    if old.size != opts.size {
        diff.push(format!("size {} px (asked {})", old.size, opts.size));
    }
    if old.subjects != opts.subjects {
        diff.push(format!("subjects {:?} (asked {:?})", old.subjects, opts.subjects));
    }
    if old.mix != opts.mix {
        let how = |m: bool| if m { "cycled counts (mix)" } else { "drawn counts" };
        diff.push(format!("{} (asked {})", how(old.mix), how(opts.mix)));
    }
    if old.split != opts.split {
        diff.push(format!("split {:?} (asked {:?})", old.split, opts.split));
    }
    if !diff.is_empty() {
        return refuse(format!("holds a dataset made with {}", diff.join(", ")));
    }
    if let Some(beyond) = names.iter().filter_map(|n| sample_index(n)).filter(|&i| i >= opts.n).max() {
        return refuse(format!("holds sample_{beyond}, beyond the {} samples asked for", opts.n));
    }
    Ok(())
}

/// Delete what `generate` writes in `out` (sample folders `sample_<i>`, `dataset.json`,
/// `contact.png` and their temporaries), nothing else; returns the number of entries deleted.
pub fn clear_output(out: &Path) -> Result<usize> {
    if !out.is_dir() {
        return Ok(0);
    }
    let mut n = 0;
    for e in std::fs::read_dir(out).with_path(out)? {
        let e = e.with_path(out)?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !is_synth_entry(&name) {
            continue;
        }
        let p = e.path();
        let r = if p.is_dir() && !p.is_symlink() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        match r {
            Ok(()) => n += 1,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(Error::io(&p, err)),
        }
    }
    Ok(n)
}

/// Write `opts.n` samples to `out` (plus `dataset.json` with the options). Samples already
/// present are kept (they are deterministic), so an interrupted run resumes. A folder holding
/// anything else (another dataset, samples of other options, more samples than `opts.n`) is
/// refused, see [`clear_output`]. `progress` is called from this thread with the number of
/// samples finished so far.
pub fn generate(out: &Path, opts: &SynthOptions, progress: Option<&dyn Fn(usize)>) -> Result<()> {
    opts.validate()?;
    check_output(out, opts)?;
    std::fs::create_dir_all(out).with_path(out)?;
    let info = serde_json::json!({
        "generator": "tokenar synth v1",
        "options": opts,
        "categories": CATEGORIES,
        "colors": PALETTE.iter().map(|p| p.0).collect::<Vec<_>>(),
        "patterns": PATTERNS,
        "relations": RELATIONS.iter().map(|r| r.0).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&info).map_err(|e| Error::invalid("dataset.json", e.to_string()))?;
    crate::util::atomic_write(out.join("dataset.json"), text.as_bytes())?;
    let threads = if opts.threads > 0 {
        opts.threads
    } else {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..threads.max(1) {
            let tx = tx.clone();
            let next = &next;
            scope.spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= opts.n {
                    break;
                }
                let r = write_one(out, opts, i);
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    // Stop handing out work after an error; the others finish their sample.
                    next.store(opts.n, std::sync::atomic::Ordering::Relaxed);
                    break;
                }
            });
        }
        drop(tx);
        let mut done = 0;
        let mut first_err = None;
        for r in rx {
            match r {
                Ok(()) => {
                    done += 1;
                    if let Some(p) = progress {
                        p(done);
                    }
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    })
}

fn write_one(out: &Path, opts: &SynthOptions, i: usize) -> Result<()> {
    let dir = out.join(sample_name(i));
    if dir.is_dir() {
        return Ok(());
    }
    let s = render_sample(sample_seed(opts.seed, opts.split, i), opts.size, opts.subjects_of(i));
    let extra: Vec<(String, GrayImage)> = s
        .subject_masks
        .iter()
        .enumerate()
        .map(|(k, m)| (format!("mask_{k}.png"), m.clone()))
        .collect();
    write_sample(
        &dir,
        &SampleImages {
            refs: &s.refs,
            background: &s.background,
            target: Some(&s.target),
            mask: Some(&s.mask),
            prompt: &s.meta.prompt,
            meta: Some(&s.meta),
            extra_masks: &extra,
        },
    )
}

#[cfg(test)]
mod tests;
