"""ASE-like card generator and the paper's task-specific data augmentation (TDA, section 3.5).

Every class has a generative model (``CLASS_MODELS``, documented in docs/dataset.md). Per card the
model's parameters are jittered so classes overlap; the jitter is centred within each class so the class
averages of the per-card statistics land on the paper's Table 1. Some classes differ in *shape*
(tilted ellipse, two clusters, ring), which the printed summary numbers do not carry.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from asectl.card import GEOMETRY, inside_range, png_bytes, record_from_points, render_card
from asectl.dataset import DEFAULT_LABELS, Dataset, stratified_split
from asectl.errors import ConfigError, DataError

# Paper Table 1: class sizes and class averages of per-card mu_x, mu_y, sd_x^2, sd_y^2.
PAPER_COUNTS = (225, 92, 44, 50, 44)
PAPER_TEST_SIZE = 130
TABLE1 = {
    "normal": (0.04, -0.05, 3.71, 3.52),
    "type1": (2.73, 0.59, 7.38, 5.52),
    "type2": (6.43, -3.21, 8.27, 8.63),
    "type3": (-1.10, 0.65, 8.14, 6.44),
    "type4": (-0.21, -0.01, 9.44, 8.77),
}
CENTER_JITTER = 0.6        # sd of the per-card centre offset (units)
VAR_JITTER = 0.2           # sd of the log of the per-card variance multiplier
N_RANGE = (250, 450)       # holes per card, inclusive
RING_WIDTH = 0.25          # ring radius sd as a fraction of the ring radius
CLUSTER_SHARE = 0.75       # share of the variance (along the cluster axis) due to cluster separation


@dataclass(frozen=True)
class ClassModel:
    label: str
    mean: tuple[float, float]
    var: tuple[float, float]
    shape: str                 # "gaussian", "two-cluster" or "ring"
    rho_mean: float = 0.0      # gaussian: per-card correlation ~ N(rho_mean, rho_sd)
    rho_sd: float = 0.0


CLASS_MODELS: dict[str, ClassModel] = {
    "normal": ClassModel("normal", TABLE1["normal"][:2], TABLE1["normal"][2:], "gaussian", 0.0, 0.08),
    "type1": ClassModel("type1", TABLE1["type1"][:2], TABLE1["type1"][2:], "gaussian", 0.45, 0.10),
    "type2": ClassModel("type2", TABLE1["type2"][:2], TABLE1["type2"][2:], "gaussian", -0.50, 0.10),
    "type3": ClassModel("type3", TABLE1["type3"][:2], TABLE1["type3"][2:], "two-cluster"),
    "type4": ClassModel("type4", TABLE1["type4"][:2], TABLE1["type4"][2:], "ring"),
}


def class_latents(model: ClassModel, n_cards: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Per-card generative parameters for one class, jitter centred so class averages are exact."""
    offsets = rng.normal(0.0, CENTER_JITTER, size=(n_cards, 2))
    log_mult = rng.normal(0.0, VAR_JITTER, size=(n_cards, 2))
    if n_cards > 1:
        offsets -= offsets.mean(axis=0)
        log_mult -= log_mult.mean(axis=0)
    mult = np.exp(log_mult)
    if n_cards > 1:
        mult /= mult.mean(axis=0)
    latents = []
    for i in range(n_cards):
        lat: dict[str, Any] = {
            "shape": model.shape,
            "center": [float(model.mean[0] + offsets[i, 0]), float(model.mean[1] + offsets[i, 1])],
            "var": [float(model.var[0] * mult[i, 0]), float(model.var[1] * mult[i, 1])],
            "n": int(rng.integers(N_RANGE[0], N_RANGE[1] + 1)),
        }
        if model.shape == "gaussian":
            lat["rho"] = float(np.clip(rng.normal(model.rho_mean, model.rho_sd), -0.9, 0.9))
        elif model.shape == "two-cluster":
            lat["theta"] = float(rng.uniform(0.0, math.pi))
        latents.append(lat)
    return latents


def sample_points(lat: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Hole positions for one card, all inside the fixed circular range (outliers are redrawn)."""
    n = lat["n"]
    out = np.empty((0, 2))
    while len(out) < n:
        pts = _draw(lat, n - len(out), rng)
        out = np.concatenate([out, pts[inside_range(pts)]])
    return out[:n]


def _draw(lat: dict[str, Any], n: int, rng: np.random.Generator) -> np.ndarray:
    cx, cy = lat["center"]
    vx, vy = lat["var"]
    shape = lat["shape"]
    if shape == "gaussian":
        c = lat["rho"] * math.sqrt(vx * vy)
        return rng.multivariate_normal([cx, cy], [[vx, c], [c, vy]], size=n)
    if shape == "two-cluster":
        # Two equal clusters at centre +/- d(cos t, sin t); d chosen so total variance per axis is (vx, vy).
        t = lat["theta"]
        d2 = CLUSTER_SHARE * vx * vy / (vy * math.cos(t) ** 2 + vx * math.sin(t) ** 2)
        d = math.sqrt(d2)
        sx2, sy2 = vx - d2 * math.cos(t) ** 2, vy - d2 * math.sin(t) ** 2
        side = rng.choice([-1.0, 1.0], size=n)
        base = rng.normal(size=(n, 2)) * np.sqrt([sx2, sy2])
        return base + np.array([cx, cy]) + side[:, None] * d * np.array([math.cos(t), math.sin(t)])
    if shape == "ring":
        # Elliptic ring: radius ~ N(r0, (RING_WIDTH r0)^2); E[x^2] = E[r^2]/2 = vx gives r0.
        r0 = math.sqrt(2.0 * vx / (1.0 + RING_WIDTH ** 2))
        r = np.abs(rng.normal(r0, RING_WIDTH * r0, size=n))
        phi = rng.uniform(0.0, 2.0 * math.pi, size=n)
        b = math.sqrt(vy / vx)
        return np.stack([cx + r * np.cos(phi), cy + b * r * np.sin(phi)], axis=1)
    if shape == "tda-gaussian":
        cov = np.asarray(lat["cov"], dtype=np.float64)
        return rng.multivariate_normal([cx, cy], cov, size=n)
    raise ValueError(f"unknown shape {shape!r}")


# ---------------------------------------------------------------------------------------------------
# Writing datasets


def _labels_csv(rows: Sequence[tuple[str, str, str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "label", "split"])
    w.writerows(rows)
    return buf.getvalue().encode()


def _prepare_out(out: Path, force: bool) -> Path:
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out}: folder exists and is not empty; choose another --out or pass --force")
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
    (tmp / "images").mkdir(parents=True)
    return tmp


def _commit_out(tmp: Path, out: Path) -> None:
    """Swap the finished folder into place so a killed run never leaves a half-written dataset."""
    if out.exists():
        old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def parse_counts(text: str | Sequence[int] | None) -> tuple[int, ...]:
    if text is None:
        return PAPER_COUNTS
    if isinstance(text, str):
        try:
            counts = tuple(int(x) for x in text.split(","))
        except ValueError:
            raise ConfigError(f"--counts {text!r}: give five whole numbers, e.g. 225,92,44,50,44") from None
    else:
        counts = tuple(int(x) for x in text)
    if len(counts) != len(DEFAULT_LABELS) or any(c < 0 for c in counts) or sum(counts) < 2:
        raise ConfigError(f"--counts {text!r}: need {len(DEFAULT_LABELS)} non-negative numbers "
                          f"({','.join(DEFAULT_LABELS)}) adding to at least 2")
    return counts


@dataclass
class SampledCard:
    label: str
    split: str
    latent: dict[str, Any]
    points: np.ndarray
    printed: dict[str, Any]


def sample_cards(seed: int = 0, counts: str | Sequence[int] | None = None,
                 test_size: int | None = None) -> list[SampledCard]:
    """Everything about a generated dataset except the pixels (fast; used by tests and benchmarks)."""
    counts = parse_counts(counts)
    total = sum(counts)
    if test_size is None:
        test_size = max(1, round(total * PAPER_TEST_SIZE / sum(PAPER_COUNTS)))
    rng = np.random.default_rng(seed)
    labels: list[str] = []
    latents: list[dict[str, Any]] = []
    for label, n in zip(DEFAULT_LABELS, counts):
        labels += [label] * n
        latents += class_latents(CLASS_MODELS[label], n, rng)
    # Shuffle card order so file names do not reveal the class.
    order = rng.permutation(total)
    labels = [labels[i] for i in order]
    latents = [latents[i] for i in order]
    splits = stratified_split(labels, test_size, seed)
    cards = []
    for i, (label, lat, split) in enumerate(zip(labels, latents, splits)):
        pts = sample_points(lat, np.random.default_rng([seed, i]))
        cards.append(SampledCard(label, split, lat, pts, record_from_points(pts)))
    return cards


def generate(out: str | Path, seed: int = 0, counts: str | Sequence[int] | None = None,
             test_size: int | None = None, force: bool = False,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write an ASE-like dataset: images/, labels.csv, truth.jsonl, synth.json. Returns a summary."""
    counts = parse_counts(counts)
    cards = sample_cards(seed, counts, test_size)
    out = Path(out)
    tmp = _prepare_out(out, force)
    rows, truth = [], []
    for i, c in enumerate(cards):
        name = f"images/{i:04d}.png"
        (tmp / name).write_bytes(png_bytes(render_card(c.points, c.printed)))
        rows.append((name, c.label, c.split))
        truth.append({"image": name, "label": c.label, "split": c.split, "printed": c.printed,
                      "latent": c.latent})
        if progress:
            progress(1)
    n_test = sum(c.split == "test" for c in cards)
    params = {"seed": seed, "counts": list(counts), "test_size": n_test,
              "center_jitter": CENTER_JITTER, "var_jitter": VAR_JITTER, "n_range": list(N_RANGE),
              "class_models": {k: asdict(v) for k, v in CLASS_MODELS.items()},
              "geometry": asdict(GEOMETRY)}
    _write_meta(tmp, rows, truth, {"generator": "asectl.synth", **params})
    _commit_out(tmp, out)
    return {"out": str(out), "cards": len(cards), "train": len(cards) - n_test, "test": n_test}


def _write_meta(tmp: Path, rows, truth, params) -> None:
    from asectl import __version__

    (tmp / "labels.csv").write_bytes(_labels_csv(rows))
    (tmp / "truth.jsonl").write_text("".join(json.dumps(t) + "\n" for t in truth))
    (tmp / "synth.json").write_text(json.dumps({"asectl_version": __version__, **params}, indent=1))


# ---------------------------------------------------------------------------------------------------
# TDA


def card_correlation(img) -> float:
    """Correlation of x and y over a card's pink pixels: the sign of sigma_xy, which no printed number carries."""
    from asectl.card import dot_pixels

    pts = dot_pixels(img)
    if len(pts) < 3:
        return 0.0
    c = np.corrcoef(pts[:, 0], pts[:, 1])[0, 1]
    return 0.0 if not np.isfinite(c) else float(c)


def fit_class_gaussians(records: Sequence[dict], labels: Sequence[str],
                        correlations: Sequence[float]) -> dict[str, dict[str, Any]]:
    """Per class: mean of per-card means, mean of per-card variances, sigma_xy from the mean correlation."""
    fits: dict[str, dict[str, Any]] = {}
    for label in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == label]
        mu = np.mean([[records[i]["mu_x"], records[i]["mu_y"]] for i in idx], axis=0)
        var = np.mean([[records[i]["sd_x"] ** 2, records[i]["sd_y"] ** 2] for i in idx], axis=0)
        rho = float(np.mean([correlations[i] for i in idx]))
        sxy = rho * math.sqrt(var[0] * var[1])
        fits[label] = {"mu": [float(mu[0]), float(mu[1])],
                       "cov": [[float(var[0]), sxy], [sxy, float(var[1])]],
                       "n_values": sorted(int(records[i]["N"]) for i in idx),
                       "cards": len(idx)}
    return fits


def augment(dataset: Dataset, records: Sequence[dict], out: str | Path, factor: float = 2.0,
            seed: int = 0, force: bool = False, stats_source: str = "ocr",
            progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """TDA: fit N(mu_cls, Sigma_cls) on the training split and add (factor-1) x train new training cards.

    ``records`` holds the parsed record of every sample in ``dataset`` (same order): OCR'd fields or
    printed truth. The test split is copied byte for byte and never used for fitting."""
    from asectl.imageio import load_image

    if factor < 1:
        raise ConfigError(f"--factor {factor}: must be at least 1 (2 doubles the training split)")
    if dataset.root is None or not dataset.labelled:
        raise ConfigError("TDA needs a labelled dataset folder (labels.csv or ImageFolder)")
    train_idx = [i for i, s in enumerate(dataset.samples) if s.split == "train"]
    need = ("N", "mu_x", "mu_y", "sd_x", "sd_y")
    for i in train_idx:
        rec = records[i]
        missing = [k for k in need if not isinstance(rec.get(k), (int, float)) or not math.isfinite(rec[k])]
        if missing:
            raise DataError(f"{dataset.samples[i].path}: record lacks {', '.join(missing)}; "
                            "fix or drop this card before augmenting")
    train_labels = [dataset.samples[i].label for i in train_idx]
    corrs = [card_correlation(load_image(dataset.samples[i].path)) for i in train_idx]
    fits = fit_class_gaussians([records[i] for i in train_idx], train_labels, corrs)
    out = Path(out)
    tmp = _prepare_out(out, force)
    rows, truth = [], []
    truth_src = _read_truth(dataset.root)
    for s in dataset.samples:
        dest = tmp / s.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s.path, dest)
        rows.append((s.name, s.label, s.split))
        if s.name in truth_src:
            truth.append(truth_src[s.name])
    rng = np.random.default_rng(seed)
    n_new = int(round((factor - 1.0) * len(train_idx)))
    # Each training card in turn gets a synthetic sibling of its class, so class shares are kept.
    parents = [train_idx[k % len(train_idx)] for k in range(n_new)]
    for k, i in enumerate(parents):
        label = dataset.samples[i].label
        fit = fits[label]
        lat = {"shape": "tda-gaussian", "center": fit["mu"], "cov": fit["cov"],
               "var": [fit["cov"][0][0], fit["cov"][1][1]], "n": int(rng.choice(fit["n_values"])),
               "tda": True}
        pts = sample_points(lat, np.random.default_rng([seed, 1_000_003, k]))
        printed = record_from_points(pts)
        name = f"images/tda-{k:04d}.png"
        (tmp / name).write_bytes(png_bytes(render_card(pts, printed)))
        rows.append((name, label, "train"))
        truth.append({"image": name, "label": label, "split": "train", "printed": printed, "latent": lat})
        if progress:
            progress(1)
    _write_meta(tmp, rows, truth, {"generator": "asectl.synth.augment", "source": str(dataset.root),
                                   "source_fingerprint": dataset.fingerprint(), "factor": factor,
                                   "seed": seed, "stats_source": stats_source, "class_fits": fits})
    _commit_out(tmp, out)
    return {"out": str(out), "added": n_new, "train": len(train_idx) + n_new,
            "test": len(dataset.samples) - len(train_idx), "fits": fits}


def _read_truth(root: Path) -> dict[str, dict]:
    path = root / "truth.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["image"]] = row
    return out


def read_truth(root: str | Path) -> dict[str, dict]:
    """truth.jsonl of a generated dataset, keyed by image name (empty when there is none)."""
    try:
        return _read_truth(Path(root))
    except (OSError, ValueError) as exc:
        raise DataError(f"{Path(root) / 'truth.jsonl'}: unreadable ({exc})") from None
