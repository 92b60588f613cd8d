"""Frozen encoder features (Eq. 2), cached per input and encoder: the quick profile computes them once.

Image features are keyed by the image bytes, text features by the text itself, both with the encoder's
identity (name, weights hash, preprocessing; a trained encoder's identity holds its trained weights' hash).
Arrays are stored as safetensors (no pickle).

An image encoder that learns the cards (``cards-cnn``) is trained here first, on the training cards only,
and its weights cached (``train_image_encoder``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from asectl import ui
from asectl.cache import Cache, make_key, sha256_file
from asectl.domain.dataset import Sample

STAGE = "features"
FORMAT = 2  # 2: one item per forward pass on one CPU thread (asectl.backends.encoders.frozen_encode)
TRAIN_STAGE = "image-encoder"
TRAIN_FORMAT = 2  # 2: trained on one CPU thread whoever calls it
WEIGHTS_FILE = "encoder.safetensors"


def _cached_encode(
    keys: Sequence[str],
    items: Sequence[Any],
    encode: Callable[[list[Any]], np.ndarray],
    cache: Cache,
    batch_size: int,
    description: str,
    meta: dict[str, Any],
) -> np.ndarray:
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
                chunk = misses[start : start + batch_size]
                z = np.asarray(encode([items[i] for i in chunk]), dtype=np.float32)
                for row, i in zip(z, chunk):
                    out[i] = row
                    cache.put(STAGE, keys[i], {"feature.safetensors": st_save({"z": np.ascontiguousarray(row)})}, meta)
                advance(len(chunk))
    return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)


def image_features(samples: Sequence[Sample], encoder: Any, cache: Cache) -> np.ndarray:
    ident = encoder.identity()
    keys = [make_key(STAGE, kind="image", format=FORMAT, input=sha256_file(s.path), encoder=ident) for s in samples]
    return _cached_encode(
        keys,
        [str(s.path) for s in samples],
        encoder.encode,
        cache,
        getattr(encoder, "batch_size", 16),
        f"encode images ({ident.get('name')})",
        {"params": {"encoder": ident}},
    )


def dot_pattern_features(samples: Sequence[Sample], cache: Cache) -> np.ndarray:
    """The dot pattern's numbers of each card (asectl.domain.dot_pattern), cached per image like a frozen
    encoder's features: [n, len(PATTERN_NAMES)], NaN where a card shows no dots."""
    from asectl.domain import dot_pattern

    ident = dot_pattern.identity()
    keys = [
        make_key(STAGE, kind="dot-pattern", format=FORMAT, input=sha256_file(s.path), measure=ident) for s in samples
    ]
    return _cached_encode(
        keys,
        [s.path for s in samples],
        dot_pattern.pattern_vectors,
        cache,
        64,
        "measure dot patterns",
        {"params": {"measure": ident}},
    )


def text_features(texts: Sequence[str], encoder: Any, cache: Cache, branch: str) -> np.ndarray:
    ident = encoder.identity()
    keys = [
        make_key(STAGE, kind="text", format=FORMAT, text=hashlib.sha256(t.encode()).hexdigest(), encoder=ident)
        for t in texts
    ]
    return _cached_encode(
        keys,
        list(texts),
        encoder.encode,
        cache,
        getattr(encoder, "batch_size", 32),
        f"encode {branch} text ({ident.get('name')})",
        {"params": {"encoder": ident, "branch": branch}},
    )


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its ended workers (the fold networks may train in workers)."""
    import os

    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def train_image_encoder(
    samples: Sequence[Sample], labels: Sequence[str], encoder: Any, cache: Cache, seed: int
) -> tuple[np.ndarray, dict[str, Any], Path]:
    """Train ``encoder`` (one that ``learns_from_cards``) on ``samples`` with ``labels``, or load the
    weights an identical training left in the cache; afterwards the encoder's identity names its trained
    weights' hash, so its features are cached by it. Pass the training cards only: nothing else is read.
    Returns the training cards' own features (out-of-fold when cross-fitted), the training record (seed,
    cards, class order, seconds, weights hash) and the cached weights file."""
    import time

    from safetensors.numpy import save_file as np_save_file

    from asectl.backends.encoders import save_module_state
    from asectl.environment import training_machine

    ident = encoder.identity()
    key = make_key(
        TRAIN_STAGE,
        format=TRAIN_FORMAT,
        encoder=ident,
        seed=seed,
        cards=[[sha256_file(s.path), label] for s, label in zip(samples, labels)],
    )
    entry = cache.get(TRAIN_STAGE, key)
    if entry is None:
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        with ui.progress(1, f"train image encoder ({ident.get('encoder')}, {len(samples)} training cards)") as advance:
            own = encoder.fit([str(s.path) for s in samples], list(labels), seed)
            advance(1)
        record = {
            "encoder": ident,
            "seed": seed,
            "n_train": len(samples),
            "classes": list(encoder.classes),
            "seconds": round(time.perf_counter() - start, 2),
            "cpu_seconds": round(_cpu_seconds() - cpu_start, 2),
            "machine": training_machine(),  # its weights' last bits are this CPU's (docs/fuse-train.md)
        }

        def build(tmp):
            save_module_state(encoder.module, tmp / WEIGHTS_FILE)
            np_save_file({"z": np.ascontiguousarray(own)}, str(tmp / "train_features.safetensors"))
            (tmp / "record.json").write_text(json.dumps(record))
            return {"params": {"encoder": ident.get("encoder"), "seed": seed, "n_train": len(samples)}}

        entry = cache.put_tree(TRAIN_STAGE, key, build)
    encoder.load_finetuned(entry.file(WEIGHTS_FILE))
    record = {**entry.read_json("record.json"), "sha256": encoder.identity()["finetuned"]["sha256"]}
    return st_load(entry.read_bytes("train_features.safetensors"))["z"], record, entry.file(WEIGHTS_FILE)
