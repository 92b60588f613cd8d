"""ASE-like card generator and the paper's task-specific data augmentation (TDA, section 3.5).

Every class has a generative model (``CLASS_MODELS``, documented in docs/dataset.md). Per card the
model's parameters are jittered so classes overlap; the jitter is centred within each class so the class
averages of the per-card statistics land on the paper's Table 1. Some classes differ in *shape*
(tilted ellipse, two clusters, ring), which the printed summary numbers do not carry. That is the
``clean`` difficulty. The default ``field`` difficulty builds on it with severities, shapes that are
typical rather than certain, inspector disagreement and acquisition variation (``_field_cards``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from asectl.domain.card import (
    GEOMETRY,
    NOISY_PNG_LEVEL,
    acquire,
    default_spec,
    inside_range,
    png_bytes,
    record_from_points,
    render_card,
)
from asectl.domain.dataset import DEFAULT_LABELS, Dataset, stratified_split
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
CENTER_JITTER = 0.6  # sd of the per-card centre offset (units)
VAR_JITTER = 0.2  # sd of the log of the per-card variance multiplier
N_RANGE = (250, 450)  # holes per card, inclusive
RING_WIDTH = 0.25  # ring radius sd as a fraction of the ring radius
CLUSTER_SHARE = 0.75  # share of the variance (along the cluster axis) due to cluster separation


@dataclass(frozen=True)
class ClassModel:
    label: str
    mean: tuple[float, float]
    var: tuple[float, float]
    shape: str  # "gaussian", "two-cluster" or "ring"
    rho_mean: float = 0.0  # gaussian: per-card correlation ~ N(rho_mean, rho_sd)
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
        return _two_clusters((cx, cy), (vx, vy), CLUSTER_SHARE, lat["theta"], 0.0, n, rng)
    if shape == "ring":
        return _ring((cx, cy), (vx, vy), n, rng)
    if shape == "field":
        # A share of the holes on a ring, the rest in two (nearly merged) clusters; both parts have the
        # card's per-axis variance, so the mixture keeps it (docs/dataset.md, "Field difficulty").
        on_ring = rng.random(n) < lat["ring_share"]
        pts = np.empty((n, 2))
        pts[~on_ring] = _two_clusters(
            (cx, cy), (vx, vy), lat["cluster_share"], lat["theta"], lat["rho"], int(n - on_ring.sum()), rng
        )
        pts[on_ring] = _ring((cx, cy), (vx, vy), int(on_ring.sum()), rng)
        return pts
    if shape == "tda-gaussian":
        cov = np.asarray(lat["cov"], dtype=np.float64)
        return rng.multivariate_normal([cx, cy], cov, size=n)
    raise ValueError(f"unknown shape {shape!r}")


def _two_clusters(center, var, share: float, t: float, rho: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Two equal clusters at centre +/- d(cos t, sin t); d chosen so that ``share`` of the variance along
    the cluster axis is separation and the total variance per axis is ``var``. Within a cluster the
    axes correlate with ``rho``."""
    (cx, cy), (vx, vy) = center, var
    d2 = share * vx * vy / (vy * math.cos(t) ** 2 + vx * math.sin(t) ** 2)
    d = math.sqrt(d2)
    sx2, sy2 = vx - d2 * math.cos(t) ** 2, vy - d2 * math.sin(t) ** 2
    side = rng.choice([-1.0, 1.0], size=n)
    z = rng.normal(size=(n, 2))
    if rho:
        z[:, 1] = rho * z[:, 0] + math.sqrt(1.0 - rho**2) * z[:, 1]
    base = z * np.sqrt([sx2, sy2])
    return base + np.array([cx, cy]) + side[:, None] * d * np.array([math.cos(t), math.sin(t)])


def _ring(center, var, n: int, rng: np.random.Generator) -> np.ndarray:
    """Elliptic ring: radius ~ |N(r0, (RING_WIDTH r0)^2)|, angle uniform; E[x^2] = E[r^2]/2 = vx gives r0."""
    (cx, cy), (vx, vy) = center, var
    r0 = math.sqrt(2.0 * vx / (1.0 + RING_WIDTH**2))
    r = np.abs(rng.normal(r0, RING_WIDTH * r0, size=n))
    phi = rng.uniform(0.0, 2.0 * math.pi, size=n)
    b = math.sqrt(vy / vx)
    return np.stack([cx + r * np.cos(phi), cy + b * r * np.sin(phi)], axis=1)


# ---------------------------------------------------------------------------------------------------
# The field difficulty (docs/dataset.md, "Field difficulty"): defects of every severity, class shapes
# that are typical rather than certain, inspector disagreement on borderline cards, a wider range of
# hole counts, and acquisition variation. ``clean`` is the model above, unchanged.

DIFFICULTIES = ("field", "clean")
DEFECTS = ("type1", "type2", "type3", "type4")
FIELD_N_RANGE = (60, 600)  # holes per card, log-uniform (small panels give noisy printed statistics)
# Severity s in [0, 1] of a defect (0: not visible, 1: gross): mild ~ U(0, MILD_EDGE) for a share
# MILD_SHARE of the defective cards, else ~ U(MILD_EDGE, 1). MILD_SHARE is the one calibrated knob
# (docs/dataset.md, "Calibration"); every other value below is set from stated realism, not tuned.
MILD_SHARE = 0.3
MILD_EDGE = 0.3
SECONDARY_SHARE = 0.15  # defective cards that also carry a second defect class's mechanism ...
SECONDARY_MAX = 0.6  # ... at severity ~ U(0, SECONDARY_MAX)
WEAK_SHAPE_SHARE = 0.25  # cluster (type3) / ring (type4) mechanisms whose shape is weakly expressed:
WEAK_EDGE = 0.4  # expression e ~ U(0, WEAK_EDGE) if weak, else e = 1
SHAPE_NUISANCE = 0.15  # every card: cluster share and ring share each ~ U(0, SHAPE_NUISANCE)
CLUSTER_GAIN = 0.8  # cluster share added at severity 1, expression 1 (at most 0.95 in all)
RING_GAIN = 1.0 - SHAPE_NUISANCE  # ring share added at severity 1, expression 1 (at most 1 in all)
TILT_FULL = {"type1": 0.6, "type2": -0.65}  # correlation of x and y a mechanism adds at severity 1
TILT_SD = 0.08  # per-card correlation noise
LABEL_DISAGREEMENT = 0.08  # expected share of inspector labels that differ from the generating class
NORMAL_TAIL = 0.10  # normal cards in this upper tail of their jitter are borderline
CENTRING_ROUNDS = 3  # label-group centring passes on the drawn holes (Table 1 by label)
# Acquisition: lighting (a gain per colour channel), dot and text colour, text position and size,
# pixel noise, JPEG compression. Dots and background stay brighter than the OCR binarisation threshold.
LIGHT_GAIN = (0.94, 1.0)
DOT_RGB_RANGE = ((240, 255), (125, 145), (190, 215))
TEXT_RGB_MAX = 60
FONT_SIZES = (18, 20, 21, 23)  # px; sizes the bundled OCR engines read exactly (see docs/dataset.md)
TEXT_X_SHIFT = 20  # px either side of the layout's text column
TEXT_MARGIN = 8  # px kept free above and below the text block
NOISE_SD_MAX = 2.5  # Gaussian pixel noise, sd ~ U(0, NOISE_SD_MAX) (0-255 scale)
JPEG_QUALITY_RANGE = (85, 95)  # round trip through JPEG at a quality drawn from this range


def check_difficulty(difficulty: str) -> str:
    if difficulty not in DIFFICULTIES:
        raise ConfigError(f"--difficulty {difficulty!r}: choose {' or '.join(DIFFICULTIES)}")
    return difficulty


def mean_severity() -> float:
    return MILD_SHARE * MILD_EDGE / 2 + (1 - MILD_SHARE) * (1 + MILD_EDGE) / 2


def severity_pdf(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    dens = np.where(s < MILD_EDGE, MILD_SHARE / MILD_EDGE, (1 - MILD_SHARE) / (1 - MILD_EDGE))
    return np.where((s >= 0) & (s <= 1), dens, 0.0)


def shape_gain(mechanism: str) -> float:
    """Cluster share (type3) or ring share (type4) a mechanism adds at severity 1 and expression 1."""
    return CLUSTER_GAIN if mechanism == "type3" else RING_GAIN


def field_design() -> dict[str, dict[str, list[float]]]:
    """Per defect class, the change of the centre and of the per-axis variance from normal at severity 1.

    Solved so that the expected class averages (own mechanism at mean severity plus the occasional
    second mechanism) equal Table 1; the label-group centring then removes the sampling remainder."""
    m0, v0 = np.array(TABLE1["normal"][:2]), np.array(TABLE1["normal"][2:])
    k = len(DEFECTS)
    w = SECONDARY_SHARE * (SECONDARY_MAX / 2) / (k - 1)
    a = mean_severity() * np.eye(k) + w * (np.ones((k, k)) - np.eye(k))
    d_mean = np.linalg.solve(a, np.array([np.array(TABLE1[c][:2]) - m0 for c in DEFECTS]))
    d_var = np.linalg.solve(a, np.array([np.array(TABLE1[c][2:]) - v0 for c in DEFECTS]))
    return {
        c: {"mean": [float(x) for x in d_mean[i]], "var": [float(x) for x in d_var[i]]} for i, c in enumerate(DEFECTS)
    }


def mechanism_params(mechanisms: dict[str, Any], design: dict) -> tuple[list, list, Any]:
    """Centre, per-axis variance and tilt before jitter for severities {class: s} (s may be arrays)."""
    centre = [np.float64(TABLE1["normal"][0]), np.float64(TABLE1["normal"][1])]
    var = [np.float64(TABLE1["normal"][2]), np.float64(TABLE1["normal"][3])]
    tilt: Any = 0.0
    for c, s in mechanisms.items():
        for ax in range(2):
            centre[ax] = centre[ax] + s * design[c]["mean"][ax]
            var[ax] = var[ax] + s * design[c]["var"][ax]
        tilt = tilt + s * TILT_FULL.get(c, 0.0)
    return centre, var, tilt


def _normal_direction(deviation: np.ndarray, design: dict) -> str:
    """The defect class a normal card's standardised deviation points to (its borderline alternative)."""
    v0 = np.array(TABLE1["normal"][2:])
    best, best_dot = DEFECTS[0], -math.inf
    for c in DEFECTS:
        d = np.concatenate(
            [np.array(design[c]["mean"]) / CENTER_JITTER, np.log1p(np.array(design[c]["var"]) / v0) / VAR_JITTER]
        )
        dot = float(deviation @ d / np.linalg.norm(d))
        if dot > best_dot:
            best, best_dot = c, dot
    return best


def normal_borderline(deviation: np.ndarray, design: dict) -> tuple[float, str]:
    """(borderline score, alternative) of a normal card from its standardised jitter (offset / CENTER_JITTER,
    log variance multiplier / VAR_JITTER): 0 below the NORMAL_TAIL upper tail, rising to 1 far in it."""
    q = float(deviation @ deviation)
    tail = math.exp(-q / 2) * (1 + q / 2)  # chi-square survival function with 4 degrees of freedom
    return max(0.0, 1.0 - tail / NORMAL_TAIL), _normal_direction(deviation, design)


def defect_borderline(
    gen_class: str, s: Any, weak: bool = False, secondary: str | None = None, s2: Any = 0.0
) -> list[tuple[Any, str]]:
    """Borderline candidates (score in [0, 1], alternative label) of a defective card:
    a mild defect may be passed as normal, a weakly shaped cluster/ring called the other of the two,
    and a second mechanism nearly as strong as the first named instead."""
    s = np.asarray(s, dtype=np.float64)
    out: list[tuple[Any, str]] = [(np.clip(1.0 - s / MILD_EDGE, 0.0, 1.0), "normal")]
    if weak and gen_class in ("type3", "type4"):
        out.append((np.ones_like(s), "type4" if gen_class == "type3" else "type3"))
    if secondary:
        out.append((np.clip(np.asarray(s2) / np.maximum(s, 1e-9), 0.0, 1.0), secondary))
    return out


def label_probabilities(candidates: list[tuple[Any, str]], gen_class: str, scale: float) -> dict[str, Any]:
    """P(inspector label) for a card: the most borderline candidate's alternative with probability
    min(1, scale x score), else the generating class. Works elementwise on arrays of scores."""
    scores = np.stack(np.broadcast_arrays(*[np.asarray(b, dtype=np.float64) for b, _ in candidates]))
    top = scores.argmax(axis=0)
    p_alt = np.minimum(1.0, scale * scores.max(axis=0))
    probs: dict[str, Any] = {gen_class: 1.0 - p_alt}
    for j, (_, alt) in enumerate(candidates):
        probs[alt] = probs.get(alt, 0.0) + np.where(top == j, p_alt, 0.0)
    return probs


def disagreement_scale(scores: np.ndarray, share: float = LABEL_DISAGREEMENT) -> float:
    """The scale that makes sum(min(1, scale x score)) = share x cards (bisection; 0 if nothing is borderline)."""
    scores = np.asarray(scores, dtype=np.float64)
    target = share * len(scores)
    if target <= 0 or not (scores > 0).any():
        return 0.0
    if (scores > 0).sum() <= target:
        return float(1.0 / scores[scores > 0].min())
    lo, hi = 0.0, 1.0 / scores[scores > 0].min()
    for _ in range(100):
        mid = (lo + hi) / 2
        if np.minimum(1.0, mid * scores).sum() < target:
            lo = mid
        else:
            hi = mid
    return float(hi)


def _field_latent(gen_class: str, design: dict, rng: np.random.Generator) -> dict[str, Any]:
    """Every random choice of one card of the field model (the holes and pixels are drawn later)."""
    offset = rng.normal(0.0, CENTER_JITTER, size=2)
    log_mult = rng.normal(0.0, VAR_JITTER, size=2)
    nuisance = rng.uniform(0.0, SHAPE_NUISANCE, size=2)  # cluster share, ring share
    tilt_noise = rng.normal(0.0, TILT_SD)
    theta = rng.uniform(0.0, math.pi)
    n = int(round(math.exp(rng.uniform(math.log(FIELD_N_RANGE[0]), math.log(FIELD_N_RANGE[1])))))
    mechanisms: dict[str, float] = {}
    expression: dict[str, float] = {}
    weak = False
    secondary = None
    if gen_class != "normal":
        mild = rng.random() < MILD_SHARE
        mechanisms[gen_class] = float(rng.uniform(0.0, MILD_EDGE) if mild else rng.uniform(MILD_EDGE, 1.0))
        if rng.random() < SECONDARY_SHARE:
            secondary = str(rng.choice([c for c in DEFECTS if c != gen_class]))
            mechanisms[secondary] = float(rng.uniform(0.0, SECONDARY_MAX))
        for m in ("type3", "type4"):
            if m in mechanisms:
                is_weak = bool(rng.random() < WEAK_SHAPE_SHARE)
                expression[m] = float(rng.uniform(0.0, WEAK_EDGE)) if is_weak else 1.0
                if m == gen_class:
                    weak = is_weak
    centre, var, tilt = mechanism_params(mechanisms, design)
    shares = [float(nuisance[0]), float(nuisance[1])]
    for i, m in enumerate(("type3", "type4")):
        if m in mechanisms:
            shares[i] += shape_gain(m) * mechanisms[m] * expression[m]
    if gen_class == "normal":
        deviation = np.concatenate([offset / CENTER_JITTER, log_mult / VAR_JITTER])
        b, alt = normal_borderline(deviation, design)
        candidates: list[tuple[Any, str]] = [(b, alt)]
    else:
        s = mechanisms[gen_class]
        candidates = defect_borderline(gen_class, s, weak, secondary, mechanisms.get(secondary or "", 0.0))
    latent = {
        "shape": "field",
        "center": [float(centre[0] + offset[0]), float(centre[1] + offset[1])],
        "var": [float(var[0] * math.exp(log_mult[0])), float(var[1] * math.exp(log_mult[1]))],
        "rho": float(np.clip(tilt + tilt_noise, -0.9, 0.9)),
        "cluster_share": shares[0],
        "theta": float(theta),
        "ring_share": shares[1],
        "n": n,
    }
    return {
        "latent": latent,
        "generating_class": gen_class,
        "severity": mechanisms.get(gen_class, 0.0),
        "mechanisms": mechanisms,
        "expression": expression,
        "weak_shape": weak,
        "candidates": [(float(b), alt) for b, alt in candidates],
    }


def _undo_small_flips(labels: list[str], gen: list[str]) -> None:
    """Undo a label flip that leaves a label, or a generating class, with fewer than two cards (only in
    sets of a few cards per class), so every label keeps a card in both splits."""
    while True:
        counts = {g: 0 for g in gen}
        for lab in labels:
            counts[lab] = counts.get(lab, 0) + 1
        small = [i for i, (lab, g) in enumerate(zip(labels, gen)) if lab != g and min(counts[lab], counts[g]) < 2]
        if not small:
            return
        labels[small[0]] = gen[small[0]]


def match_label_counts(
    labels: list[str], label_probs: list[dict[str, float]], target: dict[str, int], generating: list[str]
) -> None:
    """Relabel a few cards, in place, so the label counts equal ``target`` exactly (the paper's Table 1
    gives N per labelled class, line 98; with the drawn flips they drift by a few cards).

    Each step moves one unit from a label with too many cards to one with too few along the shortest
    chain of relabellings (breadth-first over the labels), where a card may only take a label it could
    have been given (its probability is positive): a flipped card going back to its generating class
    always qualifies, so a chain exists from every surplus to some deficit. So that the share of labels
    differing from the generating class stays as drawn, a link prefers a new flip while fewer cards
    differ than were drawn, and a flip undone otherwise; then the card most likely to carry the new
    label; ties go to the lower index, so the result is deterministic."""
    from collections import deque

    drawn_differing = sum(lab != g for lab, g in zip(labels, generating))

    def best_card(src: str, dst: str) -> int | None:
        prefer_new_flip = sum(lab != g for lab, g in zip(labels, generating)) < drawn_differing
        options = [
            ((dst == generating[i]) == prefer_new_flip, -label_probs[i].get(dst, 0.0), i)
            for i, lab in enumerate(labels)
            if lab == src and label_probs[i].get(dst, 0.0) > 0
        ]
        return min(options)[2] if options else None

    while True:
        have = {lab: 0 for lab in target}
        for lab in labels:
            have[lab] = have.get(lab, 0) + 1
        surplus = [lab for lab in sorted(have) if have[lab] > target.get(lab, 0)]
        if not surplus:
            return
        deficit = {lab for lab in target if have[lab] < target[lab]}
        # Breadth-first from the surplus labels; prev[label] = (label it came from, card that moves).
        prev: dict[str, tuple[str, int] | None] = {lab: None for lab in surplus}
        queue, reached = deque(surplus), None
        while queue and reached is None:
            src = queue.popleft()
            for dst in sorted(target):
                if dst in prev:
                    continue
                card = best_card(src, dst)
                if card is not None:
                    prev[dst] = (src, card)
                    if dst in deficit:
                        reached = dst
                        break
                    queue.append(dst)
        if reached is None:
            raise RuntimeError(f"cannot match the label counts {target} (labels {have})")
        node = reached
        while prev[node] is not None:
            src, card = prev[node]
            labels[card] = node
            node = src


def _acquisition(rng: np.random.Generator, n_lines: int) -> dict[str, Any]:
    size = int(rng.choice(FONT_SIZES))
    step = int(round(1.5 * size))
    block = (n_lines - 1) * step + size + 4
    top_max = max(TEXT_MARGIN, GEOMETRY.height - TEXT_MARGIN - block)
    return {
        "light_gain": [float(x) for x in rng.uniform(*LIGHT_GAIN, size=3)],
        "dot_rgb": [int(rng.integers(lo, hi + 1)) for lo, hi in DOT_RGB_RANGE],
        "text_rgb": [int(x) for x in rng.integers(0, TEXT_RGB_MAX + 1, size=3)],
        "font_size": size,
        "line_step": step,
        "text_x": int(GEOMETRY.text_x + rng.integers(-TEXT_X_SHIFT, TEXT_X_SHIFT + 1)),
        "text_top": int(rng.integers(TEXT_MARGIN, top_max + 1)),
        "noise_sd": float(rng.uniform(0.0, NOISE_SD_MAX)),
        "jpeg_quality": int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1)),
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
    }


def _field_cards(seed: int, counts: tuple[int, ...], test_size: int) -> list[SampledCard]:
    design = field_design()
    rng = np.random.default_rng(seed)
    drawn: list[dict[str, Any]] = []
    for label, n in zip(DEFAULT_LABELS, counts):
        drawn += [_field_latent(label, design, rng) for _ in range(n)]
    drawn = [drawn[i] for i in rng.permutation(len(drawn))]
    # Inspector labels: the most borderline cards' labels differ, LABEL_DISAGREEMENT of them on average.
    scores = np.array([max(b for b, _ in d["candidates"]) for d in drawn])
    scale = disagreement_scale(scores)
    gen = [d["generating_class"] for d in drawn]
    labels, label_probs = [], []
    for d in drawn:
        probs = label_probabilities(d["candidates"], d["generating_class"], scale)
        names = sorted(probs)
        p = np.array([float(probs[k]) for k in names])
        labels.append(names[int(rng.choice(len(names), p=p / p.sum()))])
        label_probs.append({k: float(v) for k, v in probs.items()})
    _undo_small_flips(labels, gen)
    match_label_counts(labels, label_probs, dict(zip(DEFAULT_LABELS, counts)), gen)
    for d in drawn:
        d["latent"]["disagreement_scale"] = scale
        alt_b, alt = max(d["candidates"], key=lambda t: t[0])
        d["disagreement"] = {"alternative": alt, "probability": min(1.0, scale * alt_b)}
    splits = stratified_split(labels, test_size, seed)
    # Table 1 holds by (inspector) label, as in the paper, whose statistics come from the labelled cards:
    # each label group's centres move and its variances scale together until the class averages of the
    # drawn holes' statistics match.
    lats = [d["latent"] for d in drawn]
    for _ in range(CENTRING_ROUNDS):
        pts = [sample_points(lat, np.random.default_rng([seed, i])) for i, lat in enumerate(lats)]
        for label in sorted(set(labels)):
            idx = [i for i, lab in enumerate(labels) if lab == label]
            target = TABLE1.get(label)
            if target is None:
                continue
            mu = np.mean([pts[i].mean(axis=0) for i in idx], axis=0)
            var = np.mean([pts[i].var(axis=0, ddof=1) for i in idx], axis=0)
            for i in idx:
                for ax in range(2):
                    lats[i]["center"][ax] += target[ax] - float(mu[ax])
                    lats[i]["var"][ax] *= target[2 + ax] / float(var[ax])
    spec_lines = len(
        default_spec().lines(
            {"N": 0, "mu_x": 0.0, "mu_y": 0.0, "sd_x": 0.0, "sd_y": 0.0, "bins": [0] * default_spec().n_bins}
        )
    )
    cards = []
    for i, (d, label, split) in enumerate(zip(drawn, labels, splits)):
        pts = sample_points(d["latent"], np.random.default_rng([seed, i]))
        extra = {k: d[k] for k in ("severity", "mechanisms", "expression", "weak_shape", "disagreement")}
        cards.append(
            SampledCard(
                label,
                split,
                d["latent"],
                pts,
                record_from_points(pts),
                generating_class=d["generating_class"],
                truth_extra=extra,
                acquisition=_acquisition(np.random.default_rng([seed, i, 1]), spec_lines),
            )
        )
    return cards


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
        raise ConfigError(
            f"--counts {text!r}: need {len(DEFAULT_LABELS)} non-negative numbers "
            f"({','.join(DEFAULT_LABELS)}) adding to at least 2"
        )
    return counts


@dataclass
class SampledCard:
    label: str  # the inspector's label (labels.csv)
    split: str
    latent: dict[str, Any]
    points: np.ndarray
    printed: dict[str, Any]
    generating_class: str | None = None  # field: the class whose model drew the card
    truth_extra: dict[str, Any] | None = None  # field: severity, mechanisms, disagreement, ...
    acquisition: dict[str, Any] | None = None  # field: how the card is rendered and captured


def sample_cards(
    seed: int = 0, counts: str | Sequence[int] | None = None, test_size: int | None = None, difficulty: str = "field"
) -> list[SampledCard]:
    """Everything about a generated dataset except the pixels (fast; used by tests and benchmarks)."""
    check_difficulty(difficulty)
    counts = parse_counts(counts)
    total = sum(counts)
    if test_size is None:
        test_size = max(1, round(total * PAPER_TEST_SIZE / sum(PAPER_COUNTS)))
    if difficulty == "field":
        return _field_cards(seed, counts, test_size)
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


def render_sampled(card: SampledCard) -> bytes:
    """The PNG of a sampled card: the plain rendering (clean), or rendered and captured as its
    acquisition record says (field)."""
    if card.acquisition is None:
        return png_bytes(render_card(card.points, card.printed))
    a = card.acquisition
    geometry = replace(
        GEOMETRY,
        dot_rgb=tuple(a["dot_rgb"]),
        text_rgb=tuple(a["text_rgb"]),
        text_x=a["text_x"],
        text_top=a["text_top"],
        line_step=a["line_step"],
        font_size=a["font_size"],
    )
    img = render_card(card.points, card.printed, geometry=geometry)
    captured = acquire(img, a["light_gain"], a["noise_sd"], a["jpeg_quality"], a["noise_seed"])
    return png_bytes(captured, compress_level=NOISY_PNG_LEVEL)


# Cards a worker renders per job: few enough jobs that pickling and the round trips stay small.
RENDER_CHUNK = 32
# With fewer cards than this (and no --workers), render in this process: a worker's start costs more.
PARALLEL_MIN = 64


def _render_chunk(cards: Sequence[SampledCard]) -> list[bytes]:
    return [render_sampled(c) for c in cards]


def render_cards(
    cards: Sequence[SampledCard], workers: int | None = None, progress: Callable[[int], None] | None = None
) -> Iterator[bytes]:
    """Each card's PNG, in order. ``workers`` processes render them (default: one per core when there are
    at least ``PARALLEL_MIN`` cards, else this process); a card's bytes do not depend on which renders it,
    since its capture draws from its own recorded noise seed."""
    from asectl.environment import usable_cores
    from asectl.workers import WorkerPool

    if workers is None:
        workers = usable_cores() if len(cards) >= PARALLEL_MIN else 1
    if workers < 1:
        raise ConfigError(f"synth workers {workers}: must be at least 1")
    if workers == 1:
        for c in cards:
            yield render_sampled(c)
            if progress:
                progress(1)
        return
    pool = WorkerPool(workers, name="a synth worker", fix="rerun with fewer workers (asectl synth --workers 1)")
    chunks = [cards[i : i + RENDER_CHUNK] for i in range(0, len(cards), RENDER_CHUNK)]
    try:
        for start in range(0, len(chunks), workers):  # one round at a time: memory holds one round's PNGs
            for pngs in pool.run(_render_chunk, [(c,) for c in chunks[start : start + workers]]):
                yield from pngs
                if progress:
                    progress(len(pngs))
    finally:
        pool.close()


def field_parameters() -> dict[str, Any]:
    """Every field-model parameter, as recorded in synth.json."""
    return {
        "n_range": list(FIELD_N_RANGE),
        "mild_share": MILD_SHARE,
        "mild_edge": MILD_EDGE,
        "mean_severity": mean_severity(),
        "secondary_share": SECONDARY_SHARE,
        "secondary_max": SECONDARY_MAX,
        "weak_shape_share": WEAK_SHAPE_SHARE,
        "weak_edge": WEAK_EDGE,
        "shape_nuisance": SHAPE_NUISANCE,
        "cluster_gain": CLUSTER_GAIN,
        "ring_gain": RING_GAIN,
        "ring_width": RING_WIDTH,
        "tilt_full": TILT_FULL,
        "tilt_sd": TILT_SD,
        "label_disagreement": LABEL_DISAGREEMENT,
        "normal_tail": NORMAL_TAIL,
        "centring_rounds": CENTRING_ROUNDS,
        "design": field_design(),
        "acquisition": {
            "light_gain": list(LIGHT_GAIN),
            "dot_rgb_range": [list(r) for r in DOT_RGB_RANGE],
            "text_rgb_max": TEXT_RGB_MAX,
            "font_sizes": list(FONT_SIZES),
            "text_x_shift": TEXT_X_SHIFT,
            "text_margin": TEXT_MARGIN,
            "noise_sd_max": NOISE_SD_MAX,
            "jpeg_quality_range": list(JPEG_QUALITY_RANGE),
        },
    }


def generate(
    out: str | Path,
    seed: int = 0,
    counts: str | Sequence[int] | None = None,
    test_size: int | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    difficulty: str = "field",
    workers: int | None = None,
) -> dict[str, Any]:
    """Write an ASE-like dataset: images/, labels.csv, truth.jsonl, synth.json. Returns a summary.
    ``workers``: processes rendering the cards (``render_cards``); the bytes do not depend on it."""
    counts = parse_counts(counts)
    cards = sample_cards(seed, counts, test_size, difficulty)
    out = Path(out)
    tmp = _prepare_out(out, force)
    rows, truth = [], []
    for i, (c, png) in enumerate(zip(cards, render_cards(cards, workers))):
        name = f"images/{i:04d}.png"
        (tmp / name).write_bytes(png)
        rows.append((name, c.label, c.split))
        row = {"image": name, "label": c.label, "split": c.split, "printed": c.printed, "latent": c.latent}
        if c.generating_class is not None:
            row = {
                "image": name,
                "label": c.label,
                "generating_class": c.generating_class,
                **(c.truth_extra or {}),
                "split": c.split,
                "printed": c.printed,
                "latent": c.latent,
                "acquisition": c.acquisition,
            }
        truth.append(row)
        if progress:
            progress(1)
    n_test = sum(c.split == "test" for c in cards)
    params = {
        "seed": seed,
        "difficulty": difficulty,
        "counts": list(counts),
        "test_size": n_test,
        "center_jitter": CENTER_JITTER,
        "var_jitter": VAR_JITTER,
        "n_range": list(N_RANGE if difficulty == "clean" else FIELD_N_RANGE),
        "class_models": {k: asdict(v) for k, v in CLASS_MODELS.items()},
        "geometry": asdict(GEOMETRY),
    }
    if difficulty == "field":
        params["field"] = field_parameters()
        params["label_counts"] = {lab: sum(c.label == lab for c in cards) for lab in DEFAULT_LABELS}
        params["labels_differing"] = sum(c.label != c.generating_class for c in cards)
    # The generator's recorded name, not its module path: unchanged by the move to asectl.domain, so synth.json
    # (and the digests of it docs/benchmarks.md quotes) stays byte-identical.
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
    from asectl.domain.card import dot_pixels

    pts = dot_pixels(img)
    if len(pts) < 3:
        return 0.0
    c = np.corrcoef(pts[:, 0], pts[:, 1])[0, 1]
    return 0.0 if not np.isfinite(c) else float(c)


def fit_class_gaussians(
    records: Sequence[dict], labels: Sequence[str], correlations: Sequence[float]
) -> dict[str, dict[str, Any]]:
    """Per class: mean of per-card means, mean of per-card variances, sigma_xy from the mean correlation."""
    fits: dict[str, dict[str, Any]] = {}
    for label in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == label]
        mu = np.mean([[records[i]["mu_x"], records[i]["mu_y"]] for i in idx], axis=0)
        var = np.mean([[records[i]["sd_x"] ** 2, records[i]["sd_y"] ** 2] for i in idx], axis=0)
        rho = float(np.mean([correlations[i] for i in idx]))
        sxy = rho * math.sqrt(var[0] * var[1])
        fits[label] = {
            "mu": [float(mu[0]), float(mu[1])],
            "cov": [[float(var[0]), sxy], [sxy, float(var[1])]],
            "n_values": sorted(int(records[i]["N"]) for i in idx),
            "cards": len(idx),
        }
    return fits


def augment(
    dataset: Dataset,
    records: Sequence[dict],
    out: str | Path,
    factor: float = 2.0,
    seed: int = 0,
    force: bool = False,
    stats_source: str = "ocr",
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """TDA: fit N(mu_cls, Sigma_cls) on the training split and add (factor-1) x train new training cards.

    ``records`` holds the parsed record of every sample in ``dataset`` (same order): OCR'd fields or
    printed truth. The test split is copied byte for byte and never used for fitting. ``workers``: as
    ``generate``'s."""
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
            raise DataError(
                f"{dataset.samples[i].path}: record lacks {', '.join(missing)}; fix or drop this card before augmenting"
            )
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
    siblings = []
    for k, i in enumerate(parents):
        label = dataset.samples[i].label
        fit = fits[label]
        lat = {
            "shape": "tda-gaussian",
            "center": fit["mu"],
            "cov": fit["cov"],
            "var": [fit["cov"][0][0], fit["cov"][1][1]],
            "n": int(rng.choice(fit["n_values"])),
            "tda": True,
        }
        pts = sample_points(lat, np.random.default_rng([seed, 1_000_003, k]))
        siblings.append(SampledCard(label, "train", lat, pts, record_from_points(pts)))  # rendered plain
    for k, (card, png) in enumerate(zip(siblings, render_cards(siblings, workers))):
        name = f"images/tda-{k:04d}.png"
        (tmp / name).write_bytes(png)
        rows.append((name, card.label, "train"))
        truth.append(
            {"image": name, "label": card.label, "split": "train", "printed": card.printed, "latent": card.latent}
        )
        if progress:
            progress(1)
    _write_meta(
        tmp,
        rows,
        truth,
        {
            "generator": "asectl.synth.augment",
            "source": str(dataset.root),
            "source_fingerprint": dataset.fingerprint(),
            "factor": factor,
            "seed": seed,
            "stats_source": stats_source,
            "class_fits": fits,
        },
    )
    _commit_out(tmp, out)
    return {
        "out": str(out),
        "added": n_new,
        "train": len(train_idx) + n_new,
        "test": len(dataset.samples) - len(train_idx),
        "fits": fits,
    }


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
