//! What the machine offers the kernels: the instruction set the matrix products dispatch to at
//! run time, and the memory bandwidth that bounds a decoding step (every weight read once).

use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

/// The vector instructions the CPU kernels use on this machine.
#[derive(Debug, Clone, Serialize)]
pub struct Isa {
    /// gemm's f32 kernels (prefill, verification passes, training): "avx512f" (x86-64-v4),
    /// "avx2+fma" (x86-64-v3) or "baseline".
    pub gemm_f32: String,
    /// This project's few-row products and attention kernels (`vmath`): the same choice.
    pub vmath: String,
    /// The Q8_0 few-row products: "avx512vnni" (this project's integer kernel), else candle's
    /// block dot products, "avx2+fma" or "baseline".
    pub q8_0: String,
    /// f16 weights are widened with F16C where the CPU has it.
    pub f16c: bool,
    /// Many-row products (prefill, verification passes) of bf16 and Q8_0 weights:
    /// "avx512bf16" (bf16 products, `vdpbf16ps`) or "widened" (to f32 for gemm).
    pub reduced_many_rows: String,
}

/// Detect the instruction sets the kernels dispatch to (gemm and this project's kernels pick
/// AVX-512 when `avx512f` is present, AVX2 + FMA otherwise).
pub fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = std::is_x86_feature_detected!("avx512f");
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        let vl = avx512 && std::is_x86_feature_detected!("avx512vl") && std::is_x86_feature_detected!("fma");
        let pick = |wide: bool| if wide { "avx512f" } else if avx2 { "avx2+fma" } else { "baseline" }.to_string();
        let vnni = avx2 && std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512vnni") && std::is_x86_feature_detected!("f16c");
        let q8_0 = if avx512 && vnni { "avx512vnni" } else if avx2 { "avx2+fma" } else { "baseline" };
        Isa { gemm_f32: pick(avx512), vmath: pick(vl), q8_0: q8_0.into(), f16c: std::is_x86_feature_detected!("f16c"), reduced_many_rows: reduced_many_rows() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let arch = std::env::consts::ARCH.to_string();
        Isa { gemm_f32: arch.clone(), vmath: arch.clone(), q8_0: arch, f16c: false, reduced_many_rows: reduced_many_rows() }
    }
}

fn reduced_many_rows() -> String {
    if crate::nn::bf16_products_available() { "avx512bf16" } else { "widened" }.to_string()
}

/// Memory bandwidth of a streaming read on the current thread pool.
#[derive(Debug, Clone, Serialize)]
pub struct Bandwidth {
    pub buffer_mib: usize,
    /// Best of the timed passes, GB/s (1e9 bytes).
    pub read_gb_s: f64,
}

/// Read a buffer of `mib` MiB (well past the caches) `passes` times, summing it in parallel
/// chunks on rayon's pool (the threads the kernels use); the fastest pass is the bound a
/// decoding step that reads every weight once can reach.
pub fn read_bandwidth(mib: usize, passes: usize) -> Bandwidth {
    let n = mib.max(1) * (1 << 20) / 4;
    // Filled (not zero pages: those would all map one physical page).
    let buf: Vec<f32> = (0..n).into_par_iter().map(|i| (i & 1023) as f32).collect();
    let mut best = f64::INFINITY;
    let mut keep = 0f32;
    for _ in 0..passes.max(1) {
        let t0 = Instant::now();
        let s: f32 = buf.par_chunks(1 << 16).map(crate::vmath::sum_slice).sum();
        best = best.min(t0.elapsed().as_secs_f64());
        keep += s;
    }
    std::hint::black_box(keep);
    Bandwidth { buffer_mib: mib, read_gb_s: (n * 4) as f64 / best / 1e9 }
}

/// Forget the peak resident memory so far (Linux: `/proc/self/clear_refs`), so that the next
/// [`super::peak_mib`] reports the peak from here on. False where it is not supported.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
