"""Prior knowledge for ``reason``: per-class typical statistics of the training split, and the numbers a
card's record is compared with them by (part of g(.) in the paper's Eq. 1). Never built from test cards."""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np

from asectl.cache import canonical_json, sha256_bytes
from asectl.domain.dataset import NORMAL, Dataset, Sample, order_labels
from asectl.errors import ConfigError, DataError

log = logging.getLogger("asectl")

PRIORS_FORMAT = "asectl-priors/1"
SCALAR_FIELDS = ("N", "mu_x", "mu_y", "sd_x", "sd_y")
SHARE_FEATURES = ("near", "far")  # share of holes near the centre / far out (from the radius counts)
PRIOR_FEATURES = SCALAR_FIELDS + SHARE_FEATURES
SHOWN_FEATURES = PRIOR_FEATURES[1:]  # N is not a shape feature: kept in priors, not compared
FIELD_WORDS = {
    "N": "N",
    "mu_x": "mean x",
    "mu_y": "mean y",
    "sd_x": "sd x",
    "sd_y": "sd y",
    "near": "near",
    "far": "far",
}


# --- a record's numbers ------------------------------------------------------------------------------
def field_text(value: Any, field: str) -> str:
    """A field's value as the prompt shows it: N whole, shares in percent, positions with two decimals."""
    if field == "N":
        return str(round(value))
    if field in SHARE_FEATURES:
        return f"{value:.0%}"
    return f"{float(value):.2f}"


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): a field the OCR read."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def radius_counts(fields: Mapping[str, Any], edges: Sequence[float]) -> list[int] | None:
    """The record's hole counts per radius interval, or None unless all of them were read."""
    bins = fields.get("bins")
    if isinstance(bins, list) and len(bins) == len(edges) - 1 and all(is_number(b) for b in bins):
        return [int(b) for b in bins]
    return None


def near_far_intervals(edges: Sequence[float]) -> tuple[int, int] | None:
    """Radius intervals summarised as "near the centre" (the first two) and "far out" (the last three),
    when the spec has five or more: the full radius profile is too long for a small model's prompt."""
    return (2, len(edges) - 4) if len(edges) - 1 >= 5 else None


def card_features(fields: Mapping[str, Any], edges: Sequence[float]) -> dict[str, float]:
    """The numbers priors and comparisons use: the readable scalar fields, plus the share of holes near
    the centre and far out (from the radius counts)."""
    out = {f: float(fields[f]) for f in SCALAR_FIELDS if is_number(fields.get(f))}
    bins, nf = radius_counts(fields, edges), near_far_intervals(edges)
    if bins is not None and nf is not None and sum(bins) > 0:
        total = float(sum(bins))
        out["near"] = sum(bins[: nf[0]]) / total
        out["far"] = sum(bins[nf[1] :]) / total
    return out


# --- priors ------------------------------------------------------------------------------------------
def _r(x: float) -> float:
    return round(float(x), 4)


def build_priors(
    records: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    bin_edges: Sequence[float] | None = None,
    normal_label: str | None = NORMAL,
) -> dict[str, Any]:
    """Per-class typical statistics of training records (OCR'd fields), as a plain JSON-able dict.

    For each label: number of cards, mean and standard deviation of every field (and of the near-centre
    and far-out shares of holes), and the mean share of holes per radius interval. ``pooled_sd`` is the
    within-class spread over all classes, the scale for a class with a single card. A trained model
    bundle stores this dict so that ``reason`` on new images (outside any dataset) uses the same prior
    knowledge."""
    if len(records) != len(labels):
        raise ConfigError(f"build_priors: {len(records)} records but {len(labels)} labels")
    if bin_edges is None:
        from asectl.domain.card import default_spec

        bin_edges = default_spec().bin_edges
    edges = [float(e) for e in bin_edges]
    feats = [card_features(r or {}, edges) for r in records]
    classes: dict[str, Any] = {}
    for label in order_labels(labels):
        idx = [i for i, lab in enumerate(labels) if lab == label and feats[i]]
        if not idx:
            continue
        mean, sd, n_values = {}, {}, {}
        for f in PRIOR_FEATURES:
            vals = np.array([feats[i][f] for i in idx if f in feats[i]], dtype=np.float64)
            if len(vals):
                mean[f] = _r(vals.mean())
                sd[f] = _r(vals.std(ddof=1)) if len(vals) > 1 else 0.0
                n_values[f] = int(len(vals))
        shares = [
            np.array(b, dtype=np.float64) / sum(b)
            for b in (radius_counts(records[i], edges) for i in idx)
            if b and sum(b) > 0
        ]
        classes[label] = {
            "cards": len(idx),
            "mean": mean,
            "sd": sd,
            "values": n_values,
            "bin_share": [_r(x) for x in np.mean(shares, axis=0)] if shares else None,
        }
    if not classes:
        raise ConfigError("build_priors: no usable training record; the priors need OCR'd training cards")
    pooled = {}
    for f in PRIOR_FEATURES:
        groups = [c for c in classes.values() if c["values"].get(f, 0) > 1]
        dof = sum(c["values"][f] - 1 for c in groups)
        if dof:
            pooled[f] = _r(math.sqrt(sum((c["values"][f] - 1) * c["sd"][f] ** 2 for c in groups) / dof))
        else:  # one card per class: the spread between cards is the only scale there is
            vals = [feat[f] for feat in feats if f in feat]
            if len(vals) > 1:
                pooled[f] = _r(np.std(vals, ddof=1))
    return {
        "format": PRIORS_FORMAT,
        "normal_label": normal_label if normal_label in classes else None,
        "features": list(PRIOR_FEATURES),
        "bin_edges": edges,
        "classes": classes,
        "pooled_sd": pooled,
        "cards": sum(c["cards"] for c in classes.values()),
    }


def check_priors(priors: Any, where: str = "priors") -> dict[str, Any]:
    """Validate a priors dict (e.g. read back from a bundle or a --priors file)."""
    if not isinstance(priors, dict) or priors.get("format") != PRIORS_FORMAT:
        raise ConfigError(
            f"{where}: not asectl priors (expected format '{PRIORS_FORMAT}'); write them with "
            "`asectl reason DATASET --priors-out FILE.json` or build_priors()"
        )
    rebuild = "rebuild them from a labelled training split (--priors-out)"
    classes = priors.get("classes")
    if not isinstance(classes, dict) or not classes:
        raise ConfigError(f"{where}: priors have no 'classes'; {rebuild}")
    edges = priors.get("bin_edges")
    if not isinstance(edges, list) or not all(is_number(e) for e in edges):
        raise ConfigError(f"{where}: priors lack numeric 'bin_edges'; {rebuild}")
    pooled = priors.get("pooled_sd", {})
    if not isinstance(pooled, dict) or not all(k in PRIOR_FEATURES and is_number(v) for k, v in pooled.items()):
        raise ConfigError(f"{where}: priors have a malformed 'pooled_sd'; {rebuild}")
    for label, c in classes.items():
        ok = (
            isinstance(label, str)
            and label
            and isinstance(c, dict)
            and isinstance(c.get("cards"), int)
            and all(
                isinstance(c.get(k), dict)
                and set(c[k]) <= set(PRIOR_FEATURES)
                and all(is_number(v) for v in c[k].values())
                for k in ("mean", "sd", "values")
            )
            and set(c["sd"]) == set(c["mean"])
            and (
                c.get("bin_share") is None
                or (
                    isinstance(c["bin_share"], list)
                    and len(c["bin_share"]) == len(edges) - 1
                    and all(is_number(v) for v in c["bin_share"])
                )
            )
        )
        if not ok:
            raise ConfigError(
                f"{where}: priors of class '{label}' are malformed (need cards, and mean, sd and "
                f"values per feature); {rebuild}"
            )
    return priors


def priors_sha256(priors: Mapping[str, Any]) -> str:
    return sha256_bytes(canonical_json(priors).encode())


def deviation_scale(priors: Mapping[str, Any], c: Mapping[str, Any], f: str) -> float:
    """The spread a deviation is measured in: the class's own sd when it has two or more values, else the
    pooled sd; never zero."""
    own = c["sd"].get(f, 0.0) if c["values"].get(f, 0) > 1 else 0.0
    floor = 0.01 if f in SHARE_FEATURES else 0.05
    return max(own or priors.get("pooled_sd", {}).get(f, 0.0), floor)


def z_score(value: float, priors: Mapping[str, Any], c: Mapping[str, Any], f: str) -> float:
    """How far ``value`` of feature ``f`` lies from class ``c``'s mean, in its ``deviation_scale``."""
    return (value - c["mean"][f]) / deviation_scale(priors, c, f)


def class_distances(features: Mapping[str, float], priors: Mapping[str, Any]) -> dict[str, float]:
    """Root mean square z-score of a card's features against each class's typical statistics."""
    out = {}
    for label, c in priors["classes"].items():
        zs = [z_score(v, priors, c, f) for f, v in features.items() if f in SHOWN_FEATURES and f in c["mean"]]
        if zs:
            out[label] = round(float(np.sqrt(np.mean(np.square(zs)))), 2)
    return out


def labelled_training_cards(dataset: Dataset) -> list[Sample]:
    """The training split the priors come from; a ConfigError when it is missing or unlabelled."""
    train = dataset.split("train")
    if not train or any(s.label is None for s in train):
        raise ConfigError(
            "reason needs prior knowledge from a labelled training split: pass a dataset folder "
            "(labels.csv with split=train rows), or priors from an earlier run "
            "(--priors FILE.json written with --priors-out, or a trained model bundle)"
        )
    return train


def priors_from_dataset(
    dataset: Dataset, stats: Mapping[str, Mapping[str, Any]], bin_edges: Sequence[float]
) -> dict[str, Any]:
    """Priors from the training split of a labelled dataset (never the test split)."""
    train = labelled_training_cards(dataset)
    recs, labels, skipped = [], [], []
    for s in train:
        rec = stats.get(s.name) or {}
        if not rec.get("fields"):  # partly read records count: build_priors skips missing fields
            skipped.append(s.name)
            continue
        recs.append(rec["fields"])
        labels.append(s.label)
    if skipped:
        log.warning("priors: %d training card(s) without a record were left out (first: %s)", len(skipped), skipped[0])
    if not recs:
        raise DataError("no training card has a readable record; check the cards with `asectl ocr`")
    return build_priors(recs, labels, bin_edges, NORMAL)
