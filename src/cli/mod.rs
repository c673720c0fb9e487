//! One file per command group; each parses its flags and calls the library.

pub mod bench;
pub mod data;
pub mod eval;
pub mod generate;
pub mod info;
pub mod tokenizer;
pub mod train;

use clap::Args;
use tokenar::sample::{ItdMode, SampleOptions};

/// The sampling flags shared by `generate` and `eval --model`.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Classifier-free guidance scale (1 = off).
    #[arg(long, default_value_t = 3.0)]
    pub cfg_scale: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 1000)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
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
    pub fn options(&self, seed_offset: u64) -> SampleOptions {
        SampleOptions {
            cfg_scale: self.cfg_scale,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed + seed_offset,
        }
    }
}

/// A progress bar with the given template (`{bar}`, `{pos}`, `{len}`, ... as indicatif).
pub fn progress_bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(indicatif::ProgressStyle::with_template(template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    bar
}
