"""Worker processes (ocr, reason): they end with a parent killed by SIGKILL instead of idling forever."""

import os
import signal
import subprocess
import sys
import time

PARENT = """
import os, sys, time
from asectl.workers import process_pool
if __name__ == "__main__":
    pool = process_pool(2, time.sleep, (0,))
    print(*sorted({pool.submit(os.getpid).result() for _ in range(8)}), flush=True)
    time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper counts as gone
        return f.read().split(") ", 1)[1][0] != "Z"


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in parent.stdout.readline().split()]
    assert workers and all(_alive(p) for p in workers)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers)


def test_a_worker_that_dies_is_one_config_error_naming_the_fix():
    import pytest

    from asectl.errors import ConfigError
    from asectl.workers import WorkerPool

    pool = WorkerPool(1, time.sleep, (0,), name="an OCR worker", fix="rerun with fewer workers")
    try:
        assert pool.run(abs, [(-2,), (3,)]) == [2, 3]
        with pytest.raises(ConfigError, match="an OCR worker process died.*rerun with fewer workers"):
            pool.run(os._exit, [(3,)])  # as a worker killed for memory
    finally:
        pool.close()


def test_workers_that_cannot_start_are_one_error_not_a_retry_per_job():
    """An initializer that fails kills every worker before it answers: the pool says so at once (one start
    checked) instead of retrying each job alone and blaming each one (``crashed``) for the deaths."""
    import pytest

    from asectl.errors import ConfigError
    from asectl.workers import WorkerPool

    blamed = []
    pool = WorkerPool(2, os.chdir, ("/no/such/folder",), name="an OCR worker", fix="rerun with --workers 1")
    try:
        with pytest.raises(ConfigError, match="an OCR worker process could not start.*--workers 1"):
            pool.run(abs, [(-1,), (2,), (-3,)], crashed=lambda job, why: blamed.append(job))
    finally:
        pool.close()
    assert blamed == []


UNGUARDED = """
from asectl.workers import WorkerPool
pool = WorkerPool(2, abs, (0,), name="an OCR worker", fix="see docs")
print(pool.run(abs, [(-1,), (-2,)], crashed=lambda job, why: "lost"))
"""


def test_a_script_without_a_main_guard_gets_the_fix_not_lost_cards(tmp_path):
    """Spawned workers import the calling script again; without `if __name__ == "__main__":` each one dies
    starting a pool of its own. The script stops with one line naming the fix; no job is reported lost."""
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "lost" not in res.stdout
    # The error is the script's last traceback line; under load multiprocessing's resource tracker may
    # print a warning about the unclosed pool's semaphore after it.
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("asectl.errors.ConfigError")]
    assert len(errors) == 1 and 'if __name__ == "__main__":' in errors[0]


def test_a_batch_returns_a_bad_cards_error_in_its_place(tmp_path):
    """run_per_image: a DataError a batch returns becomes that card's error record (not cached, no
    timing); the other cards of the batch keep their results and are cached."""
    from asectl.cache import Cache
    from asectl.domain.dataset import Sample
    from asectl.errors import DataError
    from asectl.stages.common import run_per_image

    paths = []
    for name in ("a", "bad", "c"):
        p = tmp_path / f"{name}.png"
        p.write_bytes(name.encode())
        paths.append(p)
    samples = [Sample(p, p.name) for p in paths]
    calls = []

    def batch(chunk):
        calls.append([s.name for s in chunk])
        return [DataError(f"{s.path}: unreadable") if "bad" in s.name else {"n": len(s.name)} for s in chunk]

    def one(s):  # a lone miss is computed on its own
        assert "bad" in s.name, "a batch that returns per-card errors is not retried card by card"
        raise DataError(f"{s.path}: unreadable")

    cache = Cache(tmp_path / "cache")
    recs = run_per_image("t", samples, {}, one, cache, batch=batch, batch_size=4)
    assert calls == [["a.png", "bad.png", "c.png"]]
    assert recs[1] == {"image": "bad.png", "error": f"{paths[1]}: unreadable"}
    assert [r["n"] for r in (recs[0], recs[2])] == [5, 5] and all("seconds" in r for r in (recs[0], recs[2]))
    again = run_per_image("t", samples, {}, one, cache, batch=batch, batch_size=4)
    assert len(calls) == 1 and again == recs  # the good cards were cached, the bad one was not


def _read_logged(name: str, log: str) -> str:
    """A worker's job: note the attempt, then the test hook (kills this worker for the poison card)."""
    from asectl.workers import crash_test_hook

    with open(log, "a") as f:
        f.write(name + "\n")
    crash_test_hook(name)
    return name.upper()


def test_a_poison_job_fails_alone_after_bounded_retries(tmp_path, monkeypatch):
    """A job whose worker process really dies (SIGKILL, the test hook) every time: the other jobs, including
    those in flight when it died, get their results; it is run alone 1 + CRASH_RETRIES times, then its
    result is ``crashed``'s; the pool works on afterwards."""
    from asectl.workers import CRASH_RETRIES, CRASH_TEST_ENV, WorkerPool

    monkeypatch.setenv(CRASH_TEST_ENV, "poison.png")
    log = tmp_path / "attempts.log"
    names = ["a.png", "b.png", "poison.png", "c.png", "d.png", "e.png"]
    pool = WorkerPool(2, time.sleep, (0,), name="an OCR worker", fix="rerun")
    try:
        results = pool.run(_read_logged, [(n, str(log)) for n in names], crashed=lambda job, why: f"{job[0]}: {why}")
        assert results[:2] + results[3:] == [n.upper() for n in names if n != "poison.png"]
        assert results[2] == (
            f"poison.png: an OCR worker process died each time it ran this alone "
            f"({CRASH_RETRIES + 1} times: out of memory, or a crash in native code)"
        )
        assert log.read_text().split().count("poison.png") == 1 + 1 + CRASH_RETRIES  # in the batch, then alone
        assert pool.run(_read_logged, [("f.png", str(log))]) == ["F.PNG"]
    finally:
        pool.close()


def hold_exit() -> None:
    """A worker initializer that leaves a thread which never ends and is not a daemon: the worker then hangs
    in its exit, as one does when a library leaves such a thread (or a destructor that waits) behind."""
    import threading

    threading.Thread(target=threading.Event().wait, daemon=False).start()


def test_a_worker_that_hangs_at_exit_is_killed_when_its_pool_closes():
    """Closing a pool returns within its exit timeout even when a worker never exits by itself (a stopping
    watcher must exit); every result was delivered before."""
    from asectl.workers import WorkerPool

    pool = WorkerPool(1, hold_exit, (), name="a watch worker", fix="rerun with fewer --workers", exit_timeout=2)
    try:
        assert pool.run(abs, [(-2,)]) == [2]
        pid = pool.run(os.getpid, [()])[0]
    finally:
        t0 = time.monotonic()
        pool.close()
        waited = time.monotonic() - t0
    assert 2 <= waited < 20  # it waited out the timeout: the worker did not exit on its own
    assert not _alive(pid)
