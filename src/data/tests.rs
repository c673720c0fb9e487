//! Tests of the on-disk formats and validation: the reference layout read back exactly, every
//! kind of bad sample reported with its reason while the rest still load, the JSONL manifest.

use super::instructar::{write_sample, SampleImages};
use super::manifest::write_manifest;
use super::*;
use image::{DynamicImage, GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use std::path::{Path, PathBuf};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tokenar-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pattern(seed: u8, s: u32) -> RgbImage {
    RgbImage::from_fn(s, s, |x, y| Rgb([(x * 16) as u8 ^ seed, (y * 16) as u8, seed.wrapping_mul(7)]))
}

fn write_png(path: &Path, img: DynamicImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save_with_format(path, image::ImageFormat::Png).unwrap();
}

/// A sample folder written by hand the way the reference code lays it out.
fn write_reference_sample(root: &Path, name: &str, seed: u8, prompt: &str) {
    let d = root.join(name);
    write_png(&d.join("ref/0.png"), pattern(seed, 16).into());
    write_png(&d.join("ref/1.png"), pattern(seed + 1, 16).into());
    write_png(&d.join("background.png"), pattern(seed + 2, 16).into());
    write_png(&d.join("real.png"), pattern(seed + 3, 16).into());
    std::fs::write(d.join("description.txt"), format!("{prompt}\n")).unwrap();
}

#[test]
fn reference_layout_reads_back_exactly() {
    let root = temp_dir("layout");
    // Folder order follows the integer after the last `_`, not the name.
    write_reference_sample(&root, "pair_10", 30, "a dog next to a cat");
    write_reference_sample(&root, "pair_2", 10, "a mug on top of a book");
    write_reference_sample(&root, "x_y_3", 20, "a cat behind a dog");
    // An RGBA WebP reference is composited onto white; its ref listing sorts 2 before 10.
    let d = root.join("pair_2");
    std::fs::rename(d.join("ref/1.png"), d.join("ref/10.png")).unwrap();
    let rgba = RgbaImage::from_fn(16, 16, |x, _| if x < 8 { Rgba([0, 0, 0, 0]) } else { Rgba([10, 200, 30, 255]) });
    DynamicImage::ImageRgba8(rgba).save_with_format(d.join("ref/2.webp"), image::ImageFormat::WebP).unwrap();
    let mask = GrayImage::from_fn(16, 16, |x, y| Luma([if x > y { 255 } else { 0 }]));
    write_png(&d.join("mask.png"), mask.clone().into());
    std::fs::write(root.join("notes.txt"), "not a sample").unwrap();

    let ds = Dataset::open(&root, &OpenOptions::default()).unwrap();
    assert!(ds.skipped.is_empty(), "{:?}", ds.skipped);
    let ids: Vec<&str> = ds.samples.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["pair_2", "x_y_3", "pair_10"]);
    let s = &ds.samples[0];
    let names: Vec<String> = s.refs.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["0.png", "2.webp", "10.png"]);
    assert_eq!(s.prompt, "a mug on top of a book");
    let l = s.load(16).unwrap();
    assert_eq!(l.refs[0], pattern(10, 16));
    assert_eq!(l.refs[2], pattern(11, 16));
    assert_eq!(l.refs[1].get_pixel(0, 0), &Rgb([255, 255, 255]));
    assert_eq!(l.refs[1].get_pixel(12, 3), &Rgb([10, 200, 30]));
    assert_eq!(l.background, pattern(12, 16));
    assert_eq!(l.target.unwrap(), pattern(13, 16));
    assert_eq!(l.mask.unwrap(), mask);
    // Resized to the model resolution on load.
    let small = ds.samples[1].load(8).unwrap();
    assert_eq!(small.background.dimensions(), (8, 8));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn writer_and_reader_agree_including_meta() {
    let root = temp_dir("writer");
    let meta = Meta {
        relation: "left_of".into(),
        prompt: "a star to the left of a ring".into(),
        subjects: vec![SubjectMeta { category: "star".into(), bbox: Some([1, 2, 5, 6]), ..Default::default() }],
        ..Default::default()
    };
    let refs = [pattern(1, 8), pattern(2, 8)];
    let mask = GrayImage::from_pixel(8, 8, Luma([255]));
    write_sample(
        &root.join("sample_0"),
        &SampleImages {
            refs: &refs,
            background: &pattern(3, 8),
            target: Some(&pattern(4, 8)),
            mask: Some(&mask),
            prompt: &meta.prompt,
            meta: Some(&meta),
            extra_masks: &[],
        },
    )
    .unwrap();
    let ds = Dataset::open(&root, &OpenOptions::default()).unwrap();
    assert_eq!(ds.samples.len(), 1);
    assert_eq!(ds.samples[0].meta.as_ref(), Some(&meta));
    let l = ds.samples[0].load(8).unwrap();
    assert_eq!(l.refs, refs);
    assert_eq!(l.target.unwrap(), pattern(4, 8));
    // No temporary folder is left behind.
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1);
    std::fs::remove_dir_all(&root).unwrap();
}

/// One good sample and one of every kind of bad sample.
fn write_mixed_dataset(root: &Path) -> Vec<(&'static str, &'static str)> {
    write_reference_sample(root, "s_0", 0, "good one");
    write_reference_sample(root, "s_1", 1, "no background");
    std::fs::remove_file(root.join("s_1/background.png")).unwrap();
    write_reference_sample(root, "s_2", 2, "truncated target");
    let t = std::fs::read(root.join("s_2/real.png")).unwrap();
    std::fs::write(root.join("s_2/real.png"), &t[..t.len() / 2]).unwrap();
    write_reference_sample(root, "s_3", 3, "zero-size reference");
    std::fs::write(root.join("s_3/ref/1.png"), b"").unwrap();
    write_reference_sample(root, "s_4", 4, "too many references");
    for i in 2..4 {
        write_png(&root.join(format!("s_4/ref/{i}.png")), pattern(9, 16).into());
    }
    write_reference_sample(root, "s_5", 5, "   ");
    write_reference_sample(root, "s_6", 6, "mask of another size");
    write_png(&root.join("s_6/mask.png"), GrayImage::new(8, 8).into());
    write_reference_sample(root, "s_7", 7, "another good one");
    write_reference_sample(root, "s_8", 8, "no prompt file");
    std::fs::remove_file(root.join("s_8/description.txt")).unwrap();
    vec![
        ("s_1", "missing file"),
        ("s_2", "unreadable image"),
        ("s_3", "unreadable image"),
        ("s_4", "more than the configured maximum of 3"),
        ("s_5", "empty prompt"),
        ("s_6", "mask size mismatch"),
        ("s_8", "missing file"),
    ]
}

fn assert_reasons(bad: &[(String, String)], expected: &[(&str, &str)]) {
    assert_eq!(bad.len(), expected.len(), "{bad:#?}");
    for ((id, reason), (eid, ereason)) in bad.iter().zip(expected) {
        assert_eq!(id, eid);
        assert!(reason.contains(ereason), "{id}: `{reason}` should mention `{ereason}`");
    }
}

#[test]
fn check_reports_every_bad_sample_and_the_rest_load() {
    let root = temp_dir("check");
    let expected = write_mixed_dataset(&root);
    let report = check(&root, &OpenOptions::default()).unwrap();
    assert_eq!((report.total, report.good), (9, 2));
    assert_reasons(&report.bad, &expected);
    assert!(report.bad[2].1.contains("1.png"), "names the file: {}", report.bad[2].1);

    // The loader without decoding catches the structural problems and loads the rest.
    let ds = Dataset::open(&root, &OpenOptions::default()).unwrap();
    let skipped: Vec<&str> = ds.skipped.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(skipped, ["s_1", "s_4", "s_5", "s_8"]);
    assert!(ds.samples.iter().any(|s| s.id == "s_2" && s.load(16).is_err()));
    assert!(ds.samples.iter().filter(|s| s.id == "s_0" || s.id == "s_7").all(|s| s.load(16).is_ok()));
    // A larger maximum accepts the four references.
    let report = check(&root, &OpenOptions { max_refs: 4, ..Default::default() }).unwrap();
    assert!(!report.bad.iter().any(|b| b.0 == "s_4"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn manifest_round_trips_and_reports_bad_lines() {
    let root = temp_dir("manifest");
    let data = root.join("tree");
    std::fs::create_dir_all(&data).unwrap();
    let expected = write_mixed_dataset(&data);
    let mut ds = Dataset::open_quiet(&data, &OpenOptions { max_refs: 9, ..Default::default() }).unwrap();
    // Paths relative to the manifest's folder are resolved against it.
    for s in &mut ds.samples {
        s.dir = None;
    }
    let manifest = root.join("all.jsonl");
    let mut rel = ds.samples.clone();
    for s in &mut rel {
        s.background = s.background.strip_prefix(&root).unwrap().to_path_buf();
    }
    write_manifest(&manifest, None, &rel).unwrap();
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    text.push_str("{not json\n\n");
    std::fs::write(&manifest, text).unwrap();

    let back = Dataset::open_quiet(&manifest, &OpenOptions::default()).unwrap();
    let mut want: Vec<(&str, &str)> = expected.iter().filter(|e| !matches!(e.0, "s_1" | "s_5" | "s_8")).copied().collect();
    want.retain(|e| !matches!(e.0, "s_2" | "s_3" | "s_6"));
    assert_reasons(&back.skipped[..back.skipped.len() - 1], &want);
    assert!(back.skipped.last().unwrap().1.contains("line"), "{:?}", back.skipped);
    let good: Vec<&Sample> = ds.samples.iter().filter(|s| s.refs.len() <= 3).collect();
    assert_eq!(back.samples.len(), good.len());
    for (a, b) in back.samples.iter().zip(good) {
        assert_eq!(a, b);
    }
    // Decoding catches the image problems in a manifest too.
    let report = check(&manifest, &OpenOptions::default()).unwrap();
    let bad: Vec<&str> = report.bad.iter().map(|b| b.0.as_str()).collect();
    assert_eq!(bad, ["s_2", "s_3", "s_4", "s_6", "line_7"]);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn manifest_paths_stay_inside_its_root() {
    let root = temp_dir("manifest_root");
    let data = root.join("tree");
    std::fs::create_dir_all(&data).unwrap();
    write_mixed_dataset(&data);
    let ds = Dataset::open_quiet(&data, &OpenOptions { max_refs: 3, ..Default::default() }).unwrap();
    let mut samples = ds.samples.clone();
    for s in &mut samples {
        s.dir = None;
    }
    assert!(!samples.is_empty());
    let lists = root.join("lists");
    std::fs::create_dir_all(&lists).unwrap();

    // Without a declared root, files beside the manifest's folder are out of reach.
    let manifest = lists.join("m.jsonl");
    write_manifest(&manifest, None, &samples).unwrap();
    let back = Dataset::open_quiet(&manifest, &OpenOptions::default()).unwrap();
    assert!(back.samples.is_empty());
    assert_eq!(back.skipped.len(), samples.len());
    assert!(back.skipped.iter().all(|(_, why)| why.contains("outside the dataset root")), "{:?}", back.skipped);

    // Declaring the data folder (relative to the manifest) as the root lets them load ...
    write_manifest(&manifest, Some(Path::new("../tree")), &samples).unwrap();
    let back = Dataset::open_quiet(&manifest, &OpenOptions::default()).unwrap();
    assert_eq!(back.samples, samples);
    assert_eq!(back.root, data.canonicalize().unwrap());

    // ... and nothing else: a sample reaching out of it is skipped with its path named.
    let mut escaping = samples.clone();
    escaping[0].target = Some(data.join("..").join("secret.png"));
    write_manifest(&manifest, Some(&data), &escaping).unwrap();
    let back = Dataset::open_quiet(&manifest, &OpenOptions::default()).unwrap();
    assert_eq!(back.samples.len(), samples.len() - 1);
    assert_eq!(back.skipped.len(), 1);
    assert!(back.skipped[0].1.contains("secret.png") && back.skipped[0].1.contains("outside"), "{:?}", back.skipped);

    // A declared root that does not exist is an error naming the manifest.
    std::fs::write(&manifest, "#root ../nowhere\n").unwrap();
    let err = Dataset::open_quiet(&manifest, &OpenOptions::default()).unwrap_err().to_string();
    assert!(err.contains("m.jsonl") && err.contains("nowhere"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}
