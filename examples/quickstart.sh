#!/usr/bin/env bash
# The main job on embedded defaults: generate the 455-card ASE-like dataset, run every stage, write the
# report, and classify one new card. Stages find each other's results in the cache, so a second run is
# served from it in seconds.
#   bash examples/quickstart.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
ASECTL=${ASECTL:-$([ -x .venv/bin/asectl ] && echo .venv/bin/asectl || echo asectl)}
OUT=${1:-out/quickstart}
DATA="$OUT/data"
NEW="$OUT/new-card"

# Deterministic: the same seed gives byte-identical cards, so reruns hit the cache.
[ -f "$DATA/labels.csv" ] || $ASECTL synth --out "$DATA" --seed 0
[ -f "$NEW/labels.csv" ] || $ASECTL synth --out "$NEW" --seed 1000 --counts 1,0,1,0,0 --test-size 1

$ASECTL ocr "$DATA" --out "$OUT/ocr.jsonl"
$ASECTL describe "$DATA" --out "$OUT/describe.jsonl"
$ASECTL reason "$DATA" --out "$OUT/reason.jsonl"
$ASECTL align "$DATA" --stride 0.2
$ASECTL fuse-train "$DATA"
$ASECTL report "$DATA" --out "$OUT/report"
$ASECTL predict "$NEW/images/0000.png"
