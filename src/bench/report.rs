//! The benchmark's machine-readable result (serialised as JSON) and its readable table.

use serde::Serialize;
use std::fmt::Write as _;

#[derive(Debug, Clone, Serialize)]
pub struct PrefillResult {
    /// Model rows (2 with guidance: cond + uncond).
    pub rows: usize,
    /// Prefilled positions per row.
    pub positions: usize,
    pub ms: f64,
    /// rows * positions / time.
    pub tokens_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeResult {
    pub steps: usize,
    pub rows: usize,
    pub ms_per_step: f64,
    /// rows * steps / time (both CFG rows counted).
    pub tokens_per_s: f64,
    /// Image tokens per second (steps / time).
    pub steps_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ItdResult {
    pub mode: String,
    /// Prefill plus decoding of one image; `None` when skipped.
    pub seconds_per_image: Option<f64>,
    pub forward_passes: usize,
    /// Positions fed per row over those passes.
    pub positions_fed: usize,
    pub draft_accepted: usize,
    pub draft_rejected: usize,
    pub skipped: Option<String>,
}

impl ItdResult {
    pub fn skipped(mode: crate::sample::ItdMode, why: &str) -> Self {
        Self {
            mode: mode.as_str().into(),
            seconds_per_image: None,
            forward_passes: 0,
            positions_fed: 0,
            draft_accepted: 0,
            draft_rejected: 0,
            skipped: Some(why.into()),
        }
    }
}

/// One forward pass of several generated positions after the prefill (`--pass-sizes`).
#[derive(Debug, Clone, Serialize)]
pub struct PassResult {
    /// Generated positions fed per row.
    pub positions: usize,
    /// The pass with every position's guided logits on the host.
    pub ms: f64,
    pub ms_per_position: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainResult {
    pub batch: usize,
    /// Input positions per sequence (prefix included).
    pub positions: usize,
    /// Positions per sequence that carry the loss.
    pub loss_positions: usize,
    pub step_ms: f64,
    /// batch * positions / step time.
    pub tokens_per_s: f64,
    /// Forward + cross-entropy, backward, clipping + AdamW (of the last timed step).
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
}

/// The PyTorch side of a comparison: its JSON as printed, and Rust / PyTorch ratios
/// (above 1: Rust is faster).
#[derive(Debug, Clone, Serialize)]
pub struct TorchComparison {
    pub python: String,
    pub result: serde_json::Value,
    pub prefill_ratio: Option<f64>,
    pub decode_ratio: Option<f64>,
    pub train_ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub device: String,
    /// Threads of candle's CPU kernels (and of PyTorch in a comparison).
    pub threads: usize,
    pub params: usize,
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub vocab: usize,
    pub grid: (usize, usize),
    pub refs: usize,
    pub itd_model: bool,
    pub prefix_len: usize,
    pub generated_len: usize,
    pub cfg_scale: f32,
    pub top_k: usize,
    /// "random" (seeded initialisation) or "trained" (a bundle).
    pub weights: String,
    /// False with random weights: `exact` then rejects nearly every draft token.
    pub acceptance_representative: bool,
    pub prefill: PrefillResult,
    pub decode: DecodeResult,
    pub itd: Vec<ItdResult>,
    /// Single passes of `--pass-sizes` positions (empty when not asked for).
    pub passes: Vec<PassResult>,
    /// Time of `exact` over `off` per image (goal: at most 1.3).
    pub exact_over_off: Option<f64>,
    pub train: Option<TrainResult>,
    /// How the linear layers' weights were stored (f32, bf16, f16, q8_0).
    pub dtype: String,
    /// MiB of weights a decoding step reads (every block's projections and the output head).
    pub weights_mib: f64,
    /// Instruction sets the kernels dispatch to on this machine.
    pub isa: super::Isa,
    /// Streaming read bandwidth on the kernels' threads (GB/s), the bound of a decoding step.
    pub bandwidth_gb_s: Option<f64>,
    /// Weight bytes per decoding step over its time (GB/s), and that over the bound.
    pub decode_weight_gb_s: f64,
    pub decode_bandwidth_fraction: Option<f64>,
    /// Peak resident memory (VmHWM) of the inference measurements (from after the model was
    /// built and converted, where `peak_reset`), and of the whole run.
    pub peak_mib_inference: f64,
    pub peak_reset: bool,
    pub peak_mib: f64,
    /// /proc/loadavg (1, 5, 15 minutes) before and after the Rust measurements.
    pub loadavg_start: [f64; 3],
    pub loadavg_end: [f64; 3],
    pub torch: Option<TorchComparison>,
    pub notes: Vec<String>,
}

fn ratio(x: Option<f64>) -> String {
    x.map_or("-".into(), |r| format!("{r:.2}x"))
}

fn field(v: &serde_json::Value, k: &str) -> Option<f64> {
    v.get(k).and_then(|x| x.as_f64())
}

/// A readable table of a report.
pub fn render_table(r: &BenchReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model {} ({:.2}M params, dim {}, {} layers, {} heads, vocab {}, grid {}x{}, {} refs), {} weights, {} on {} threads",
        r.model,
        r.params as f64 / 1e6,
        r.dim,
        r.layers,
        r.heads,
        r.vocab,
        r.grid.0,
        r.grid.1,
        r.refs,
        r.weights,
        r.device,
        r.threads
    );
    let _ = writeln!(s, "sequence: prefix {} positions, {} generated; cfg {} top-k {}", r.prefix_len, r.generated_len, r.cfg_scale, r.top_k);
    let _ = writeln!(
        s,
        "weights {} ({:.0} MiB per decoding step); kernels: gemm f32 {}, few-row/attention {}, q8_0 {}{}, bf16/q8_0 many rows {}",
        r.dtype,
        r.weights_mib,
        r.isa.gemm_f32,
        r.isa.vmath,
        r.isa.q8_0,
        if r.isa.f16c { ", f16c" } else { "" },
        r.isa.reduced_many_rows
    );
    let _ = writeln!(
        s,
        "load average (1/5/15 min): {:.2} {:.2} {:.2} -> {:.2} {:.2} {:.2}",
        r.loadavg_start[0], r.loadavg_start[1], r.loadavg_start[2], r.loadavg_end[0], r.loadavg_end[1], r.loadavg_end[2]
    );
    let t = r.torch.as_ref();
    let tv = |k: &str| t.and_then(|t| field(&t.result, k)).map_or("-".into(), |x| format!("{x:.1}"));
    let _ = writeln!(s, "{:<28} {:>12} {:>12} {:>8}", "measure", "rust", "pytorch", "ratio");
    let _ = writeln!(s, "{:<28} {:>12.1} {:>12} {:>8}", "prefill tokens/s", r.prefill.tokens_per_s, tv("prefill_tokens_per_s"), ratio(t.and_then(|t| t.prefill_ratio)));
    let _ = writeln!(s, "{:<28} {:>12.2} {:>12} {:>8}", "prefill ms", r.prefill.ms, tv("prefill_ms"), "");
    let _ = writeln!(s, "{:<28} {:>12.1} {:>12} {:>8}", "decode tokens/s (2 rows)", r.decode.tokens_per_s, tv("decode_tokens_per_s"), ratio(t.and_then(|t| t.decode_ratio)));
    let _ = writeln!(s, "{:<28} {:>12.2} {:>12} {:>8}", "decode ms/step", r.decode.ms_per_step, tv("decode_ms_per_step"), "");
    match (r.bandwidth_gb_s, r.decode_bandwidth_fraction) {
        (Some(bw), Some(f)) => {
            let _ = writeln!(s, "decode reads weights at {:.1} GB/s = {:.0}% of the {:.1} GB/s streaming-read bound", r.decode_weight_gb_s, f * 100.0, bw);
        }
        _ => {
            let _ = writeln!(s, "decode reads weights at {:.1} GB/s", r.decode_weight_gb_s);
        }
    }
    if let Some(cap) = t.and_then(|t| t.result.get("cpu_capability")).and_then(|c| c.as_str()) {
        let _ = writeln!(s, "pytorch kernels: {cap}");
    }
    if let Some(tr) = &r.train {
        let _ = writeln!(s, "{:<28} {:>12.1} {:>12} {:>8}", format!("train tokens/s (batch {})", tr.batch), tr.tokens_per_s, tv("train_tokens_per_s"), ratio(t.and_then(|t| t.train_ratio)));
        let _ = writeln!(s, "{:<28} {:>12.1} {:>12} {:>8}", "train step ms", tr.step_ms, tv("train_step_ms"), "");
        let _ = writeln!(s, "  (forward+loss {:.1} ms, backward {:.1} ms, clip+AdamW {:.1} ms; {} positions, {} with loss)", tr.forward_ms, tr.backward_ms, tr.optimizer_ms, tr.positions, tr.loss_positions);
    }
    if let Some(t) = t {
        let load = |k: &str| field(&t.result, k).map_or("-".into(), |x| format!("{x:.2}"));
        let _ = writeln!(s, "pytorch {} load average (1 min): {} -> {}", t.python, load("loadavg_1m_start"), load("loadavg_1m_end"));
    }
    let _ = writeln!(s, "{:<8} {:>12} {:>9} {:>9} {:>9} {:>9}", "ITD", "s/image", "forwards", "fed", "accepted", "rejected");
    for i in &r.itd {
        match i.seconds_per_image {
            Some(sec) => {
                let _ = writeln!(s, "{:<8} {:>12.3} {:>9} {:>9} {:>9} {:>9}", i.mode, sec, i.forward_passes, i.positions_fed, i.draft_accepted, i.draft_rejected);
            }
            None => {
                let _ = writeln!(s, "{:<8} skipped: {}", i.mode, i.skipped.as_deref().unwrap_or(""));
            }
        }
    }
    for p in &r.passes {
        let _ = writeln!(s, "pass of {:>4} positions: {:8.3} ms ({:.4} ms per position)", p.positions, p.ms, p.ms_per_position);
    }
    if let Some(x) = r.exact_over_off {
        let _ = writeln!(s, "exact / off = {x:.2} (goal <= 1.3)");
    }
    let _ = writeln!(
        s,
        "peak memory: {:.0} MiB {}, {:.0} MiB at the end",
        r.peak_mib_inference,
        if r.peak_reset { "during inference" } else { "after inference" },
        r.peak_mib
    );
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}
