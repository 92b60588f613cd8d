"""Killed runs, concurrent runs and unsafe inputs, through real `asectl` processes.

Each killed-run case starts a stage, kills it with SIGKILL at a seeded random moment, checks that no
cache entry is partial or corrupt, reruns it and compares the results with an uninterrupted run. One seed
per stage runs by default for `describe`; `pytest -m slow` adds the ocr and reason cases, more seeds, killed
synth/training/predict/report and two processes on one cache (bench/reliability.py runs the full count)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asectl.cache import Cache, CorruptEntry

from .tiny_gguf import write_tiny_llama

VOLATILE = {"seconds", "timing", "created"}


def asectl(cache: Path, *args, wait=True, **kw):
    cmd = [sys.executable, "-m", "asectl", "--cache-dir", str(cache), "-q", *map(str, args)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kw)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, **kw)


def check_cache(cache: Path) -> int:
    """Every entry present verifies (complete files, matching checksums); returns how many there are."""
    c = Cache(cache)
    n = 0
    for stage in c.stages():
        for entry in c.iter_entries(stage):
            try:
                c._verify(entry)
            except CorruptEntry as exc:  # pragma: no cover - the failure this test exists to catch
                raise AssertionError(f"corrupt entry after kill: {entry}: {exc}") from exc
            n += 1
    return n


def records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if k not in VOLATILE})
    return out


def kill_at_random(cache: Path, args, seed: int, lo=1.0, hi=8.0) -> float:
    delay = random.Random(seed).uniform(lo, hi)
    p = asectl(cache, *args, wait=False)
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
    return delay


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from asectl.domain.synth import generate

    root = tmp_path_factory.mktemp("rel")
    generate(root / "data", seed=5, counts="4,3,3,3,3")
    write_tiny_llama(root / "tiny.gguf")
    return root


STAGES = {
    "ocr": lambda d: ["ocr", d / "data"],
    "describe": lambda d: ["describe", d / "data"],
    "reason": lambda d: ["reason", d / "data", "--llm-model", d / "tiny.gguf", "--max-tokens", "32"],
}


def _killed_run_matches(data, tmp_path, stage, seed):
    args = STAGES[stage](data)
    ref_cache, cache = tmp_path / "ref", tmp_path / "killed"
    ref = asectl(ref_cache, *args, "--out", tmp_path / "ref.jsonl")
    assert ref.returncode == 0, ref.stderr
    kill_at_random(cache, args, seed)
    check_cache(cache)
    again = asectl(cache, *args, "--out", tmp_path / "again.jsonl")
    assert again.returncode == 0, again.stderr
    assert records(tmp_path / "again.jsonl") == records(tmp_path / "ref.jsonl")
    assert check_cache(cache) >= len(records(tmp_path / "ref.jsonl"))


# The describe case runs by default (seconds); ocr and reason repeat the same check on slower stages.
@pytest.mark.parametrize(
    "stage", [pytest.param("ocr", marks=pytest.mark.slow), "describe", pytest.param("reason", marks=pytest.mark.slow)]
)
def test_killed_stage_resumes_to_the_same_result(data, tmp_path, stage):
    _killed_run_matches(data, tmp_path, stage, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("stage", list(STAGES))
def test_killed_stage_resumes_more_seeds(data, tmp_path, stage, seed):
    _killed_run_matches(data, tmp_path, stage, seed)


@pytest.mark.slow
def test_killed_synth_leaves_no_half_dataset(tmp_path):
    out = tmp_path / "ds"
    kill_at_random(tmp_path / "c", ["synth", "--out", out, "--counts", "40,20,10,10,10"], seed=0, lo=1.5, hi=3.0)
    assert not out.exists() or (out / "labels.csv").is_file()
    res = asectl(tmp_path / "c", "synth", "--out", out, "--counts", "40,20,10,10,10", "--force")
    assert res.returncode == 0, res.stderr
    ref = tmp_path / "ref"
    asectl(tmp_path / "c", "synth", "--out", ref, "--counts", "40,20,10,10,10")
    assert (out / "truth.jsonl").read_bytes() == (ref / "truth.jsonl").read_bytes()


@pytest.mark.slow
def test_killed_training_predict_and_report_resume_to_the_same_results(data, tmp_path):
    cache = tmp_path / "cache"
    fast = ["--set", "pfa.epochs_per_stage=2", "--set", "fusion.epochs=4"]
    prep = [STAGES["reason"](data), STAGES["describe"](data)]
    for args in prep:
        assert asectl(cache, *args).returncode == 0
    kill_at_random(cache, ["fuse-train", data / "data", *fast], seed=0, lo=3.0, hi=10.0)
    check_cache(cache)
    res = asectl(cache, "fuse-train", data / "data", "--json", *fast)
    assert res.returncode == 0, res.stderr
    model = json.loads(res.stdout.splitlines()[-1])["model"]
    ref_cache = tmp_path / "ref"
    for args in prep:
        asectl(ref_cache, *args)
    ref = asectl(ref_cache, "fuse-train", data / "data", "--json", *fast)
    assert json.loads(ref.stdout.splitlines()[-1])["model"] == model
    for k in range(5):
        a = Cache(cache).get("model", model).file(f"fusion-{k}.safetensors").read_bytes()
        b = Cache(ref_cache).get("model", model).file(f"fusion-{k}.safetensors").read_bytes()
        assert a == b, k

    # predict and report, killed and rerun, give what an uninterrupted run gives.
    card = data / "data" / "images" / "0001.png"
    assert asectl(ref_cache, "predict", card, "--out", tmp_path / "ref-pred.jsonl").returncode == 0
    assert asectl(ref_cache, "report", data / "data", "--out", tmp_path / "ref-report").returncode == 0
    kill_at_random(cache, ["predict", card, "--out", tmp_path / "pred.jsonl"], seed=1, lo=1.0, hi=4.0)
    kill_at_random(cache, ["report", data / "data", "--out", tmp_path / "report"], seed=2, lo=2.0, hi=8.0)
    check_cache(cache)
    assert asectl(cache, "predict", card, "--out", tmp_path / "pred.jsonl").returncode == 0
    assert asectl(cache, "report", data / "data", "--out", tmp_path / "report").returncode == 0
    assert records(tmp_path / "pred.jsonl") == records(tmp_path / "ref-pred.jsonl")
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "report", tmp_path / "ref-report")]
    assert metrics[0]["multiclass"] == metrics[1]["multiclass"]


@pytest.mark.slow
def test_two_processes_on_one_cache(data, tmp_path):
    cache = tmp_path / "cache"
    procs = [asectl(cache, "ocr", data / "data", "--out", tmp_path / f"out{i}.jsonl", wait=False) for i in range(2)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    assert records(tmp_path / "out0.jsonl") == records(tmp_path / "out1.jsonl")
    assert check_cache(cache) == len(records(tmp_path / "out0.jsonl"))
    assert not any((cache / "tmp").iterdir())


def test_catastrophic_card_spec_pattern_is_bounded(tmp_path, data):
    spec = tmp_path / "evil.toml"
    spec.write_text("[fields.N]\npattern = '(N|NN|N=|=)+(?P<value>X)'\ntype = \"int\"\n")
    card = data / "data" / "images" / "0000.png"
    t0 = time.perf_counter()
    # rapidocr: the same spec matching, without cnocr's torch import in the new process
    res = asectl(tmp_path / "c", "ocr", card, "--spec", spec, "--engine", "rapidocr", "--json")
    assert time.perf_counter() - t0 < 120
    assert res.returncode == 1  # nothing matched: an error record, not a hang
    assert "Traceback" not in res.stderr


def test_pickled_weights_are_refused(tmp_path):
    """A .pth whose unpickling would run code is refused (torch.load with weights_only=True)."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    bad = tmp_path / "resnet50.pth"
    bad.write_bytes(pickle.dumps({"fc.weight": Evil()}))
    from asectl.backends.encoders import image_encoder
    from asectl.errors import ConfigError

    with pytest.raises(ConfigError, match="not a readable weights file"):
        _ = image_encoder("resnet50", weights=str(bad)).module  # the property loads the weights
    assert not (tmp_path / "pwned").exists()
