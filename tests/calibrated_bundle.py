"""One small trained and calibrated model for the tests of calibration, predict decisions and watch mode:
the 24 cards of conftest.read_cards, real OCR, the built-in describer, a tiny random llama GGUF and the real frozen
encoders, few epochs. Built once per test run and shared."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import FAST, built_once, cli_invoker, copy_read_cards


def train(invoke, dataset: Path, gguf: Path, *extra: str) -> dict:
    """reason, describe, align and fuse-train on ``dataset``; fuse-train's --json summary."""
    invoke("reason", dataset, "--llm-model", gguf, "--max-tokens", "32")
    invoke("describe", dataset)
    invoke("align", dataset, "--stride", "0.5", *FAST)
    return json.loads(invoke("fuse-train", dataset, "--json", *FAST, *extra).stdout.splitlines()[-1])


def calibrated_bundle(tmp_path_factory, gguf: Path) -> dict:
    """Built once per test run (``built_once``) and shared by the workers: its users name the bundle with
    ``--model`` and train other models only on copies of its cards or under other settings."""

    def build(root: Path) -> None:
        copy_read_cards(tmp_path_factory, root, gguf)
        fuse = train(cli_invoker(root / "cache"), root / "data", gguf, "--out", root / "bundle")
        (root / "fuse-train.json").write_text(json.dumps(fuse))

    root = built_once(tmp_path_factory, "calibrated-bundle", build)
    cache, data, bundle = root / "cache", root / "data", root / "bundle"
    return {
        "root": root,
        "cache": cache,
        "data": data,
        "bundle": bundle,
        "gguf": gguf,
        "invoke": cli_invoker(cache),
        "fuse": json.loads((root / "fuse-train.json").read_text()),
        "config": json.loads((bundle / "bundle.json").read_text()),
    }
