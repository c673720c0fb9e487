#!/usr/bin/env bash
# Trains the built-in model from scratch: synthetic data, tokenizer, decoder fine-tuning, code
# cache, GPT, then copies the result to assets/builtin/ (compiled into the binary by build.rs)
# and evaluates it on the 500-sample test split.
# Every step resumes where it stopped: run the script again after an interruption.
# Wall times measured on a 2-core machine are in docs/experiments.md ("Reproducing the built-in model").
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
T=target/release/tokenar
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}

# 1. Data (seconds).
[ -f data/synth64/train/dataset.json ] || $T data synth --out data/synth64/train --n 20000 --seed 0 --split train --size 64 --subjects 2
[ -f data/synth64/test/dataset.json ] || $T data synth --out data/synth64/test --n 500 --seed 0 --split test --size 64 --subjects 2

# 2. Tokenizer: 3,000 steps on 32 px crops, then 800 more (about 45 min).
$T tokenizer train --config configs/tokenizer-small.toml
$T tokenizer train --config configs/tokenizer-small.toml --set steps=3800 --set max_minutes=10

# 3. Decoder fine-tuning with the codes fixed (30 min); the encoder and codebook are unchanged.
$T tokenizer train --config configs/tokenizer-decoder.toml

# 4. Code cache of the first 9,216 training samples (about 12 min).
$T data encode data/synth64/train --tokenizer runs/vq-small/vq.safetensors --out runs/cache/synth64-train --max-samples 9216

# 5. The GPT with the binding options, without the index embedding
#    (configs/tokenar-binding.toml): 1,500 steps, then resumed to 2,500, 4,000 and 5,500 (each
#    resume restarts the cosine schedule over the longer horizon); 0.7-0.8 s per step at two
#    threads with this version, about 70 min in all.
$T train --config configs/tokenar-binding.toml --resume
$T train --config configs/tokenar-binding.toml --resume --set steps=2500
$T train --config configs/tokenar-binding.toml --resume --set steps=4000
$T train --config configs/tokenar-binding.toml --resume --set steps=5500

# 6. Ship: the fine-tuned decoder's tokenizer (same codes) with the GPT and text encoder.
mkdir -p assets/builtin
cp runs/vq-small-dec/vq.safetensors assets/builtin/tokenizer.safetensors
cp runs/binding/export/model.safetensors runs/binding/export/text.safetensors assets/builtin/
cargo build --release
$T eval --model builtin --dataset data/synth64/test --metrics pixel,background,subject,identity --out runs/eval/builtin
