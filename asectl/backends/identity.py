"""Model identity recorded in artifacts and cache keys: what a result was computed with."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

from asectl.cache import canonical_json, default_cache_dir, sha256_bytes, sha256_file, write_atomic

# Hashing every byte of a multi-GB weight file on each run would cost minutes; above this size the
# fingerprint covers the size plus the first and last 8 MiB (weights change there in practice), and
# says so in its "method" field.
_FULL_HASH_LIMIT = 256 << 20
_EDGE = 8 << 20

# A fingerprint is reused while the file's path, size, inode and times stay the same. One of a file
# changed in the last seconds is not stored on disk: with coarse timestamps the file could still change
# again without its times moving.
_RACY_SECONDS = 2
_memo: dict[tuple, dict] = {}


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Content fingerprint of a model file, kept per process and on disk (in the artifact cache folder), so
    a later command whose results are all cached does not read the weights again."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key in _memo:
        return _memo[key]
    fp = _load_memo(key)
    if fp is None:
        fp = _fingerprint(p, st)
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_SECONDS * 10**9:
            _save_memo(key, fp)
    _memo[key] = fp
    return fp


def _memo_path(key: tuple) -> Path:
    return default_cache_dir() / "file-hashes" / f"{sha256_bytes(canonical_json(list(key)).encode())}.json"


def _load_memo(key: tuple) -> dict | None:
    try:
        fp = json.loads(_memo_path(key).read_bytes())
    except (OSError, ValueError):
        return None
    return fp if isinstance(fp, dict) and {"sha256", "size", "method"} <= fp.keys() else None


def _save_memo(key: tuple, fp: dict) -> None:
    with contextlib.suppress(OSError):
        write_atomic(_memo_path(key), json.dumps(fp).encode())


def _fingerprint(p: Path, st: os.stat_result) -> dict:
    if st.st_size <= _FULL_HASH_LIMIT:
        return {"sha256": sha256_file(p), "size": st.st_size, "method": "sha256"}
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(_EDGE))
        f.seek(st.st_size - _EDGE)
        h.update(f.read(_EDGE))
    h.update(str(st.st_size).encode())
    return {"sha256": h.hexdigest(), "size": st.st_size, "method": "sha256-edges-8MiB"}


def model_fingerprint(path: str | os.PathLike) -> str:
    """One hash for a model file or folder (all files inside it, by relative name)."""
    p = Path(path)
    if p.is_file():
        return file_fingerprint(p)["sha256"]
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file() and ".cache" not in q.parts):
        h.update(f.relative_to(p).as_posix().encode())
        h.update(file_fingerprint(f)["sha256"].encode())
    return h.hexdigest()
