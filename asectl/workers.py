"""Worker processes for the stages that spread cards over cores (``ocr``, ``reason``)."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable


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


def process_pool(workers: int, initializer: Callable[..., None], initargs: tuple = ()) -> ProcessPoolExecutor:
    """``workers`` spawned processes, each set up by ``initializer(*initargs)`` and ended with the parent.

    spawn, not fork: the parent may hold torch/onnxruntime thread pools that do not survive a fork."""
    import multiprocessing as mp

    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_start, initargs=(initializer, initargs))
