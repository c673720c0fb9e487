#!/usr/bin/env bash
# Trains the built-in model from scratch: synthetic data, tokenizer, code cache, GPT, then
# copies the result to assets/builtin/ (compiled into the binary) and evaluates it.
# Every step resumes where it stopped: run the script again after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
T=target/release/tokenar

[ -f data/synth64/train/dataset.json ] || $T data synth --out data/synth64/train --n 20000 --seed 0 --split train --size 64 --subjects 2
[ -f data/synth64/test/dataset.json ] || $T data synth --out data/synth64/test --n 500 --seed 0 --split test --size 64 --subjects 2
$T tokenizer train --config configs/tokenizer-small.toml
$T data encode data/synth64/train --tokenizer runs/vq-small/vq.safetensors --out runs/cache/synth64-train
$T train --config configs/tokenar-builtin.toml --resume
mkdir -p assets/builtin
cp runs/builtin/export/tokenizer.safetensors runs/builtin/export/model.safetensors runs/builtin/export/text.safetensors assets/builtin/
$T eval --model runs/builtin/export --dataset data/synth64/test --metrics pixel,background,subject,edges,identity --out runs/eval/builtin
