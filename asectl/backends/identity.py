"""Model identity recorded in artifacts and cache keys: what a result was computed with."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from asectl.cache import file_state, read_memo, sha256_file, write_memo

# Hashing every byte of a multi-GB weight file on each run would cost minutes; above this size the
# fingerprint covers the size plus the first and last 8 MiB (weights change there in practice), and
# says so in its "method" field.
_FULL_HASH_LIMIT = 256 << 20
_EDGE = 8 << 20

_memo: dict[tuple, dict] = {}


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Content fingerprint of a model file, kept per process and on disk per file state (a memo beside the
    artifact cache), so a later command whose results are all cached does not read the weights again."""
    key, st = file_state(path)
    if tuple(key) in _memo:
        return _memo[tuple(key)]
    fp = read_memo("file-hashes", key)
    if not (isinstance(fp, dict) and {"sha256", "size", "method"} <= fp.keys()):
        fp = _fingerprint(Path(path), st)
        write_memo("file-hashes", key, fp, st)
    _memo[tuple(key)] = fp
    return fp


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
