"""One small trained and calibrated model for the tests of calibration, predict decisions and watch mode:
the 24 cards of conftest.read_cards, real OCR, the built-in describer, a tiny random llama GGUF and the real frozen
encoders, few epochs. Built once per test session (kept under pytest's base temp folder) and shared."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .conftest import FAST, cli_invoker, copy_read_cards


def train(invoke, dataset: Path, gguf: Path, *extra: str) -> dict:
    """reason, describe, align and fuse-train on ``dataset``; fuse-train's --json summary."""
    invoke("reason", dataset, "--llm-model", gguf, "--max-tokens", "32")
    invoke("describe", dataset)
    invoke("align", dataset, "--stride", "0.5", *FAST)
    return json.loads(invoke("fuse-train", dataset, "--json", *FAST, *extra).stdout.splitlines()[-1])


def calibrated_bundle(tmp_path_factory, gguf: Path) -> dict:
    root = tmp_path_factory.getbasetemp() / "calibrated-bundle"
    cache, data, bundle = root / "cache", root / "data", root / "bundle"
    invoke = cli_invoker(cache)
    summary = root / "fuse-train.json"
    if not summary.exists():
        shutil.rmtree(root, ignore_errors=True)
        copy_read_cards(tmp_path_factory, root)
        fuse = train(invoke, data, gguf, "--out", bundle)
        summary.write_text(json.dumps(fuse))
    return {
        "root": root,
        "cache": cache,
        "data": data,
        "bundle": bundle,
        "gguf": gguf,
        "invoke": invoke,
        "fuse": json.loads(summary.read_text()),
        "config": json.loads((bundle / "bundle.json").read_text()),
    }
