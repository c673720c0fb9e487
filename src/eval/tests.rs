//! Checks against values computed by torchmetrics and OpenCV
//! (`tests/fixtures/eval/make_pixel_fixtures.py`).

use super::edges;
use super::pixel::{self, Planar, Region};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval").join(name)
}

fn png_rgb(name: &str) -> image::RgbImage {
    image::open(fixture(name)).unwrap().to_rgb8()
}

fn png_grey(name: &str) -> image::GrayImage {
    image::open(fixture(name)).unwrap().to_luma8()
}

#[test]
fn pixel_metrics_match_torchmetrics_and_opencv() {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture("pixel.json")).unwrap()).unwrap();
    let cases = json["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let get = |k: &str| c[k].as_f64().unwrap();
        let (pred_img, target_img) = (png_rgb(&format!("{name}_pred.png")), png_rgb(&format!("{name}_target.png")));
        let mask = png_grey(&format!("{name}_mask.png"));
        let (p, t) = (Planar::from_rgb(&pred_img), Planar::from_rgb(&target_img));
        // torchmetrics computes PSNR's `10 / ln(10)` in f32 (tensor(10.0)): 1e-7 relative.
        let close = |what: &str, got: f64, want: f64| {
            let tol = if what.starts_with("psnr") { 2e-7 } else { 1e-9 };
            assert!((got - want).abs() < tol * want.abs().max(1.0), "{name} {what}: {got} vs {want}");
        };
        for (suffix, region) in [("", Region::All), ("_inside", Region::Inside(&mask)), ("_outside", Region::Outside(&mask))] {
            close(&format!("mse{suffix}"), pixel::mse(&p, &t, region).unwrap().unwrap(), get(&format!("mse{suffix}")));
            close(&format!("psnr{suffix}"), pixel::psnr(&p, &t, region).unwrap().unwrap(), get(&format!("psnr{suffix}")));
            close(&format!("ssim{suffix}"), pixel::ssim(&p, &t, region).unwrap().unwrap(), get(&format!("ssim{suffix}")));
            let map = pixel::ssim_map(&p, &t).unwrap();
            let all = pixel::region_scores(&p, &t, &map, region).unwrap().unwrap();
            close("ssim (shared map)", all.ssim, get(&format!("ssim{suffix}")));
            close("psnr (shared map)", all.psnr, get(&format!("psnr{suffix}")));
        }
        // Canny: the grey conversion and both edge maps are exactly OpenCV's.
        assert_eq!(edges::rgb_to_grey(&pred_img), png_grey(&format!("{name}_pred_grey.png")), "{name} grey");
        for (img, file) in [(&pred_img, "pred_edges"), (&target_img, "target_edges")] {
            let want: Vec<bool> = png_grey(&format!("{name}_{file}.png")).as_raw().iter().map(|&v| v > 127).collect();
            let got = edges::edge_map(img);
            let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(diff, 0, "{name} {file}: {diff} pixels differ from cv2.Canny");
        }
        close("f1", edges::edge_f1(&pred_img, &target_img).unwrap(), get("f1"));
    }
}

mod pipeline {
    //! End-to-end: a dataset written by the test, predictions that are the ground truth or
    //! have the subjects swapped, shards + merge, reports, skipped metrics.
    use crate::eval::identity::tests::scenes;
    use crate::eval::metric::{self, Column, MetricContext, MetricKind, MetricSpec, SampleData, SetFeatures, SetMetric};
    use crate::eval::{registry, report, run, samples};
    use crate::Result;
    use image::{Rgb, RgbImage};
    use std::path::{Path, PathBuf};

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Six samples; predictions: even = ground truth, odd = subjects swapped; sample 5 has no
    /// prediction file.
    fn build(tag: &str) -> (Tmp, PathBuf, PathBuf) {
        let root = std::env::temp_dir().join(format!("tokenar-eval-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (data, pred) = (root.join("data"), root.join("pred"));
        let (truth, swapped, subjects) = scenes();
        for i in 0..6u32 {
            let dir = data.join(format!("sample_{}", i * 10)); // ordered by number, not by name
            std::fs::create_dir_all(dir.join("ref")).unwrap();
            // Targets differ per sample by a brightness shift of the background.
            let target = RgbImage::from_fn(64, 64, |x, y| {
                let p = truth.get_pixel(x, y);
                if subjects.iter().any(|s| s.mask.get_pixel(x, y)[0] > 127) { *p } else { Rgb([p[0].saturating_add(i as u8 * 9), p[1], p[2]]) }
            });
            target.save(dir.join("real.png")).unwrap();
            let mut union = image::GrayImage::new(64, 64);
            let mut meta = Vec::new();
            for (k, s) in subjects.iter().enumerate() {
                s.mask.save(dir.join(format!("mask_{k}.png"))).unwrap();
                s.reference.save(dir.join(format!("ref/{k}.png"))).unwrap();
                for (u, m) in union.pixels_mut().zip(s.mask.pixels()) {
                    u[0] = u[0].max(m[0]);
                }
                meta.push(serde_json::json!({"category": "disc", "mask": format!("mask_{k}.png"), "reference": format!("ref/{k}.png")}));
            }
            union.save(dir.join("mask.png")).unwrap();
            std::fs::write(dir.join("meta.json"), serde_json::json!({"subjects": meta}).to_string()).unwrap();
            if i < 5 {
                std::fs::create_dir_all(&pred).unwrap();
                let src = if i % 2 == 0 { &target } else { &swapped };
                // Predictions at twice the size: they are resized to the target's size.
                crate::imageio::resize_rgb(src, 128, 128).save(pred.join(format!("sample_{}.png", i * 10))).unwrap();
            }
        }
        (Tmp(root), data, pred)
    }

    /// A set metric for the test: distance between the mean colours of predictions and targets.
    struct MeanColour;
    impl SetMetric for MeanColour {
        fn features(&self, d: &SampleData) -> Result<SetFeatures> {
            let mean = |img: &RgbImage| -> Vec<f64> {
                (0..3).map(|c| img.pixels().map(|p| p[c] as f64).sum::<f64>() / (img.width() * img.height()) as f64).collect()
            };
            Ok(SetFeatures { pred: mean(d.pred), target: d.target.map(mean) })
        }
    }
    fn mean_colour_score(a: &[Vec<f64>], b: &[Vec<f64>]) -> Result<f64> {
        let m = |v: &[Vec<f64>]| -> Vec<f64> { (0..3).map(|c| v.iter().map(|x| x[c]).sum::<f64>() / v.len() as f64).collect() };
        Ok(m(a).iter().zip(m(b)).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt())
    }

    fn specs() -> Vec<MetricSpec> {
        let mut s = registry::builtin_metrics();
        s.push(MetricSpec {
            name: "meancolour",
            about: "test set metric",
            kind: MetricKind::Set { column: || Column::new("meancol", "MeanCol", false), build: |_| Ok(Box::new(MeanColour)), score: mean_colour_score },
        });
        s.push(MetricSpec {
            name: "needsweights",
            about: "a network metric whose weight file is missing",
            kind: MetricKind::Sample(|ctx| {
                let p = ctx.weights_dir.clone().unwrap_or_default().join("net.safetensors");
                Err(crate::Error::bad_file(&p, "weight file not found (download net.safetensors)"))
            }),
        });
        s
    }

    fn eval(data: &Path, pred: &Path, shard: (usize, usize)) -> run::EvalResult {
        let specs = specs();
        let ctx = MetricContext { weights_dir: Some(PathBuf::from("w")), device: candle_core::Device::Cpu };
        let built = metric::build_metrics(&specs, None, &ctx).unwrap();
        let opts = run::EvalOptions { name: "gt-or-swapped".into(), size: None, shard };
        run::evaluate_dir(pred, data, &built, &specs, &opts, None).unwrap()
    }

    #[test]
    fn scores_identity_pixels_and_failures_per_sample() {
        let (_tmp, data, pred) = build("rows");
        let r = eval(&data, &pred, (0, 1));
        let ids: Vec<&str> = r.rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["sample_0", "sample_10", "sample_20", "sample_30", "sample_40", "sample_50"]);
        // The registry's network metrics and the test's own one are skipped (no weight files),
        // each naming the file it needs; the pixel metrics still run.
        let reason = |m: &str| r.skipped.iter().find(|s| s.metric == m).map(|s| s.reason.clone()).unwrap_or_default();
        assert_eq!(r.skipped.len(), 5, "{:?}", r.skipped);
        assert!(reason("test-net").contains("net.safetensors") || r.skipped.iter().any(|s| s.reason.contains("net.safetensors")), "{:?}", r.skipped);
        assert!(reason("lpips").contains("squeeze"), "{:?}", r.skipped);
        assert!(reason("fid").contains("pt_inception-2015-12-05"), "{:?}", r.skipped);
        assert!(reason("clip_i").contains("clip-vit-base-patch32"), "{:?}", r.skipped);
        assert!(reason("dino").contains("dino_deitsmall16_pretrain.pth"), "{:?}", r.skipped);
        for row in &r.rows[..5] {
            let v = |k: &str| row.values[k].unwrap();
            if row.index % 2 == 0 {
                assert_eq!((v("id_acc"), v("id_swap")), (1.0, 0.0), "{row:?}");
                // Not exact: the predictions went through a 2x up- and down-scaling.
                assert!(v("psnr") > 28.0 && v("ssim") > 0.95 && v("f1") > 0.5, "{row:?}");
            } else {
                assert_eq!((v("id_acc"), v("id_swap")), (0.0, 1.0), "{row:?}");
                assert!(v("psnr_subj") < v("psnr_bg"), "{row:?}");
            }
        }
        assert!(r.rows[5].error.as_deref().unwrap().contains("sample_50.png"));
        assert_eq!(r.failed(), 1);
        let acc = &r.aggregates["id_acc"];
        assert_eq!((acc.n, acc.mean), (5, 0.6));
        assert!(acc.ci95.unwrap() > 0.0 && acc.min == 0.0 && acc.max == 1.0);
        assert!(r.set_scores["meancol"] >= 0.0);

        let (best, worst) = report::best_and_worst(&r, "id_acc", 2).unwrap();
        assert!(best.iter().all(|row| row.values["id_acc"] == Some(1.0)));
        assert!(worst.iter().all(|row| row.values["id_acc"] == Some(0.0)));
        let samples = samples::list_samples(&data).unwrap();
        let img = report::best_worst_grid(&best, &worst, &mut |row| run::sample_panels(&samples[row.index], &pred, None)).unwrap();
        assert!(img.width() > 3 * 64 && img.height() > 4 * 64);

        let table = report::markdown_table(std::slice::from_ref(&r), Some(&["psnr".into(), "id_acc".into(), "meancol".into()]));
        assert!(table.starts_with("| Method | PSNR↑ | ID acc↑ | MeanCol↓ |"), "{table}");
        assert!(table.contains("| gt-or-swapped | ") && table.contains("0.6000 ± "), "{table}");
        assert!(table.contains("`needsweights` skipped"), "{table}");
    }

    #[test]
    fn shards_merge_to_the_unsharded_result() {
        let (tmp, data, pred) = build("shards");
        let whole = eval(&data, &pred, (0, 1));
        let parts: Vec<_> = (0..3).map(|i| eval(&data, &pred, (i, 3))).collect();
        assert_eq!(parts.iter().map(|p| p.rows.len()).sum::<usize>(), 6);
        assert_eq!(parts[1].shard, Some((1, 3)));
        assert_eq!(run::merge(&parts, &specs()).unwrap(), whole);
        // Round trip through JSON files, as `tokenar eval merge` does. serde_json (without its
        // `float_roundtrip` feature) may parse a float 1 ulp off, hence the tolerance there.
        let read: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let f = tmp.0.join(format!("shard{i}.json"));
                report::write_json(&f, p).unwrap();
                report::read_json(&f).unwrap()
            })
            .collect();
        let merged = run::merge(&read, &specs()).unwrap();
        assert_eq!(merged.rows.len(), whole.rows.len());
        assert_eq!(merged.set_scores, whole.set_scores);
        for (k, a) in &whole.aggregates {
            let b = &merged.aggregates[k];
            assert_eq!(a.n, b.n);
            for (x, y) in [(a.mean, b.mean), (a.std, b.std), (a.ci95.unwrap(), b.ci95.unwrap())] {
                assert!((x - y).abs() <= 1e-12 * x.abs().max(1e-3), "{k}: {x} vs {y}");
            }
        }
        // A shard given twice is refused.
        assert!(run::merge(&[read[0].clone(), read[0].clone()], &specs()).is_err());
    }

    #[test]
    fn predictions_from_a_closure_and_a_two_run_table() {
        // The hook a model plugs into: the closure produces each sample's prediction.
        let (_tmp, data, _pred) = build("closure");
        let specs = registry::builtin_metrics();
        let ctx = MetricContext { weights_dir: None, device: candle_core::Device::Cpu };
        let built = metric::build_metrics(&specs, Some(&["pixel".into(), "identity".into()]), &ctx).unwrap();
        let samples = samples::list_samples(&data).unwrap();
        let mut calls = 0;
        let mut perfect = |s: &samples::EvalSample| {
            calls += 1;
            crate::imageio::load_rgb(s.target.as_ref().unwrap(), None)
        };
        let opts = run::EvalOptions { name: "oracle".into(), ..Default::default() };
        let oracle = run::evaluate(&data, &samples, &built, &specs, &opts, &mut perfect, None).unwrap();
        assert_eq!(calls, 6);
        assert_eq!(oracle.failed(), 0);
        assert_eq!(oracle.aggregates["psnr"].mean, 100.0);
        assert_eq!(oracle.aggregates["id_acc"].mean, 1.0);
        let mut grey = |_: &samples::EvalSample| Ok(RgbImage::from_pixel(64, 64, Rgb([128, 128, 128])));
        let opts = run::EvalOptions { name: "grey".into(), ..Default::default() };
        let grey = run::evaluate(&data, &samples, &built, &specs, &opts, &mut grey, None).unwrap();
        let t = report::markdown_table(&[oracle, grey], None);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[2].starts_with("| oracle | **100.0 ± 0.0** | **1.0000 ± 0.0000** | **0.0000 ± 0.0000** |"), "{t}");
        // A flat grey image is nearest to one reference for every subject: 1 of 3 right.
        assert!(lines[3].starts_with("| grey | 14.") && lines[3].contains("| 0.3333 ± 0.0000 | **0.0000 ± 0.0000** |"), "{t}");
    }

    #[test]
    fn per_group_tables_by_subject_count_and_relation() {
        let (_tmp, data, pred) = build("groups");
        // Two samples name a relation; the subject count comes from ref/.
        for (i, rel) in [(0, "next to"), (1, "far from")] {
            let f = data.join(format!("sample_{}/meta.json", i * 10));
            let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
            v["relation"] = serde_json::json!(rel);
            std::fs::write(&f, v.to_string()).unwrap();
        }
        let samples = samples::list_samples(&data).unwrap();
        let n = samples[0].refs.len().to_string();
        assert_eq!(samples[0].groups.get("relation").map(String::as_str), Some("next to"));
        assert!(samples[2].groups.get("relation").is_none());
        assert!(samples.iter().all(|s| s.groups["subjects"] == n));
        let mut r = eval(&data, &pred, (0, 1));
        // Rows keep their groups; pretend sample 20 had one subject fewer to get two groups.
        r.rows[2].groups.insert("subjects".into(), "1".into());
        let g = run::group_summaries(&r, "subjects");
        assert_eq!(g.iter().map(|g| (g.value.as_str(), g.samples)).collect::<Vec<_>>(), [("1", 1), (n.as_str(), 4)]);
        // Each group's aggregate is the summary of its own rows (failed sample 50 left out).
        let want: Vec<f64> = [0, 1, 3, 4].iter().filter_map(|&k| r.rows[k].values["id_acc"]).collect();
        assert_eq!(g[1].aggregates["id_acc"], crate::eval::stats::summarize(&want).unwrap());
        assert_eq!(g[0].aggregates["id_acc"].ci95, None, "one sample has no interval");
        let rel = run::group_summaries(&r, "relation");
        assert_eq!(rel.iter().map(|g| g.value.as_str()).collect::<Vec<_>>(), ["far from", "next to"]);
        // Ground truth (sample 0) is right, the swapped prediction (sample 10) wrong.
        assert_eq!((rel[0].aggregates["id_acc"].mean, rel[1].aggregates["id_acc"].mean), (0.0, 1.0));
        // Table: one row per (group, run); set metrics are not split.
        let t = report::group_table(&[r.clone()], "subjects", None).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("| subjects | Method | n | PSNR↑") && !lines[0].contains("MeanCol"), "{t}");
        assert!(lines[2].starts_with("| 1 | gt-or-swapped | 1 |") && lines[3].starts_with(&format!("| {n} | gt-or-swapped | 4 |")), "{t}");
        assert!(t.contains("within each group"), "{t}");
        // JSON keeps the groups; a key no row has gives no table.
        let f = _tmp.0.join("r.json");
        report::write_json(&f, &r).unwrap();
        assert_eq!(report::read_json(&f).unwrap().rows[2].groups["subjects"], "1");
        assert!(report::group_table(&[r], "colour", None).is_none());
    }

    #[test]
    fn contact_sheet_of_best_median_and_worst() {
        let (_tmp, data, pred) = build("sheet");
        let r = eval(&data, &pred, (0, 1));
        // Five scored samples: ground truth (id_acc 1) at 0, 20, 40; swapped (0) at 10, 30.
        let [b, m, w] = report::best_median_worst(&r, "psnr", 1).unwrap();
        assert_eq!((b.len(), m.len(), w.len()), (1, 1, 1));
        assert!(b[0].values["psnr"] >= m[0].values["psnr"] && m[0].values["psnr"] >= w[0].values["psnr"]);
        let [b, m, w] = report::best_median_worst(&r, "id_acc", 9).unwrap();
        assert_eq!((b.len(), m.len(), w.len()), (2, 2, 1), "fewer than 3k rows split about evenly");
        assert!(b.iter().all(|row| row.values["id_acc"] == Some(1.0)) && w[0].values["id_acc"] == Some(0.0));
        let samples = samples::list_samples(&data).unwrap();
        let panels = run::sheet_panels(&samples[0], &pred, None).unwrap();
        assert_eq!(panels.len(), samples[0].refs.len() + 2, "references, target, prediction");
        assert!(panels.iter().all(|p| p.dimensions() == (64, 64)));
        let sheet = report::contact_sheet(&[b, m, w], 3, &mut |row| run::sheet_panels(&samples[row.index], &pred, None)).unwrap();
        let strip = (panels.len() as u32) * 65 + 1;
        assert_eq!(sheet.width(), 2 * strip + 3 * 6, "two samples a row in the widest block");
        assert!(report::best_median_worst(&r, "nope", 3).is_err());
    }

    #[test]
    fn unknown_metric_and_bad_dataset_are_errors() {
        let ctx = MetricContext { weights_dir: None, device: candle_core::Device::Cpu };
        let e = metric::build_metrics(&specs(), Some(&["nope".to_string()]), &ctx).err().unwrap().to_string();
        assert!(e.contains("nope") && e.contains("pixel"), "{e}");
        let built = metric::build_metrics(&specs(), Some(&["edges".to_string()]), &ctx).unwrap();
        assert_eq!((built.metrics.len(), built.skipped.len()), (1, 0));
        let empty = std::env::temp_dir().join(format!("tokenar-eval-empty-{}", std::process::id()));
        std::fs::create_dir_all(&empty).unwrap();
        let e = samples::list_samples(&empty).unwrap_err().to_string();
        assert!(e.contains("sample"), "{e}");
        std::fs::remove_dir_all(&empty).unwrap();
    }
}
