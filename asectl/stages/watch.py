"""``asectl predict --watch DIR --out FILE.jsonl``: classify each card image that appears in a folder,
with every model loaded once and kept, and append one JSON line per card to FILE.

* A file is read only when it is complete: its size and modification time are the same at two polls in
  a row and it decodes as an image. A file that stays unchanged but undecodable for ``UNREADABLE_AFTER``
  seconds gets an error line (the station learns of it; it is not retried).
* Each line is flushed and fsync'ed before the next one is written, so a line that is in FILE is on
  disk. A stop request (Ctrl-C, SIGTERM) finishes the cards handed on (at most ``CHUNKS_AHEAD`` chunks)
  and writes their lines before returning: no computed result is lost.
* Both cores: ``Preparers`` are worker processes that compute the next cards' OCR, description and LLM
  answer into the cache while this process fuses the cards before them; lines are written chunk by
  chunk in the order the cards became complete (by name within one poll), whichever worker is first.
* On start, the cards already in FILE (by name) are skipped, and a torn last line (the process was
  killed while writing it) is cut off, so that card is classified again. Restarting never classifies a
  card twice.
* Only files directly in DIR whose names end in an image suffix are watched; names starting with "." are
  skipped, so a writer can write ``.card.png.tmp`` and rename it.
"""

from __future__ import annotations

import json
import os
import queue
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from asectl.domain.dataset import Dataset, Sample
from asectl.errors import ConfigError, DataError
from asectl.imageio import is_image_path, load_image

DEFAULT_POLL = 0.25  # seconds between looks at the folder
DEFAULT_BATCH = 8  # most cards classified together (a stop waits for at most this many)
UNREADABLE_AFTER = 30.0  # seconds a file may stay unchanged and undecodable before it is an error


@dataclass
class WatchSummary:
    classified: int = 0  # lines written in this run
    errors: int = 0  # of which error records
    skipped: int = 0  # cards already in --out when the run started
    names: list[str] = field(default_factory=list)


def done_names(out: Path) -> set[str]:
    """Card names already in ``out``; cuts off a torn last line (one without its newline)."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(out, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    names = set()
    for n, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            names.add(json.loads(line)["image"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"{out}: line {n} is not a prediction record; give --out a file written by "
                "`asectl predict --watch` (or a new file)"
            ) from None
    return names


class FolderWatch:
    """Which files in a folder are complete and not yet classified, poll by poll."""

    def __init__(self, folder: Path, done: set[str]):
        self.folder = folder
        self.done = set(done)
        self._seen: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) at the last poll
        self._undecodable_since: dict[str, float] = {}

    def poll(self) -> tuple[list[Path], list[dict[str, Any]]]:
        """(complete new files, in name order; error records for files that never became readable)."""
        ready, broken = [], []
        try:
            entries = sorted(os.scandir(self.folder), key=lambda e: e.name)
        except OSError as exc:
            raise ConfigError(f"{self.folder}: cannot list the watched folder ({exc.strerror})") from None
        present = set()
        for e in entries:
            name = e.name
            if name in self.done or name.startswith(".") or not is_image_path(Path(name)):
                continue
            try:
                if not e.is_file():
                    continue
                st = e.stat()
            except OSError:  # removed or renamed between listing and stat
                continue
            present.add(name)
            state = (st.st_size, st.st_mtime_ns)
            previous, self._seen[name] = self._seen.get(name), state
            if previous != state or st.st_size == 0:
                self._undecodable_since.pop(name, None)
                continue
            path = Path(e.path)
            try:
                load_image(path)
            except DataError as exc:
                since = self._undecodable_since.setdefault(name, time.monotonic())
                if time.monotonic() - since >= UNREADABLE_AFTER:
                    broken.append({"image": name, "error": f"{exc} (unchanged for {UNREADABLE_AFTER:.0f} s)"})
                    self.done.add(name)
                continue
            ready.append(path)
        for gone in set(self._seen) - present:  # deleted before it was read
            self._seen.pop(gone, None)
            self._undecodable_since.pop(gone, None)
        return ready, broken


class JsonlAppender:
    """Appends records to a JSON-lines file, each flushed and fsync'ed before ``write`` returns."""

    def __init__(self, path: Path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot open for appending ({exc.strerror}); choose another --out") from None

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, default=str) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


# Chunks handed to the preparers and not yet written: the next cards are read and reasoned about while the
# current ones are fused, and a stop waits for at most this many chunks.
CHUNKS_AHEAD = 2


def watch_folder(
    folder: str | Path,
    out: str | Path,
    classify: Callable[[Dataset], list[dict[str, Any]]],
    *,
    should_stop: Callable[[], bool],
    poll: float = DEFAULT_POLL,
    batch: int = DEFAULT_BATCH,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    sleep: Callable[[float], Any] = time.sleep,
    prepare: Callable[[list[Path]], list[Future]] | None = None,
) -> WatchSummary:
    """Watch ``folder`` until ``should_stop()``; ``classify(dataset)`` returns one record per card (as
    ``Predictor.run(...).records``). ``sleep`` waits between polls (a stop event's ``wait`` wakes early).

    ``prepare(paths)`` (optional, ``Preparers.prepare``) starts the per-image stages of each card elsewhere
    and returns one future per card: None when its records are cached, else the card's error record. Up
    to ``CHUNKS_AHEAD`` chunks are prepared while the oldest is classified, and lines are written chunk
    by chunk in the order the cards became ready (by name within one poll)."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: --watch needs an existing folder")
    if poll <= 0 or batch < 1:
        raise ConfigError(f"--poll {poll} / batch {batch}: the poll interval must be positive")
    done = done_names(out)
    watcher = FolderWatch(folder, done)
    summary = WatchSummary(skipped=len(done))
    writer = JsonlAppender(out)
    ahead: deque[tuple[list[Path], list[Future] | None]] = deque()

    def emit(rec: dict[str, Any]) -> None:
        writer.write(rec)
        summary.classified += 1
        summary.errors += bool(rec.get("error"))
        summary.names.append(rec["image"])
        if on_record:
            on_record(rec)

    def write_oldest() -> None:
        chunk, prepared = ahead.popleft()
        failed = {p.name: f.result() for p, f in zip(chunk, prepared or []) if f.result() is not None}
        ok = [Sample(p.resolve(), p.name) for p in chunk if p.name not in failed]
        by_name = {r["image"]: r for r in classify(Dataset(ok, None, "images", []))} if ok else {}
        for p in chunk:
            emit(failed.get(p.name) or by_name[p.name])

    def ready_to_write() -> bool:
        return bool(ahead) and all(f.done() for f in ahead[0][1] or [])

    try:
        while not should_stop():
            ready, broken = watcher.poll()
            for rec in broken:
                emit(rec)
            # A chunk handed on is marked done at once: the next poll does not return its cards again.
            for start in range(0, len(ready), batch):
                if len(ahead) >= CHUNKS_AHEAD:
                    break
                chunk = ready[start : start + batch]
                watcher.done.update(p.name for p in chunk)
                ahead.append((chunk, prepare(chunk) if prepare else None))
            wrote = False
            # A stop request between chunks ends the run; the chunks handed on are finished first (below).
            while ready_to_write() and not should_stop():
                write_oldest()
                wrote = True
            if not wrote:
                sleep(poll)
        while ahead:
            write_oldest()
    finally:
        writer.close()
    return summary


# --- the preparers: OCR, describe and reason of the next cards in worker processes -----------------------
_prepared: dict[str, Any] = {}


def _preparer_init(replay: dict[str, Any], cache_root: str, force: bool, threads: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    _prepared.update(model_replay=replay, cache=cache_root, force=force, threads=threads)


def _preparer_setup() -> tuple[Any, Any]:
    """(replay settings, cache) of this worker, its models kept loaded for its life (``keep_loaded``)."""
    if "replay" not in _prepared:
        import contextlib

        from asectl.backends.llm import set_process_threads
        from asectl.backends.ocr import get_engine
        from asectl.backends.warm import keep_loaded
        from asectl.cache import Cache
        from asectl.stages.modalities import ModalitySettings

        replay = _prepared["model_replay"]
        # The OCR engine and the LLM with this worker's share of the cores (the engine is made once per process).
        get_engine(ModalitySettings.from_dict(replay).ocr.engine_choice(), threads=_prepared["threads"])
        set_process_threads(_prepared["threads"])
        stack = contextlib.ExitStack()
        stack.enter_context(keep_loaded())
        _prepared.update(replay=replay, cache_obj=Cache(_prepared["cache"]), stack=stack)
    return _prepared["replay"], _prepared["cache_obj"]


def _prepare_card(path: str, force: bool | None = None) -> dict[str, Any] | None:
    """In a worker: the card's OCR, describe and reason records, computed into the cache; None, or the
    card's error record when one is missing."""
    from asectl.stages.modalities import collect_modalities
    from asectl.workers import crash_test_hook

    crash_test_hook(Path(path).name)
    replay, cache = _preparer_setup()
    card = Path(path)
    mods = collect_modalities(
        Dataset([Sample(card, card.name)], None, "images", []),
        cache,
        replay,
        force=_prepared["force"] if force is None else force,
        remember=False,
    )
    return mods.dropped[0] if mods.dropped else None


def _warm_up() -> None:
    """In a worker: load its models now, through a generated card (its records are dropped)."""
    import tempfile

    from asectl.domain.synth import generate

    with tempfile.TemporaryDirectory(prefix="asectl-warm-up-") as tmp:
        generate(Path(tmp) / "card", seed=0, counts="1,1,0,0,0")
        _prepare_card(str(sorted((Path(tmp) / "card" / "images").glob("*.png"))[0]), force=True)


class Preparers:
    """``workers`` worker processes, each with the OCR engine, describer and LLM of a model's ``replay``
    settings (``config["replay"]`` of a bundle or an export, as loaded) loaded once, that
    compute the per-image records of cards into the cache while this process fuses the cards before them.
    Each is a pool of its own (asectl.workers.WorkerPool), so a card that kills its worker every time is
    retried a bounded number of times and becomes that card's error record without touching the other's
    cards."""

    def __init__(self, replay: dict[str, Any], cache_root: Path, force: bool, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        from asectl.environment import usable_cores
        from asectl.workers import WorkerPool

        threads = max(1, usable_cores() // workers)
        self._pools = [
            WorkerPool(
                1,
                _preparer_init,
                (replay, str(cache_root), force, threads),
                name="a watch worker",
                fix="rerun with fewer --workers",
            )
            for _ in range(workers)
        ]
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for pool in self._pools:
            self._free.put(pool)
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="watch-worker")

    def warm_up(self) -> None:
        """Start every worker and load its models (a model that fails to load stops here, with its error)."""
        for f in [self._threads.submit(pool.run, _warm_up, [()]) for pool in self._pools]:
            f.result()

    def prepare(self, paths: list[Path]) -> list[Future]:
        return [self._threads.submit(self._one, p) for p in paths]

    def _one(self, path: Path) -> dict[str, Any] | None:
        pool = self._free.get()  # as many threads as pools: one is free
        try:
            return pool.run(_prepare_card, [(str(path),)], crashed=_lost_card)[0]
        finally:
            self._free.put(pool)

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        for pool in self._pools:
            pool.close()


def _lost_card(job: tuple, why: str) -> dict[str, Any]:
    return {"image": Path(job[0]).name, "error": f"{job[0]}: {why}"}
