#!/usr/bin/env bash
# End to end on the built-in toy data: pretrain -> extract -> probe (vs random init) -> export.
#   bash examples/pipeline.sh [PRESET] [STEPS]      e.g. bash examples/pipeline.sh tiny/m2d 300
set -euo pipefail
PRESET=${1:-tiny/byol-a}
STEPS=${2:-300}
WORK=${WORK:-sslaudio-example}
NAME=${PRESET//\//_}

python - "$WORK/data" <<'PY'
import sys
from sslaudio.synth import make_dataset
print(make_dataset(sys.argv[1]))
PY
sslaudio pretrain "$WORK/data/audio/train" "$WORK/data/unlabeled" --preset "$PRESET" --steps "$STEPS" \
  --out "$WORK/runs/$NAME" --quiet
sslaudio extract "$WORK/runs/$NAME" "$WORK/data/audio" --out "$WORK/feats/$NAME" --frames
sslaudio probe "$WORK/runs/$NAME" "$WORK/data/labels.csv" --json "$WORK/probe-$NAME.json"
sslaudio probe "random:$PRESET" "$WORK/data/labels.csv" --json "$WORK/probe-random-$NAME.json"
sslaudio export "$WORK/runs/$NAME" --format torchscript --out "$WORK/$NAME.pt"
# the loss curve, straight from log.jsonl
python -c "import json,sys; [print(r['step'], round(r['loss'], 4)) for r in map(json.loads, open(sys.argv[1]))]" \
  "$WORK/runs/$NAME/log.jsonl" | tail -5
