//! `tokenar info`: what a checkpoint or bundle is.

use clap::Args;
use std::path::PathBuf;
use tokenar::pipeline::bundle::{BundlePaths, LoadHints};
use tokenar::pipeline::Bundle;

#[derive(Args)]
pub struct InfoArgs {
    /// A bundle folder, a single checkpoint file, or nothing for the built-in model.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Preset for a .pt GPT checkpoint.
    #[arg(long)]
    preset: Option<String>,
}

fn describe_gpt(c: &tokenar::model::GptConfig) -> String {
    format!(
        "family {:?}, {} layers x {} heads x dim {}, vocab {}, grid {}x{}, {} params ({} backbone); additions: index embedding {}, instruct tokens {}, ITD {}; max refs {}; layout {:?}",
        c.family,
        c.n_layer,
        c.n_head,
        c.dim,
        c.vocab_size,
        c.grid.0,
        c.grid.1,
        c.num_params(),
        c.backbone_params(),
        if c.index_embedding { "on" } else { "off" },
        c.n_instruct,
        if c.itd { "on" } else { "off" },
        c.max_refs,
        c.scheme
    )
}

pub fn run(a: InfoArgs) -> anyhow::Result<()> {
    let device = candle_core::Device::Cpu;
    let bundle = match &a.weights {
        None => Bundle::builtin(&device)?,
        Some(p) if p.is_dir() => {
            let paths = BundlePaths::find(p)?;
            println!("folder {}\n  tokenizer: {}\n  model: {}", p.display(), paths.tokenizer.display(), paths.model.display());
            Bundle::load(p, &LoadHints { preset: a.preset.clone(), tokenizer_preset: None }, &device)?
        }
        Some(p) => {
            let file = tokenar::weights::TensorFile::load(p, &device)?;
            let n: usize = file.tensors.values().map(|t| t.elem_count()).sum();
            println!("{}: {} tensors, {} values", p.display(), file.tensors.len(), n);
            if let Ok(c) = tokenar::model::config_from_metadata(&file) {
                println!("TokenAR GPT: {}", describe_gpt(&c));
            } else if let Some(vq) = file.metadata.get("tokenar.vq") {
                println!("VQ tokenizer: {vq}");
            } else {
                let family = if file.contains("ref_index_embeddings.weight") || file.contains("instruct_token_embeddings.weight") {
                    "TokenAR"
                } else if file.contains("img_uncond_embedding") || file.contains("alignment.weight") {
                    "EditAR"
                } else if file.contains("tok_embeddings.weight") {
                    "LlamaGen GPT"
                } else if file.contains("quantize.embedding.weight") {
                    "LlamaGen VQ tokenizer"
                } else {
                    "unknown"
                };
                println!("looks like: {family} (no config in the file; load it with --preset)");
            }
            return Ok(());
        }
    };
    println!("source: {}", bundle.source);
    let vq = bundle.vq.config();
    println!(
        "tokenizer: ch {} x {:?}, downsample {}, codebook {} x {}, {} params",
        vq.ch,
        vq.ch_mult,
        vq.downsample(),
        vq.codebook_size,
        vq.codebook_dim,
        vq.num_params()
    );
    println!("text encoder: {}", bundle.text.describe());
    println!("GPT: {}", describe_gpt(bundle.config()));
    println!("image size: {} px", bundle.image_size());
    let sp = &bundle.sampling;
    println!("sampling: cfg {} top-k {} top-p {} temperature {}", sp.cfg_scale, sp.top_k, sp.top_p, sp.temperature);
    Ok(())
}
