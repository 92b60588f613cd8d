"""Warm mode: models kept loaded between calls, and ``asectl predict --watch`` run as a real process
(files appearing, a file still being written, SIGTERM, a restart)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asectl.backends import warm
from asectl.domain.synth import generate
from asectl.errors import ConfigError
from asectl.stages import watch

from .calibrated_bundle import calibrated_bundle


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_gguf):
    return calibrated_bundle(tmp_path_factory, tiny_gguf)


@pytest.fixture(scope="module")
def new_cards(tmp_path_factory):
    """Seven cards the model has never seen."""
    out = tmp_path_factory.mktemp("new") / "cards"
    generate(out, seed=99, counts="2,1,1,1,2")
    return sorted((out / "images").glob("*.png"))


# ---------------------------------------------------------------------------------------------------
# Pieces, no model


def test_done_names_cuts_a_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"image": "a.png", "label": "normal"}\n{"image": "b.png", "label": "ty')
    assert watch.done_names(out) == {"a.png"}
    assert out.read_text() == '{"image": "a.png", "label": "normal"}\n'
    out.write_text("not json\n")
    with pytest.raises(ConfigError, match="line 1 is not a prediction record"):
        watch.done_names(out)
    assert watch.done_names(tmp_path / "absent.jsonl") == set()


def test_a_file_is_ready_when_unchanged_for_two_polls_and_decodable(tmp_path, new_cards, monkeypatch):
    data = new_cards[0].read_bytes()
    folder = tmp_path / "in"
    folder.mkdir()
    w = watch.FolderWatch(folder, done={"old.png"})
    (folder / "old.png").write_bytes(data)  # already classified
    (folder / ".card.png.tmp").write_bytes(data)  # a writer's temporary name
    (folder / "notes.txt").write_text("x")
    (folder / "half.png").write_bytes(data[: len(data) // 2])
    (folder / "whole.png").write_bytes(data)
    assert w.poll() == ([], [])  # first sight: not yet known to be stable
    assert w.poll() == ([folder / "whole.png"], [])  # half.png is stable but does not decode
    with open(folder / "half.png", "ab") as f:  # the writer finishes
        f.write(data[len(data) // 2 :])
    w.done.add("whole.png")
    assert w.poll() == ([], [])  # changed since the last poll
    assert w.poll() == ([folder / "half.png"], [])
    # A file that stays undecodable becomes one error record, then is left alone.
    monkeypatch.setattr(watch, "UNREADABLE_AFTER", 0.0)
    w.done.add("half.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    w.poll()
    ready, broken = w.poll()
    assert ready == [] and [b["image"] for b in broken] == ["broken.png"] and "broken.png" in broken[0]["error"]
    assert w.poll() == ([], [])


def test_watch_usage_errors(tmp_path):
    from click.testing import CliRunner

    from asectl.cli import cli

    for args, says in (
        (["--watch", str(tmp_path)], "needs --out"),
        (["--watch", str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "x.png"], "takes no image"),
        ([], "give card images"),
        (["x.png", "--poll", "1"], "--poll applies to --watch only"),
        (["x.png", "--workers", "2"], "--workers applies to --watch only"),
    ):
        res = CliRunner().invoke(cli, ["predict", *args])
        assert res.exit_code == 2 and says in res.output, res.output


def test_kept_backends_stay_loaded_until_the_block_ends(tiny_gguf):
    from asectl.backends.llm import default_workers, make_llm

    outside = make_llm("llama-cpp", tiny_gguf)
    with warm.keep_loaded():
        assert default_workers(None, 0) == 1  # stages run in this process
        llm = make_llm("llama-cpp", tiny_gguf)
        llm.load()
        llm.close()  # a stage's end: stays loaded
        assert llm._llm is not None and make_llm("llama-cpp", tiny_gguf) is llm and llm is not outside
    assert llm._llm is None  # the block's end frees it


def test_a_warm_predictor_loads_each_model_once(trained, new_cards):
    from asectl.bundle import load_bundle
    from asectl.cache import Cache
    from asectl.domain.dataset import load_inputs
    from asectl.stages.predict import Predictor

    with warm.keep_loaded():
        predictor = Predictor(load_bundle(trained["bundle"]), Cache(trained["cache"]))
        first = predictor.run(load_inputs([str(new_cards[0])])).records
        llms = [b for b in warm.kept_backends() if hasattr(b, "hash")]
        encoders = predictor.encoders()
        second = predictor.run(load_inputs([str(p) for p in new_cards[1:3]])).records
        assert [b for b in warm.kept_backends() if hasattr(b, "hash")] == llms and len(llms) == 1
        assert llms[0]._llm is not None and predictor.encoders() is encoders
    assert [r["image"] for r in first + second] == [p.name for p in new_cards[:3]]
    assert all(r["decision"] in ("pass", "defect", "defective", "review") for r in first + second)


# ---------------------------------------------------------------------------------------------------
# The command, as a process


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []


def _names(out: Path) -> set[str]:
    """Cards with a complete line in ``out`` (a torn last line, as a killed run leaves, is not one)."""
    text = out.read_text() if out.exists() else ""
    return {json.loads(x)["image"] for x in text[: text.rfind("\n") + 1].splitlines()}


def _wait_for(predicate, proc, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the watcher exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _start(trained, inbox: Path, out: Path, log: Path, workers: int = 2, **env: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "asectl",
        "--cache-dir",
        str(trained["cache"]),
        "predict",
        "--watch",
        str(inbox),
        "--out",
        str(out),
        "--model",
        str(trained["bundle"]),
        "--poll",
        "0.1",
        "--workers",
        str(workers),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env={**os.environ, **env})


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()


def _sigterm_and_resume(
    trained, new_cards, tmp_path, workers: int, final_wait: float, restart_env: dict[str, str]
) -> list[dict]:
    """a.png classified by an earlier run (whose next line was cut), b.png, c.png half written, then d-f;
    SIGTERM while they are classified, a restart (with ``restart_env``) that gets g.png too. Checks the
    first run's lines and that every card is written once; returns the final lines."""
    a, b, c, d, e, f, g = new_cards
    inbox, out, log = tmp_path / "inbox", tmp_path / "out.jsonl", tmp_path / "watch.log"
    inbox.mkdir()
    # A previous run classified a.png and was killed while writing the next line.
    previous = {"image": a.name, "label": "normal", "decision": "pass", "from": "previous run"}
    out.write_text(json.dumps(previous) + "\n" + '{"image": "' + b.name + '", "lab')
    shutil.copy(a, inbox)
    shutil.copy(b, inbox)
    c_bytes = c.read_bytes()
    (inbox / c.name).write_bytes(c_bytes[: len(c_bytes) // 2])  # still being written

    proc = _start(trained, inbox, out, log, workers=workers)
    try:
        _wait_for(lambda: b.name in _names(out), proc, 240, "b.png's line")
        time.sleep(1.0)  # ten more polls: the half-written file stays out
        assert c.name not in _names(out)
        with open(inbox / c.name, "ab") as fh:
            fh.write(c_bytes[len(c_bytes) // 2 :])
        _wait_for(lambda: c.name in _names(out), proc, 120, "c.png's line")
        for p in (d, e, f):
            shutil.copy(p, inbox)
        time.sleep(0.3)  # SIGTERM lands while they are being classified
    finally:
        code = _stop(proc)
    assert code == 0, log.read_text()
    first_run = _lines(out)  # every line complete JSON (or _lines raises)
    names = [r["image"] for r in first_run]
    assert len(names) == len(set(names)) and names[:3] == [a.name, b.name, c.name]
    assert first_run[0] == previous  # skipped, not classified again
    stderr = log.read_text()
    assert "stopped by SIGTERM" in stderr
    assert f"{len(first_run) - 1} card(s) classified this run" in stderr  # every result it made is written

    proc = _start(trained, inbox, out, log, workers=workers, **restart_env)
    try:
        _wait_for(lambda: "watching" in log.read_text(), proc, 240, "the restarted watcher")
        shutil.copy(g, inbox)
        _wait_for(lambda: {d.name, e.name, f.name, g.name} <= _names(out), proc, final_wait, "d, e, f, g")
        time.sleep(0.5)
    finally:
        code = _stop(proc)
    assert code == 0, log.read_text()
    final = _lines(out)
    assert sorted(r["image"] for r in final) == sorted(p.name for p in new_cards)  # each card once
    assert final[: len(first_run)] == first_run
    return final


def test_watch_in_one_process_survives_sigterm_and_resumes(trained, new_cards, tmp_path):
    """The default watcher (`--workers 0`, everything in one process): every card is written exactly once
    across a SIGTERM and a restart."""
    final = _sigterm_and_resume(trained, new_cards, tmp_path, workers=0, final_wait=120, restart_env={})
    for r in final[1:]:
        assert (
            r["decision"] in ("pass", "defect", "defective", "review")
            and abs(sum(r["probabilities"].values()) - 1) < 1e-4
        )


# Slow: it takes 3 to 4.5 minutes on 2 shared cores, and in one of three clean-clone runs the watcher with two
# workers did not exit within 120 s of SIGTERM (not reproduced in three later runs; the default is --workers 0
# until the cause is found; docs/predict.md).
@pytest.mark.slow
def test_watch_classifies_appearing_files_survives_sigterm_and_resumes(trained, new_cards, tmp_path):
    """Two worker processes read, describe and reason about the next cards while the watcher fuses: every
    card is written exactly once across a SIGTERM and a restart, in the order the cards became ready; a
    card that kills its worker each time (the test hook) is one error line after bounded retries."""
    from asectl.workers import CRASH_TEST_ENV

    g = new_cards[-1]
    final = _sigterm_and_resume(
        trained, new_cards, tmp_path, workers=2, final_wait=240, restart_env={CRASH_TEST_ENV: g.name}
    )
    poison = next(r for r in final if r["image"] == g.name)
    assert (
        set(poison) == {"image", "error"}
        and "a watch worker process died each time it ran this alone" in poison["error"]
    )
    for r in final[1:]:
        if r is poison:
            continue
        assert (
            r["decision"] in ("pass", "defect", "defective", "review")
            and abs(sum(r["probabilities"].values()) - 1) < 1e-4
        )
