//! Tests of the matte split, the identity filter (on the tiny DINO fixture) and the report's
//! resumption. The VLM filter's tests, against a mock server, are in `vlm.rs` beside this file.

use crate::curate::identity::{self, decide, embed_images, identity_scores, IdentityOptions};
use crate::curate::matte::{self, alpha_of, split_files, FOREGROUND};
use crate::curate::report::Report;
use crate::data::{Dataset, OpenOptions};
use crate::eval::nets::{DinoConfig, DinoEncoder};
use candle_core::Device;
use image::{DynamicImage, GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use std::path::{Path, PathBuf};

mod vlm;

pub(super) fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tokenar-curate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub(super) fn pattern(seed: u32, w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let v = (x * 37 + y * 11 + seed * 53) ^ (x * y + seed);
        Rgb([(v * 7) as u8, (v * 13 + seed) as u8, (x * 40 + seed * 17) as u8])
    })
}

pub(super) fn save(path: &Path, img: DynamicImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save_with_format(path, image::ImageFormat::Png).unwrap();
}

/// A sample folder in the InstructAR layout (with a background unless `background` is false).
pub(super) fn write_sample(root: &Path, name: &str, target: &RgbImage, refs: &[RgbImage], prompt: &str, background: bool) {
    let d = root.join(name);
    for (i, r) in refs.iter().enumerate() {
        save(&d.join(format!("ref/{i}.png")), r.clone().into());
    }
    save(&d.join("real.png"), target.clone().into());
    if background {
        save(&d.join("background.png"), pattern(99, target.width(), target.height()).into());
    }
    std::fs::write(d.join("description.txt"), prompt).unwrap();
}

fn tiny_dino() -> DinoEncoder {
    let cfg = DinoConfig { dim: 32, depth: 2, heads: 2, patch: 4, mlp_ratio: 4, resize: 20, crop: 16 };
    match identity::load_dino(&crate::eval::nets::fixtures::path("dino_vit.safetensors"), cfg, &Device::Cpu) {
        Ok(net) => net,
        Err(e) => panic!("tiny DINO fixture: {e}"),
    }
}

#[test]
fn threshold_is_strict_and_names_the_worst_reference() {
    assert!(!decide(&[20.0, 50.0], 20.0).0);
    assert!(decide(&[50.0, 20.000001], 20.0).0);
    let (kept, reason) = decide(&[80.0, 12.5, 30.0], 20.0);
    assert!(!kept && reason.contains("reference 1") && reason.contains("12.50"), "{reason}");
    assert!(decide(&[99.0], 98.9).0 && !decide(&[99.0], 99.0).0);
    assert!(!decide(&[], -100.0).0);
    assert!((identity::cosine100(&[1.0, 0.0], &[1.0, 1.0]) - 100.0 / 2f64.sqrt()).abs() < 1e-9);
    assert!((identity::cosine100(&[1.0, 2.0], &[-1.0, -2.0]) + 100.0).abs() < 1e-9);
    assert_eq!(identity::cosine100(&[0.0, 0.0], &[1.0, 2.0]), 0.0);
}

#[test]
fn weights_are_found_in_a_folder_or_taken_as_a_file() {
    let d = temp_dir("weights");
    assert_eq!(identity::find_dino_weights(&d), d.join("dino_deitsmall16_pretrain.pth"));
    std::fs::write(d.join("dino_vits16.safetensors"), b"x").unwrap();
    assert_eq!(identity::find_dino_weights(&d), d.join("dino_vits16.safetensors"));
    assert_eq!(identity::find_dino_weights(&d.join("w.pth")), d.join("w.pth"));
    let err = identity::load_dino(&d.join("none"), DinoConfig::vit_s16(), &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("none") && err.contains("not found"), "{err}");
    // A folder without the weights: the error names the file looked for and where it comes from.
    let empty = temp_dir("weights-empty");
    let err = identity::load_dino(&empty, DinoConfig::vit_s16(), &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("dino_deitsmall16_pretrain.pth") && err.contains("facebookresearch/dino"), "{err}");
    std::fs::remove_dir_all(&empty).unwrap();
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn batched_embeddings_equal_single_ones_across_sizes() {
    let net = tiny_dino();
    let imgs = [pattern(1, 24, 24), pattern(2, 20, 28), pattern(3, 24, 24), pattern(4, 24, 24)];
    let refs: Vec<&RgbImage> = imgs.iter().collect();
    let batched = embed_images(&net, &refs, 2, &Device::Cpu).unwrap();
    for (i, img) in imgs.iter().enumerate() {
        let one = embed_images(&net, &[img], 1, &Device::Cpu).unwrap();
        assert!((identity::cosine100(&one[0], &batched[i]) - 100.0).abs() < 1e-3, "image {i}");
        let d = one[0].iter().zip(&batched[i]).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(d < 1e-4, "image {i}: {d}");
    }
    assert!(embed_images(&net, &refs, 0, &Device::Cpu).is_err());
}

#[test]
fn identity_filter_keeps_by_the_lowest_score_and_resumes() {
    let root = temp_dir("identity");
    let data = root.join("data");
    let (a, b, c) = (pattern(5, 24, 24), pattern(6, 24, 24), pattern(7, 24, 24));
    let stripes = RgbImage::from_fn(24, 24, |x, _| if x % 6 < 3 { Rgb([250, 250, 250]) } else { Rgb([5, 5, 5]) });
    write_sample(&data, "s_1", &a, &[a.clone(), a.clone()], "a and a", true);
    write_sample(&data, "s_2", &b, &[b.clone(), stripes.clone()], "b and stripes", true);
    write_sample(&data, "s_3", &c, &[c.clone(), c.clone()], "c and c", true);
    // An unreadable reference: the sample is dropped with the reason, the others are scored.
    std::fs::write(data.join("s_3/ref/1.png"), b"not a png").unwrap();
    let net = tiny_dino();
    let dev = Device::Cpu;
    let same = identity_scores(&net, &a, &[a.clone(), a.clone()], &dev).unwrap();
    assert!(same.iter().all(|s| (s - 100.0).abs() < 1e-3), "{same:?}");
    let s2 = identity_scores(&net, &b, &[b.clone(), stripes.clone()], &dev).unwrap();
    assert!((s2[0] - 100.0).abs() < 1e-3 && s2[1] < 99.0, "{s2:?}");
    // A threshold between the second sample's low score and 100 separates the two.
    let min = (s2[1] + 100.0) / 2.0;
    let ds = Dataset::open_quiet(&data, &OpenOptions::default()).unwrap();
    assert_eq!(ds.len(), 3);
    let out = root.join("out");
    let opts = IdentityOptions { min_score: min, batch: 4, retry_errors: false };
    let calls = std::cell::Cell::new(0);
    let sum = identity::run_identity(&ds, &net, &dev, &opts, &out, Some(&|_, n| {
        calls.set(calls.get() + 1);
        assert_eq!(n, 3);
    }))
    .unwrap();
    assert!(calls.get() >= 2, "batches of 4 images hold one sample each");
    assert_eq!((sum.total, sum.decided, sum.resumed, sum.kept, sum.dropped, sum.errors), (3, 3, 0, 1, 2, 1));
    let report = Report::open(&out.join(identity::REPORT), &identity::filter_label(min)).unwrap();
    let v1 = report.get("s_1").unwrap();
    assert!(v1.kept && v1.scores.as_ref().unwrap().len() == 2 && !v1.error);
    let v2 = report.get("s_2").unwrap();
    assert!(!v2.kept && !v2.error && v2.reason.contains("reference 1"), "{v2:?}");
    assert!((v2.scores.as_ref().unwrap()[1] - s2[1]).abs() < 1e-3);
    let v3 = report.get("s_3").unwrap();
    assert!(!v3.kept && v3.error && v3.reason.contains("s_3/ref/1.png"), "{v3:?}");
    // The kept manifest is a dataset the reader opens, from any working directory.
    let kept = Dataset::open_quiet(&out.join(identity::KEPT), &OpenOptions::default()).unwrap();
    assert!(kept.skipped.is_empty(), "{:?}", kept.skipped);
    let ids: Vec<&str> = kept.samples.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["s_1"]);
    assert_eq!(kept.samples[0].prompt, "a and a");
    assert!(kept.samples[0].refs.iter().all(|p| p.is_absolute()));
    drop(report);
    // A rerun skips every decided sample; with --retry-errors only the failed one.
    let lines = || std::fs::read_to_string(out.join(identity::REPORT)).unwrap().lines().count();
    let again = identity::run_identity(&ds, &net, &dev, &opts, &out, None).unwrap();
    assert_eq!((again.decided, again.resumed, again.kept), (0, 3, 1));
    assert_eq!(lines(), 3);
    let retry = IdentityOptions { retry_errors: true, ..opts.clone() };
    assert_eq!(identity::run_identity(&ds, &net, &dev, &retry, &out, None).unwrap().decided, 1);
    assert_eq!(lines(), 4);
    // Another threshold into the same report is refused.
    let other = IdentityOptions { min_score: 20.0, ..opts };
    let err = identity::run_identity(&ds, &net, &dev, &other, &out, None).unwrap_err().to_string();
    assert!(err.contains("identity.jsonl") && err.contains("min>20"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn report_drops_a_cut_line_and_rejects_a_bad_one() {
    let d = temp_dir("report");
    let p = d.join("r.jsonl");
    let line = r#"{"id":"a","path":"x","kept":true,"filter":"f","reason":"ok"}"#;
    std::fs::write(&p, format!("{line}\n{{\"id\":\"b\",\"pa")).unwrap();
    let r = Report::open(&p, "f").unwrap();
    assert!(r.get("a").unwrap().kept && r.get("b").is_none());
    assert!(!r.pending("a", true) && r.pending("b", false));
    drop(r);
    assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("{line}\n"));
    std::fs::write(&p, format!("{line}\nnot json\n")).unwrap();
    let err = Report::open(&p, "f").err().unwrap().to_string();
    assert!(err.contains("r.jsonl") && err.contains("line 2"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn matte_split_writes_exact_pixels() {
    let d = temp_dir("matte-pixels");
    let target = RgbImage::from_fn(3, 2, |x, y| Rgb([10 * x as u8 + 1, 20 * y as u8 + 2, 100]));
    let alpha = GrayImage::from_raw(3, 2, vec![0, 1, 128, 255, 0, 7]).unwrap();
    save(&d.join("real.png"), target.clone().into());
    save(&d.join("matte.png"), alpha.clone().into());
    split_files(&d.join("real.png"), &d.join("matte.png"), &d).unwrap();
    let bg = image::open(d.join("background.png")).unwrap().to_rgb8();
    let want_bg: Vec<u8> = vec![1, 2, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 11, 22, 100, 0, 0, 0];
    assert_eq!(bg.as_raw(), &want_bg);
    let mask = image::open(d.join("mask.png")).unwrap();
    assert!(matches!(mask, DynamicImage::ImageLuma8(_)));
    assert_eq!(mask.to_luma8().as_raw(), &vec![0, 255, 255, 255, 0, 255]);
    let fg = image::open(d.join(FOREGROUND)).unwrap();
    assert!(matches!(fg, DynamicImage::ImageRgba8(_)));
    let fg = fg.to_rgba8();
    assert_eq!(*fg.get_pixel(1, 0), Rgba([11, 2, 100, 1]));
    assert_eq!(*fg.get_pixel(2, 1), Rgba([21, 22, 100, 7]));
    assert_eq!(*fg.get_pixel(0, 1), Rgba([1, 22, 100, 255]));
    assert_eq!(*fg.get_pixel(1, 1), Rgba([11, 22, 100, 0]));
    // A cut-out matte gives its alpha channel; a grey one its value.
    let cut = RgbaImage::from_fn(2, 1, |x, _| Rgba([200, 200, 200, if x == 0 { 0 } else { 90 }]));
    assert_eq!(alpha_of(&cut.into()).as_raw(), &vec![0, 90]);
    assert_eq!(alpha_of(&DynamicImage::ImageLuma8(GrayImage::from_pixel(1, 1, Luma([33])))).as_raw(), &vec![33]);
    // A matte of another size names both files.
    save(&d.join("small.png"), GrayImage::new(2, 2).into());
    let err = split_files(&d.join("real.png"), &d.join("small.png"), &d).unwrap_err().to_string();
    assert!(err.contains("small.png") && err.contains("real.png") && err.contains("2x2") && err.contains("3x2"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn matte_run_splits_a_tree_and_lists_what_failed() {
    let root = temp_dir("matte-run");
    let data = root.join("data");
    let mattes = root.join("mattes");
    let t = pattern(3, 8, 8);
    let circle = GrayImage::from_fn(8, 8, |x, y| Luma([if (x as i32 - 4).pow(2) + (y as i32 - 4).pow(2) < 9 { 255 } else { 0 }]));
    for name in ["s_1", "s_2", "s_10", "s_3"] {
        write_sample(&data, name, &t, &[pattern(4, 8, 8), pattern(5, 8, 8)], "two things", false);
    }
    save(&matte::matte_path(&mattes, "s_1"), circle.clone().into());
    save(&matte::matte_path(&mattes, "s_10"), circle.clone().into());
    save(&matte::matte_path(&mattes, "s_3"), GrayImage::new(4, 8).into());
    // Before the split the samples have no background: the reader skips them all.
    assert_eq!(Dataset::open_quiet(&data, &OpenOptions::default()).unwrap().len(), 0);
    let run = matte::run_matte(&data, &mattes, false, None).unwrap();
    assert_eq!(run.written, ["s_1", "s_10"]);
    assert_eq!(run.failed.len(), 2);
    assert!(run.failed[0].0 == "s_2" && run.failed[0].1.contains("missing matte") && run.failed[0].1.contains("s_2.png"));
    assert!(run.failed[1].0 == "s_3" && run.failed[1].1.contains("4x8"), "{:?}", run.failed);
    let ds = Dataset::open_quiet(&data, &OpenOptions::default()).unwrap();
    let ids: Vec<&str> = ds.samples.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["s_1", "s_10"]);
    let l = ds.samples[0].load(8).unwrap();
    assert_eq!(l.mask.unwrap().as_raw(), circle.as_raw());
    // Done samples are left alone (a mask may have been refined by hand) unless overwriting.
    save(&data.join("s_1/mask.png"), GrayImage::new(8, 8).into());
    let again = matte::run_matte(&data, &mattes, false, None).unwrap();
    assert_eq!(again.existing, ["s_1", "s_10"]);
    assert_eq!(image::open(data.join("s_1/mask.png")).unwrap().to_luma8().as_raw(), GrayImage::new(8, 8).as_raw());
    let over = matte::run_matte(&data, &mattes, true, None).unwrap();
    assert_eq!(over.written, ["s_1", "s_10"]);
    assert_eq!(image::open(data.join("s_1/mask.png")).unwrap().to_luma8().as_raw(), circle.as_raw());
    // Bad roots are errors naming the path.
    let err = matte::run_matte(&data, &root.join("nope"), false, None).unwrap_err().to_string();
    assert!(err.contains("nope") && err.contains("mattes folder"), "{err}");
    std::fs::write(root.join("d.jsonl"), "").unwrap();
    let err = matte::run_matte(&root.join("d.jsonl"), &mattes, false, None).unwrap_err().to_string();
    assert!(err.contains("d.jsonl") && err.contains("folder tree"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}
