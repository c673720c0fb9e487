#!/usr/bin/env bash
# The ablation in the README and docs/experiments.md: the built-in recipe's first stage (configs/tokenar-binding.toml,
# 1,500 steps) trained four ways on the same code cache with the same budget -- full model,
# without ITD, without instruct tokens, without the Token Index Embedding -- then each scored
# on the 500-sample test split. Every run resumes after an interruption; rerun the script.
#
#   STEPS=1500 scripts/ablation.sh           # steps per run (default 1500)
#   EXTRA="--set binding_token_loss=1" EVAL_FLAGS="--cfg-scale 3 --top-k 10" \
#     OUT=runs/ablation-binding scripts/ablation.sh  # the previous built-in recipe's ablation
#   CONFIG=configs/tokenar-builtin.toml STEPS=400 OUT=runs/ablation EXTRA="--set warmup=50 \
#     --set ckpt_every=100" scripts/ablation.sh  # the earlier ablation (recipe without binding)
#   RUNS="full no-itd" scripts/ablation.sh    # a subset (e.g. to spread runs over machines)
#   EVAL_ONLY=1 scripts/ablation.sh           # score finished runs and print the table
#   EVAL_FLAGS="--cfg-scale 1.5 --top-k 10"   # sampling of the scoring (default: the built-in
#                                             # model's assets/builtin/sampling.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
T=${TOKENAR:-target/release/tokenar}
CONFIG=${CONFIG:-configs/tokenar-binding.toml}
STEPS=${STEPS:-1500}
RUNS=${RUNS:-"full no-itd no-instruct no-index"}
CACHE=${CACHE:-runs/cache/synth64-train}
# Exported with each run and used to score it: the fine-tuned decoder the built-in model ships
# with (same encoder and codebook as the tokenizer the cache was encoded with).
TOKENIZER=${TOKENIZER:-runs/vq-small-dec/vq.safetensors}
TEST=${TEST:-data/synth64/test}
OUT=${OUT:-runs/ablation-binding}
EXTRA=${EXTRA:-}
# Score every run with the sampling settings the built-in model ships with.
default_flags() {
  local f=assets/builtin/sampling.toml
  [ -f "$f" ] || return 0
  sed -n 's/^cfg_scale = \(.*\)/--cfg-scale \1/p; s/^top_k = \(.*\)/--top-k \1/p; s/^top_p = \(.*\)/--top-p \1/p; s/^temperature = \(.*\)/--temperature \1/p' "$f" | tr '\n' ' '
}
EVAL_FLAGS=${EVAL_FLAGS:-$(default_flags)}

# Each run sets all three switches, so that "full" has every TokenAR addition whatever the
# config ships with (the built-in recipe itself trains without the index embedding).
switches() {
  case $1 in
    full) echo "--set model.index_embedding=true" ;;
    no-itd) echo "--set model.index_embedding=true --set model.itd=false" ;;
    no-instruct) echo "--set model.index_embedding=true --set model.n_instruct=0" ;;
    no-index) echo "--set model.index_embedding=false" ;;
    *) echo "unknown run $1" >&2; exit 2 ;;
  esac
}

for run in $RUNS; do
  if [ -z "${EVAL_ONLY:-}" ]; then
    # shellcheck disable=SC2046
    $T train --config "$CONFIG" --resume --set steps="$STEPS" \
      --set cache="$CACHE" --set tokenizer="$TOKENIZER" --set out="$OUT/$run" $(switches "$run") $EXTRA
  fi
  [ -f "$OUT/eval/$run/results.json" ] || \
    # shellcheck disable=SC2086
    $T eval --model "$OUT/$run/export" --dataset "$TEST" --metrics pixel,background,identity \
      --out "$OUT/eval/$run" --name "$run" $EVAL_FLAGS
done
$T eval table --columns id_acc,id_swap,psnr_bg,ssim_bg,psnr $(for r in $RUNS; do echo "$OUT/eval/$r/results.json"; done) --out "$OUT/table.md"
cat "$OUT/table.md"
