"""Shared bits of the benchmark scripts: fixed datasets, machine description, saved results,
docs/benchmarks.md sections.

The scripts are ordinary clients of the installed ``asectl`` package (public names only) and import this
module as a sibling: run them as ``python bench/NAME.py`` from the repository root."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import string
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
# Committed: each run's summary, what docs/benchmarks.md quotes and enough to render its section again.
RESULTS = ROOT / "bench" / "results"
# Not committed (bench/out is ignored): a run's per-card output, for diagnosis and for scoring other rules.
RAW = OUT / "results"
SUMMARY_LIMIT = 200_000  # bytes per summary file (tests/test_layout.py checks the committed ones)
# Per-card label lists (true and predicted class of each test card) are kept in a summary, since the
# intervals and paired tests are computed from them, but packed: one character per card.
PACKED_KEYS = ("y_true", "y_pred")
CODES = string.digits + string.ascii_lowercase
BENCH_MD = ROOT / "docs" / "benchmarks.md"
START_LOAD = os.getloadavg()[0]  # when the script started (the scripts import this module first)
# The per-image stage settings every quality benchmark uses: CnOCR, the built-in describer, the default
# reasoning (SmolLM2-135M).
SETTINGS = {"ocr": {"engine": "cnocr"}, "describe": {"vlm": "builtin"}, "reason": {}}


def dataset(seed: int = 0, counts: str | None = None, difficulty: str = "field") -> Path:
    """The default generated dataset for a seed, made once and reused (generation is deterministic) while
    the generator's parameters stay those recorded in its synth.json."""
    from asectl.domain.synth import field_parameters, generate

    name = f"ds-{difficulty}-seed{seed}" + (f"-{counts.replace(',', '-')}" if counts else "")
    path = OUT / name
    meta = json.loads((path / "synth.json").read_text()) if (path / "synth.json").is_file() else {}
    current = json.loads(json.dumps(field_parameters())) if difficulty == "field" else None
    if not (path / "labels.csv").exists() or meta.get("difficulty") != difficulty or meta.get("field") != current:
        generate(path, seed=seed, counts=counts, force=True, difficulty=difficulty)
    return path


def train_quick(ds, cache, seed: int, overrides: dict | None = None, augmented: Path | None = None):
    """``run_fuse_train`` with the quick profile, training seed ``seed`` and exactly ``overrides`` (profile
    keys) over the benchmark's per-image settings: the alignment runs first with the alignment keys among
    them alone, so nothing an earlier run left in the dataset's alignment pointer carries over (fuse-train
    trains on the alignment a dataset last ran, with its overrides, as `asectl fuse-train` does).
    ``augmented``: a TDA copy of ``ds`` to train on (`asectl align --augmented`)."""
    from asectl.stages.align import run_align
    from asectl.stages.fuse import run_fuse_train

    over = dict(overrides or {})
    align_over = {k: v for k, v in over.items() if k.startswith(("pfa.", "encoders."))}
    run_align(ds, cache, profile="quick", seed=seed, overrides=align_over, settings=SETTINGS, augmented=augmented)
    return run_fuse_train(ds, cache, profile="quick", seed=seed, overrides=over, augmented=augmented)


def machine() -> str:
    import torch

    from asectl.environment import cpu_name

    cpu = cpu_name()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}, "
        f"torch {torch.__version__}, load average at start {START_LOAD:.2f}"
    )


def command() -> str:
    """This run's command line, a cache folder shown as ``C`` (a machine's paths stay out of the docs)."""
    args = list(sys.argv[1:])
    for i, a in enumerate(args):
        if a == "--cache-dir" and i + 1 < len(args):
            args[i + 1] = "C"
        elif a.startswith("--cache-dir="):
            args[i] = "--cache-dir=C"
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *args])


def measured_line() -> str:
    return f"_Measured {time.strftime('%Y-%m-%d')} with `{command()}` on {machine()}._"


def save(name: str, data: dict, raw: dict | None = None) -> Path:
    """Write the summary ``bench/results/NAME.json`` (lists under PACKED_KEYS packed) and, given ``raw``,
    the run's per-card output ``bench/out/results/NAME.json``. A summary is indented unless that takes it
    over SUMMARY_LIMIT (then it is written compact). A summary still over SUMMARY_LIMIT is
    written (a long run is not lost) but reported: move its per-card parts into ``raw``."""
    if raw is not None:
        RAW.mkdir(parents=True, exist_ok=True)
        (RAW / f"{name}.json").write_text(json.dumps(raw, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    packed = pack_labels(data)
    text = json.dumps(packed, indent=1)
    if len(text.encode()) > SUMMARY_LIMIT:  # the indentation alone may be what puts it over
        text = json.dumps(packed, separators=(",", ":"))
    path.write_text(text)
    if path.stat().st_size > SUMMARY_LIMIT:
        print(
            f"warning: {path} is {path.stat().st_size / 1000:.0f} KB, over the {SUMMARY_LIMIT // 1000} KB "
            "a committed summary may take; save its per-card parts with save(..., raw=...)",
            file=sys.stderr,
        )
    return path


def publish(name: str, rec: dict, started: float, render, docs: bool = True, raw: dict | None = None) -> None:
    """Finish a run: ``rec`` gains its run time (from ``started``, a perf_counter) and the measured line, is
    saved as bench/results/NAME.json (``raw``, the per-card output, as bench/out/results/NAME.json), and
    ``render(rec)`` replaces the docs section named NAME with dashes."""
    import time

    rec["seconds"] = round(time.perf_counter() - started, 1)
    rec["measured"] = measured_line()
    save(name, rec, raw)
    if docs:
        update_section(name.replace("_", "-"), render(rec))


def load(name: str) -> dict:
    """A saved summary, label lists unpacked (as the run that saved it held them)."""
    return unpack_labels(json.loads((RESULTS / f"{name}.json").read_text()))


def load_raw(name: str) -> dict:
    """A run's per-card output (``save(..., raw=...)``); only on the machine that ran it."""
    path = RAW / f"{name}.json"
    if not path.is_file():
        raise SystemExit(
            f"{path} is missing: it is written by the run that saves '{name}' (per-card output is "
            "not committed); run that benchmark here first"
        )
    return json.loads(path.read_text())


def pack_labels(data):
    """``data`` with every list of strings under a PACKED_KEYS key stored as ``{"labels": [...], "codes":
    "0210..."}`` (one character per entry: the index of its label)."""
    if isinstance(data, dict):
        return {k: _packed(v) if k in PACKED_KEYS and _packable(v) else pack_labels(v) for k, v in data.items()}
    if isinstance(data, list):
        return [pack_labels(v) for v in data]
    return data


def unpack_labels(data):
    """The inverse of ``pack_labels``."""
    if isinstance(data, dict):
        if set(data) == {"labels", "codes"} and isinstance(data["codes"], str):
            return [data["labels"][CODES.index(code)] for code in data["codes"]]
        return {k: unpack_labels(v) for k, v in data.items()}
    if isinstance(data, list):
        return [unpack_labels(v) for v in data]
    return data


def _packable(values) -> bool:
    return isinstance(values, list) and all(isinstance(v, str) for v in values) and len(set(values)) <= len(CODES)


def _packed(values: list[str]) -> dict:
    labels = sorted(set(values))
    index = {label: i for i, label in enumerate(labels)}
    return {"labels": labels, "codes": "".join(CODES[index[v]] for v in values)}


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
