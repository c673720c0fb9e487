#!/usr/bin/env bash
# Checks of the CUDA build on a machine with one NVIDIA GPU, in order, each under its own time
# limit (about 11 minutes in all at the most), results under $OUT (default runs/gpu-check):
#
#   1. bench-xl     tokenar bench --preset XL --grid 16 --gpu --dtype bf16 (256 px, prefill,
#                   decode, one whole image without ITD), with --torch when bench/torch_gpt.py
#                   can run on CUDA (--device) and torch sees the GPU
#   2. generate     the demo scene with the built-in model on the GPU (64 px), and the same on the
#                   CPU for comparison
#   3. image-256    one whole 256 px image of TokenAR-XL (random weights) on the GPU, bf16
#   4. nccl-1       two training steps of the built-in config on the GPU through NCCL, one rank
#                   (WORLD_SIZE=1), in f32 and with autocast = "bf16", against the same steps on
#                   the CPU (loss of each step)
#   5. nccl-2       the same with two ranks on the one GPU (NCCL may refuse two ranks per GPU:
#                   the log says so)
#
# The binary: $TOKENAR, else target-cuda/release/tokenar or target/release/tokenar (built with
# `--features nccl`, e.g. on another machine with scripts/cuda-toolchain.sh), or
# target-cuda/release/tokenar.xz, else it is built here (needs nvcc and the crates). The CUDA libraries are looked for on LD_LIBRARY_PATH,
# in $CUDA_LIBS, /usr/local/cuda/lib64 and the pip `nvidia` packages of python3 (torch's).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu-check}
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }

# --- the binary ---------------------------------------------------------------------------
T=${TOKENAR:-}
if [ -z "$T" ]; then
    for c in target-cuda/release/tokenar target/release/tokenar; do
        # Only a CUDA build (linked to the driver library).
        if [ -x "$c" ] && ldd "$c" 2>/dev/null | grep -q 'libcuda\.so'; then T=$c; break; fi
    done
fi
# A binary built elsewhere may travel compressed (xz -T0 -6 -k target-cuda/release/tokenar).
if [ -z "$T" ] && [ -f target-cuda/release/tokenar.xz ]; then
    T=${TMPDIR:-/tmp}/tokenar-gpu-check
    xz -dc target-cuda/release/tokenar.xz >"$T" 2>/dev/null \
        || python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" target-cuda/release/tokenar.xz "$T"
    chmod +x "$T"
fi
if [ -z "$T" ]; then
    say "building: cargo build --release --features cuda,nccl"
    CARGO_TARGET_DIR=target-cuda timeout 900 cargo build --release --features cuda,nccl >"$out/build.log" 2>&1 \
        || { say "FAIL build (see $out/build.log)"; exit 1; }
    T=target-cuda/release/tokenar
fi
say "binary: $T"

# --- the CUDA libraries ---------------------------------------------------------------------
libdirs=()
[ -n "${CUDA_LIBS:-}" ] && libdirs+=("$CUDA_LIBS")
[ -d /usr/local/cuda/lib64 ] && libdirs+=(/usr/local/cuda/lib64)
if command -v python3 >/dev/null; then
    while IFS= read -r d; do libdirs+=("$d"); done < <(python3 - <<'EOF' 2>/dev/null
import glob, os, importlib.util
spec = importlib.util.find_spec("nvidia")
for root in (spec.submodule_search_locations if spec else []):
    for d in sorted(glob.glob(os.path.join(root, "*", "lib")) + glob.glob(os.path.join(root, "cu1*", "lib"))):
        print(d)
EOF
)
fi
for d in "${libdirs[@]}"; do LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; done
export LD_LIBRARY_PATH
missing=()
for lib in libcuda.so.1 libcublas.so libcublasLt.so libcurand.so libnvrtc.so libnccl.so.2; do
    found=""
    IFS=: read -ra dirs <<<"$LD_LIBRARY_PATH"
    for d in "${dirs[@]}"; do
        if compgen -G "$d/$lib*" >/dev/null; then found="$d"; break; fi
    done
    [ -z "$found" ] && ldconfig -p 2>/dev/null | grep -q "$lib" && found="(ldconfig)"
    if [ -n "$found" ]; then say "library $lib: $found"; else say "library $lib: MISSING"; missing+=("$lib"); fi
done
[ ${#missing[@]} -gt 0 ] && say "missing libraries: ${missing[*]} (pip: nvidia-cublas nvidia-curand nvidia-cuda-nvrtc nvidia-nccl-cu13; then CUDA_LIBS=DIR)"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 && say "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"

# step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, one summary line.
step() {
    local name=$1 limit=$2
    shift 2
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    if [ $rc -eq 0 ]; then
        say "ok   $name (${secs} s)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        say "TIME $name: stopped after ${limit} s (see $out/$name.log)"
    else
        say "FAIL $name: exit $rc after ${secs} s: $(grep -m1 -i 'error' "$out/$name.log" | cut -c1-300)"
    fi
    return $rc
}

# 1. GPT-XL benchmark at 256 px (grid 16), bf16.
torch=()
if grep -q -- "--device" bench/torch_gpt.py 2>/dev/null && python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    torch=(--torch)
else
    say "note: no --torch comparison (bench/torch_gpt.py runs on the CPU only, or torch has no CUDA)"
fi
step bench-xl 240 "$T" bench --preset XL --grid 16 --gpu --dtype bf16 --train-batch 0 --itd off --decode 64 \
    --repeat 3 --json "$out/bench-xl.json" "${torch[@]}"

# 2. The demo scene with the built-in model, on the GPU and on the CPU.
demo=(--ref tests/fixtures/demo/ref0.png --ref tests/fixtures/demo/ref1.png --background tests/fixtures/demo/background.png
    --mask tests/fixtures/demo/mask.png --prompt "a heart above a square" --seed 0)
step generate-gpu 60 "$T" generate "${demo[@]}" --gpu --out "$out/demo-gpu.png"
step generate-cpu 60 "$T" generate "${demo[@]}" --out "$out/demo-cpu.png"

# 3. One 256 px image of TokenAR-XL (random weights), bf16: the whole-image time of the bench.
step image-256 150 "$T" bench --preset tokenar-xl --grid 16 --gpu --dtype bf16 --train-batch 0 --itd off \
    --decode 16 --repeat 1 --json "$out/image-256.json"

# 4-5. NCCL training steps on a small synthetic cache (built-in config, built-in tokenizer).
data="$out/data"
if [ ! -f "$data/cache/index.json" ]; then
    step data-synth 60 "$T" data synth --out "$data/synth" --n 64 --seed 0 --split train --size 64 --subjects 2
    step data-encode 120 "$T" data encode "$data/synth" --tokenizer assets/builtin/tokenizer.safetensors --out "$data/cache"
fi
train=(train --config configs/tokenar-builtin.toml --force --set "cache=$data/cache" --set tokenizer=assets/builtin/tokenizer.safetensors
    --set steps=2 --set batch=8 --set log_every=1 --set ckpt_every=0 --set grid_samples=0 --set model.dropout=0.0
    --collective-timeout 60)
losses() { grep -o '"loss":[^,]*' "$1/checkpoints/metrics.jsonl" 2>/dev/null | cut -d: -f2 | tr '\n' ' '; }
step train-cpu 120 "$T" "${train[@]}" --set "out=$out/train-cpu"
step nccl-1 120 env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 "$T" "${train[@]}" --gpu --set "out=$out/train-nccl1"
step nccl-1-bf16 120 env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 "$T" "${train[@]}" --gpu --set 'autocast="bf16"' --set "out=$out/train-nccl1-bf16"
say "losses cpu:         $(losses "$out/train-cpu")"
say "losses nccl-1:      $(losses "$out/train-nccl1")"
say "losses nccl-1 bf16: $(losses "$out/train-nccl1-bf16")"
# Two ranks of batch 4 on the same GPU (the global batch of 8 above).
port=$((29500 + RANDOM % 1000))
two() {
    local pids=() rc=0
    for r in 0 1; do
        env RANK=$r WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
            "$T" "${train[@]}" --gpu --set batch=4 --set "out=$out/train-nccl2" >"$out/nccl-2.rank$r.log" 2>&1 &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    cat "$out/nccl-2.rank0.log" "$out/nccl-2.rank1.log"
    return $rc
}
step nccl-2 120 bash -c "$(declare -f two); T='$T'; out='$out'; port=$port; train=($(printf '%q ' "${train[@]}")); two"
say "losses nccl-2:      $(losses "$out/train-nccl2")"
say "results in $out"
