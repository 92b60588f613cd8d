"""The Ray executor (``--executor ray``): a stage's ``Work`` as a Ray Data pipeline whose workers are an actor
pool. Each actor loads the stage's engine once, computes batches of jobs and stores every result in the
shared content-addressed cache itself, so nothing a worker finished depends on the driver living on.
Imported only when the Ray executor is chosen (asectl.executors.make_executor). docs/scale.md."""

from __future__ import annotations

import logging
import math
import pickle
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

from asectl.cache import Cache, write_atomic
from asectl.errors import AsectlError, ConfigError
from asectl.executors import INSTALL_HINT, Executor, ExecutorSettings, Job, Work

try:
    import ray
    import ray.data
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as exc:   # installed, but broken (a missing dependency of Ray Data)
    raise ConfigError(f"--executor ray: Ray does not import ({exc}); run `{INSTALL_HINT}`") from None

PROBE_TIMEOUT_S = 120


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
                self.compute = work.load(*work.args)   # the engine, once per worker
            except AsectlError as exc:   # reported with the first batch, as the error of the run
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
        Ray instance on this machine (one CPU per usable core)."""
        self._quiet_ray_data()
        if ray.is_initialized():
            return
        quiet: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
        address = self.settings.address
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                try:
                    ray.init(address="auto", **quiet)
                except ConnectionError:
                    from asectl.workers import usable_cores

                    ray.init(num_cpus=usable_cores(), include_dashboard=False, **quiet)
                    self._started_here = True
        except Exception as exc:   # Ray raises ConnectionError, RuntimeError, ValueError ... for a bad address
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(f"--ray-address {address or 'auto'}: cannot join a Ray cluster ({first}); start one "
                              "with `ray start --head` or fix the address (docs/scale.md)") from None

    @staticmethod
    def _quiet_ray_data() -> None:
        """asectl draws its own progress: no Ray Data bars, execution plans or progress log lines."""
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)

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
        refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(paths[n["NodeID"]]), tokens[n["NodeID"]]) for n in nodes}
        try:
            answers = dict(zip(refs, ray.get(list(refs.values()), timeout=PROBE_TIMEOUT_S)))
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(f"a Ray node did not answer the cache check within {PROBE_TIMEOUT_S} s; check the "
                              "cluster with `ray status`") from None
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
                    "pass that path with --cache-dir or ASECTL_CACHE_DIR (docs/scale.md)")
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
                raise ConfigError("--num-gpus-per-worker: the Ray cluster has no GPUs (`ray status` lists its "
                                  "resources); drop the option or add GPU nodes")
            return max(1, int(total["GPU"] // gpus))
        return max(1, int(total.get("CPU", 1) // work.cpus))

    # -- a stage's work --------------------------------------------------------------------------------
    def map(self, work: Work, jobs: Sequence[Job], cache: Cache) -> Iterator[tuple[int, Any]]:
        """(position in ``jobs``, result) for every job, in the order they finish; the workers have stored
        the results (counted in ``cache.stats`` here). Close the iterator to stop early."""
        self.connect()
        root = Path(cache.root).absolute()   # not resolve(): each node follows its own links to the share
        self.check_shared_cache(root)
        if not jobs:
            return
        batch_size = self.settings.batch_size or work.batch_size
        n_batches = math.ceil(len(jobs) / batch_size)
        workers = min(self._workers(work), n_batches)
        items = [{"index": i, "job": pickle.dumps(job)} for i, job in enumerate(jobs)]
        resources: dict[str, Any] = {"num_cpus": work.cpus}
        if self.settings.num_gpus_per_worker:
            resources["num_gpus"] = self.settings.num_gpus_per_worker
        # Ray Data's own fault tolerance: a worker process that dies is restarted (its engine loaded again)
        # and its batches are retried, without limit.
        results = ray.data.from_items(items, override_num_blocks=n_batches).map_batches(
            _worker_class(work, str(root)), batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
            **resources)
        try:
            for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
                for index, payload in zip(batch["index"], batch["result"]):
                    result = pickle.loads(payload)
                    if isinstance(result, _Failure):
                        raise result.error
                    if isinstance(result, dict) and not result.get("error"):
                        cache._count(work.stage, "put")   # stored by the worker, counted here
                    yield int(index), result
        except ray.exceptions.RayActorError as exc:
            raise ConfigError(f"{work.name} process on the Ray cluster died and could not be restarted "
                              f"({exc.__class__.__name__}); what finished is cached: check the cluster with `ray "
                              "status` and rerun") from None


__all__ = ["RayExecutor"]
