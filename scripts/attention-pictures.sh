#!/usr/bin/env bash
# The README's attention pictures: for one two-subject and one three-subject test sample, the
# share of each generated cell's attention that each reference, the background, the text and
# the instruct tokens receive, per layer (`tokenar attention`, built-in model by default).
#
#   scripts/attention-pictures.sh          # after scripts/train-builtin-f4.sh data
#
# Writes $DOCS/attention-2.png and $DOCS/attention-3.png (DOCS: docs by default), and each
# run's attention.json and per-cell pictures in $RUN/attention-<k>/. MODEL=<bundle folder>
# draws another model's (the three-subject picture needs a model of three references).
set -euo pipefail
cd "$(dirname "$0")/.."
T=${TOKENAR:-target/release/tokenar}
RUN=${RUN:-runs/builtin-f4}
# Which test sample of each split (the first by default).
SAMPLE=${SAMPLE:-0}
# Bundle folder (default: the built-in model).
WEIGHTS=(); [ -n "${MODEL:-}" ] && WEIGHTS=(--weights "$MODEL")
DOCS=${DOCS:-docs}
for k in 2 3; do
  s=$RUN/data/test$k/sample_$SAMPLE
  refs=()
  for ((i = 0; i < k; i++)); do refs+=(--ref "$s/ref/$i.png"); done
  prompt=$(sed -n 's/^ *"prompt": "\(.*\)",$/\1/p' "$s/meta.json")
  $T attention "${WEIGHTS[@]}" "${refs[@]}" --background "$s/background.png" --mask "$s/mask.png" \
    --prompt "$prompt" --out "$RUN/attention-$k" --panel 96
  cp "$RUN/attention-$k/shares.png" "$DOCS/attention-$k.png"
  echo "$DOCS/attention-$k.png: \"$prompt\""
done
