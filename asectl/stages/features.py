"""Frozen encoder features (Eq. 2), cached per input and encoder: the quick profile computes them once.

Image features are keyed by the image bytes, text features by the text itself, both with the encoder's
identity (name, weights hash, preprocessing). Arrays are stored as safetensors (no pickle)."""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from asectl import ui
from asectl.cache import Cache, make_key, sha256_file
from asectl.dataset import Sample

STAGE = "features"
FORMAT = 1


def _cached_encode(keys: Sequence[str], items: Sequence[Any], encode: Callable[[list[Any]], np.ndarray],
                   cache: Cache, batch_size: int, description: str, meta: dict[str, Any]) -> np.ndarray:
    out: list[np.ndarray | None] = [None] * len(items)
    misses = []
    for i, key in enumerate(keys):
        entry = cache.get(STAGE, key)
        if entry is not None:
            out[i] = st_load(entry.read_bytes("feature.safetensors"))["z"]
        else:
            misses.append(i)
    if misses:
        with ui.progress(len(misses), description) as advance:
            for start in range(0, len(misses), batch_size):
                chunk = misses[start:start + batch_size]
                z = np.asarray(encode([items[i] for i in chunk]), dtype=np.float32)
                for row, i in zip(z, chunk):
                    out[i] = row
                    cache.put(STAGE, keys[i], {"feature.safetensors": st_save({"z": np.ascontiguousarray(row)})},
                              meta)
                advance(len(chunk))
    return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)


def image_features(samples: Sequence[Sample], encoder: Any, cache: Cache) -> np.ndarray:
    ident = encoder.identity()
    keys = [make_key(STAGE, kind="image", format=FORMAT, input=sha256_file(s.path), encoder=ident)
            for s in samples]
    return _cached_encode(keys, [str(s.path) for s in samples], encoder.encode, cache,
                          getattr(encoder, "batch_size", 16), f"encode images ({ident.get('name')})",
                          {"params": {"encoder": ident}})


def text_features(texts: Sequence[str], encoder: Any, cache: Cache, branch: str) -> np.ndarray:
    ident = encoder.identity()
    keys = [make_key(STAGE, kind="text", format=FORMAT, text=hashlib.sha256(t.encode()).hexdigest(),
                     encoder=ident) for t in texts]
    return _cached_encode(keys, list(texts), encoder.encode, cache, getattr(encoder, "batch_size", 32),
                          f"encode {branch} text ({ident.get('name')})",
                          {"params": {"encoder": ident, "branch": branch}})
