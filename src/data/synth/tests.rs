//! The synthetic benchmark: deterministic for a seed, masks and boxes agree with the pixels,
//! prompts carry no identity, train and test differ.

use super::patterns::{PALETTE, PATTERNS};
use super::*;
use crate::data::{Dataset, OpenOptions};
use std::collections::HashSet;

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tokenar-synth-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.strip_prefix(dir).unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn generation_is_deterministic_for_a_seed_whatever_the_threads_and_resumes() {
    let (a, b) = (temp_dir("det-a"), temp_dir("det-b"));
    let opts = SynthOptions { n: 6, seed: 3, size: 32, subjects: (1, 3), threads: 1, ..Default::default() };
    let seen = std::cell::Cell::new(0);
    generate(&a, &opts, Some(&|k| seen.set(k))).unwrap();
    assert_eq!(seen.get(), 6);
    generate(&b, &SynthOptions { threads: 3, ..opts.clone() }, None).unwrap();
    let fa = files(&a);
    assert_eq!(fa, files(&b));
    assert!(fa.iter().any(|f| f.0.ends_with("real.png")));
    // An interrupted run resumes: a removed sample is written again, identical.
    std::fs::remove_dir_all(b.join("sample_4")).unwrap();
    generate(&b, &opts, None).unwrap();
    assert_eq!(fa, files(&b));
    // Another seed or the test split gives other samples.
    let other = render_sample(sample_seed(4, Split::Train, 0), 32, (1, 3));
    let test = render_sample(sample_seed(3, Split::Test, 0), 32, (1, 3));
    let first = render_sample(sample_seed(3, Split::Train, 0), 32, (1, 3));
    assert_ne!(first.target, other.target);
    assert_ne!(first.target, test.target);
    std::fs::remove_dir_all(&a).unwrap();
    std::fs::remove_dir_all(&b).unwrap();
}

#[test]
fn masks_and_boxes_agree_with_the_pixels_that_differ_from_the_background() {
    for i in 0..40 {
        let s = render_sample(sample_seed(11, Split::Train, i), 64, (1, 4));
        let n = s.meta.subjects.len();
        assert_eq!(s.refs.len(), n);
        assert_eq!(s.subject_masks.len(), n);
        for (x, y, m) in s.mask.enumerate_pixels() {
            let differs = s.target.get_pixel(x, y) != s.clean_background.get_pixel(x, y);
            assert_eq!(m[0] == 255, differs, "sample {i} pixel ({x},{y})");
            let owners = s.subject_masks.iter().filter(|sm| sm.get_pixel(x, y)[0] == 255).count();
            assert_eq!(owners, differs as usize, "subject masks are disjoint and cover the union");
            let bg = s.background.get_pixel(x, y);
            if differs {
                assert_eq!(bg, &Rgb([0, 0, 0]));
            } else {
                assert_eq!(bg, s.target.get_pixel(x, y));
            }
        }
        for (sm, meta) in s.subject_masks.iter().zip(&s.meta.subjects) {
            let [x0, y0, x1, y1] = meta.bbox.expect("every subject is visible");
            assert_eq!(mask_box(sm), meta.bbox);
            assert!(x1 > x0 + 3 && y1 > y0 + 3, "sample {i}: box {:?} too small", meta.bbox);
        }
    }
}

#[test]
fn files_on_disk_agree_with_meta() {
    let dir = temp_dir("disk");
    let opts = SynthOptions { n: 5, seed: 1, size: 64, ..Default::default() };
    generate(&dir, &opts, None).unwrap();
    let ds = Dataset::open(&dir, &OpenOptions::default()).unwrap();
    assert_eq!(ds.samples.len(), 5);
    assert!(ds.skipped.is_empty());
    for s in &ds.samples {
        let l = s.load(64).unwrap();
        let meta = s.meta.as_ref().unwrap();
        assert_eq!(l.refs.len(), 2);
        assert_eq!(meta.prompt, s.prompt);
        let target = l.target.unwrap();
        let mask = l.mask.unwrap();
        let mut union = GrayImage::new(64, 64);
        for sub in &meta.subjects {
            let m = crate::imageio::load_mask(s.dir.as_ref().unwrap().join(sub.mask.as_ref().unwrap()), None).unwrap();
            assert_eq!(mask_box(&m), sub.bbox);
            for (u, p) in union.pixels_mut().zip(m.pixels()) {
                u[0] = u[0].max(p[0]);
            }
        }
        assert_eq!(union, mask);
        for (x, y, m) in mask.enumerate_pixels() {
            assert_eq!(m[0] == 255, target.get_pixel(x, y) != l.background.get_pixel(x, y), "{} ({x},{y})", s.id);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn identity_lives_only_in_the_references() {
    let colour_words: Vec<&str> = PALETTE.iter().map(|p| p.0).chain(PATTERNS).collect();
    let mut relations = HashSet::new();
    let mut categories = HashSet::new();
    for i in 0..300 {
        let s = render_sample(sample_seed(5, Split::Test, i), 64, (2, 2));
        let p = &s.meta.prompt;
        for w in &colour_words {
            assert!(!p.split(' ').any(|t| t == *w), "prompt `{p}` names `{w}`");
        }
        let phrase = RELATIONS.iter().find(|r| r.0 == s.meta.relation).unwrap().1;
        assert!(p.contains(phrase), "{p}");
        let (a, b) = (&s.meta.subjects[0], &s.meta.subjects[1]);
        assert_ne!(a.category, b.category);
        assert_ne!(a.identity, b.identity);
        assert!(p.starts_with(&format!("a {}", a.category)) || p.starts_with(&format!("an {}", a.category)), "{p}");
        assert!(p.ends_with(&format!(" {}", b.category)), "{p}");
        relations.insert(s.meta.relation.clone());
        categories.insert(a.category.clone());
        // A reference holds only white and its subject's own colours, centred.
        for (r, sub) in s.refs.iter().zip(&s.meta.subjects) {
            let allowed: Vec<[u8; 3]> = PALETTE.iter().filter(|c| sub.colors.iter().any(|n| n == c.0)).map(|c| c.1).collect();
            assert!(r.pixels().all(|p| p.0 == [255, 255, 255] || allowed.contains(&p.0)));
            let fg = GrayImage::from_fn(64, 64, |x, y| Luma([if r.get_pixel(x, y).0 == [255; 3] { 0 } else { 255 }]));
            let [x0, y0, x1, y1] = mask_box(&fg).unwrap();
            let (cx, cy) = ((x0 + x1) as i32 / 2, (y0 + y1) as i32 / 2);
            assert!((cx - 32).abs() <= 4 && (cy - 32).abs() <= 4, "{} not centred: {cx},{cy}", sub.category);
            assert!((x1 - x0).max(y1 - y0) >= 40, "{} fills the reference", sub.category);
        }
    }
    assert_eq!(relations.len(), RELATIONS.len(), "all relations occur: {relations:?}");
    assert_eq!(categories.len(), shapes::CATEGORIES.len());
}

#[test]
fn mix_cycles_one_two_and_three_subjects_and_a_mixed_folder_is_not_completed_as_drawn() {
    let dir = temp_dir("mix");
    let opts = SynthOptions { n: 7, seed: 4, size: 32, subjects: (1, 3), mix: true, threads: 2, ..Default::default() };
    generate(&dir, &opts, None).unwrap();
    let ds = Dataset::open(&dir, &OpenOptions { max_refs: 3, ..OpenOptions::default() }).unwrap();
    assert!(ds.skipped.is_empty(), "{:?}", ds.skipped);
    let mut counts: Vec<(usize, usize)> = ds
        .samples
        .iter()
        .map(|s| (s.id.strip_prefix("sample_").unwrap().parse::<usize>().unwrap(), s.meta.as_ref().unwrap().subjects.len()))
        .collect();
    counts.sort();
    let got: Vec<usize> = counts.iter().map(|c| c.1).collect();
    assert_eq!(got, vec![1, 2, 3, 1, 2, 3, 1]);
    for s in &ds.samples {
        assert_eq!(s.refs.len(), s.meta.as_ref().unwrap().subjects.len(), "{}", s.id);
    }
    // Sample i of a mix is the sample a fixed count gives with the same seed.
    let fixed = render_sample(sample_seed(4, Split::Train, 2), 32, (3, 3));
    let l = ds.samples.iter().find(|s| s.id == "sample_2").unwrap().load(32).unwrap();
    assert_eq!(l.target.unwrap(), fixed.target);
    // The same folder with drawn counts would mix two datasets: refused, naming the difference.
    let e = generate(&dir, &SynthOptions { mix: false, ..opts.clone() }, None).unwrap_err().to_string();
    assert!(e.contains("mix") && e.contains("--force"), "{e}");
    // Without mix a range is drawn per sample (not cycled).
    let drawn = SynthOptions { mix: false, ..opts };
    assert_eq!(drawn.subjects_of(5), (1, 3));
    std::fs::remove_dir_all(&dir).unwrap();
}
