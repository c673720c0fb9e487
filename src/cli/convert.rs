//! `tokenar convert`: a GPT checkpoint rewritten with its linear layers' weights in bf16 or
//! f16 (half the file; loads like any checkpoint of this project).

use anyhow::Context;
use clap::Args;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tokenar::model::TokenAr;
use tokenar::nn::WeightDtype;

#[derive(Args)]
pub struct ConvertArgs {
    /// The GPT checkpoint (this project's safetensors, or a reference .pt/.pth/.bin/.safetensors with --preset).
    #[arg(long)]
    model: PathBuf,
    /// Architecture preset for a reference checkpoint (e.g. XL, tokenar-xl).
    #[arg(long)]
    preset: Option<String>,
    /// f32, bf16 or f16. (q8_0 and q4_k are made at load time: `--dtype` on generate, serve, bench, eval.)
    #[arg(long)]
    dtype: WeightDtype,
    /// The safetensors file to write (atomically).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: ConvertArgs) -> anyhow::Result<()> {
    let dtype = match a.dtype {
        WeightDtype::Q8_0 | WeightDtype::Q4K => anyhow::bail!(
            "--dtype {}: checkpoint files hold f32, bf16 or f16; quantized weights are made when loading (--dtype {} on generate, serve, bench, eval)",
            a.dtype,
            a.dtype
        ),
        WeightDtype::F32 => candle_core::DType::F32,
        WeightDtype::Bf16 => candle_core::DType::BF16,
        WeightDtype::F16 => candle_core::DType::F16,
    };
    let device = candle_core::Device::Cpu;
    let (model, varmap, report) = tokenar::model::load::load(&a.model, a.preset.as_deref(), &device).with_context(|| format!("loading {}", a.model.display()))?;
    if !report.fresh.is_empty() {
        eprintln!("note: {} TokenAR additions are not in the checkpoint; their fresh initialisation is written too", report.fresh.len());
    }
    let mut tensors = tokenar::weights::varmap_tensors(&varmap);
    let mut converted = 0usize;
    for (name, t) in tensors.iter_mut() {
        if TokenAr::is_linear_weight(name) {
            *t = t.to_dtype(dtype)?;
            converted += 1;
        }
    }
    let json = serde_json::to_string(model.config())?;
    let mut meta = BTreeMap::new();
    meta.insert(tokenar::model::load::CONFIG_KEY.to_string(), json);
    meta.insert("format".to_string(), "tokenar-gpt".to_string());
    meta.insert("tokenar.weight_dtype".to_string(), a.dtype.to_string());
    tokenar::weights::save_safetensors(&a.out, &tensors, &meta)?;
    let bytes = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    println!("wrote {} ({converted} linear weights in {}, {:.1} MiB)", a.out.display(), a.dtype, bytes as f64 / (1u64 << 20) as f64);
    Ok(())
}
