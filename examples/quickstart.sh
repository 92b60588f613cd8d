#!/usr/bin/env bash
# The main job on embedded defaults: generate the 455-card ASE-like dataset, then run every stage.
# Stages find each other's results in the cache, so a second run is served from it in seconds.
#   bash examples/quickstart.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
ASECTL=${ASECTL:-$([ -x .venv/bin/asectl ] && echo .venv/bin/asectl || echo asectl)}
OUT=${1:-out/quickstart}
DATA="$OUT/data"

# Deterministic: the same seed gives byte-identical cards, so reruns hit the cache.
if [ ! -f "$DATA/labels.csv" ]; then
  $ASECTL synth --out "$DATA" --seed 0
fi
$ASECTL ocr "$DATA" --out "$OUT/ocr.jsonl"
