"""Datasets: a folder with ``labels.csv`` (image,label,split), an ImageFolder (``<label>/*.png``), or
plain image paths (no labels, e.g. for ``predict``). Every path must stay inside the dataset folder."""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from asectl.cache import canonical_json, sha256_file
from asectl.errors import ConfigError, DataError
from asectl.imageio import IMAGE_SUFFIXES, is_image_path

DEFAULT_LABELS = ("normal", "type1", "type2", "type3", "type4")
NORMAL = "normal"
SPLITS = ("train", "test")
LABELS_FILE = "labels.csv"
# Share of a folder without labels.csv held out as test: the paper's 130 test cards of 455 (paper lines
# 189 and 204; the paper does not say how its split was drawn: here stratified and seeded).
TEST_FRACTION = 130 / 455
# Files asectl writes into an output folder (report, exported bundle): a folder holding one of them is
# asectl's output, never a class of cards.
OUTPUT_MARKERS = ("report.html", "metrics.json", "bundle.json")
log = logging.getLogger("asectl")


@dataclass(frozen=True)
class Sample:
    path: Path  # absolute path of the image file
    name: str  # path relative to the dataset root (or the file name), used in records
    label: str | None = None
    split: str | None = None


@dataclass
class Dataset:
    samples: list[Sample]
    root: Path | None = None
    source: str = "images"  # "labels.csv", "imagefolder" or "images"
    labels: list[str] = field(default_factory=list)
    split_seed: int | None = None  # the seed of an ImageFolder's stratified split (None: labels.csv's)

    def __len__(self) -> int:
        return len(self.samples)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    @property
    def labelled(self) -> bool:
        return bool(self.samples) and all(s.label is not None for s in self.samples)

    def fingerprint(self) -> str:
        """Hash of names, labels, splits and image bytes: what a trained model depends on."""
        rows = [(s.name, s.label, s.split, sha256_file(s.path)) for s in self.samples]
        return hashlib.sha256(canonical_json(rows).encode()).hexdigest()

    def split_text(self) -> str:
        """How the cards are split, e.g. "44 train / 17 test, stratified, split seed 0"."""
        return split_text([s.split for s in self.samples], self.source, self.split_seed)

    def split_record(self) -> dict[str, Any]:
        """What a model stores of the split it was trained on: every card's name, label, split and
        sha256, and how the split was made (asectl.stages.split checks a folder against it)."""
        return {
            "source": self.source,
            "split_seed": self.split_seed,
            "cards": [
                {"image": s.name, "label": s.label, "split": s.split, "sha256": sha256_file(s.path)}
                for s in self.samples
            ],
        }

    def class_counts(self, split: str | None = None) -> dict[str, int]:
        rows = self.samples if split is None else self.split(split)
        c = Counter(s.label for s in rows)
        return {lab: c.get(lab, 0) for lab in self.labels}


def split_text(splits: Sequence[str | None], source: str, split_seed: int | None) -> str:
    """A split as people read it: counts and how it was made (a Dataset's, or one a model stored)."""
    counts = f"{list(splits).count('train')} train / {list(splits).count('test')} test"
    if split_seed is not None:
        return f"{counts}, stratified, split seed {split_seed}"
    return f"{counts}, from {LABELS_FILE}" if source == LABELS_FILE else counts


def binary_label(label: str) -> str:
    return "normal" if label == NORMAL else "defective"


def order_labels(found: Iterable[str]) -> list[str]:
    """The default five-class order when the data uses those names, otherwise sorted."""
    found = set(found)
    if found <= set(DEFAULT_LABELS):
        return [lab for lab in DEFAULT_LABELS if lab in found]
    return sorted(found)


def stratified_split(labels: Sequence[str], test_size: int, seed: int) -> list[str]:
    """Assign 'train'/'test' per item: test counts per class proportional to class size (largest
    remainder), at least one test and one train item for every class with two or more items."""
    n = len(labels)
    if not 0 < test_size < n:
        raise ConfigError(f"test size {test_size} must be between 1 and {n - 1} for {n} images")
    by_class: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    classes = sorted(by_class)
    exact = {c: len(by_class[c]) * test_size / n for c in classes}
    alloc = {c: int(exact[c]) for c in classes}
    for c in sorted(classes, key=lambda c: (-(exact[c] - alloc[c]), c))[: test_size - sum(alloc.values())]:
        alloc[c] += 1
    for c in classes:
        size = len(by_class[c])
        if size >= 2:
            alloc[c] = min(max(alloc[c], 1), size - 1)
    rng = np.random.default_rng(seed)
    split = ["train"] * n
    for c in classes:
        idx = np.array(by_class[c])
        rng.shuffle(idx)
        for i in idx[: alloc[c]]:
            split[int(i)] = "test"
    return split


def _inside(root: Path, real_root: Path, rel: str, where: str) -> Path:
    """``root / rel`` resolved; ``real_root`` is ``root.resolve()``, computed once per dataset."""
    if not rel:
        raise DataError(f"{where}: empty image path")
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise DataError(f"{where}: image path '{rel}' leaves the dataset folder; use a path relative to {root}")
    full = (root / p).resolve()
    if real_root not in full.parents:
        raise DataError(f"{where}: image path '{rel}' resolves outside the dataset folder (symlink?)")
    return full


def read_labels_csv(root: Path, require_train: bool = True) -> Dataset:
    csv_path = root / LABELS_FILE
    try:
        text = csv_path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{csv_path}: not UTF-8 text; save it as UTF-8 CSV") from None
    reader = csv.DictReader(io.StringIO(text))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in ("image", "label", "split") if c not in cols]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}; the header must be image,label,split")
    samples, seen, real_root = [], {}, root.resolve()
    for lineno, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        where = f"{csv_path}:{lineno}"
        rel, label, split = row["image"], row["label"], row["split"].lower()
        path = _inside(root, real_root, rel, where)
        if rel in seen:
            raise DataError(f"{where}: duplicate row for '{rel}' (first on line {seen[rel]}); keep one")
        seen[rel] = lineno
        if not label:
            raise DataError(f"{where}: empty label for '{rel}'")
        if split not in SPLITS:
            raise DataError(f"{where}: split '{row['split']}' is not train or test")
        if not path.is_file():
            raise DataError(f"{where}: image '{rel}' not found in {root}")
        samples.append(Sample(path, rel, label, split))
    if not samples:
        raise DataError(f"{csv_path}: no rows; add image,label,split lines")
    ds = Dataset(samples, root, LABELS_FILE, order_labels(s.label for s in samples))
    if require_train:
        _check_label_coverage(ds, csv_path)
    return ds


def _check_label_coverage(ds: Dataset, where: Path) -> None:
    train_labels = {s.label for s in ds.split("train")}
    if not train_labels:
        raise DataError(f"{where}: no training images; mark some rows with split=train")
    unknown = sorted({s.label for s in ds.split("test")} - train_labels)
    if unknown:
        raise DataError(f"{where}: test label(s) {', '.join(unknown)} never appear in the train split")


def class_folders(root: Path) -> list[Path]:
    """The class sub-folders of an ImageFolder: hidden folders and folders asectl wrote (a report or an
    exported bundle, told by OUTPUT_MARKERS) are skipped, with a warning naming them."""
    folders = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        marker = next((m for m in OUTPUT_MARKERS if (sub / m).is_file()), None)
        if marker is not None:
            log.warning("%s: skipped, not a class (asectl output: it holds %s)", sub, marker)
        else:
            folders.append(sub)
    return folders


def read_image_folder(root: Path, test_fraction: float = TEST_FRACTION, split_seed: int = 0) -> Dataset:
    """``<label>/<image>`` folders, split into train and test by ``stratified_split`` seeded with
    ``split_seed`` (a seed of its own: the training seed never moves a card between the splits)."""
    rows = []
    for sub in class_folders(root):
        images = [f for f in sorted(sub.iterdir()) if f.is_file() and is_image_path(f)]
        if not images:
            log.warning("%s: empty class folder (no images), skipped", sub)
        rows += [(f, f"{sub.name}/{f.name}", sub.name) for f in images]
    if not rows:
        raise DataError(f"{root}: no {LABELS_FILE} and no <label>/<image> sub-folders; see docs/dataset.md")
    labels = [r[2] for r in rows]
    test_size = max(1, round(len(rows) * test_fraction))
    splits = stratified_split(labels, test_size, split_seed) if len(rows) > 1 else ["train"]
    samples = [Sample(f.resolve(), name, lab, sp) for (f, name, lab), sp in zip(rows, splits)]
    ds = Dataset(samples, root, "imagefolder", order_labels(labels), split_seed=int(split_seed))
    _check_label_coverage(ds, root)
    return ds


def load_dataset(path: str | Path, split_seed: int = 0, require_train: bool = True) -> Dataset:
    """A labelled dataset folder (labels.csv or ImageFolder). ``require_train``: the training stages need
    a train split covering every test label; the per-image stages read any labelled folder.
    ``split_seed`` seeds the split of a folder without labels.csv (labels.csv names its own split)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{root}: dataset folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: expected a dataset folder with {LABELS_FILE}")
    if (root / LABELS_FILE).is_file():
        return read_labels_csv(root, require_train)
    return read_image_folder(root, split_seed=split_seed)


def load_inputs(inputs: Sequence[str | Path], split_seed: int = 0) -> Dataset:
    """What a stage command accepts: one dataset folder, or image files / folders / globs."""
    if len(inputs) == 1:
        p = Path(inputs[0]).expanduser()
        if p.is_dir() and ((p / LABELS_FILE).is_file() or any(c.is_dir() for c in p.iterdir())):
            return load_dataset(p, split_seed=split_seed, require_train=False)
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.is_file() and is_image_path(f)))
        elif p.exists():
            files.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(p)))
            if not matches:
                raise DataError(f"{p}: no such file, folder or glob match")
            files.extend(m for m in matches if m.is_file())
    if not files:
        kinds = "/".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
        raise DataError(
            f"{', '.join(map(str, inputs))}: no images found (looked for {kinds} files); pass card images, "
            f"a folder of them, or a dataset folder with {LABELS_FILE} or one sub-folder per class"
        )
    names = Counter(f.name for f in files)
    samples = [Sample(f.resolve(), f.name if names[f.name] == 1 else str(f), None, None) for f in files]
    return Dataset(samples, None, "images", [])
