//! One file per command group; each parses its flags and calls the library.

pub mod attention;
pub mod bench;
pub mod convert;
pub mod curate;
pub mod data;
pub mod eval;
pub mod generate;
pub mod info;
pub mod serve;
pub mod tokenizer;
pub mod train;

use clap::Args;
use tokenar::sample::{ItdMode, SampleOptions};

/// The sampling flags shared by `generate` and `eval --model`.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Classifier-free guidance scale; 1 or less = no guidance, as LlamaGen [default: the
    /// model's sampling.toml, else 3].
    #[arg(long)]
    pub cfg_scale: Option<f32>,
    /// Guidance stops after this many decode steps, as LlamaGen's `--cfg-interval` (tokens
    /// 0..=N+1 guided) [default: the model's, else guided throughout].
    #[arg(long)]
    pub cfg_interval: Option<usize>,
    /// Keep the k most likely tokens (0 = all) [default: the model's, else 1000].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling mass (1 = off) [default: the model's, else 1].
    #[arg(long)]
    pub top_p: Option<f32>,
    /// [default: the model's, else 1].
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// ITD decoding: exact (default for ITD models), naive, forced, or off.
    #[arg(long)]
    pub itd: Option<ItdMode>,
    /// Keep the given background exactly outside the mask.
    #[arg(long)]
    pub paste_back: bool,
}

impl SamplingArgs {
    /// The flags over the model's recommended settings.
    pub fn options(&self, defaults: &tokenar::pipeline::bundle::SamplingDefaults, seed_offset: u64) -> SampleOptions {
        SampleOptions {
            cfg_scale: self.cfg_scale.unwrap_or(defaults.cfg_scale),
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            seed: self.seed + seed_offset,
            cfg_interval: self.cfg_interval.or(defaults.cfg_interval),
        }
    }
}

/// The model to load: a bundle folder or public checkpoints, else the built-in model.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Bundle folder (tokenizer, model, text encoder); default: the built-in model.
    #[arg(long)]
    pub weights: Option<std::path::PathBuf>,
    /// Architecture preset for a .pt GPT checkpoint (e.g. tokenar-xl, editar-xl, XL).
    #[arg(long)]
    pub preset: Option<String>,
    /// Tokenizer preset: checked against the tokenizer file's shapes (which are used without it).
    #[arg(long)]
    pub tokenizer_preset: Option<String>,
    /// Token grid side of a .pt GPT that does not record it (LlamaGen t2i): 32 by default
    /// (512 px with VQ-16), 16 for the 256 px stage-1 model.
    #[arg(long)]
    pub grid: Option<usize>,
    /// Run on the GPU (a build with the `cuda` feature).
    #[arg(long)]
    pub gpu: bool,
    /// Inference weights of the GPT's linear layers: f32, bf16, f16 or q8_0 (8-bit blocks),
    /// converted at load time.
    #[arg(long, default_value = "f32")]
    pub dtype: tokenar::nn::WeightDtype,
}

impl ModelArgs {
    pub fn load(&self) -> tokenar::Result<tokenar::pipeline::Bundle> {
        let device = tokenar::util::device(self.gpu)?;
        let bundle = match &self.weights {
            Some(dir) => {
                let hints = tokenar::pipeline::bundle::LoadHints { preset: self.preset.clone(), tokenizer_preset: self.tokenizer_preset.clone(), dtype: self.dtype };
                tokenar::pipeline::Bundle::load_with_grid(dir, &hints, self.grid, &device)?
            }
            None => tokenar::pipeline::Bundle::builtin(&device)?,
        };
        let mut bundle = bundle;
        if self.dtype != tokenar::nn::WeightDtype::F32 {
            // A bundle folder's GPT was converted while loading; the built-in model is here.
            if self.weights.is_none() {
                bundle.gpt.convert_weights(self.dtype)?;
            }
            // The model now holds the only copy of the converted weights: the f32 variables go.
            bundle.gpt_vars = candle_nn::VarMap::new();
        }
        for k in &bundle.report.fresh {
            eprintln!("note: `{k}` is not in the checkpoint and was freshly initialised");
        }
        Ok(bundle)
    }
}

/// A progress callback `(done, total)` that moves `bar`, for the library's long loops.
pub fn bar_progress(bar: &indicatif::ProgressBar) -> impl Fn(usize, usize) + '_ {
    move |k, n| {
        bar.set_length(n as u64);
        bar.set_position(k as u64);
    }
}

/// A progress bar with the given template (`{bar}`, `{pos}`, `{len}`, ... as indicatif).
pub fn progress_bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(indicatif::ProgressStyle::with_template(template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    bar
}
