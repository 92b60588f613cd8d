"""Every test runs against a private cache folder, never the user's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# Epochs of the trained fixtures' align (PFA and the cards-cnn image encoder) and fuse-train: a few, to keep
# the default run fast; the tests check where models come from and go, not how good they are.
FAST = ["--set", "pfa.epochs_per_stage=3", "--set", "fusion.epochs=8", "--set", "encoders.image_epochs=4"]

# Tests must never reach a model hub; every model they use is local or built in the test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    cache_dir = tmp_path_factory.mktemp("asectl-cache")
    monkeypatch.setenv("ASECTL_CACHE_DIR", str(cache_dir))
    return cache_dir


@pytest.fixture(autouse=True)
def _isolated_user_config(tmp_path_factory, monkeypatch):
    """No test reads the user's config file (asectl/settings.py): the user config folder is a fresh one."""
    folder = tmp_path_factory.mktemp("asectl-config-home")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(folder))
    monkeypatch.delenv("ASECTL_CONFIG", raising=False)
    return folder / "asectl" / "config.toml"


@pytest.fixture
def cache(_isolated_cache):
    from asectl.cache import Cache

    return Cache(_isolated_cache)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """10 generated cards (2 per class), seed 0: shared read-only by tests that only read it."""
    from asectl.domain.synth import generate

    out = tmp_path_factory.mktemp("ds") / "small"
    generate(out, seed=0, counts="2,2,2,2,2")
    return out


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only add contention."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cli_invoker(cache):
    """``invoke(*args, code=0)``: one quiet asectl command on ``cache`` in-process, its exit code checked."""
    from click.testing import CliRunner

    from asectl.cli import cli

    def invoke(*args, code=0):
        res = CliRunner().invoke(cli, ["--cache-dir", str(cache), "-q", *map(str, args)])
        assert res.exit_code == code, res.output
        return res

    return invoke


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A tiny random llama GGUF (tests/tiny_gguf.py), shared by every module."""
    from .tiny_gguf import write_tiny_llama

    # One file for the run: a model built once (calibrated_bundle) records this path.
    return built_once(tmp_path_factory, "gguf", lambda root: write_tiny_llama(root / "tiny.gguf")) / "tiny.gguf"


@pytest.fixture(scope="session")
def tiny_instructblip(tmp_path_factory):
    """A tiny random InstructBLIP folder (asectl/testing.py), shared by every module."""
    import torch

    from asectl.testing import build_tiny_instructblip

    torch.set_num_threads(1)
    return build_tiny_instructblip(tmp_path_factory.mktemp("vlm") / "tiny-instructblip")


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder ``name``, made by ``build(folder)`` once per test run and then only read. Under
    pytest-xdist the workers share the run's base temp folder: the first to ask builds, the others wait on
    the lock (an expensive fixture, such as the OCR of the shared cards, is not paid once per worker)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root = base / name
    with FileLock(str(base / f"{name}.lock")):
        if not (root / ".built").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            build(root)
            (root / ".built").touch()
    return root


def read_cards(tmp_path_factory, gguf: Path):
    """(data, cache): 24 generated cards (seed 11: 8 normal, 4 per defect class) and a cache holding their
    OCR records, descriptions and answers of the tiny GGUF ``gguf``. Made once per test run (``built_once``):
    every fixture that trains a model starts from a copy (``copy_read_cards``), where its own reason and
    describe are cache hits."""
    from asectl.domain.synth import generate

    def build(root):
        generate(root / "data", seed=11, counts="8,4,4,4,4")
        invoke = cli_invoker(root / "cache")
        invoke("ocr", root / "data", "--workers", "1")  # in this process: its tests import the engine anyway
        invoke("reason", root / "data", "--llm-model", gguf, "--max-tokens", "32")
        invoke("describe", root / "data")

    root = built_once(tmp_path_factory, "read-cards", build)
    return root / "data", root / "cache"


def copy_read_cards(tmp_path_factory, root, gguf: Path):
    """(data, cache) under ``root``: copies of ``read_cards``' cards and cache, this fixture's own."""
    data, cache = read_cards(tmp_path_factory, gguf)
    shutil.copytree(data, root / "data")
    shutil.copytree(cache, root / "cache")
    return root / "data", root / "cache"


def reasoned_dataset(tmp_path_factory, root, tiny_gguf):
    """(data, cache, invoke): the 24 cards of ``read_cards`` under ``root`` through reason (the tiny GGUF)
    and describe, in a cache of their own; what the fixtures that train a model start from."""
    data, cache = copy_read_cards(tmp_path_factory, root, tiny_gguf)
    invoke = cli_invoker(cache)
    invoke("reason", data, "--llm-model", tiny_gguf, "--max-tokens", "32")
    invoke("describe", data)
    return data, cache, invoke


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_gguf):
    """A small dataset through reason (a tiny GGUF), describe, align and fuse-train, through the CLI;
    shared by every module that needs a trained model (tests change only what they restore)."""
    root = tmp_path_factory.mktemp("learn")
    data, cache, invoke = reasoned_dataset(tmp_path_factory, root, tiny_gguf)
    align = invoke("align", data, "--stride", "0.2", "--json", *FAST)
    fuse = invoke("fuse-train", data, "--out", root / "bundle", "--json", *FAST)
    return {
        "root": root,
        "data": data,
        "cache": cache,
        "invoke": invoke,
        "align": json.loads(align.stdout.splitlines()[-1]),
        "fuse": json.loads(fuse.stdout.splitlines()[-1]),
    }


def make_default_latest(trained) -> None:
    """The shared fixture's alignment and model are the dataset's latest again (cache hits). Tests in other
    modules train other ones and leave them latest, and pytest-xdist runs the modules in any order, so a
    test that relies on the latest ones calls this first."""
    trained["invoke"]("align", trained["data"], "--stride", "0.2", *FAST)
    trained["invoke"]("fuse-train", trained["data"], *FAST)


@pytest.fixture
def asectl_log(caplog):
    """caplog on the "asectl" logger itself: a CLI run in this process stops it propagating to the root."""
    import logging

    log = logging.getLogger("asectl")
    log.addHandler(caplog.handler)
    level = log.level
    log.setLevel(logging.INFO)
    yield caplog
    log.removeHandler(caplog.handler)
    log.setLevel(level)
