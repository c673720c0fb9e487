#!/usr/bin/env bash
# The next built-in model (issue #24): one to three subjects on 16 x 16 codes.
#
#   scripts/train-builtin-f4.sh                 # every stage in order, each resuming
#   scripts/train-builtin-f4.sh train eval      # only these stages
#   STEPS=4000 scripts/train-builtin-f4.sh train  # train to step 4000 (resumes; the cosine
#                                               # schedule then ends at 4000)
#
# Stages (each resumes where it stopped: run the same command again after an interruption):
#   data       synthetic data: 20,000 training samples with 1, 2 and 3 subjects in turn
#              (`--subjects mix`), a 500-sample validation mix, and three 500-sample test
#              splits (1, 2 and 3 subjects) with a seed no other split or test uses
#   ceiling    the candidate tokenizers' round trips of the first CEIL_N test samples of each
#              count, scored inside the subjects' masks: the ceiling any model on those codes
#              has (the built-in 8 x 8 tokenizer and vq-small-f4)
#   tokenizer  the 16 x 16-code tokenizer: by default the trained assets/vq-small-f4.safetensors
#              (configs/tokenizer-f4.toml, then configs/tokenizer-f4-decoder.toml); with
#              RETRAIN_TOKENIZER=1 trained again on this data with those two configs
#   encode     the code cache of the first ENCODE_N training samples (resumable by shard):
#              backgrounds and targets at 64 px (16 x 16 codes), each reference cropped to
#              its subject at REF_SIZE px (default 32: 8 x 8 codes; `data encode --ref-size`)
#   warm       continue the run saved in assets/warm-start/builtin-f4/ (its newest checkpoint
#              with the optimiser state, run.json, config and logs) instead of starting from
#              scratch: copied into $RUN/gpt when that folder has no checkpoint yet, and the
#              next train stage resumes it with --force (the cache was encoded again, in
#              another folder, so its fingerprint differs; the change is recorded in
#              checkpoints/changes.jsonl). WARM=0 skips it.
#   train      the GPT (configs/tokenar-builtin-f4.toml), checkpoints every 100 steps,
#              resumed from the newest one
#   eval       the model on the three test splits, beside the tokenizer's round trip, as one
#              table per subject count and one per relation
#   pack       copy the exported model into assets/builtin/ (refused above 40 MB)
#
# Every stage appends what it ran (command, start, end, exit status, commit) to
# $RUN/record.log; finished stages leave $RUN/<stage>.done (delete it to run a stage again).
# Run folder: RUN (default runs/builtin-f4, ignored by git). Threads: RAYON_NUM_THREADS
# (default 2).
#
# GPU mode (GPU=1): for a machine with one CUDA GPU and 16 cores, aiming at about 10 minutes
# for data, encode, train, eval and pack. It builds with `--features cuda` (unless TOKENAR is
# given), trains with `train --gpu`, writes everything (record.log, gpt/export, eval tables,
# the packed bundle in builtin/) under OUT (required; it replaces RUN) and leaves assets/
# alone. Smaller defaults: 10,000 training samples, 4,096 encoded, 3,000 steps, 200 test
# samples per count; encoding and eval run on the CPU, eval in SHARDS (default 8) processes
# of 2 threads. Not run yet: the step time on the GPU and the encoding rate on 16 cores are
# guesses; read record.log's stage times after a first run and adjust STEPS / ENCODE_N.
#   GPU=1 OUT=/some/folder scripts/train-builtin-f4.sh
# The warm stage applies here too: the GPU then continues the saved run, so STEPS must lie
# beyond its checkpoint's step (WARM=0 trains from scratch).
# On a shared machine, run it in the background at low priority:
#   mkdir -p runs/builtin-f4 && cp target/release/tokenar runs/builtin-f4/tokenar
#   TOKENAR=runs/builtin-f4/tokenar nohup nice -n 19 scripts/train-builtin-f4.sh >> runs/builtin-f4/log.txt 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
# TOKENAR: the binary to run (default: build target/release/tokenar first). A copy of it
# outside target/ keeps a long run independent of later builds.
T=${TOKENAR:-target/release/tokenar}
GPU=${GPU:-0}
if [ "$GPU" = 1 ]; then
  [ -n "${OUT:-}" ] || { echo "GPU=1 needs OUT=<folder for the results>" >&2; exit 2; }
  RUN=$OUT
  N_TRAIN=${N_TRAIN:-10000}
  ENCODE_N=${ENCODE_N:-4096}
  STEPS=${STEPS:-3000}
  N_TEST=${N_TEST:-200}
  RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-16}
fi
SHARDS=${SHARDS:-8}
RUN=${RUN:-runs/builtin-f4}
CONFIG=${CONFIG:-configs/tokenar-builtin-f4.toml}
N_TRAIN=${N_TRAIN:-20000}
N_TEST=${N_TEST:-500}
CEIL_N=${CEIL_N:-200}
# Seeds: training data 0 (train stream); tests and validation on the test stream with a seed
# the project's tests do not use.
TEST_SEED=${TEST_SEED:-20261205}
VAL_SEED=${VAL_SEED:-31337}
STEPS=${STEPS:-}
# Training samples encoded (the first ENCODE_N of the split, every count in equal shares; `all`
# for every one). Encoding with 32 px references runs at about 35 samples/s on 2 idle cores
# (20,000 in about 10 minutes). Growing the cache later changes what a resumed run trains on,
# which `train --resume` refuses without --force.
ENCODE_N=${ENCODE_N:-all}
# Side of the references' subject crops (see the encode stage).
REF_SIZE=${REF_SIZE:-32}
# Sampling settings the model is evaluated and shipped with (generate's defaults for it).
SAMPLING=${SAMPLING:-assets/builtin/sampling.toml}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
mkdir -p "$RUN"
LOG=$RUN/record.log

# Run one command, recording it (with the time it took and its status) in the record.
record() {
  local t0 rc
  t0=$(date -u +%FT%TZ)
  echo "$t0 start [$(git rev-parse --short HEAD 2>/dev/null || echo no-git)] $*" >> "$LOG"
  set +e
  "$@"
  rc=$?
  set -e
  echo "$(date -u +%FT%TZ) end rc=$rc $*" >> "$LOG"
  return $rc
}

done_mark() { date -u +%FT%TZ > "$RUN/$1.done"; }
is_done() { [ -f "$RUN/$1.done" ]; }

stage_data() {
  record $T data synth --out "$RUN/data/train" --n "$N_TRAIN" --seed 0 --split train --size 64 --subjects mix
  record $T data synth --out "$RUN/data/val" --n 300 --seed "$VAL_SEED" --split test --size 64 --subjects mix
  for k in 1 2 3; do
    record $T data synth --out "$RUN/data/test$k" --n "$N_TEST" --seed "$TEST_SEED" --split test --size 64 --subjects "$k"
  done
}

# Round trip of real.png through tokenizer $2 for the first $3 samples of dataset $1 into $4.
roundtrip() {
  local ds=$1 weights=$2 n=$3 out=$4 i
  mkdir -p "$out"
  for ((i = 0; i < n; i++)); do
    [ -f "$out/sample_$i.png" ] || $T tokenizer roundtrip --weights "$weights" "$ds/sample_$i/real.png" "$out/sample_$i.png" > /dev/null
  done
}

METRICS=pixel,background,subject,edges,identity

stage_ceiling() {
  local k name w
  for k in 1 2 3; do
    # The first CEIL_N samples of the test split (samples depend only on seed and index).
    record $T data synth --out "$RUN/ceiling/test$k" --n "$CEIL_N" --seed "$TEST_SEED" --split test --size 64 \
      --subjects "$k" --no-contact
    for name in builtin8 f4; do
      case $name in
        builtin8) w=assets/builtin/tokenizer.safetensors ;;
        f4) w=assets/vq-small-f4.safetensors ;;
      esac
      record roundtrip "$RUN/ceiling/test$k" "$w" "$CEIL_N" "$RUN/ceiling/rt-$name-$k"
      record $T eval --pred "$RUN/ceiling/rt-$name-$k" --dataset "$RUN/ceiling/test$k" --metrics "$METRICS" \
        --name "$name round trip" --out "$RUN/ceiling/eval-$name-$k"
    done
    $T eval table "$RUN/ceiling/eval-builtin8-$k/results.json" "$RUN/ceiling/eval-f4-$k/results.json" \
      --columns psnr_subj,ssim_subj,f1,id_acc,id_shape,psnr_bg > "$RUN/ceiling/table-$k.md"
    { echo "## $k subject(s), first $CEIL_N test samples"; cat "$RUN/ceiling/table-$k.md"; } >> "$LOG"
  done
}

stage_tokenizer() {
  mkdir -p "$RUN/tokenizer"
  if [ "${RETRAIN_TOKENIZER:-0}" = 1 ]; then
    record $T tokenizer train --config configs/tokenizer-f4.toml --set data_dir="$RUN/data/train" \
      --set eval_dir="$RUN/data/val" --set out_dir="$RUN/tokenizer-enc" --set steps=6000 --set max_minutes=600
    record $T tokenizer train --config configs/tokenizer-f4-decoder.toml --set data_dir="$RUN/data/train" \
      --set eval_dir="$RUN/data/val" --set init="$RUN/tokenizer-enc/vq.safetensors" --set out_dir="$RUN/tokenizer"
  else
    [ -f "$RUN/tokenizer/vq.safetensors" ] || cp assets/vq-small-f4.safetensors "$RUN/tokenizer/vq.safetensors"
    echo "$(date -u +%FT%TZ) tokenizer: assets/vq-small-f4.safetensors ($(sha256sum assets/vq-small-f4.safetensors | cut -c1-16))" >> "$LOG"
  fi
}

stage_encode() {
  local n=()
  [ "$ENCODE_N" = all ] || n=(--max-samples "$ENCODE_N")
  record $T data encode "$RUN/data/train" --tokenizer "$RUN/tokenizer/vq.safetensors" --out "$RUN/cache/train" --max-refs 3 \
    --ref-size "$REF_SIZE" "${n[@]}"
}

WARM_SRC=assets/warm-start/builtin-f4
stage_warm() {
  if [ "${WARM:-1}" = 0 ] || [ ! -d "$WARM_SRC" ]; then
    echo "warm: not used (WARM=0 or no $WARM_SRC)"
    return
  fi
  if compgen -G "$RUN/gpt/checkpoints/ckpt-*.safetensors" > /dev/null; then
    echo "warm: $RUN/gpt already has checkpoints; left as they are"
    return
  fi
  mkdir -p "$RUN/gpt/checkpoints"
  cp "$WARM_SRC"/ckpt-*.safetensors "$WARM_SRC"/metrics.jsonl "$WARM_SRC"/probe.jsonl "$RUN/gpt/checkpoints/"
  cp "$WARM_SRC"/run.json "$WARM_SRC"/config.toml "$RUN/gpt/"
  touch "$RUN/gpt/warm-start"
  echo "$(date -u +%FT%TZ) warm: $RUN/gpt from $WARM_SRC ($(ls "$WARM_SRC" | grep ckpt-))" >> "$LOG"
}

stage_train() {
  local extra=()
  [ -n "$STEPS" ] && extra=(--set "steps=$STEPS")
  [ "$GPU" = 1 ] && extra+=(--gpu)
  # A warm start's first resume: the cache is this machine's encoding of the same data.
  [ -f "$RUN/gpt/warm-start" ] && extra+=(--force)
  record $T train --config "$CONFIG" --set cache="$RUN/cache/train" --set out="$RUN/gpt" \
    --set tokenizer="$RUN/tokenizer/vq.safetensors" "${extra[@]}" --resume
  rm -f "$RUN/gpt/warm-start"
}

# The model on one test split: one process, or (GPU mode) SHARDS processes of 2 threads merged.
eval_model() {
  local k=$1 out=$RUN/eval/model-$1 i
  if [ "$GPU" != 1 ]; then
    record $T eval --model "$RUN/gpt/export" --dataset "$RUN/data/test$k" --metrics "$METRICS" --name "model ($k)" --out "$out"
    return
  fi
  for ((i = 0; i < SHARDS; i++)); do
    RAYON_NUM_THREADS=2 record $T eval --model "$RUN/gpt/export" --dataset "$RUN/data/test$k" --metrics "$METRICS" \
      --name "model ($k)" --out "$out" --shard "$i/$SHARDS" &
  done
  wait
  record $T eval merge --out "$out" "$out"/results.shard-*-of-"$SHARDS".json
}

stage_eval() {
  local k
  # The model samples as it will ship: with the built-in model's sampling settings.
  cp "$SAMPLING" "$RUN/gpt/export/sampling.toml"
  for k in 1 2 3; do
    eval_model "$k"
    record roundtrip "$RUN/data/test$k" "$RUN/tokenizer/vq.safetensors" "$N_TEST" "$RUN/eval/rt-$k"
    record $T eval --pred "$RUN/eval/rt-$k" --dataset "$RUN/data/test$k" --metrics "$METRICS" \
      --name "tokenizer round trip ($k)" --out "$RUN/eval/ceiling-$k"
  done
  local all=()
  for k in 1 2 3; do all+=("$RUN/eval/model-$k/results.json" "$RUN/eval/ceiling-$k/results.json"); done
  $T eval table "${all[@]}" --by subjects --columns psnr_subj,ssim_subj,f1,id_acc,id_shape,psnr_bg \
    --out "$RUN/eval/by-subjects.md"
  $T eval table "$RUN/eval/model-2/results.json" "$RUN/eval/ceiling-2/results.json" "$RUN/eval/model-3/results.json" \
    --by relation --columns id_acc,id_shape,ssim_subj --out "$RUN/eval/by-relation.md"
  { echo "## eval"; cat "$RUN/eval/by-subjects.md" "$RUN/eval/by-relation.md"; } >> "$LOG"
}

stage_pack() {
  local ex=$RUN/gpt/export bytes
  bytes=$(cat "$ex/model.safetensors" "$ex/text.safetensors" "$RUN/tokenizer/vq.safetensors" | wc -c)
  if [ "$bytes" -gt $((40 * 1024 * 1024)) ]; then
    echo "pack: the bundle is $bytes bytes, more than the 40 MB the binary may hold" >&2
    return 1
  fi
  local dest=assets/builtin
  # GPU mode leaves the tree alone: the bundle goes to $OUT/builtin, to be copied by hand.
  [ "$GPU" = 1 ] && dest=$RUN/builtin
  mkdir -p "$dest"
  cp "$ex/model.safetensors" "$ex/text.safetensors" "$dest/"
  [ "$dest" = assets/builtin ] || cp "$SAMPLING" "$dest/sampling.toml"
  cp "$RUN/tokenizer/vq.safetensors" "$dest/tokenizer.safetensors"
  echo "$(date -u +%FT%TZ) pack: $bytes bytes into $dest (into assets/builtin, then rebuild, to compile them in)" >> "$LOG"
}

# Everything runs from main, which bash has read whole before it starts: editing this file
# while a run goes on does not change that run.
main() {
  local s stages=("$@")
  if [ ${#stages[@]} -eq 0 ]; then
    stages=(data ceiling tokenizer encode warm train eval pack)
    # GPU mode: the ceiling stage (600 CLI round trips) is left out; eval scores the round trip.
    [ "$GPU" = 1 ] && stages=(data tokenizer encode warm train eval pack)
  fi
  if [ -z "${TOKENAR:-}" ]; then
    if [ "$GPU" = 1 ]; then cargo build --release --features cuda; else cargo build --release; fi
  fi
  for s in "${stages[@]}"; do
    case $s in
      data | ceiling | tokenizer | encode | warm | train | eval | pack) ;;
      *) echo "unknown stage \`$s\` (data ceiling tokenizer encode warm train eval pack)" >&2; exit 2 ;;
    esac
    # train and eval always run (train resumes to STEPS; eval scores the newest export).
    if is_done "$s" && [ "$s" != train ] && [ "$s" != eval ]; then
      echo "stage $s: done ($(cat "$RUN/$s.done")); delete $RUN/$s.done to run it again"
      continue
    fi
    echo "stage $s"
    "stage_$s"
    done_mark "$s"
  done
}

main "$@"; exit
