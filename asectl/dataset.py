"""Datasets: a folder with ``labels.csv`` (image,label,split), an ImageFolder (``<label>/*.png``), or
plain image paths (no labels, e.g. for ``predict``). Every path must stay inside the dataset folder."""

from __future__ import annotations

import csv
import glob
import hashlib
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from asectl.cache import canonical_json, sha256_file
from asectl.errors import ConfigError, DataError
from asectl.imageio import is_image_path

DEFAULT_LABELS = ("normal", "type1", "type2", "type3", "type4")
NORMAL = "normal"
SPLITS = ("train", "test")
LABELS_FILE = "labels.csv"


@dataclass(frozen=True)
class Sample:
    path: Path            # absolute path of the image file
    name: str             # path relative to the dataset root (or the file name), used in records
    label: str | None = None
    split: str | None = None


@dataclass
class Dataset:
    samples: list[Sample]
    root: Path | None = None
    source: str = "images"          # "labels.csv", "imagefolder" or "images"
    labels: list[str] = field(default_factory=list)

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

    def class_counts(self, split: str | None = None) -> dict[str, int]:
        rows = self.samples if split is None else self.split(split)
        c = Counter(s.label for s in rows)
        return {lab: c.get(lab, 0) for lab in self.labels}


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
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}; "
                        "the header must be image,label,split")
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


def read_image_folder(root: Path, test_fraction: float = 130 / 455, seed: int = 0) -> Dataset:
    rows = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(sub.iterdir()):
            if f.is_file() and is_image_path(f):
                rows.append((f, f"{sub.name}/{f.name}", sub.name))
    if not rows:
        raise DataError(f"{root}: no {LABELS_FILE} and no <label>/<image> sub-folders; see docs/dataset.md")
    labels = [r[2] for r in rows]
    test_size = max(1, round(len(rows) * test_fraction))
    splits = stratified_split(labels, test_size, seed) if len(rows) > 1 else ["train"]
    samples = [Sample(f.resolve(), name, lab, sp) for (f, name, lab), sp in zip(rows, splits)]
    ds = Dataset(samples, root, "imagefolder", order_labels(labels))
    _check_label_coverage(ds, root)
    return ds


def load_dataset(path: str | Path, seed: int = 0, require_train: bool = True) -> Dataset:
    """A labelled dataset folder (labels.csv or ImageFolder). ``require_train``: the training stages need
    a train split covering every test label; the per-image stages read any labelled folder."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{root}: dataset folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: expected a dataset folder with {LABELS_FILE}")
    if (root / LABELS_FILE).is_file():
        return read_labels_csv(root, require_train)
    return read_image_folder(root, seed=seed)


def load_inputs(inputs: Sequence[str | Path], seed: int = 0) -> Dataset:
    """What a stage command accepts: one dataset folder, or image files / folders / globs."""
    if len(inputs) == 1:
        p = Path(inputs[0]).expanduser()
        if p.is_dir() and ((p / LABELS_FILE).is_file() or any(c.is_dir() for c in p.iterdir())):
            return load_dataset(p, seed=seed, require_train=False)
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
        raise DataError(f"{', '.join(map(str, inputs))}: no images found")
    names = Counter(f.name for f in files)
    samples = [Sample(f.resolve(), f.name if names[f.name] == 1 else str(f), None, None) for f in files]
    return Dataset(samples, None, "images", [])
