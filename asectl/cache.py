"""Content-addressed artifact cache shared by every stage.

An entry is a directory ``entries/<stage>/<key[:2]>/<key>/`` holding payload files and ``meta.json``
(parameters, versions, timings and a sha256 + size per payload file). Entries are built in ``tmp/`` and
renamed into place, so a reader sees either nothing or a complete entry; a killed run leaves only
``tmp/`` debris, which is swept later. Every read verifies the checksums: a truncated or edited entry
is discarded, logged, and reported as a miss so the caller recomputes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import platformdirs

from asectl import __version__
from asectl.errors import ConfigError

log = logging.getLogger("asectl")

# Bump when the layout of entries changes; it is part of every key.
FORMAT_VERSION = 1
ENV_VAR = "ASECTL_CACHE_DIR"
_STALE_TMP_SECONDS = 6 * 3600
# Payload files up to this size stay in memory after a read verified them, so reading the entry's data
# does not touch the disk again (and returns exactly the bytes that were checked).
_KEEP_VERIFIED_BYTES = 1 << 20


def default_cache_dir() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("asectl"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_file_hash_memo: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, memoised on (path, size, mtime) within one process."""
    st = os.stat(path)
    # abspath, not resolve(): following links costs more than hashing a small card image.
    memo_key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if memo_key not in _file_hash_memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _file_hash_memo[memo_key] = h.hexdigest()
    return _file_hash_memo[memo_key]


def forget_file_hashes() -> None:
    """Drop sha256_file's memo, so that every file is hashed again as in a new process (benchmarks)."""
    _file_hash_memo.clear()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def make_key(stage: str, **parts: Any) -> str:
    """Key = hash of stage name, format version and everything the result depends on."""
    return sha256_bytes(canonical_json({"stage": stage, "format": FORMAT_VERSION, **parts}).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def new_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Write a folder for the user (an exported model) so it is whole or absent: the block writes into an
    empty hidden sibling, renamed to ``out`` when the block ends and removed when it fails. ``out`` must
    not exist or be an empty folder, else a ConfigError says so."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty folder; choose another --out")
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- small memos about files, beside the entries (docs/cache.md) -------------------------------------
# Facts about a model file (its fingerprint, its GGUF header, "passed the checks before loading") are
# kept per file state, so a command whose results are all cached does not read the file again. A file
# changed in the last seconds is not memoised: with coarse timestamps it could change again without its
# state moving.
_RACY_NS = 2 * 10**9


def file_state(path: str | os.PathLike) -> tuple[list, os.stat_result]:
    """(memo key, stat) of a file: resolved path, size, mtime, ctime and inode; a rewrite changes one."""
    p = Path(path)
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino], st


def _memo_path(kind: str, key: list, suffix: str = ".json") -> Path:
    return default_cache_dir() / kind / f"{sha256_bytes(canonical_json(key).encode())}{suffix}"


def read_memo(kind: str, key: list) -> Any | None:
    """What ``write_memo`` kept under ``kind`` for ``key`` (a ``file_state`` key, perhaps extended), or None."""
    try:
        return json.loads(_memo_path(kind, key).read_bytes())
    except (OSError, ValueError):
        return None


def write_memo(kind: str, key: list, value: Any, st: os.stat_result) -> None:
    """Keep ``value`` (JSON) for ``key`` unless the file (``st``) is too new; failures are ignored."""
    try:
        write_memo_bytes(kind, key, json.dumps(value).encode(), st, suffix=".json", checked=False)
    except (TypeError, ValueError):
        pass


def read_memo_bytes(kind: str, key: list) -> bytes | None:
    """What ``write_memo_bytes`` kept for ``key``, or None (also when its checksum does not match: a torn or
    damaged memo is treated as missing, and the caller computes and writes it again)."""
    try:
        data = _memo_path(kind, key, ".bin").read_bytes()
    except OSError:
        return None
    digest, body = data[:32], data[32:]
    return body if len(digest) == 32 and hashlib.sha256(body).digest() == digest else None


def write_memo_bytes(
    kind: str, key: list, data: bytes, st: os.stat_result, *, suffix: str = ".bin", checked: bool = True
) -> None:
    """Keep ``data`` for ``key`` (with a sha256 in front when ``checked``) unless the file (``st``) is too
    new; failures are ignored."""
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) <= _RACY_NS:
        return
    try:
        write_atomic(_memo_path(kind, key, suffix), (hashlib.sha256(data).digest() + data) if checked else data)
    except OSError:
        pass


def sha256_file_kept(path: str | os.PathLike) -> str:
    """``sha256_file``, also kept on disk beside the cache per ``file_state`` (a rewrite changes the size,
    mtime, ctime or inode), so a model folder's checksums are not read again by every new process (a cold
    ``predict``); a file changed in any way is hashed again."""
    key, st = file_state(path)
    kept = read_memo("sha256", key)
    if isinstance(kept, str) and len(kept) == 64:
        return kept
    digest = sha256_file(path)
    write_memo("sha256", key, digest, st)
    return digest


def remember_file_hashes(paths: Sequence[str | os.PathLike]) -> None:
    """Make ``sha256_file`` of each path a memo hit in this process. The digests of the whole list are kept
    on disk per the files' states, one memo for a folder of cards rather than one per card, so a command
    whose results are all cached does not read every card again (the quickstart's 455 cards: 109 MB). A
    file changed in any way changes the key, and the list is hashed again; a file that cannot be read
    leaves the list to ``sha256_file``, which raises where that card is used."""
    try:
        # file_state without resolving each path's links (a tenth of a millisecond a card): the inode and
        # times already tell a changed file.
        found = [(os.path.abspath(p), os.stat(p)) for p in paths]
    except OSError:
        return
    key = [[path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] for path, st in found]
    kept = read_memo("sha256-lists", key)
    if isinstance(kept, list) and len(kept) == len(found) and all(isinstance(d, str) and len(d) == 64 for d in kept):
        for (path, st), digest in zip(found, kept):
            _file_hash_memo[(path, st.st_size, st.st_mtime_ns)] = digest
        return
    try:
        digests = [sha256_file(p) for p in paths]
    except OSError:
        return
    if found:
        newest = max((st for _, st in found), key=lambda st: max(st.st_mtime_ns, st.st_ctime_ns))
        write_memo("sha256-lists", key, digests, newest)


def sha256_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """``sha256_file`` of each path, the list kept as ``remember_file_hashes`` keeps it."""
    remember_file_hashes(paths)
    return [sha256_file(p) for p in paths]


class CorruptEntry(Exception):
    pass


@dataclass
class Entry:
    path: Path
    meta: dict
    verified: dict[str, bytes] = field(default_factory=dict, repr=False)  # name -> bytes checked on get

    def file(self, name: str) -> Path:
        return self.path / name

    def read_bytes(self, name: str) -> bytes:
        data = self.verified.get(name)
        return data if data is not None else (self.path / name).read_bytes()

    def read_json(self, name: str = "record.json") -> Any:
        return json.loads(self.read_bytes(name))


class Cache:
    """The store. ``stats`` counts hits, misses, puts and rebuilt (corrupt) entries for reporting."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root else default_cache_dir()
        self.stats: Counter = Counter()
        self._swept = False

    # -- layout -----------------------------------------------------------------------------------
    def entry_dir(self, stage: str, key: str) -> Path:
        return self.root.joinpath("entries", stage, key[:2], key)

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def _sweep_tmp(self) -> None:
        """Remove debris of killed runs (temp dirs older than a few hours)."""
        if self._swept or not self.tmp_dir.exists():
            return
        self._swept = True
        now = time.time()
        for p in self.tmp_dir.iterdir():
            try:
                if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
            except OSError:
                pass

    def _new_tmp(self) -> Path:
        self._sweep_tmp()
        d = self.tmp_dir / f"{uuid.uuid4().hex}"
        d.mkdir(parents=True)
        return d

    # -- read -------------------------------------------------------------------------------------
    def _verify(self, path: Path, keep: dict[str, bytes] | None = None) -> dict:
        """The entry's meta.json after checking every payload file; ``keep`` receives the small ones' bytes."""
        try:
            meta = json.loads((path / "meta.json").read_bytes())
            files = meta["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptEntry(f"unreadable meta.json ({exc.__class__.__name__})") from None
        for name, info in files.items():
            fp = path / name
            try:
                data = fp.read_bytes()
            except OSError:
                raise CorruptEntry(f"missing file {name}") from None
            if len(data) != info["size"] or sha256_bytes(data) != info["sha256"]:
                raise CorruptEntry(f"checksum mismatch in {name}")
            if keep is not None and len(data) <= _KEEP_VERIFIED_BYTES:
                keep[name] = data
        return meta

    def get(self, stage: str, key: str) -> Entry | None:
        """A verified entry, or None (a miss, or a corrupt entry that was discarded)."""
        path = self.entry_dir(stage, key)
        verified: dict[str, bytes] = {}
        try:
            meta = self._verify(path, verified)
        except CorruptEntry as exc:
            if not path.exists():  # no entry at all (checked only now: most lookups are hits)
                self._count(stage, "miss")
                return None
            log.warning("cache entry %s/%s is corrupt (%s); it will be rebuilt", stage, key[:12], exc)
            self._discard(path)
            self._count(stage, "rebuilt")
            self._count(stage, "miss")
            return None
        self._count(stage, "hit")
        return Entry(path, meta, verified)

    def _count(self, stage: str, what: str) -> None:
        self.stats[what] += 1
        self.stats[f"{stage}.{what}"] += 1

    def get_json(self, stage: str, key: str, name: str = "record.json") -> Any | None:
        entry = self.get(stage, key)
        return None if entry is None else entry.read_json(name)

    # -- write ------------------------------------------------------------------------------------
    def _finish(self, tmp: Path, stage: str, key: str, meta: dict) -> Entry:
        files = {}
        for fp in sorted(p for p in tmp.rglob("*") if p.is_file()):
            data = fp.read_bytes()
            files[fp.relative_to(tmp).as_posix()] = {"sha256": sha256_bytes(data), "size": len(data)}
        full_meta = {
            "stage": stage,
            "key": key,
            "format": FORMAT_VERSION,
            "asectl_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **meta,
            "files": files,
        }
        with open(tmp / "meta.json", "wb") as f:
            f.write(json.dumps(full_meta, indent=1, sort_keys=True, default=str).encode())
            f.flush()
            os.fsync(f.fileno())
        final = self.entry_dir(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same entry first: keep a valid one, replace a bad one.
            try:
                self._verify(final)
                shutil.rmtree(tmp, ignore_errors=True)
            except CorruptEntry:
                self._discard(final)
                os.rename(tmp, final)
        self._count(stage, "put")
        return Entry(final, full_meta)

    def put(self, stage: str, key: str, files: dict[str, bytes], meta: dict | None = None) -> Entry:
        tmp = self._new_tmp()
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        return self._finish(tmp, stage, key, meta or {})

    def put_json(self, stage: str, key: str, obj: Any, meta: dict | None = None, name: str = "record.json") -> Entry:
        return self.put(stage, key, {name: json.dumps(obj, default=str).encode()}, meta)

    def put_tree(self, stage: str, key: str, build: Callable[[Path], dict | None]) -> Entry:
        """``build(tmpdir)`` writes the payload files and may return extra metadata."""
        tmp = self._new_tmp()
        try:
            meta = build(tmp) or {}
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self._finish(tmp, stage, key, meta)

    def _discard(self, path: Path) -> None:
        trash = self._new_tmp()
        try:
            os.rename(path, trash / "gone")
        except OSError:
            pass
        shutil.rmtree(trash, ignore_errors=True)

    # -- pointers (small mutable JSON documents, e.g. "latest model") -----------------------------
    def set_pointer(self, name: str, value: Any) -> None:
        write_atomic(self.root / "pointers" / f"{name}.json", json.dumps(value, indent=1).encode())

    def get_pointer(self, name: str) -> Any | None:
        try:
            return json.loads((self.root / "pointers" / f"{name}.json").read_bytes())
        except (OSError, ValueError):
            return None

    # -- management -------------------------------------------------------------------------------
    def stages(self) -> list[str]:
        base = self.root / "entries"
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.exists() else []

    def iter_entries(self, stage: str) -> Iterable[Path]:
        base = self.root / "entries" / stage
        if base.exists():
            yield from (p for p in base.glob("*/*") if p.is_dir())

    def info(self) -> dict:
        out = {"root": str(self.root), "stages": {}}
        for stage in self.stages():
            n = size = 0
            for entry in self.iter_entries(stage):
                n += 1
                size += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            out["stages"][stage] = {"entries": n, "bytes": size}
        return out

    def clear(self, stage: str | None = None) -> int:
        """Remove all entries (or one stage's); returns how many were removed."""
        stages = [stage] if stage else self.stages()
        removed = 0
        for s in stages:
            for entry in list(self.iter_entries(s)):
                self._discard(entry)
                removed += 1
        if stage is None:
            for sub in ("pointers", "tmp"):
                shutil.rmtree(self.root / sub, ignore_errors=True)
        return removed

    def summary(self, stage: str | None = None) -> str:
        """Hits, computed and rebuilt entries so far: of one stage, or of all stages together."""
        s, p = self.stats, f"{stage}." if stage else ""
        text = f"{s[p + 'hit']} from cache, {s[p + 'put']} computed"
        if s[p + "rebuilt"]:
            text += f", {s[p + 'rebuilt']} corrupt entries rebuilt"
        return text
