//! Parity with the reference BEN2 (`scripts/BEN2.py` of TokenAR) on the fixture of
//! `parity/ben2_parity.py`: a reduced BEN_Base (Swin width 12, depths 2/2/2/2, heads 2/2/4/4,
//! window 12; decoder width 16, head 24) with random weights, loaded from its `.pth` the way
//! `tokenar curate matte --model ben2 --weights` loads it (the shape read from the tensors),
//! run on a 120 x 90 image at network size 512.

use candle_core::{DType, Device};
use image::{GrayImage, RgbImage};
use std::path::{Path, PathBuf};
use tokenar::curate::ben2::resample::{resize_rgb, Filter};
use tokenar::curate::ben2::{cut_out, preprocess, Ben2};
use tokenar::curate::matte::split_with_threshold;
use tokenar::weights::TensorFile;

const SIZE: usize = 512;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn io() -> TensorFile {
    TensorFile::load(fixtures().join("ben2_parity_io.safetensors"), &Device::Cpu).unwrap()
}

fn bytes(f: &TensorFile, key: &str) -> (Vec<usize>, Vec<u8>) {
    let t = f.tensors.get(key).unwrap_or_else(|| panic!("fixture has no `{key}`"));
    (t.dims().to_vec(), t.flatten_all().unwrap().to_vec1::<u8>().unwrap())
}

fn image(f: &TensorFile) -> RgbImage {
    let (d, v) = bytes(f, "image");
    RgbImage::from_raw(d[1] as u32, d[0] as u32, v).unwrap()
}

fn net() -> Ben2 {
    Ben2::load(&fixtures().join("ben2_parity.pth"), &Device::Cpu).unwrap()
}

/// (max |a - b|, number of positions that differ).
fn u8_diff(a: &[u8], b: &[u8]) -> (i32, usize) {
    assert_eq!(a.len(), b.len());
    let d: Vec<i32> = a.iter().zip(b).map(|(x, y)| (*x as i32 - *y as i32).abs()).collect();
    (*d.iter().max().unwrap(), d.iter().filter(|&&v| v != 0).count())
}

#[test]
fn lanczos_resize_matches_pillow_to_the_byte() {
    let f = io();
    let (_, want) = bytes(&f, "resized");
    let got = resize_rgb(&image(&f), SIZE as u32, SIZE as u32, Filter::Lanczos);
    assert_eq!(u8_diff(got.as_raw(), &want), (0, 0));
}

#[test]
fn architecture_is_read_from_the_checkpoint() {
    let f = io();
    let arch: serde_json::Value = serde_json::from_str(f.metadata.get("arch").unwrap()).unwrap();
    let cfg = net().cfg;
    assert_eq!(cfg.swin.embed as u64, arch["embed"].as_u64().unwrap());
    assert_eq!(serde_json::to_value(&cfg.swin.depths).unwrap(), arch["depths"]);
    assert_eq!(serde_json::to_value(&cfg.swin.heads).unwrap(), arch["heads"]);
    assert_eq!(cfg.swin.window as u64, arch["window"].as_u64().unwrap());
    assert_eq!(cfg.decoder as u64, arch["decoder"].as_u64().unwrap());
    assert_eq!(cfg.head_hidden as u64, arch["head_hidden"].as_u64().unwrap());
}

#[test]
fn matte_matches_the_reference() {
    let f = io();
    let net = net();
    let x = preprocess(&image(&f), SIZE, &Device::Cpu).unwrap();
    let got = net.forward(&x).unwrap();
    let want = f.tensors.get("matte").unwrap().to_dtype(DType::F32).unwrap();
    assert_eq!(got.dims(), want.dims());
    let d = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let spread = want.max_all().unwrap().to_scalar::<f32>().unwrap() - want.min_all().unwrap().to_scalar::<f32>().unwrap();
    eprintln!("BEN2 matte: max |rust - reference| = {d:.3e} (matte spans {spread:.3})");
    assert!(d <= 1e-4, "matte differs by {d}");
}

#[test]
fn cutout_and_background_match_the_reference() {
    let f = io();
    let img = image(&f);
    let cut = cut_out(&net(), &img, SIZE).unwrap();
    let (_, alpha) = bytes(&f, "alpha");
    let (_, fg) = bytes(&f, "foreground");
    let (_, bg) = bytes(&f, "background");
    // the 8-bit matte truncates x * 255: a matte within 1e-4 of the reference may land on the
    // other side of an integer at a few pixels, nowhere by more than one level
    let (da, na) = u8_diff(cut.alpha.as_raw(), &alpha);
    let got_fg: Vec<u8> = cut.foreground.pixels().flat_map(|p| [p[0], p[1], p[2]]).collect();
    let (df, nf) = u8_diff(&got_fg, &fg);
    eprintln!("alpha: max diff {da} at {na} px; foreground: max diff {df} at {nf} values of {}", fg.len());
    assert!(da <= 1 && na * 100 <= alpha.len(), "alpha differs by {da} at {na} pixels");
    assert!(df <= 1 && nf * 100 <= fg.len(), "foreground differs by {df} at {nf} values");
    let ref_alpha = GrayImage::from_raw(img.width(), img.height(), alpha).unwrap();
    let parts = split_with_threshold(&img, &ref_alpha, 0);
    assert_eq!(u8_diff(parts.background.as_raw(), &bg), (0, 0));
}

/// `tokenar curate matte --model ben2` on a two-sample tree: writes the three files, resumes,
/// refuses bad flags with exit status 2.
#[test]
fn curate_matte_with_ben2_writes_resumes_and_refuses_bad_flags() {
    let root = std::env::temp_dir().join(format!("tokenar-ben2-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let img = image(&io());
    for s in ["s_0", "s_1"] {
        std::fs::create_dir_all(root.join(s)).unwrap();
        img.save(root.join(s).join("real.png")).unwrap();
    }
    let weights = fixtures().join("ben2_parity.pth");
    let run = |extra: &[&str]| {
        let mut args: Vec<String> = ["curate", "matte", "--dataset"].iter().map(|s| s.to_string()).collect();
        args.push(root.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        std::process::Command::new(env!("CARGO_BIN_EXE_tokenar")).args(&args).output().unwrap()
    };
    let w = weights.to_str().unwrap();
    let out = run(&["--model", "ben2", "--weights", w, "--size", "512"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("split 2"));
    let fg = image::open(root.join("s_1/foreground.png")).unwrap().to_rgba8();
    let want = cut_out(&net(), &img, SIZE).unwrap().foreground;
    assert_eq!(fg.as_raw(), want.as_raw());
    let mask = image::open(root.join("s_1/mask.png")).unwrap().to_luma8();
    assert!(mask.pixels().zip(fg.pixels()).all(|(m, f)| (m[0] == 255) == (f[3] > 0)));
    let again = run(&["--model", "ben2", "--weights", w, "--size", "512"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("already split 2"));
    // a higher threshold: fewer subject pixels
    let high = run(&["--model", "ben2", "--weights", w, "--size", "512", "--threshold", "0.5", "--overwrite"]);
    assert!(high.status.success());
    let mask_high = image::open(root.join("s_1/mask.png")).unwrap().to_luma8();
    assert!(mask_high.pixels().zip(fg.pixels()).all(|(m, f)| (m[0] == 255) == (f[3] > 127)));
    for (bad, says) in [
        (vec!["--model", "ben2", "--weights", w, "--threshold", "1"], "--threshold"),
        (vec!["--model", "ben2", "--weights", w, "--size", "600"], "multiple of 128"),
        (vec!["--model", "ben2", "--weights", "/nonexistent/BEN2_Base.pth"], "BEN2_Base.pth"),
    ] {
        let out = run(&bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(says), "{bad:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let _ = std::fs::remove_dir_all(&root);
}
