"""The Ray executor (docs/scale.md): records identical to the local executor's, a killed worker retried with
nothing lost, a killed driver losing nothing, the shared-cache check, the missing-extra message, and where
the executor settings come from. The cluster tests start a local Ray instance with 2 CPUs (module scope)
and are slow (Ray's start-up and engine loads: 2 to 3.5 minutes on 2 shared cores); they skip without Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from asectl.cli import cli
from asectl.errors import ConfigError
from asectl.executors import ExecutorSettings, check_same

VOLATILE = {"seconds", "timing"}  # measured durations: the only fields a recomputation may change


def canonical(records: list[dict]) -> list[str]:
    """Records as the bytes they are stored and exported as, without measured durations."""
    return [json.dumps({k: v for k, v in r.items() if k not in VOLATILE}, sort_keys=True, default=str) for r in records]


def entries(cache_root: Path, stage: str) -> dict[str, Path]:
    base = cache_root / "entries" / stage
    return {p.name: p for p in base.glob("*/*") if p.is_dir()} if base.exists() else {}


def stored(cache_root: Path, stage: str) -> dict[str, str]:
    """Each entry's record (without durations) and metadata (without its creation time and checksums)."""
    out = {}
    for key, path in entries(cache_root, stage).items():
        record = json.loads((path / "record.json").read_bytes())
        meta = {k: v for k, v in json.loads((path / "meta.json").read_bytes()).items() if k not in ("created", "files")}
        out[key] = canonical([record])[0] + json.dumps(meta, sort_keys=True)
    return out


# --- without a cluster -------------------------------------------------------------------------------
def test_missing_ray_is_one_line_naming_the_extra(small_dataset, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed: `import ray` fails
    res = CliRunner().invoke(cli, ["ocr", str(small_dataset), "--executor", "ray"])
    assert res.exit_code == 2, res.output
    assert 'pip install -e ".[ray]"' in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_executors_are_found_by_name_and_ray_is_imported_only_for_ray():
    from asectl.registry import EXECUTORS

    assert EXECUTORS.names() == ["local", "ray"]
    probe = (
        "import sys, asectl.executors as e; s = e.ExecutorSettings.from_sources(kind='local'); "
        "print(e.make_executor(s).kind, 'asectl.ray_executor' in sys.modules, 'ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["local", "False", "False"]


def test_executor_settings_come_from_options_then_env_then_config(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('[executor]\nkind = "ray"\nworkers = 8\nbatch_size = 16\n')
    monkeypatch.setenv("ASECTL_CONFIG", str(config))
    for var in (
        "ASECTL_EXECUTOR",
        "ASECTL_RAY_ADDRESS",
        "ASECTL_RAY_WORKERS",
        "ASECTL_RAY_BATCH_SIZE",
        "ASECTL_NUM_GPUS_PER_WORKER",
    ):
        monkeypatch.delenv(var, raising=False)
    assert ExecutorSettings.from_sources() == ExecutorSettings("ray", None, 8, 16, 0.0)
    monkeypatch.setenv("ASECTL_RAY_WORKERS", "3")
    monkeypatch.setenv("ASECTL_RAY_ADDRESS", "10.0.0.1:6379")
    assert ExecutorSettings.from_sources(batch_size=2) == ExecutorSettings("ray", "10.0.0.1:6379", 3, 2, 0.0)
    # A local run ignores Ray settings from the environment and the file, but not from the command line.
    assert ExecutorSettings.from_sources(kind="local") == ExecutorSettings()
    with pytest.raises(ConfigError, match="--ray-workers apply to the Ray executor"):
        ExecutorSettings.from_sources(kind="local", workers=2)
    monkeypatch.delenv("ASECTL_RAY_WORKERS")
    config.write_text('[executor]\nkind = "ray"\nworkers = "8"\n')
    with pytest.raises(ConfigError, match=r"--ray-workers '8': must be a whole.*config.toml \[executor\] workers"):
        ExecutorSettings.from_sources()
    config.write_text('[executor]\nkind = "ray"\nworker = 8\n')
    with pytest.raises(ConfigError, match=r"config.toml: unknown key\(s\) worker in \[executor\]"):
        ExecutorSettings.from_sources()
    monkeypatch.setenv("ASECTL_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="nope.toml: no such config file"):
        ExecutorSettings.from_sources()
    config.write_text("")
    monkeypatch.setenv("ASECTL_CONFIG", str(config))
    monkeypatch.setenv("ASECTL_EXECUTOR", "cluster")
    with pytest.raises(
        ConfigError,
        match=r"executor 'cluster': choose one of local, ray \(settings from "
        r"ASECTL_EXECUTOR",
    ):
        ExecutorSettings.from_sources()


def test_a_worker_with_another_model_stops_the_run_naming_what_differs():
    check_same("the OCR engine cnocr", {"engine": "cnocr", "model": "a"}, {"engine": "cnocr", "model": "a"})
    with pytest.raises(ConfigError, match=r"the OCR engine cnocr on node .* \(differs in model\); install the same"):
        check_same("the OCR engine cnocr", {"engine": "cnocr", "model": "b"}, {"engine": "cnocr", "model": "a"})


# --- on a local Ray instance -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_home(tmp_path_factory):
    """A Ray instance with 2 CPUs. Its workers start in the working folder the driver had at ray.init,
    here a private one (the unshared-cache test relies on it)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    home = tmp_path_factory.mktemp("ray-home")
    before = os.getcwd()
    os.chdir(home)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    finally:
        os.chdir(before)
    yield home
    ray.shutdown()


def ray_executor(**settings):
    from asectl.executors import make_executor

    return make_executor(ExecutorSettings(kind="ray", **settings))


@pytest.fixture(scope="module")
def local_ocr(small_dataset, tmp_path_factory):
    """OCR of the small dataset on the local executor: (records, cache folder)."""
    from asectl.cache import Cache
    from asectl.domain.dataset import load_dataset
    from asectl.stages.ocr import run_ocr

    root = tmp_path_factory.mktemp("local-ocr")
    return run_ocr(load_dataset(small_dataset), cache=Cache(root), workers=1).records, root


@pytest.mark.slow
def test_ocr_on_ray_stores_the_local_records_under_the_same_keys(ray_home, small_dataset, local_ocr, tmp_path):
    from asectl.cache import Cache
    from asectl.domain.dataset import load_dataset
    from asectl.stages.ocr import run_ocr

    local_records, local_root = local_ocr
    ds = load_dataset(small_dataset)
    cache = Cache(tmp_path / "ray")
    result = run_ocr(ds, cache=cache, executor=ray_executor())
    ok = [r for r in local_records if not r.get("error")]
    assert canonical(result.records) == canonical(local_records) and len(ok) >= 8
    assert cache.summary("ocr") == f"0 from cache, {len(ok)} computed"
    assert stored(tmp_path / "ray", "ocr") == stored(local_root, "ocr")  # same keys, records and metadata
    # Each executor hits the other's cache and returns exactly what is stored there.
    again = Cache(tmp_path / "ray")
    hits = run_ocr(ds, cache=again, workers=1).records
    assert again.summary("ocr") == f"{len(ok)} from cache, 0 computed"
    assert canonical([r for r in hits if not r.get("error")]) == canonical(ok)
    theirs = Cache(local_root)
    from_local = run_ocr(ds, cache=theirs, executor=ray_executor())
    assert theirs.summary("ocr") == f"{len(ok)} from cache, 0 computed"
    assert canonical(from_local.records) == canonical(local_records)


@pytest.mark.slow
def test_builtin_describe_on_ray_equals_local(ray_home, small_dataset, tmp_path):
    from asectl.cache import Cache
    from asectl.domain.dataset import load_dataset
    from asectl.stages.describe import run_describe

    ds = load_dataset(small_dataset)
    local = run_describe(ds, vlm="builtin", cache=Cache(tmp_path / "local"))
    on_ray = run_describe(ds, vlm="builtin", cache=Cache(tmp_path / "ray"), executor=ray_executor(batch_size=3))
    assert canonical(on_ray.records) == canonical(local.records) and not on_ray.errors
    assert all("measurements" in r for r in on_ray.records)
    assert stored(tmp_path / "ray", "describe") == stored(tmp_path / "local", "describe")


@pytest.mark.slow
def test_reason_on_ray_equals_local_with_shared_answers(ray_home, small_dataset, tiny_gguf, tmp_path):
    """The answers are generated on the cluster, each distinct prompt once; the card records are then made
    in card order, so which cards share an answer is the same as on the local executor."""
    from asectl.cache import Cache
    from asectl.domain.dataset import load_dataset
    from asectl.domain.synth import read_truth
    from asectl.stages.reason import run_reason

    ds = load_dataset(small_dataset)
    truth = {name: row["printed"] for name, row in read_truth(small_dataset).items()}
    tiny = {"llm_model": tiny_gguf, "fields": truth, "n_ctx": 8192, "max_tokens": 1200}
    local = run_reason(ds, cache=Cache(tmp_path / "local"), workers=1, **tiny)
    on_ray = run_reason(ds, cache=Cache(tmp_path / "ray"), executor=ray_executor(), **tiny)
    assert canonical(on_ray.records) == canonical(local.records) and not on_ray.errors
    assert on_ray.params["answers_generated"] == local.params["answers_generated"]
    for stage in ("reason", "reason-answer"):
        assert stored(tmp_path / "ray", stage) == stored(tmp_path / "local", stage)


@pytest.mark.slow
def test_a_prompt_the_llm_cannot_answer_on_ray_is_that_cards_error(ray_home, small_dataset, tiny_gguf, tmp_path):
    """As on the local executor (tests/test_reason.py): a real llama.cpp condition, a context window that holds
    one card's prompt and answer but not another's longer prompt. On the cluster the long card gets the same
    error record, the other card the answer a wide window gives, and the run completes; the error is not
    cached."""
    from asectl.cache import Cache
    from asectl.domain.dataset import Dataset, load_dataset
    from asectl.domain.synth import read_truth
    from asectl.stages.reason import build_priors, run_reason

    ds = load_dataset(small_dataset)
    truth = {name: row["printed"] for name, row in read_truth(small_dataset).items()}
    train = ds.split("train")
    priors = build_priors([truth[s.name] for s in train], [s.label for s in train])
    short, long_ = ds.samples[0], ds.samples[1]
    # partly read records: only N gives a shorter prompt than only the radius counts
    fields = {short.name: {"N": truth[short.name]["N"]}, long_.name: {"bins": truth[long_.name]["bins"]}}
    both = Dataset([long_, short], ds.root, ds.source, ds.labels)

    def run(cache: str, **kw):
        return run_reason(
            both, llm_model=tiny_gguf, fields=fields, priors=priors, cache=Cache(tmp_path / cache), max_tokens=32, **kw
        )

    wide = run("wide", n_ctx=8192, workers=1).by_image()
    n_ctx = wide[short.name]["tokens"]["prompt"] + 33  # its prompt and 32 answer tokens
    assert wide[long_.name]["tokens"]["prompt"] >= n_ctx

    local = run("local", n_ctx=n_ctx, workers=1)
    on_ray = run("ray", n_ctx=n_ctx, executor=ray_executor())
    by = on_ray.by_image()
    assert by[short.name]["raw"] == wide[short.name]["raw"] and not by[short.name].get("error")
    assert by[long_.name] == local.by_image()[long_.name]
    assert set(by[long_.name]) == {"image", "error"}
    assert f"does not fit the context window ({n_ctx}); raise --n-ctx" in by[long_.name]["error"]
    assert canonical(on_ray.records) == canonical(local.records)
    assert stored(tmp_path / "ray", "reason") == stored(tmp_path / "local", "reason")  # the error is in neither


def _ocr_worker_pids() -> set[int]:
    import psutil

    pids = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if "OcrWorker" in " ".join(proc.cmdline()):
                pids.add(proc.pid)
        except psutil.Error:
            pass
    return pids


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_nothing_is_lost(ray_home, small_dataset, local_ocr, tmp_path):
    """SIGKILL one worker process once a few cards are stored: Ray restarts it and retries its batch, the
    run completes with the local records, and the entries stored before the kill are kept as they were."""
    pytest.importorskip("psutil")
    from asectl.cache import Cache
    from asectl.domain.dataset import load_dataset
    from asectl.stages.ocr import run_ocr

    root = tmp_path / "ray"
    killed: dict = {}

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            before = entries(root, "ocr")
            pids = _ocr_worker_pids()
            if len(before) >= 2 and pids:
                pid = min(pids)
                killed.update(pid=pid, entries={k: p.stat().st_ino for k, p in before.items()})
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    result = run_ocr(load_dataset(small_dataset), cache=Cache(root), executor=ray_executor(batch_size=1, workers=2))
    killer.join(timeout=5)
    local_records, _ = local_ocr
    n_ok = sum(1 for r in local_records if not r.get("error"))
    assert killed, "no worker was killed"
    assert len(killed["entries"]) < n_ok, "the kill came after the last card: nothing was retried"
    assert canonical(result.records) == canonical(local_records)
    after = entries(root, "ocr")
    assert len(after) == n_ok
    assert all(after[k].stat().st_ino == ino for k, ino in killed["entries"].items())  # kept, not redone


@pytest.mark.slow
def test_a_killed_driver_loses_nothing_computed(ray_home, small_dataset, local_ocr, tmp_path):
    """`asectl ocr --executor ray` joins the running cluster and is killed (SIGKILL) once cards are stored;
    a rerun takes every stored card from the cache and computes only the rest."""
    import ray

    from asectl.cache import Cache
    from asectl.domain.dataset import load_dataset
    from asectl.stages.ocr import run_ocr

    root = tmp_path / "cache"
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "asectl",
            "--cache-dir",
            str(root),
            "-q",
            "ocr",
            str(small_dataset),
            "--executor",
            "ray",
            "--ray-address",
            ray.get_runtime_context().gcs_address,
            "--ray-batch-size",
            "1",
            "--ray-workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while len(entries(root, "ocr")) < 2 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(3)  # the killed driver's workers are ended by Ray; a batch in flight may still land
    done = entries(root, "ocr")
    local_records, _ = local_ocr
    n_ok = sum(1 for r in local_records if not r.get("error"))
    assert 2 <= len(done) < n_ok
    cache = Cache(root)
    rerun = run_ocr(load_dataset(small_dataset), cache=cache, executor=ray_executor())
    assert cache.summary("ocr") == f"{len(done)} from cache, {n_ok - len(done)} computed"
    assert canonical(rerun.records) == canonical(local_records)


@pytest.mark.slow
def test_a_cache_the_workers_do_not_share_stops_the_run_naming_the_fix(ray_home, small_dataset, tmp_path, monkeypatch):
    """/proc/self/cwd/cache is a different folder for this process (working folder tmp_path) and for the
    workers (started in ray_home), as node-local storage is on a real cluster."""
    from asectl.cache import Cache
    from asectl.domain.dataset import load_dataset
    from asectl.stages.ocr import run_ocr

    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"the cache folder /proc/self/cwd/cache is not shared with Ray node .*: a "
        r"file a worker wrote there is not visible to this process; put the cache "
        r"on storage every node mounts at the same path .* --cache-dir",
    ):
        run_ocr(load_dataset(small_dataset), cache=Cache("/proc/self/cwd/cache"), executor=ray_executor())
    assert not entries(tmp_path / "cache", "ocr") and not entries(ray_home / "cache", "ocr")
    assert list((ray_home / "cache" / "tmp").glob("shared-check-*"))  # the worker did write, elsewhere


# --- a wrong address, a poison card, batch predict -----------------------------------------------------
def _asectl(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "asectl", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_an_unreachable_ray_address_fails_at_once_naming_it(small_dataset, tmp_path):
    """Nothing listens at the address: one line naming it, in seconds (Ray alone kept retrying for minutes)."""
    pytest.importorskip("ray.data")
    started = time.monotonic()
    res = _asectl("--cache-dir", tmp_path, "ocr", small_dataset, "--executor", "ray", "--ray-address", "127.0.0.1:1")
    assert res.returncode == 2 and time.monotonic() - started < 30, res.stderr
    assert res.stderr.strip().splitlines() == [
        "error: --ray-address 127.0.0.1:1: nothing answers at 127.0.0.1:1 (Connection refused within 5 s); start "
        "the cluster with `ray start --head` or fix the address (docs/scale.md)"
    ]


@pytest.mark.slow
def test_an_address_that_answers_but_is_no_ray_cluster_fails_within_30_s(small_dataset, tmp_path):
    """A port that accepts connections and never answers (as a hung or foreign service): ray.init would
    retry for minutes; the run ends with one error line naming the address within 30 s."""
    pytest.importorskip("ray.data")
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        res = _asectl("--cache-dir", tmp_path, "ocr", small_dataset, "--executor", "ray", "--ray-address", address)
    assert res.returncode == 2 and time.monotonic() - started < 30, res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: --ray-address {address}: no Ray cluster answered there within 20 s; check the address (`ray "
        "status` on the cluster shows it) (docs/scale.md)"
    )
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_batch_predict_on_ray_equals_local_and_a_poison_card_fails_alone(
    ray_home, tiny_gguf, tmp_path_factory, tmp_path, monkeypatch
):
    """`predict --executor ray` on new cards gives the local records; a card whose OCR worker is killed each
    time it reads it (the documented test hook, forwarded to the Ray workers) is that card's error record
    after bounded retries, and the other cards are classified."""
    from asectl.domain.synth import generate
    from asectl.workers import CRASH_RETRIES, CRASH_TEST_ENV

    from .calibrated_bundle import calibrated_bundle
    from .conftest import cli_invoker

    trained = calibrated_bundle(tmp_path_factory, tiny_gguf)
    generate(tmp_path / "new", seed=99, counts="1,1,1,0,1")
    cards = sorted((tmp_path / "new" / "images").glob("*.png"))
    poison = cards[1].name

    def predict(cache: Path, *extra: str, code: int = 0) -> list[dict]:
        res = cli_invoker(cache)("predict", *cards, "--model", trained["bundle"], "--json", *extra, code=code)
        return [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]

    local = predict(tmp_path / "local")
    monkeypatch.setenv(CRASH_TEST_ENV, poison)
    on_ray = predict(tmp_path / "ray", "--executor", "ray", "--ray-batch-size", "2", code=1)
    assert [r["image"] for r in on_ray] == [c.name for c in cards]
    bad = on_ray[1]
    assert (
        set(bad) == {"image", "error"}
        and f"{cards[1]}: an OCR worker process died each time it ran this alone ({CRASH_RETRIES + 1} times"
        in bad["error"]
    ), bad
    assert on_ray[:1] + on_ray[2:] == local[:1] + local[2:]
    assert not entries(tmp_path / "ray", "ocr").keys() - entries(tmp_path / "local", "ocr").keys()
    assert len(entries(tmp_path / "ray", "ocr")) == len(cards) - 1  # the poison card is not cached
