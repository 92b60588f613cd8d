"""One small trained and calibrated model for the tests of calibration, predict decisions and watch mode:
24 generated cards, real OCR, the built-in describer, a tiny random llama GGUF and the real frozen
encoders, few epochs. Built once per test session (kept under pytest's base temp folder) and shared."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

FAST = ["--set", "pfa.epochs_per_stage=3", "--set", "fusion.epochs=8"]


def cli_runner(cache: Path):
    """``invoke(*args, code=0)``: the CLI in this process on ``cache``, asserting the exit code."""
    from asectl.cli import cli

    def invoke(*args, code: int = 0):
        res = CliRunner().invoke(cli, ["--cache-dir", str(cache), "-q", *map(str, args)])
        assert res.exit_code == code, res.output
        return res

    return invoke


def train(invoke, dataset: Path, gguf: Path, *extra: str) -> dict:
    """reason, describe, align and fuse-train on ``dataset``; fuse-train's --json summary."""
    invoke("reason", dataset, "--llm-model", gguf, "--max-tokens", "32")
    invoke("describe", dataset)
    invoke("align", dataset, "--stride", "0.5", *FAST)
    return json.loads(invoke("fuse-train", dataset, "--json", *FAST, *extra).stdout.splitlines()[-1])


def calibrated_bundle(tmp_path_factory, gguf: Path) -> dict:
    from asectl.domain.synth import generate

    root = tmp_path_factory.getbasetemp() / "calibrated-bundle"
    cache, data, bundle = root / "cache", root / "data", root / "bundle"
    invoke = cli_runner(cache)
    summary = root / "fuse-train.json"
    if not summary.exists():
        generate(data, seed=11, counts="8,4,4,4,4", force=True)
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
