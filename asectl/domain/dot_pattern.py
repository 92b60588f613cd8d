"""The dot pattern's numbers: moments of the hole positions measured from the card's pink pixels.

The printed record gives the holes' per-axis means and SDs and the radius-bin counts. What it cannot say
is how the cloud is shaped: its x-y correlation (tilt), whether it splits in two along some direction,
whether it is hollow in the middle (a ring). The paper reads that from the image through a VLM's words
(section 3.1); words lose the numbers, and the text branch that reads them is weak (docs/benchmarks.md).
These are the same properties as numbers, measured the way an AOI station measures hole positions, with
no model and no training: they join the printed numbers in the ``stats`` branch when
``encoders.dot_pattern`` is on (an extension of the paper, chosen by cross-validation on training cards).

Dots are 5-px discs that overlap where holes are dense, so the pixels are turned into a hole density
first: the dot mask is blurred and the Boolean-model coverage inverted, density ~ -log(1 - coverage), as
the built-in describer does (asectl.backends.vlm). Every number below is a moment of that density inside
the circular range, in the card's units (x right, y up):

- ``centroid_x``, ``centroid_y``, ``sd_x``, ``sd_y``, ``corr``: first and second moments;
- ``holes``: the density's mass in dots (about the number of holes);
- in whitened coordinates (the cloud made round and unit-variance), with r the whitened radius:
  ``radial_kurtosis`` E[r^4] / E[r^2]^2 / 2 (1 for a Gaussian cloud, below 1 for a ring), the density's
  shares at r < 0.5, r < 1 and r > 2, and its share in each of ``RADIAL_EDGES``' bins;
- directional kurtosis E[t^4] / E[t^2]^2 of the projection t on 18 directions (3 for a Gaussian, below 3
  along the axis of two clusters): the smallest, largest and mean, on the raw and on the whitened cloud.

A card with (almost) no pink pixels gets NaN everywhere, which the stats encoder masks.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

VERSION = 1  # part of every cached vector's key: change it when a number's definition changes
BLUR_PX = 3.0  # blur of the dot mask before inverting coverage (as the built-in describer)
COVERAGE_CLIP = 0.98  # coverage cap before -log(1 - coverage): saturated areas stay finite
MIN_DOT_PIXELS = 40  # fewer pink pixels than about two dots: nothing to measure
RADIAL_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, math.inf)
DIRECTIONS = 18

PATTERN_NAMES: tuple[str, ...] = (
    "centroid_x",
    "centroid_y",
    "sd_x",
    "sd_y",
    "corr",
    "holes",
    "radial_kurtosis",
    "share_r_below_0.5",
    "share_r_below_1",
    "share_r_above_2",
    *(f"share_r_{lo:g}_{hi:g}" for lo, hi in zip(RADIAL_EDGES[:-1], RADIAL_EDGES[1:])),
    "kurtosis_min",
    "kurtosis_max",
    "kurtosis_mean",
    "whitened_kurtosis_min",
    "whitened_kurtosis_max",
    "whitened_kurtosis_mean",
)


@lru_cache(maxsize=4)
def _range_pixels(size: tuple[int, int], geometry: Any) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]:
    """(crop box around the range with a blur margin, in-range mask of the crop, unit coordinates of the
    in-range pixels) for one image size (width, height)."""
    w, h = size
    cx, cy = geometry.center_px
    r = geometry.range_units * geometry.px_per_unit
    pad = r + 4 * BLUR_PX
    y0, y1 = max(0, int(cy - pad)), min(h, int(math.ceil(cy + pad)) + 1)
    x0, x1 = max(0, int(cx - pad)), min(w, int(math.ceil(cx + pad)) + 1)
    ys, xs = np.mgrid[y0:y1, x0:x1]
    units = geometry.to_units(np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64))
    inside = np.hypot(units[:, 0], units[:, 1]) <= geometry.range_units
    return (x0, y0, x1, y1), inside.reshape(ys.shape), units[inside]


@lru_cache(maxsize=1)
def _directions() -> tuple[np.ndarray, np.ndarray]:
    """(cos a, sin a) of the DIRECTIONS projection angles a in [0, pi)."""
    a = np.linspace(0.0, math.pi, DIRECTIONS, endpoint=False)
    return np.cos(a), np.sin(a)


@lru_cache(maxsize=1)
def _direction_powers() -> np.ndarray:
    """[DIRECTIONS, 5]: the coefficients of E[x^k y^(4-k)] in E[t^4] for t = x cos a + y sin a."""
    c, s = _directions()
    return np.stack([math.comb(4, k) * c**k * s ** (4 - k) for k in range(5)], axis=1)


def _directional_kurtosis(xy: np.ndarray, w: np.ndarray) -> np.ndarray:
    """E[t^4] / E[t^2]^2 of the weighted, centred cloud projected on each direction."""
    x, y = xy[:, 0], xy[:, 1]
    wxx, wyy, wxy = w * x * x, w * y * y, w * x * y
    m4 = np.array([wyy @ (y * y), wxy @ (y * y), wxx @ (y * y), wxy @ (x * x), wxx @ (x * x)])
    sxx, syy, sxy = wxx.sum(), wyy.sum(), wxy.sum()
    c, s = _directions()
    var = sxx * c**2 + syy * s**2 + 2 * sxy * s * c
    return (_direction_powers() @ m4) / np.maximum(var, 1e-12) ** 2


def pattern_vector(image: Any, geometry: Any = None) -> np.ndarray:
    """The dot pattern's numbers (``PATTERN_NAMES``) of one card image (a PIL image), float32."""
    from scipy import ndimage

    from asectl.domain.card import GEOMETRY, dot_mask

    g = geometry or GEOMETRY
    box, inside, units = _range_pixels(image.size, g)
    mask = dot_mask(image.crop(box))
    out = np.full(len(PATTERN_NAMES), np.nan, dtype=np.float32)
    if int(mask[inside].sum()) < MIN_DOT_PIXELS:
        return out
    cover = ndimage.gaussian_filter(mask.astype(np.float32), BLUR_PX)[inside]
    density = -np.log1p(-np.clip(cover, 0.0, COVERAGE_CLIP)).astype(np.float64)
    keep = density > 1e-4
    mass, xy = density[keep], units[keep]
    w = mass / mass.sum()
    centroid = w @ xy
    d = xy - centroid
    cov = (d * w[:, None]).T @ d + np.eye(2) * 1e-9
    sd = np.sqrt(np.diag(cov))
    white = np.linalg.solve(np.linalg.cholesky(cov), d.T).T
    r2 = np.sum(white**2, axis=1)
    r = np.sqrt(r2)
    dot_area = math.pi * (g.dot_radius + 0.5) ** 2
    raw_k, white_k = _directional_kurtosis(d, w), _directional_kurtosis(white, w)
    values = [
        centroid[0],
        centroid[1],
        sd[0],
        sd[1],
        cov[0, 1] / (sd[0] * sd[1]),
        mass.sum() / dot_area,
        np.sum(w * r2**2) / max(np.sum(w * r2), 1e-12) ** 2 / 2.0,
        np.sum(w[r < 0.5]),
        np.sum(w[r < 1.0]),
        np.sum(w[r > 2.0]),
        *np.histogram(r, bins=np.asarray(RADIAL_EDGES), weights=w)[0],
        raw_k.min(),
        raw_k.max(),
        raw_k.mean(),
        white_k.min(),
        white_k.max(),
        white_k.mean(),
    ]
    out[:] = np.asarray(values, dtype=np.float64)
    return out


def pattern_vectors(paths: list[Any]) -> np.ndarray:
    """``pattern_vector`` of each image file, [n, len(PATTERN_NAMES)]."""
    from PIL import Image

    rows = []
    for p in paths:
        with Image.open(p) as im:
            rows.append(pattern_vector(im))
    return np.stack(rows) if rows else np.zeros((0, len(PATTERN_NAMES)), dtype=np.float32)


def identity() -> dict[str, Any]:
    """What the numbers depend on: part of their cache key and of a model's record."""
    return {
        "name": "asectl dot pattern",
        "version": VERSION,
        "blur_px": BLUR_PX,
        "coverage_clip": COVERAGE_CLIP,
        "radial_edges": [e if math.isfinite(e) else "inf" for e in RADIAL_EDGES],
        "directions": DIRECTIONS,
    }


__all__ = ["PATTERN_NAMES", "VERSION", "identity", "pattern_vector", "pattern_vectors"]
