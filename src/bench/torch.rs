//! Running the PyTorch eager reference (`bench/torch_gpt.py`) on the shapes of a Rust run.

use super::report::{BenchReport, TorchComparison};
use crate::error::{Error, Result};
use std::path::PathBuf;
use std::process::Command;

/// How to run the reference script.
#[derive(Debug, Clone)]
pub struct TorchArgs {
    /// The Python interpreter (with torch installed).
    pub python: String,
    pub script: PathBuf,
    pub threads: usize,
    pub repeat: usize,
    pub warmup: usize,
    pub seed: u64,
}

/// The script's command-line arguments for the shapes of `r`: same model, prefix length,
/// decode steps, CFG, top-k, training batch and sequence length, thread count, inference
/// weights' dtype (the script takes f32, bf16, f16 and q8_0, the last as PyTorch's dynamic int8
/// quantization of its linear layers).
pub fn script_args(r: &BenchReport, t: &TorchArgs, caption_len: usize, caption_dim: usize) -> Vec<String> {
    let flags: [(&str, String); 15] = [
        ("--dim", r.dim.to_string()),
        ("--layers", r.layers.to_string()),
        ("--heads", r.heads.to_string()),
        ("--vocab", r.vocab.to_string()),
        ("--cap-len", caption_len.to_string()),
        ("--cap-dim", caption_dim.to_string()),
        ("--prefix", r.prefix_len.to_string()),
        ("--decode", (r.decode.steps + 1).to_string()),
        ("--cfg", r.cfg_scale.to_string()),
        ("--top-k", r.top_k.to_string()),
        ("--threads", t.threads.to_string()),
        ("--repeat", t.repeat.to_string()),
        ("--warmup", t.warmup.to_string()),
        ("--seed", t.seed.to_string()),
        ("--dtype", r.dtype.clone()),
    ];
    let mut a = vec![t.script.display().to_string()];
    a.extend(flags.into_iter().flat_map(|(flag, value)| [flag.to_string(), value]));
    match &r.train {
        Some(tr) => a.extend(["--train-batch".into(), tr.batch.to_string(), "--train-seq".into(), tr.positions.to_string()]),
        None => a.push("--skip-train".into()),
    }
    a
}

/// Run the script for the shapes of `r` and attach its result and the Rust / PyTorch ratios.
pub fn run_torch(r: &mut BenchReport, t: &TorchArgs, caption_len: usize, caption_dim: usize) -> Result<()> {
    if !t.script.is_file() {
        return Err(Error::bad_file(&t.script, "PyTorch reference script not found (pass --torch-script)"));
    }
    let args = script_args(r, t, caption_len, caption_dim);
    let out = Command::new(&t.python)
        .args(&args)
        .env("OMP_NUM_THREADS", t.threads.to_string())
        .output()
        .map_err(|e| Error::invalid("--python", format!("cannot run `{}`: {e}", t.python)))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        return Err(Error::invalid("PyTorch reference", format!("`{} {}` failed ({}):\n{tail}", t.python, args.join(" "), out.status)));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| Error::invalid("PyTorch reference", format!("no JSON result on its output ({e}): {stdout}")))?;
    let get = |k: &str| v.get(k).and_then(|x| x.as_f64()).filter(|x| *x > 0.0);
    let prefill_ratio = get("prefill_tokens_per_s").map(|p| r.prefill.tokens_per_s / p);
    let decode_ratio = get("decode_tokens_per_s").map(|p| r.decode.tokens_per_s / p);
    let train_ratio = match &r.train {
        Some(tr) => get("train_tokens_per_s").map(|p| tr.tokens_per_s / p),
        None => None,
    };
    r.torch = Some(TorchComparison { python: t.python.clone(), result: v, prefill_ratio, decode_ratio, train_ratio });
    Ok(())
}
