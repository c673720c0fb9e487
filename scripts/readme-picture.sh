#!/usr/bin/env bash
# The README's picture: for the first test samples, the references, the background, the mask
# and what the built-in model generated (the last column), as a contact sheet.
# Needs the predictions of `tokenar eval --model builtin ... --out runs/eval/builtin`.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${TOKENAR:-target/release/tokenar}
TEST=${TEST:-data/synth64/test}
PRED=${PRED:-runs/eval/builtin/pred}
N=${N:-6}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp "$TEST/dataset.json" "$tmp/" 2>/dev/null || true
for i in $(seq 0 $((N - 1))); do
  cp -r "$TEST/sample_$i" "$tmp/"
  cp "$PRED/sample_$i.png" "$tmp/sample_$i/real.png"
done
$T data sheet "$tmp" --rows "$N" --out docs/builtin-samples.png
echo "wrote docs/builtin-samples.png"
