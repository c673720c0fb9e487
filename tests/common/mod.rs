//! Fixtures shared by the integration tests (each test file that needs one says `mod common;`).

use candle_core::Device;
use std::path::{Path, PathBuf};
use tokenar::data::{self, synth};

/// A 24-sample synthetic set at 16 px (two references each), a random tokenizer downsampling
/// 4x (4 x 4 codes of 16) and its code cache: (dataset, tokenizer, cache).
pub fn fixture(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ds_dir = root.join("synth");
    let opts = synth::SynthOptions { n: 24, seed: 3, size: 16, subjects: (2, 2), mix: false, split: synth::Split::Train, threads: 1 };
    synth::generate(&ds_dir, &opts, None).unwrap();
    let mut cfg = tokenar::tokenizer::VqConfig::preset("vq-tiny").unwrap();
    cfg.ch_mult = vec![1, 2, 2];
    let (vq, vars) = tokenar::tokenizer::build(&cfg, &Device::Cpu, 0).unwrap();
    let tok = root.join("vq.safetensors");
    tokenar::tokenizer::save(&tok, &cfg, &vars).unwrap();
    let ds = data::Dataset::open_quiet(&ds_dir, &data::OpenOptions::default()).unwrap();
    let cache = root.join("cache");
    let mut enc = |x: &candle_core::Tensor| vq.encode(x);
    data::cache::encode_dataset(&ds, &cache, 16, &mut enc, None, 8, None).unwrap();
    (ds_dir, tok, cache)
}
