"""The Ray executor (``--executor ray``): a stage's ``Work`` as a Ray Data pipeline whose workers are an actor
pool. Each actor loads the stage's engine once, computes batches of jobs and stores every result in the
shared content-addressed cache itself, so nothing a worker finished depends on the driver living on.
Imported only when the Ray executor is chosen (it registers itself in asectl.registry.EXECUTORS, which
imports it on demand for asectl.executors.make_executor). docs/scale.md."""

from __future__ import annotations

import logging
import math
import os
import pickle
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

from asectl.cache import Cache, write_atomic
from asectl.errors import AsectlError, ConfigError, describe_exception
from asectl.executors import INSTALL_HINT, Executor, ExecutorSettings, Job, Work, require_ray
from asectl.registry import EXECUTORS
from asectl.workers import CRASH_RETRIES, CRASH_TEST_ENV, died_alone

require_ray()  # not installed: one line saying how to install it
try:
    import ray
    import ray.data
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as exc:  # installed, but broken (a missing dependency of Ray Data)
    raise ConfigError(f"--executor ray: Ray does not import ({exc}); run `{INSTALL_HINT}`") from None

PROBE_TIMEOUT_S = 120
PROBE_CONNECT_S = 5.0  # a cluster's GCS port accepts a connection at once; a dead or filtered one never does
JOIN_TIMEOUT_S = 20.0  # the longest ray.init may take to join a cluster that answers (usually under 2 s)


def reachable(address: str) -> None:
    """ConfigError naming ``address`` unless something accepts a TCP connection at its host and port
    (``HOST:PORT`` or ``ray://HOST:PORT``; other forms, such as ``auto``, are left to Ray)."""
    import socket
    from urllib.parse import urlsplit

    try:
        where = urlsplit(address if "://" in address else f"//{address}")
        host, port = where.hostname, where.port
    except ValueError:  # a port that is not a number
        raise ConfigError(f"--ray-address {address}: not HOST:PORT (e.g. 10.0.0.5:6379); fix the address") from None
    if not host or port is None:
        return
    try:
        socket.create_connection((host, port), timeout=PROBE_CONNECT_S).close()
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ConfigError(
            f"--ray-address {address}: nothing answers at {host}:{port} ({why} within "
            f"{PROBE_CONNECT_S:g} s); start the cluster with `ray start --head` or fix the address "
            "(docs/scale.md)"
        ) from None


def join_within(seconds: float, **init: Any) -> None:
    """``ray.init(**init)``, or a ConfigError after ``seconds``: a port that answers but is no Ray cluster
    (or one that hangs) keeps ray.init retrying for minutes, and it cannot be interrupted. It runs in a
    daemon thread that is abandoned, still waiting, when the time is up."""
    import threading

    done = threading.Event()
    failure: list[BaseException] = []

    def join() -> None:
        try:
            ray.init(**init)
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=join, name="ray-join", daemon=True).start()
    if not done.wait(seconds):
        raise ConfigError(
            f"--ray-address {init.get('address')}: no Ray cluster answered there within {seconds:g} s; "
            "check the address (`ray status` on the cluster shows it) (docs/scale.md)"
        )
    if failure:
        raise failure[0]


class _Failure:
    """An AsectlError raised in a worker, carried back as data: Ray would wrap it beyond recognition."""

    def __init__(self, error: AsectlError):
        self.error = error


def _worker_class(work: Work, cache_root: str) -> type:
    """The actor class of one run. ``work`` travels inside the class (pickled with it), not as a
    constructor argument in the object store, so a restarted actor always finds it."""

    class CardWorker:
        def __init__(self) -> None:
            self.cache = Cache(cache_root)
            self.failure: AsectlError | None = None
            try:
                self.compute = work.load(*work.args)  # the engine, once per worker
            except AsectlError as exc:  # reported with the first batch, as the error of the run
                self.failure = exc

        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            import numpy as np

            jobs: list[Job] = [pickle.loads(b) for b in batch["job"]]
            try:
                if self.failure is not None:
                    raise self.failure
                results = self.compute([j.item for j in jobs])
                for job, result in zip(jobs, results):
                    if isinstance(result, dict) and not result.get("error"):
                        self.cache.put_json(work.stage, job.key, result, {**work.meta, **job.meta})
                payload = [pickle.dumps(r) for r in results]
            except AsectlError as exc:
                payload = [pickle.dumps(_Failure(exc))] * len(jobs)
            except Exception as exc:  # a fault in the stage's code: the run stops, the batch is not dropped
                failure = ConfigError(f"{work.name} failed: {describe_exception(exc)}")
                payload = [pickle.dumps(_Failure(failure))] * len(jobs)
            return {"index": batch["index"], "result": np.array(payload, dtype=object)}

    CardWorker.__qualname__ = CardWorker.__name__ = f"{work.stage.title().replace('-', '')}Worker"
    return CardWorker


def _write_probe(path: str, token: str) -> str | None:
    """Runs on a node: write ``token`` to ``path``; None, or why it could not."""
    try:
        write_atomic(Path(path), token.encode())
    except OSError as exc:
        return f"the worker could not write there ({exc.strerror or exc})"
    return None


@EXECUTORS.register("ray")
class RayExecutor(Executor):
    kind = "ray"
    distributed = True

    def __init__(self, settings: ExecutorSettings):
        self.settings = settings
        self._started_here = False
        self._checked: set[str] = set()

    # -- the cluster -----------------------------------------------------------------------------------
    def connect(self) -> None:
        """Join the cluster at --ray-address; without one, a running cluster if there is one, else start a
        Ray instance on this machine (one CPU per usable core). A wrong or unreachable address is one
        ConfigError naming it within ``PROBE_CONNECT_S + JOIN_TIMEOUT_S`` seconds: Ray itself would retry for
        minutes, printing connection warnings."""
        self._quiet_ray_data()
        if ray.is_initialized():
            return
        quiet: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
        address = self.settings.address
        try:
            if address:
                reachable(address)
                join_within(JOIN_TIMEOUT_S, address=address, **quiet)
            else:
                try:
                    ray.init(address="auto", **quiet)
                except ConnectionError:
                    from asectl.environment import usable_cores

                    ray.init(num_cpus=usable_cores(), include_dashboard=False, **quiet)
                    self._started_here = True
        except ConfigError:
            raise
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError ... for a bad address
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(
                f"--ray-address {address or 'auto'}: cannot join a Ray cluster ({first}); start one "
                "with `ray start --head` or fix the address (docs/scale.md)"
            ) from None

    @staticmethod
    def _quiet_ray_data() -> None:
        """asectl draws its own progress: no Ray Data bars, execution plans or progress log lines."""
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        # A batch whose worker died beyond its retries is dropped, not the end of the run (``map``); Ray
        # Data's log of each such drop (a traceback) is left out, the job's error record says it.
        ctx.max_errored_blocks = -1
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)

    def close(self) -> None:
        if self._started_here and ray.is_initialized():
            ray.shutdown()
            self._started_here = False

    def check_shared_cache(self, root: Path) -> None:
        """A worker on every live node writes a probe file into the cache folder and this process reads
        it back; a node that cannot, or whose file does not arrive here, stops the run with the fix."""
        if str(root) in self._checked:
            return
        probe = ray.remote(num_cpus=0, max_retries=0)(_write_probe)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        tokens = {n["NodeID"]: f"{uuid.uuid4().hex}-{n['NodeID'][:12]}" for n in nodes}
        paths = {nid: root / "tmp" / f"shared-check-{tok}" for nid, tok in tokens.items()}
        refs = {
            n["NodeID"]: probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(paths[n["NodeID"]]), tokens[n["NodeID"]])
            for n in nodes
        }
        try:
            answers = dict(zip(refs, ray.get(list(refs.values()), timeout=PROBE_TIMEOUT_S)))
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(
                f"a Ray node did not answer the cache check within {PROBE_TIMEOUT_S} s; check the "
                "cluster with `ray status`"
            ) from None
        for n in nodes:
            nid = n["NodeID"]
            problem = answers[nid]
            if problem is None:
                try:
                    seen = paths[nid].read_text()
                except OSError:
                    seen = None
                if seen != tokens[nid]:
                    problem = "a file a worker wrote there is not visible to this process"
            paths[nid].unlink(missing_ok=True)
            if problem:
                raise ConfigError(
                    f"the cache folder {root} is not shared with Ray node {n.get('NodeManagerAddress', nid[:12])}: "
                    f"{problem}; put the cache on storage every node mounts at the same path (e.g. NFS) and "
                    "pass that path with --cache-dir or ASECTL_CACHE_DIR (docs/scale.md)"
                )
        self._checked.add(str(root))

    def _workers(self, work: Work) -> int:
        """--ray-workers, else as many as the cluster holds: one per work.cpus CPUs, or per
        --num-gpus-per-worker GPUs."""
        if self.settings.workers:
            return self.settings.workers
        total = ray.cluster_resources()
        gpus = self.settings.num_gpus_per_worker
        if gpus:
            if not total.get("GPU"):
                raise ConfigError(
                    "--num-gpus-per-worker: the Ray cluster has no GPUs (`ray status` lists its "
                    "resources); drop the option or add GPU nodes"
                )
            return max(1, int(total["GPU"] // gpus))
        return max(1, int(total.get("CPU", 1) // work.cpus))

    # -- a stage's work --------------------------------------------------------------------------------
    def map(self, work: Work, jobs: Sequence[Job], cache: Cache) -> Iterator[tuple[int, Any]]:
        """(position in ``jobs``, result) for every job, in the order they finish; the workers have stored
        the results (counted in ``cache.stats`` here). Close the iterator to stop early.

        A worker process that dies is restarted (its engine loaded again) by Ray. Its batch is dropped when
        the batch holds several jobs, else run again up to ``CRASH_RETRIES`` times; the jobs of dropped
        batches are then run again one per batch, so a job that kills its worker every time (a poison card)
        is found and the others complete. Its result is ``work.lost(job, why)`` (a card's error record), or
        without ``lost`` one ConfigError that stops the run."""
        self.connect()
        root = Path(cache.root).absolute()  # not resolve(): each node follows its own links to the share
        self.check_shared_cache(root)
        if not jobs:
            return
        batch_size = self.settings.batch_size or work.batch_size
        done: set[int] = set()
        # A lost batch of several jobs is not retried as it is: the isolation round retries its jobs alone.
        yield from self._run(
            work, jobs, range(len(jobs)), root, cache, batch_size, 0 if batch_size > 1 else CRASH_RETRIES, done
        )
        if len(done) < len(jobs) and batch_size > 1:
            lost = [i for i in range(len(jobs)) if i not in done]
            yield from self._run(work, jobs, lost, root, cache, 1, CRASH_RETRIES, done)
        why = died_alone(work.name)
        for i in range(len(jobs)):
            if i in done:
                continue
            if work.lost is None:
                raise ConfigError(f"{why}; what finished is cached: check the cluster with `ray status` and rerun")
            yield i, work.lost(jobs[i], why)

    def _run(
        self,
        work: Work,
        jobs: Sequence[Job],
        todo: Sequence[int],
        root: Path,
        cache: Cache,
        batch_size: int,
        retries: int,
        done: set[int],
    ) -> Iterator[tuple[int, Any]]:
        """One Ray Data pass over the jobs at positions ``todo``, each batch retried up to ``retries`` times
        when its worker dies, then dropped; ``done`` collects the positions answered."""
        n_batches = math.ceil(len(todo) / batch_size)
        workers = min(self._workers(work), n_batches)
        items = [{"index": i, "job": pickle.dumps(jobs[i])} for i in todo]
        resources: dict[str, Any] = {"num_cpus": work.cpus}
        if self.settings.num_gpus_per_worker:
            resources["num_gpus"] = self.settings.num_gpus_per_worker
        if os.environ.get(CRASH_TEST_ENV):  # the test hook reaches the workers of a cluster started earlier
            resources["runtime_env"] = {"env_vars": {CRASH_TEST_ENV: os.environ[CRASH_TEST_ENV]}}
        with warnings.catch_warnings():
            # Ray Data 2.60 takes the actors' task retries (default: without limit) only among the remote
            # arguments it calls deprecated, to be removed in Ray 2.64; it names no replacement yet.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            results = ray.data.from_items(items, override_num_blocks=n_batches).map_batches(
                _worker_class(work, str(root)),
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=workers),
                max_task_retries=retries,
                **resources,
            )
        try:
            for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
                for index, payload in zip(batch["index"], batch["result"]):
                    result = pickle.loads(payload)
                    if isinstance(result, _Failure):
                        raise result.error
                    if isinstance(result, dict) and not result.get("error"):
                        cache._count(work.stage, "put")  # stored by the worker, counted here
                    done.add(int(index))
                    yield int(index), result
        except ray.exceptions.RayActorError as exc:
            raise ConfigError(
                f"{work.name} process on the Ray cluster died and could not be restarted "
                f"({exc.__class__.__name__}); what finished is cached: check the cluster with `ray "
                "status` and rerun"
            ) from None


__all__ = ["RayExecutor"]
