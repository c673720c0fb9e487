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
