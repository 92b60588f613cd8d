"""The split belongs to the model: ``fuse-train`` stores in the bundle every card of the dataset it was
trained on (name, label, split, sha256) and how the split was made; ``report`` and ``predict`` on a
labelled folder use that split, never one they make themselves. Otherwise another ``--split-seed`` (or,
before it existed, another ``--seed``) would score training cards as test cards."""

from __future__ import annotations

import dataclasses

from asectl.bundle import Bundle
from asectl.cache import sha256_file
from asectl.domain.dataset import Dataset, split_text
from asectl.errors import ConfigError

EXAMPLES = 2  # card names quoted in a mismatch message


def split_summary(record: dict) -> str:
    """A stored split as people read it, e.g. "44 train / 17 test, stratified, split seed 0"."""
    return split_text([c["split"] for c in record["cards"]], record.get("source", ""), record.get("split_seed"))


def model_split(dataset: Dataset, bundle: Bundle) -> tuple[Dataset, bool]:
    """``dataset`` with the split ``bundle`` was trained with, and whether it is that model's data.

    A folder sharing no card (by content) with the model's dataset is new data: its own split stands
    (False). A folder sharing any card must hold exactly the model's cards (names and contents; labels
    may have been corrected since), else a ConfigError says what differs: part of its "test" split
    could be cards the model trained on."""
    record = bundle.config["split"]
    stored = {(c["image"], c["sha256"]): c for c in record["cards"]}
    known = {c["sha256"] for c in record["cards"]}
    digests = [sha256_file(s.path) for s in dataset.samples]
    if not known.intersection(digests):
        return dataset, False
    mine = {(s.name, d) for s, d in zip(dataset.samples, digests)}
    missing = sorted(name for name, d in stored if (name, d) not in mine)
    extra = sorted(s.name for s, d in zip(dataset.samples, digests) if (s.name, d) not in stored)
    if missing or extra:
        where = bundle.config["training"].get("dataset", "?")
        parts = (
            [f"{len(missing)} of its cards missing or changed (e.g. {', '.join(missing[:EXAMPLES])})"]
            if missing
            else []
        ) + ([f"{len(extra)} card(s) it never saw (e.g. {', '.join(extra[:EXAMPLES])})"] if extra else [])
        raise ConfigError(
            f"{dataset.root}: the cards do not match the split the model was trained with "
            f"({'; '.join(parts)}); use the folder it was trained on ({where}), or retrain: "
            f"asectl fuse-train {dataset.root}"
        )
    samples = [dataclasses.replace(s, split=stored[(s.name, d)]["split"]) for s, d in zip(dataset.samples, digests)]
    return dataclasses.replace(dataset, samples=samples, split_seed=record.get("split_seed")), True
