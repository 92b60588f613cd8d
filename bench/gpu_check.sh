#!/usr/bin/env bash
# One prepared check of the CUDA paths, meant to finish in under 5 minutes on a GPU machine:
#   bash bench/gpu_check.sh [INSTRUCTBLIP_DIR] [LLM.gguf]
# - installs the project if it is missing (same command as README),
# - runs `describe --vlm instructblip --device cuda` in half precision on 16 generated cards (real
#   weights when INSTRUCTBLIP_DIR is given, else the tiny random model the tests build),
# - runs `reason --n-gpu-layers -1` on 8 cards (SmolLM2 by default, or LLM.gguf),
# - prints images/s and tokens/s. Set LLAMA_CUDA=1 to rebuild llama-cpp-python with CUDA first
#   (several minutes); without it llama.cpp runs on the CPU and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/asectl ]; then
  python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]"
fi
if [ "${LLAMA_CUDA:-0}" = "1" ]; then
  CMAKE_ARGS="-DGGML_CUDA=on" .venv/bin/pip install -q --force-reinstall --no-deps --no-cache-dir llama-cpp-python
fi
PY=.venv/bin/python
WORK=$(mktemp -d)
export ASECTL_CACHE_DIR="$WORK/cache"
$PY - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import llama_cpp
print("llama-cpp-python", llama_cpp.__version__, "GPU offload:", llama_cpp.llama_supports_gpu_offload())
PYEOF
.venv/bin/asectl synth --out "$WORK/data" --counts 4,3,3,3,3 --test-size 5
VLM_DIR=${1:-}
if [ -z "$VLM_DIR" ]; then
  VLM_DIR="$WORK/tiny-instructblip"
  $PY -c "from asectl.testing import build_tiny_instructblip as b; b('$VLM_DIR')"
fi
t0=$(date +%s.%N)
.venv/bin/asectl -q describe "$WORK/data" --vlm instructblip --vlm-model "$VLM_DIR" --device cuda \
  --batch-size 8 --out "$WORK/describe.jsonl"
t1=$(date +%s.%N)
$PY -c "import json; r=[json.loads(l) for l in open('$WORK/describe.jsonl')]; print('describe: %d cards, dtype %s, %.2f images/s' % (len(r), r[0]['model'].get('dtype', '?'), len(r)/($t1-$t0)))"
LLM=${2:-}
.venv/bin/asectl -q reason "$WORK/data" ${LLM:+--llm-model "$LLM"} --n-gpu-layers -1 --out "$WORK/reason.jsonl"
$PY - "$WORK/reason.jsonl" <<'PYEOF'
import json, sys
r = [json.loads(l) for l in open(sys.argv[1])]
gen = sum(x["tokens"]["completion"] for x in r); sec = sum(x["seconds"] for x in r)
print("reason: %d cards, %.2f s/card, %.1f generated tok/s" % (len(r), sec / len(r), gen / sec))
PYEOF
rm -rf "$WORK"
