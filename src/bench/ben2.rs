//! Speed of BEN2 matting (`tokenar bench --ben2`): one image through the network at the
//! published input size (1024), the published shape with seeded random weights (or a given
//! checkpoint), and the whole cut-out (resize, network, 8-bit matte, bicubic resize back,
//! blur-fusion refinement); with `torch` also the reference module (`bench/torch_ben2.py`,
//! the reference's `BEN_Base` with random weights) on the same machine and thread count.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

use crate::curate::ben2::{cut_out, preprocess, synthetic, Ben2, Ben2Config};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Ben2BenchOptions {
    /// Network input side (1024 as published).
    pub size: usize,
    /// A BEN2 checkpoint; `None`: the published shape with random weights.
    pub weights: Option<PathBuf>,
    /// Side of the square test image (it is resized to `size`, and the cut-out back to it).
    pub image: u32,
    pub repeat: usize,
    pub warmup: usize,
    pub seed: u64,
    /// (python, script, reference checkout) for the PyTorch run.
    pub torch: Option<(String, PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ben2BenchReport {
    pub size: usize,
    pub image: u32,
    pub parameters: usize,
    pub device: String,
    pub threads: usize,
    pub load_s: f64,
    /// Median seconds of the network alone (preprocessed input to matte).
    pub forward_s: f64,
    /// Median seconds of the whole cut-out of one image.
    pub cutout_s: f64,
    pub peak_mib: f64,
    pub loadavg: [f64; 3],
    /// The reference module's median forward seconds (same input size and thread count).
    pub torch_forward_s: Option<f64>,
    pub torch_version: Option<String>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn timed(repeat: usize, warmup: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut t = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

/// A test image: smooth colours with a disc, so the refinement has edges to work on.
fn test_image(side: u32) -> image::RgbImage {
    let c = side as f32 / 2.0;
    image::RgbImage::from_fn(side, side, |x, y| {
        let (dx, dy) = (x as f32 - c * 0.9, y as f32 - c * 1.1);
        let inside = dx * dx + dy * dy < (c * 0.5) * (c * 0.5);
        let v = (255.0 * x as f32 / side as f32) as u8;
        if inside {
            image::Rgb([220, v / 2, 40])
        } else {
            image::Rgb([v, 160, 255 - v])
        }
    })
}

pub fn bench_ben2(o: &Ben2BenchOptions, device: &Device) -> Result<Ben2BenchReport> {
    Ben2::check_size(o.size)?;
    if o.repeat == 0 {
        return Err(Error::invalid("--repeat", "must be at least 1"));
    }
    crate::util::check_range("--ben2-image", o.image, 16, crate::util::MAX_IMAGE_SIZE)?;
    let start = Instant::now();
    let net = match &o.weights {
        Some(p) => Ben2::load(p, device)?,
        None => Ben2::from_file(&synthetic::random_checkpoint(&Ben2Config::published(), o.seed, device)?, device)?,
    };
    let load_s = start.elapsed().as_secs_f64();
    let img = test_image(o.image);
    let x = preprocess(&img, o.size, device)?;
    let sync = |t: &candle_core::Tensor| -> Result<()> {
        // reading one value waits for the device
        t.flatten_all()?.narrow(0, 0, 1)?.to_vec1::<f32>()?;
        Ok(())
    };
    let forward_s = timed(o.repeat, o.warmup, || sync(&net.forward(&x)?))?;
    let cutout_s = timed(o.repeat, 0, || cut_out(&net, &img, o.size).map(|_| ()))?;
    let mut r = Ben2BenchReport {
        size: o.size,
        image: o.image,
        parameters: net.cfg.parameters(),
        device: format!("{device:?}"),
        threads: super::threads(),
        load_s,
        forward_s,
        cutout_s,
        peak_mib: super::peak_mib(),
        loadavg: super::loadavg(),
        torch_forward_s: None,
        torch_version: None,
    };
    if let Some((python, script, reference)) = &o.torch {
        let (s, v) = run_torch_ben2(python, script, reference, o, r.threads)?;
        r.torch_forward_s = Some(s);
        r.torch_version = Some(v);
    }
    Ok(r)
}

/// Run `bench/torch_ben2.py`; it prints one JSON line `{"forward_s": .., "torch": ".."}`.
fn run_torch_ben2(python: &str, script: &PathBuf, reference: &PathBuf, o: &Ben2BenchOptions, threads: usize) -> Result<(f64, String)> {
    if !script.is_file() {
        return Err(Error::bad_file(script, "PyTorch BEN2 script not found (pass --torch-script)"));
    }
    let out = Command::new(python)
        .arg(script)
        .args(["--tokenar", &reference.display().to_string()])
        .args(["--size", &o.size.to_string(), "--repeat", &o.repeat.to_string(), "--warmup", &o.warmup.to_string()])
        .args(["--threads", &threads.to_string(), "--seed", &o.seed.to_string()])
        .env("OMP_NUM_THREADS", threads.to_string())
        .output()
        .map_err(|e| Error::invalid("--python", format!("cannot run `{python}`: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        return Err(Error::invalid("PyTorch BEN2", format!("{} failed: {}", script.display(), tail.into_iter().rev().collect::<Vec<_>>().join(" | "))));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::invalid("PyTorch BEN2", format!("unreadable output `{line}`: {e}")))?;
    let s = v["forward_s"].as_f64().ok_or_else(|| Error::invalid("PyTorch BEN2", format!("no forward_s in `{line}`")))?;
    Ok((s, v["torch"].as_str().unwrap_or("?").to_string()))
}

/// The report as a few lines of text.
pub fn render(r: &Ben2BenchReport) -> String {
    let mut s = format!(
        "BEN2 matting, input {0}x{0}, {1:.1}M parameters, {2}, {3} threads (load avg {4:.2})\n",
        r.size,
        r.parameters as f64 / 1e6,
        r.device,
        r.threads,
        r.loadavg[0]
    );
    s += &format!("  load          {:8.2} s\n", r.load_s);
    s += &format!("  network       {:8.2} s per image\n", r.forward_s);
    s += &format!("  cut-out       {:8.2} s per {}x{} image (resize, network, refinement)\n", r.cutout_s, r.image, r.image);
    if let Some(t) = r.torch_forward_s {
        s += &format!(
            "  PyTorch {:<6}{:8.2} s per image (reference module); Rust / PyTorch speed {:.2}x\n",
            r.torch_version.as_deref().unwrap_or("?"),
            t,
            t / r.forward_s
        );
    }
    s += &format!("  peak memory   {:8.0} MiB\n", r.peak_mib);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_checkpoint_is_timed_and_reported() {
        let weights = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/ben2_parity.pth");
        let o = Ben2BenchOptions { size: 512, weights: Some(weights), image: 48, repeat: 1, warmup: 0, seed: 0, torch: None };
        let r = bench_ben2(&o, &Device::Cpu).unwrap();
        assert!(r.forward_s > 0.0 && r.cutout_s > 0.0);
        assert!(r.parameters > 100_000 && r.parameters < 1_000_000, "{}", r.parameters);
        let text = render(&r);
        assert!(text.contains("input 512x512") && text.contains("48x48 image"), "{text}");
        let bad = Ben2BenchOptions { size: 700, ..o.clone() };
        assert!(bench_ben2(&bad, &Device::Cpu).unwrap_err().to_string().contains("multiple of 128"));
        let none = Ben2BenchOptions { repeat: 0, ..o };
        assert!(bench_ben2(&none, &Device::Cpu).is_err());
    }
}
