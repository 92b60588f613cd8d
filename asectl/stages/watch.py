"""``asectl predict --watch DIR --out FILE.jsonl``: classify each card image that appears in a folder,
with every model loaded once and kept, and append one JSON line per card to FILE.

* A file is read only when it is complete: its size and modification time are the same at two polls in
  a row and it decodes as an image. A file that stays unchanged but undecodable for ``UNREADABLE_AFTER``
  seconds gets an error line (the station learns of it; it is not retried).
* Each line is flushed and fsync'ed before the next card is looked at, so a line that is in FILE is on
  disk. A stop request (Ctrl-C, SIGTERM) finishes the cards being classified and writes their lines
  before returning: no computed result is lost.
* On start, the cards already in FILE (by name) are skipped, and a torn last line (the process was
  killed while writing it) is cut off, so that card is classified again. Restarting never classifies a
  card twice.
* Only files directly in DIR whose names end in an image suffix are watched; names starting with "." are
  skipped, so a writer can write ``.card.png.tmp`` and rename it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from asectl.dataset import Dataset, Sample
from asectl.errors import ConfigError, DataError
from asectl.imageio import is_image_path, load_image

DEFAULT_POLL = 0.25            # seconds between looks at the folder
DEFAULT_BATCH = 8              # most cards classified together (a stop waits for at most this many)
UNREADABLE_AFTER = 30.0        # seconds a file may stay unchanged and undecodable before it is an error


@dataclass
class WatchSummary:
    classified: int = 0        # lines written in this run
    errors: int = 0            # of which error records
    skipped: int = 0           # cards already in --out when the run started
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
            raise ConfigError(f"{out}: line {n} is not a prediction record; give --out a file written by "
                              "`asectl predict --watch` (or a new file)") from None
    return names


class FolderWatch:
    """Which files in a folder are complete and not yet classified, poll by poll."""

    def __init__(self, folder: Path, done: set[str]):
        self.folder = folder
        self.done = set(done)
        self._seen: dict[str, tuple[int, int]] = {}        # name -> (size, mtime_ns) at the last poll
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
            except OSError:        # removed or renamed between listing and stat
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
        for gone in set(self._seen) - present:     # deleted before it was read
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


def watch_folder(folder: str | Path, out: str | Path, classify: Callable[[Dataset], list[dict[str, Any]]], *,
                 should_stop: Callable[[], bool], poll: float = DEFAULT_POLL, batch: int = DEFAULT_BATCH,
                 on_record: Callable[[dict[str, Any]], None] | None = None,
                 sleep: Callable[[float], Any] = time.sleep) -> WatchSummary:
    """Watch ``folder`` until ``should_stop()``; ``classify(dataset)`` returns one record per card (as
    ``Predictor.run(...).records``). ``sleep`` waits between polls (a stop event's ``wait`` wakes early)."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: --watch needs an existing folder")
    if poll <= 0 or batch < 1:
        raise ConfigError(f"--poll {poll} / batch {batch}: the poll interval must be positive")
    done = done_names(out)
    watcher = FolderWatch(folder, done)
    summary = WatchSummary(skipped=len(done))
    writer = JsonlAppender(out)

    def emit(rec: dict[str, Any]) -> None:
        writer.write(rec)
        watcher.done.add(rec["image"])
        summary.classified += 1
        summary.errors += bool(rec.get("error"))
        summary.names.append(rec["image"])
        if on_record:
            on_record(rec)

    try:
        while not should_stop():
            ready, broken = watcher.poll()
            for rec in broken:
                emit(rec)
            # A stop request between batches ends the run; the batch being classified is finished first.
            for start in range(0, len(ready), batch):
                chunk = ready[start:start + batch]
                samples = [Sample(p.resolve(), p.name) for p in chunk]
                for rec in classify(Dataset(samples, None, "images", [])):
                    emit(rec)
                if should_stop():
                    break
            if not ready:
                sleep(poll)
    finally:
        writer.close()
    return summary
