"""Shared bits of the benchmark scripts: fixed datasets, machine description, docs/benchmarks.md sections."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "results"
BENCH_MD = ROOT / "docs" / "benchmarks.md"
START_LOAD = os.getloadavg()[0]      # when the script started (the scripts import this module first)
# The per-image stage settings every quality benchmark uses: CnOCR, the built-in describer, the default
# reasoning (SmolLM2-135M).
SETTINGS = {"ocr": {"engine": "cnocr"}, "describe": {"vlm": "builtin"}, "reason": {}}


def dataset(seed: int = 0, counts: str | None = None, difficulty: str = "field") -> Path:
    """The default generated dataset for a seed, made once and reused (generation is deterministic) while
    the generator's parameters stay those recorded in its synth.json."""
    from asectl.synth import field_parameters, generate

    name = f"ds-{difficulty}-seed{seed}" + (f"-{counts.replace(',', '-')}" if counts else "")
    path = OUT / name
    meta = json.loads((path / "synth.json").read_text()) if (path / "synth.json").is_file() else {}
    current = json.loads(json.dumps(field_parameters())) if difficulty == "field" else None
    if not (path / "labels.csv").exists() or meta.get("difficulty") != difficulty or meta.get("field") != current:
        generate(path, seed=seed, counts=counts, force=True, difficulty=difficulty)
    return path


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}, "
            f"torch {torch.__version__}, load average at start {START_LOAD:.2f}")


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def measured_line() -> str:
    return f"_Measured {time.strftime('%Y-%m-%d')} with `{command()}` on {machine()}._"


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def update_section(name: str, markdown: str, header: str | None = None) -> None:
    """Replace the block between <!-- bench:NAME --> markers in docs/benchmarks.md (append if absent).
    ``header``: the "Measured ..." line of a run rendered again from its saved results (default: this run)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{header or measured_line()}\n\n{markdown.strip()}\n{end}"
    text = BENCH_MD.read_text() if BENCH_MD.exists() else "# Benchmarks\n"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCH_MD.write_text(text)
