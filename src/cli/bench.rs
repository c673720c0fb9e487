//! `tokenar bench`: prefill / decode / ITD-mode / train-step speed, optionally against the
//! PyTorch eager reference on the same machine.

use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use tokenar::bench::{self, BenchOptions, ConditionCodes, Overrides, TorchArgs};
use tokenar::pipeline::bundle::LoadHints;
use tokenar::pipeline::generate::condition_codes;
use tokenar::pipeline::{Bundle, GenerateRequest};
use tokenar::sample::{ItdMode, SampleOptions};

#[derive(Args)]
pub struct BenchArgs {
    /// Model preset: anchor (LlamaGen 256-dim, 4 layers, the PyTorch anchor), tiny, small,
    /// B, L, XL, XXL, editar-xl, tokenar-xl. Random weights (seeded).
    #[arg(long, default_value = "anchor")]
    preset: String,
    /// A bundle folder: time a trained model instead (shape flags are then ignored).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Preset for a .pt GPT checkpoint inside --weights.
    #[arg(long)]
    weights_preset: Option<String>,
    /// Prompt encoded with the bundle's text encoder (with --weights).
    #[arg(long, default_value = "a photo of two subjects in a scene")]
    prompt: String,
    /// With --weights: condition on these reference images (repeat, in order) instead of
    /// random codes, so that `exact`'s draft acceptance is what real use sees.
    #[arg(long = "ref", value_name = "IMAGE", requires = "weights")]
    refs_images: Vec<PathBuf>,
    /// With --ref: the scene.
    #[arg(long, requires = "refs_images")]
    background: Option<PathBuf>,
    /// With --background: white where the subjects go.
    #[arg(long, requires = "background")]
    mask: Option<PathBuf>,
    /// Model width (at most 16384).
    #[arg(long)]
    dim: Option<usize>,
    /// Blocks (at most 256).
    #[arg(long)]
    layers: Option<usize>,
    /// Attention heads (at most 256).
    #[arg(long)]
    heads: Option<usize>,
    /// Vocabulary (at most 1048576).
    #[arg(long)]
    vocab: Option<usize>,
    /// Token grid of one image: N (square) or RxC (at most 128 a side). The shapes together
    /// must fit the memory available: the benchmark checks its estimate before building.
    #[arg(long)]
    grid: Option<String>,
    /// Caption positions (at most 4096).
    #[arg(long)]
    caption_len: Option<usize>,
    /// Width of the text features (at most 16384).
    #[arg(long)]
    caption_dim: Option<usize>,
    /// Reference images in the condition (0 for the LlamaGen presets).
    #[arg(long)]
    refs: Option<usize>,
    /// Decoding steps timed.
    #[arg(long, default_value_t = 64)]
    decode: usize,
    /// ITD modes timed per image (comma-separated), or `none` (no whole image: at GPT-XL
    /// sizes one image takes minutes).
    #[arg(long, value_delimiter = ',', default_value = "off,naive,forced,exact", value_parser = parse_itd)]
    itd: Vec<Option<ItdMode>>,
    /// Training batch (0: skip the training step; at most 256).
    #[arg(long, default_value_t = 4)]
    train_batch: usize,
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 1)]
    itd_repeat: usize,
    /// Also time single forward passes of these many generated positions right after the
    /// prefill, every position's logits read (comma-separated), as `--itd exact` verifies.
    #[arg(long, value_delimiter = ',')]
    pass_sizes: Vec<usize>,
    #[arg(long, default_value_t = 3.0)]
    cfg_scale: f32,
    #[arg(long, default_value_t = 1000)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also run the PyTorch reference (bench/torch_gpt.py) with the same shapes and threads.
    #[arg(long)]
    torch: bool,
    /// Python interpreter with torch installed.
    #[arg(long, default_value = "python3")]
    python: String,
    /// The PyTorch reference script.
    #[arg(long, default_value = "bench/torch_gpt.py")]
    torch_script: PathBuf,
    /// Write the JSON report here (atomically).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Print only the JSON report on stdout (no table).
    #[arg(long)]
    json_only: bool,
    #[arg(long)]
    gpu: bool,
    /// Inference weights: f32, bf16, f16 or q8_0 (converted after building or loading; the
    /// training step needs f32, so pass --train-batch 0 with the others).
    #[arg(long, default_value = "f32")]
    dtype: tokenar::nn::WeightDtype,
    #[command(flatten)]
    ben2: Ben2BenchArgs,
}

/// BEN2 matting speed instead of the GPT's (`--ben2`); shares --repeat, --warmup, --seed,
/// --gpu, --torch, --python, --json and --json-only.
#[derive(Args)]
struct Ben2BenchArgs {
    /// Time BEN2 matting (published shape, random weights unless --ben2-weights) instead of the GPT.
    #[arg(long)]
    ben2: bool,
    /// A BEN2 checkpoint (BEN2_Base.pth or model.safetensors) to time instead of random weights.
    #[arg(long, requires = "ben2")]
    ben2_weights: Option<PathBuf>,
    /// BEN2's input side (1024 as published).
    #[arg(long, default_value_t = tokenar::curate::ben2::INPUT_SIZE)]
    ben2_size: usize,
    /// Side of the test image cut out (resized to the input side and back).
    #[arg(long, default_value_t = 1024)]
    ben2_image: u32,
    /// With --torch: the PyTorch BEN2 script.
    #[arg(long, default_value = "bench/torch_ben2.py")]
    ben2_torch_script: PathBuf,
    /// With --torch: a TokenAR checkout (its scripts/BEN2.py is the reference module).
    #[arg(long)]
    tokenar_ref: Option<PathBuf>,
}

fn run_ben2(a: &BenchArgs) -> anyhow::Result<()> {
    let b = &a.ben2;
    let torch = match (a.torch, &b.tokenar_ref) {
        (true, Some(r)) => Some((a.python.clone(), b.ben2_torch_script.clone(), r.clone())),
        (true, None) => anyhow::bail!("--ben2 --torch needs --tokenar-ref DIR (a TokenAR checkout holding scripts/BEN2.py)"),
        _ => None,
    };
    let o = bench::ben2::Ben2BenchOptions {
        size: b.ben2_size,
        weights: b.ben2_weights.clone(),
        image: b.ben2_image,
        repeat: a.repeat,
        warmup: a.warmup,
        seed: a.seed,
        torch,
    };
    let report = bench::ben2::bench_ben2(&o, &tokenar::util::device(a.gpu)?)?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(p) = &a.json {
        tokenar::util::atomic_write(p, json.as_bytes())?;
    }
    if a.json_only {
        println!("{json}");
    } else {
        print!("{}", bench::ben2::render(&report));
    }
    Ok(())
}

/// An ITD mode, or `none` (`None`).
fn parse_itd(s: &str) -> Result<Option<ItdMode>, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    s.parse::<ItdMode>().map(Some).map_err(|e| e.to_string())
}

fn parse_grid(s: &str) -> anyhow::Result<(usize, usize)> {
    let parse = |x: &str| x.trim().parse::<usize>().with_context(|| format!("--grid `{s}`: expected N or RxC"));
    match s.split_once(['x', 'X']) {
        Some((r, c)) => Ok((parse(r)?, parse(c)?)),
        None => {
            let n = parse(s)?;
            Ok((n, n))
        }
    }
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if a.ben2.ben2 {
        return run_ben2(&a);
    }
    if a.train_batch > 0 {
        tokenar::util::check_batch("--train-batch", a.train_batch)?;
    }
    // The thread count was pinned at program start (main).
    let device = tokenar::util::device(a.gpu)?;
    let sample = SampleOptions { cfg_scale: a.cfg_scale, top_k: a.top_k, seed: a.seed, ..SampleOptions::default() };
    let mut opts = BenchOptions {
        label: a.preset.clone(),
        n_refs: 0,
        decode_steps: a.decode,
        itd_modes: a.itd.iter().flatten().copied().collect(),
        train_batch: a.train_batch,
        repeat: a.repeat,
        warmup: a.warmup,
        itd_repeat: a.itd_repeat,
        pass_sizes: a.pass_sizes.clone(),
        sample,
        seed: a.seed,
        trained: false,
        codes: None,
        dtype: a.dtype,
        bandwidth_mib: 256,
    };
    let bundle;
    let built;
    let (model, varmap, text) = match &a.weights {
        Some(dir) => {
            let hints = LoadHints { preset: a.weights_preset.clone(), tokenizer_preset: None, ..Default::default() };
            bundle = Bundle::load(dir, &hints, &device).with_context(|| format!("loading {}", dir.display()))?;
            let caption_len = bundle.gpt.config().caption_len;
            let (feats, _mask) = bundle.text.encode(std::slice::from_ref(&a.prompt), caption_len)?;
            opts.label = dir.display().to_string();
            opts.trained = true;
            if !a.refs_images.is_empty() {
                let (refs, background, mask) = super::generate::load_condition_images(&a.refs_images, a.background.as_ref(), a.mask.as_ref())?;
                let req = GenerateRequest {
                    refs,
                    background,
                    mask,
                    prompt: a.prompt.clone(),
                    options: SampleOptions::default(),
                    itd: None,
                    num_samples: 1,
                    paste_back: false,
                    decode_itd: false,
                };
                let (refs, background) = condition_codes(&bundle, &req)?;
                if a.refs.is_some_and(|n| n != refs.len()) {
                    anyhow::bail!("--refs {} but {} --ref images given", a.refs.unwrap_or(0), refs.len());
                }
                opts.codes = Some(ConditionCodes { refs, background });
            }
            (bundle.gpt, bundle.gpt_vars, Some(feats))
        }
        None => {
            let o = Overrides {
                dim: a.dim,
                layers: a.layers,
                heads: a.heads,
                vocab: a.vocab,
                grid: a.grid.as_deref().map(parse_grid).transpose()?,
                caption_len: a.caption_len,
                caption_dim: a.caption_dim,
            };
            let cfg = bench::bench_config(&a.preset, &o)?;
            bench::check_memory(&cfg, a.train_batch, a.torch)?;
            if a.train_batch == 0 {
                // Inference only: the linear weights drawn and converted one at a time, never
                // all in f32 (the same values as the f32 build of this seed).
                let (model, _vars) = tokenar::weights::convert::build_seeded(&cfg, &device, a.seed, a.dtype)?;
                opts.n_refs = a.refs.unwrap_or(cfg.max_refs.min(2));
                let report = bench::run_inference(model, None, &opts)?;
                return finish(&a, report, &cfg);
            }
            built = tokenar::model::build(&cfg, &device, a.seed)?;
            (built.0, built.1, None)
        }
    };
    let cfg = model.config().clone();
    opts.n_refs = match &opts.codes {
        Some(c) => c.refs.len(),
        None => a.refs.unwrap_or(cfg.max_refs.min(2)),
    };
    let report = bench::run_owned(model, varmap, text.as_ref(), &opts)?;
    finish(&a, report, &cfg)
}

/// The PyTorch comparison (with --torch), then the table and the JSON report.
fn finish(a: &BenchArgs, mut report: bench::BenchReport, cfg: &tokenar::model::GptConfig) -> anyhow::Result<()> {
    if a.torch {
        let t = TorchArgs { python: a.python.clone(), script: a.torch_script.clone(), threads: report.threads, repeat: a.repeat, warmup: a.warmup, seed: a.seed };
        bench::run_torch(&mut report, &t, cfg.caption_len, cfg.caption_dim)?;
    }
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(p) = &a.json {
        tokenar::util::atomic_write(p, json.as_bytes())?;
    }
    if a.json_only {
        println!("{json}");
    } else {
        print!("{}", bench::render_table(&report));
        if a.json.is_none() {
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(())
}
