"""Worker processes for the stages that spread cards over cores (``ocr``, ``reason``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Sequence

from asectl.errors import ConfigError

if TYPE_CHECKING:   # multiprocessing is imported only when workers start: cached runs start none
    from concurrent.futures import ProcessPoolExecutor


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _exit_with_parent() -> None:
    import multiprocessing as mp
    from multiprocessing.connection import wait

    parent = mp.parent_process()
    if parent is not None:
        wait([parent.sentinel])
        os._exit(1)


def _start(initializer: Callable[..., None], initargs: tuple) -> None:
    import threading

    # A parent killed with SIGKILL never shuts its pool down: the worker exits with it instead of
    # idling forever with a model in memory.
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    initializer(*initargs)


def process_pool(workers: int, initializer: Callable[..., None], initargs: tuple = ()) -> "ProcessPoolExecutor":
    """``workers`` spawned processes, each set up by ``initializer(*initargs)`` and ended with the parent.

    spawn, not fork: the parent may hold torch/onnxruntime thread pools that do not survive a fork."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_start, initargs=(initializer, initargs))


class WorkerPool:
    """``process_pool`` for a stage: jobs answered in order, and a worker that dies (killed for memory,
    crashed in native code) becomes one ConfigError naming the stage and the fix instead of a traceback.
    No process starts before the first ``run``, so a stage can make its pool up front at no cost."""

    def __init__(self, workers: int, initializer: Callable[..., None], initargs: tuple, *, name: str, fix: str):
        self.workers = workers
        self.name = name   # who the workers are, e.g. "an OCR worker"
        self.fix = fix     # what the user can do, e.g. "rerun with fewer workers (asectl ocr --workers N)"
        self._setup = (initializer, initargs)
        self._pool: ProcessPoolExecutor | None = None

    @property
    def started(self) -> bool:
        return self._pool is not None

    def run(self, fn: Callable[..., Any], jobs: Sequence[tuple]) -> list[Any]:
        from concurrent.futures.process import BrokenProcessPool

        if self._pool is None:
            self._pool = process_pool(self.workers, *self._setup)
        futures = [self._pool.submit(fn, *job) for job in jobs]
        try:
            return [f.result() for f in futures]
        except BrokenProcessPool:
            raise ConfigError(f"{self.name} process died (out of memory? its error, if any, is above); the cards "
                              f"done so far are cached: {self.fix}") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
