"""Worker processes for the work that spreads over cores: the per-image stages (``ocr``, ``describe``,
``reason``, ``predict --watch``), ``synth``'s rendering and the image encoder's fold networks in ``align``."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Sequence

from asectl.errors import ConfigError, DataError

if TYPE_CHECKING:  # multiprocessing is imported only when workers start: cached runs start none
    from concurrent.futures import ProcessPoolExecutor


def _exit_with_parent() -> None:
    import multiprocessing as mp
    from multiprocessing.connection import wait

    parent = mp.parent_process()
    if parent is not None:
        wait([parent.sentinel])
        os._exit(1)


def _start(initializer: Callable[..., None] | None, initargs: tuple) -> None:
    import threading

    # A parent killed with SIGKILL never shuts its pool down: the worker exits with it instead of
    # idling forever with a model in memory.
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def process_pool(
    workers: int, initializer: Callable[..., None] | None = None, initargs: tuple = ()
) -> ProcessPoolExecutor:
    """``workers`` spawned processes, each set up by ``initializer(*initargs)`` (None: nothing to load
    before the first job) and ended with the parent.

    spawn, not fork: the parent may hold torch/onnxruntime thread pools that do not survive a fork."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_start, initargs=(initializer, initargs)
    )


# Seconds the workers of a pool being closed may take to exit. Every result has been delivered by then, so a
# worker still alive after this (hung in its interpreter's exit: a library's thread that never ends, a native
# destructor waiting) is killed, rather than keep its parent, a watcher stopping on SIGTERM, from exiting.
EXIT_TIMEOUT = 30.0


def shut_down(pool: ProcessPoolExecutor, timeout: float = EXIT_TIMEOUT) -> None:
    """``pool.shutdown(cancel_futures=True)`` that returns within about ``timeout`` seconds: workers not
    gone by then are killed (SIGKILL). Jobs still queued are cancelled; one still running after the timeout
    is lost with its worker (``WorkerPool`` closes between runs, when none is running)."""
    import time

    processes = list((pool._processes or {}).values())  # the stdlib's own record of its workers
    manager = pool._executor_manager_thread
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + timeout
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in processes:
        if proc.is_alive():
            proc.kill()
            proc.join()
    if manager is not None:
        manager.join()  # it ends once its workers have


# Times a job whose worker process died on it alone is tried again, in a fresh worker, before that death is the
# job's result: with none a card would be blamed for one death it only happened to be near (memory pressure
# from elsewhere); a card that kills its worker every time costs 1 + this many worker starts.
CRASH_RETRIES = 2
# A documented test hook, off by default (unset): a worker given a card of this file name kills itself, as
# the kernel does to a process out of memory, so tests exercise a real dying worker (tests/test_workers.py).
CRASH_TEST_ENV = "ASECTL_TEST_KILL_WORKER_ON"


def died_alone(name: str) -> str:
    """Why a job (a card) failed when its worker died each time it ran alone; ``name`` is the worker's."""
    return (
        f"{name} process died each time it ran this alone ({CRASH_RETRIES + 1} times: out of memory, or a "
        "crash in native code)"
    )


def crash_test_hook(name: str) -> None:
    """In a worker process, before it computes the card ``name``: the ``CRASH_TEST_ENV`` test hook."""
    if name and name == os.environ.get(CRASH_TEST_ENV):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _ready() -> bool:
    """A job that only says a worker started (``WorkerPool`` asks it when a pool broke before any answer)."""
    return True


def _card_died(job: tuple, why: str) -> DataError:
    return DataError(f"{job[0].path}: {why}")


def could_not_start(name: str, fix: str) -> str:
    """Why a stage stopped when its workers died before answering anything, and a fresh one could not start."""
    return (
        f"{name} process could not start (its error, if any, is above). A Python script that runs asectl must "
        'do so under `if __name__ == "__main__":`, since each worker starts by importing the script again; '
        f"otherwise: {fix}"
    )


class WorkerPool:
    """``process_pool`` for a stage: jobs answered in order. A worker that dies (killed for memory, crashed
    in native code) takes the jobs in flight with it: each is run again alone in a fresh worker, up to
    1 + ``CRASH_RETRIES`` times, so the rest of the run completes and a job that kills its worker every time
    (a poison card) is found; its result is then ``crashed(job, why)``, or without ``crashed`` one
    ConfigError naming the stage and the fix instead of a traceback. No process starts before the first
    ``run``, so a stage can make its pool up front at no cost."""

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., None] | None = None,
        initargs: tuple = (),
        *,
        name: str,
        fix: str,
        exit_timeout: float = EXIT_TIMEOUT,
    ):
        self.workers = workers
        self.exit_timeout = exit_timeout  # seconds its workers may take to exit on close (``shut_down``)
        self.name = name  # who the workers are, e.g. "an OCR worker"
        self.fix = fix  # what the user can do, e.g. "rerun with fewer workers (asectl ocr --workers N)"
        self._setup = (initializer, initargs)
        self._pool: ProcessPoolExecutor | None = None
        self._answered = False  # whether any worker of this pool has returned a result

    @property
    def started(self) -> bool:
        return self._pool is not None

    def _fresh(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = process_pool(self.workers, *self._setup)
        return self._pool

    def _discard(self) -> None:
        """Drop a pool a dead worker broke (its other workers are stopped); the next job starts a fresh one."""
        if self._pool is not None:
            shut_down(self._pool, self.exit_timeout)
            self._pool = None

    def run(
        self, fn: Callable[..., Any], jobs: Sequence[tuple], crashed: Callable[[tuple, str], Any] | None = None
    ) -> list[Any]:
        from concurrent.futures.process import BrokenProcessPool

        pool = self._fresh()
        futures = [pool.submit(fn, *job) for job in jobs]
        results: list[Any] = [None] * len(jobs)
        lost: list[int] = []  # jobs in flight (or queued) when a worker died
        for i, f in enumerate(futures):
            try:
                results[i] = f.result()
                self._answered = True
            except BrokenProcessPool:
                lost.append(i)
        if lost:
            self._discard()
            # Workers that died before answering anything may be workers that cannot start at all (an
            # initializer that fails, a script without a main guard): then retrying each job alone would
            # only start and lose 1 + CRASH_RETRIES workers per job. A worker that starts and answers means
            # the jobs killed theirs.
            if not self._answered and not self._starts():
                raise ConfigError(could_not_start(self.name, self.fix))
        for i in lost:  # one at a time, so a death is that job's own
            for _ in range(1 + CRASH_RETRIES):
                try:
                    results[i] = self._fresh().submit(fn, *jobs[i]).result()
                    break
                except BrokenProcessPool:
                    self._discard()
            else:
                if crashed is None:
                    raise ConfigError(
                        f"{self.name} process died (out of memory? its error, if any, is above); "
                        f"the cards done so far are cached: {self.fix}"
                    )
                results[i] = crashed(jobs[i], died_alone(self.name))
        return results

    def run_cards(
        self, fn: Callable[[Any], Any], cards: Sequence[Any], here: Callable[[Sequence[Any]], list[Any]], small_run: int
    ) -> list[Any]:
        """One result per card (anything with a ``path``), in order: ``here(cards)`` in this process while
        the workers have not started and fewer than ``small_run`` cards are to do (starting them costs
        more, and what is loaded here is reused), else ``fn(card)`` in the workers, one job per card, so a
        card whose worker dies each time it runs alone gets its own DataError and the others their results."""
        if not self.started and len(cards) < small_run:
            return here(cards)
        return self.run(fn, [(card,) for card in cards], crashed=_card_died)

    def _starts(self) -> bool:
        from concurrent.futures.process import BrokenProcessPool

        try:
            self._answered = self._fresh().submit(_ready).result()
        except BrokenProcessPool:
            self._discard()
        return self._answered

    def close(self) -> None:
        self._discard()
