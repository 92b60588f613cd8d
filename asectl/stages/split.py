"""The split belongs to the model: ``fuse-train`` stores in the bundle every card of the dataset it was
trained on (name, label, split, sha256) and how the split was made; ``report`` and ``predict`` on a
labelled folder use that split, never one they make themselves. Otherwise another ``--split-seed`` (or,
before it existed, another ``--seed``) would score training cards as test cards. A model whose thresholds
were re-set on a line's cards (``asectl calibrate``) holds that folder's split the same way."""

from __future__ import annotations

import dataclasses

from asectl.bundle import Bundle
from asectl.cache import sha256_files
from asectl.domain.dataset import Dataset, split_text
from asectl.errors import ConfigError

EXAMPLES = 2  # card names quoted in a mismatch message


def split_summary(record: dict) -> str:
    """A stored split as people read it, e.g. "44 train / 17 test, stratified, split seed 0"."""
    return split_text([c["split"] for c in record["cards"]], record.get("source", ""), record.get("split_seed"))


TRAINING = "training"  # the folder is the model's training data: the model's split
THRESHOLDS = "thresholds"  # the folder is the line whose cards re-set its thresholds (asectl calibrate)


def stored_splits(bundle: Bundle) -> list[tuple[str, dict, str]]:
    """(kind, split record, where it came from) of every folder whose split the model holds: the one it
    was trained on, and the line its thresholds were re-set on (asectl.stages.calibrate), if any."""
    cfg = bundle.config
    out = [(TRAINING, cfg["split"], cfg["training"].get("dataset", "?"))]
    recut = cfg.get("recalibration")
    if recut:
        out.append((THRESHOLDS, recut["split"], recut.get("dataset", "?")))
    return out


def model_split(dataset: Dataset, bundle: Bundle) -> tuple[Dataset, str | None]:
    """``dataset`` with the split ``bundle`` holds for it, and which: ``TRAINING`` (the model's own data),
    ``THRESHOLDS`` (the line its thresholds were re-set on: the cards of its training split set them) or
    None (new data: the folder's own split stands).

    A folder sharing any card (by content) with a stored split must hold exactly that split's cards
    (names and contents; labels may have been corrected since), else a ConfigError says what differs:
    part of its "test" split could be cards the model trained on, or cards that set its thresholds."""
    digests = sha256_files([s.path for s in dataset.samples])
    for kind, record, where in stored_splits(bundle):
        known = {c["sha256"] for c in record["cards"]}
        if known.intersection(digests):
            return _apply(dataset, digests, record, where, kind), kind
    return dataset, None


def _apply(dataset: Dataset, digests: list[str], record: dict, where: str, kind: str) -> Dataset:
    stored = {(c["image"], c["sha256"]): c for c in record["cards"]}
    mine = {(s.name, d) for s, d in zip(dataset.samples, digests)}
    missing = sorted(name for name, d in stored if (name, d) not in mine)
    extra = sorted(s.name for s, d in zip(dataset.samples, digests) if (s.name, d) not in stored)
    if missing or extra:
        parts = (
            [f"{len(missing)} of its cards missing or changed (e.g. {', '.join(missing[:EXAMPLES])})"]
            if missing
            else []
        ) + ([f"{len(extra)} card(s) it never saw (e.g. {', '.join(extra[:EXAMPLES])})"] if extra else [])
        fix = (
            f"use the folder it was trained on ({where}), or retrain: asectl fuse-train {dataset.root}"
            if kind == TRAINING
            else f"use the folder its thresholds were set on ({where}), or set them again: asectl calibrate "
            f"{dataset.root}"
        )
        what = "the split the model was trained with" if kind == TRAINING else "the split its thresholds were set on"
        raise ConfigError(f"{dataset.root}: the cards do not match {what} ({'; '.join(parts)}); {fix}")
    samples = [dataclasses.replace(s, split=stored[(s.name, d)]["split"]) for s, d in zip(dataset.samples, digests)]
    return dataclasses.replace(dataset, samples=samples, split_seed=record.get("split_seed"))
