"""Model identity recorded in artifacts and cache keys: what a result was computed with."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from asectl.cache import sha256_file

# Hashing every byte of a multi-GB weight file on each run would cost minutes; above this size the
# fingerprint covers the size plus the first and last 8 MiB (weights change there in practice), and
# says so in its "method" field.
_FULL_HASH_LIMIT = 256 << 20
_EDGE = 8 << 20

_memo: dict[tuple[str, int, int], dict] = {}


def file_fingerprint(path: str | os.PathLike) -> dict:
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key in _memo:
        return _memo[key]
    if st.st_size <= _FULL_HASH_LIMIT:
        fp = {"sha256": sha256_file(p), "size": st.st_size, "method": "sha256"}
    else:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            h.update(f.read(_EDGE))
            f.seek(st.st_size - _EDGE)
            h.update(f.read(_EDGE))
        h.update(str(st.st_size).encode())
        fp = {"sha256": h.hexdigest(), "size": st.st_size, "method": "sha256-edges-8MiB"}
    _memo[key] = fp
    return fp


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
