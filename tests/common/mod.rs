//! Fixtures shared by the integration tests (each test file that needs one says `mod common;`).

// Each test file uses its own part of this module.
#![allow(dead_code)]

use candle_core::Device;
use std::path::{Path, PathBuf};
use tokenar::data::{self, synth};
use tokenar::pipeline::TrainJobConfig;

/// The training config of a tiny model over the code cache `cache` (tokenizer `tok`), writing to
/// `out`: 10 steps of batch 4, one layer of 32, CFG dropout 0.05, checkpoints every 2 steps; then
/// `sets` (`key=value`, dotted for `model.` / `text.`, as `tokenar train --set` takes them).
pub fn train_toml(cache: &Path, out: &Path, tok: &Path, sets: &[&str]) -> String {
    let base = format!(
        r#"
cache = "{cache}"
out = "{out}"
tokenizer = "{tok}"
seed = 5
steps = 10
batch = 4
lr = 3e-3
weight_decay = 0.05
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
log_every = 1
ckpt_every = 2
keep_last = 1
drop_both = 0.05
drop_image = 0.05
drop_text = 0.05
[model]
preset = "tiny"
n_layer = 1
n_head = 2
dim = 32
dropout = 0.0
[text]
dim = 32
n_layer = 1
n_head = 2
max_len = 8
mlp_ratio = 2
norm_eps = 1e-5
"#,
        cache = cache.display(),
        out = out.display(),
        tok = tok.display()
    );
    let value: toml::Value = toml::from_str(&base).unwrap();
    let value = tokenar::train::config::apply_overrides(value, sets).unwrap();
    toml::to_string(&value).unwrap()
}

/// [`train_toml`] parsed.
pub fn train_config(cache: &Path, out: &Path, tok: &Path, sets: &[&str]) -> TrainJobConfig {
    TrainJobConfig::from_toml(&train_toml(cache, out, tok, sets), &[], Path::new("test.toml")).unwrap()
}

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
