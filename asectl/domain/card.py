"""The card: pink hole-position dots in a fixed circular range, and the printed record beside them.

``docs/card-format.md`` describes the layout precisely; the constants here are that document in code.
The card spec (``specs/default.toml``) holds both the text of every printed line (for rendering) and the
pattern that reads it back (for OCR parsing), so the two can never drift apart.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import regex
from PIL import Image, ImageDraw, ImageFont

from asectl.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Geometry:
    width: int = 720
    height: int = 480
    center_px: tuple[int, int] = (240, 240)  # pixel of the range centre (x right, y down)
    range_units: float = 20.0  # radius of the fixed circular range, in units
    px_per_unit: float = 11.0  # so the range circle has a radius of 220 px
    dot_radius: int = 2  # each hole is a filled disc of 5 px diameter
    dot_rgb: tuple[int, int, int] = (255, 105, 180)
    range_rgb: tuple[int, int, int] = (170, 170, 170)
    axis_rgb: tuple[int, int, int] = (215, 215, 215)
    text_rgb: tuple[int, int, int] = (0, 0, 0)
    text_x: int = 500
    text_top: int = 24
    line_step: int = 30
    font_size: int = 20

    def to_pixel(self, xy: np.ndarray) -> np.ndarray:
        """Units (y up) to pixel coordinates (y down)."""
        cx, cy = self.center_px
        return np.stack([cx + xy[:, 0] * self.px_per_unit, cy - xy[:, 1] * self.px_per_unit], axis=1)

    def to_units(self, px: np.ndarray) -> np.ndarray:
        cx, cy = self.center_px
        return np.stack([(px[:, 0] - cx) / self.px_per_unit, (cy - px[:, 1]) / self.px_per_unit], axis=1)


GEOMETRY = Geometry()
PATTERN_TIMEOUT = 0.25  # seconds one card-spec pattern may spend on one OCR'd row
DEFAULT_SPEC_PATH = Path(__file__).resolve().parent.parent / "specs" / "default.toml"


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str  # "int" or "float"
    pattern: regex.Pattern
    template: str | None


@dataclass(frozen=True)
class CardSpec:
    name: str
    fields: tuple[FieldSpec, ...]
    bin_edges: tuple[float, ...]
    bin_pattern: regex.Pattern | None
    bin_template: str | None
    source: str  # path of the TOML, recorded in artifact metadata
    digest: str  # hash of the TOML text, part of cache keys

    @property
    def n_bins(self) -> int:
        return max(len(self.bin_edges) - 1, 0)

    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    def lines(self, printed: dict[str, Any]) -> list[str]:
        """The text lines of a card for a printed record."""
        out = [f.template.format(**printed) for f in self.fields if f.template]
        if self.bin_template:
            for lo, hi, count in zip(self.bin_edges[:-1], self.bin_edges[1:], printed["bins"]):
                out.append(self.bin_template.format(lo=number_text(lo), hi=number_text(hi), count=count))
        return out


def number_text(x: float) -> str:
    """A number as a card prints it: whole numbers without a decimal point."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _compile(pattern: str, where: str) -> regex.Pattern:
    # The `regex` engine (not `re`) because a user's spec may hold a pattern with catastrophic
    # backtracking: `regex` can stop a match after a timeout (see PATTERN_TIMEOUT), `re` cannot.
    try:
        return regex.compile(pattern, regex.IGNORECASE | regex.VERSION0)
    except regex.error as exc:
        raise ConfigError(f"{where}: invalid regular expression ({exc})") from None


def search(pattern: regex.Pattern, text: str) -> regex.Match | None:
    """``pattern.search(text)`` bounded in time; raises TimeoutError past PATTERN_TIMEOUT seconds."""
    return pattern.search(text, timeout=PATTERN_TIMEOUT)


def load_spec(path: str | Path | None = None) -> CardSpec:
    """Read a card spec TOML (default: the built-in one matching docs/card-format.md)."""
    import hashlib

    p = Path(path) if path else DEFAULT_SPEC_PATH
    try:
        raw = p.read_bytes()
        doc = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: card spec not found") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{p}: not a valid TOML card spec ({exc}); see docs/card-format.md") from None
    fields = []
    for name, f in (doc.get("fields") or {}).items():
        if not isinstance(f, dict) or "pattern" not in f:
            raise ConfigError(f"{p}: field '{name}' needs a 'pattern' with a (?P<value>...) group")
        pat = _compile(f["pattern"], f"{p}: field '{name}'")
        if "value" not in pat.groupindex:
            raise ConfigError(f"{p}: field '{name}' pattern needs a (?P<value>...) group")
        kind = f.get("type", "float")
        if kind not in ("int", "float"):
            raise ConfigError(f"{p}: field '{name}' type must be int or float, not {kind!r}")
        fields.append(FieldSpec(name, kind, pat, f.get("template")))
    bins = doc.get("bins") or {}
    bin_pattern = None
    if bins:
        bin_pattern = _compile(bins.get("pattern", ""), f"{p}: [bins]")
        if not {"lo", "hi", "value"} <= set(bin_pattern.groupindex):
            raise ConfigError(f"{p}: [bins] pattern needs (?P<lo>..), (?P<hi>..) and (?P<value>..) groups")
    edges = tuple(float(e) for e in bins.get("edges", []))
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(f"{p}: [bins] edges must increase")
    if not fields and not bins:
        raise ConfigError(f"{p}: the spec defines no [fields] and no [bins]")
    return CardSpec(
        name=str(doc.get("card", {}).get("name", p.stem)),
        fields=tuple(fields),
        bin_edges=edges,
        bin_pattern=bin_pattern,
        bin_template=bins.get("template"),
        source=str(p),
        digest=hashlib.sha256(raw).hexdigest(),
    )


@lru_cache(maxsize=1)
def default_spec() -> CardSpec:
    return load_spec(None)


def record_from_points(points: np.ndarray, edges: tuple[float, ...] | None = None) -> dict[str, Any]:
    """The printed record of a card: N, means, sample standard deviations, counts per radius interval.

    Values are rounded as printed (2 decimals) so a record compares exactly with what OCR reads."""
    edges = edges or default_spec().bin_edges
    pts = np.asarray(points, dtype=np.float64)
    n = len(pts)
    mu = pts.mean(axis=0) if n else np.zeros(2)
    sd = pts.std(axis=0, ddof=1) if n > 1 else np.zeros(2)
    r = np.hypot(pts[:, 0], pts[:, 1]) if n else np.zeros(0)
    # Intervals are [lo, hi); the last one also holds r == its upper edge.
    counts, _ = np.histogram(r, bins=np.asarray(edges))
    return {
        "N": int(n),
        "mu_x": _round2(mu[0]),
        "mu_y": _round2(mu[1]),
        "sd_x": _round2(sd[0]),
        "sd_y": _round2(sd[1]),
        "bins": [int(c) for c in counts],
    }


def _round2(x: float) -> float:
    v = round(float(x), 2)
    return 0.0 if v == 0 else v  # never print "-0.00"


@lru_cache(maxsize=8)  # the field difficulty draws six text sizes
def _font(size: int) -> ImageFont.ImageFont:
    # Pillow's embedded scalable font: identical on every machine with the same Pillow, no system fonts.
    return ImageFont.load_default(size=size)


def render_card(
    points: np.ndarray, printed: dict[str, Any], spec: CardSpec | None = None, geometry: Geometry = GEOMETRY
) -> Image.Image:
    g = geometry
    spec = spec or default_spec()
    img = Image.new("RGB", (g.width, g.height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    cx, cy = g.center_px
    rr = g.range_units * g.px_per_unit
    draw.line([(cx - rr, cy), (cx + rr, cy)], fill=g.axis_rgb, width=1)
    draw.line([(cx, cy - rr), (cx, cy + rr)], fill=g.axis_rgb, width=1)
    draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], outline=g.range_rgb, width=1)
    px = g.to_pixel(np.asarray(points, dtype=np.float64).reshape(-1, 2))
    d = g.dot_radius
    for x, y in np.rint(px).astype(int):
        draw.ellipse([x - d, y - d, x + d, y + d], fill=g.dot_rgb)
    font = _font(g.font_size)
    for i, line in enumerate(spec.lines(printed)):
        draw.text((g.text_x, g.text_top + i * g.line_step), line, fill=g.text_rgb, font=font)
    return img


def acquire(
    img: Image.Image, light_gain=(1.0, 1.0, 1.0), noise_sd: float = 0.0, jpeg_quality: int | None = None, seed: int = 0
) -> Image.Image:
    """A rendered card as a camera and an image pipeline deliver it: a lighting gain per colour channel
    (background tint), Gaussian pixel noise (sd on the 0-255 scale, seeded), a JPEG round trip."""
    import io

    a = np.asarray(img.convert("RGB"), dtype=np.float32) * np.asarray(light_gain, dtype=np.float32)
    if noise_sd > 0:
        a += np.random.default_rng(seed).normal(0.0, noise_sd, size=a.shape).astype(np.float32)
    out = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if jpeg_quality:
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=int(jpeg_quality))
        buf.seek(0)
        out = Image.open(buf).convert("RGB")
    return out


def inside_range(points: np.ndarray, geometry: Geometry = GEOMETRY) -> np.ndarray:
    return np.hypot(points[:, 0], points[:, 1]) <= geometry.range_units


# zlib level of the PNG of a captured (noisy) card: pixel noise defeats compression, so the default level 6
# spends 39 ms a card for files 15% smaller than level 1's 14 ms (PNG is lossless: the same pixels either
# way). Plain renderings keep the default level, and with it the bytes they have always had.
NOISY_PNG_LEVEL = 1


def png_bytes(img: Image.Image, compress_level: int = 6) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=compress_level)
    return buf.getvalue()


__all__ = [
    "GEOMETRY",
    "Geometry",
    "CardSpec",
    "load_spec",
    "default_spec",
    "record_from_points",
    "render_card",
    "acquire",
    "inside_range",
    "NOISY_PNG_LEVEL",
    "png_bytes",
    "dot_mask",
    "dot_pixels",
]


def dot_mask(img: Image.Image) -> np.ndarray:
    """Boolean mask of pink dot pixels. The thresholds tolerate JPEG noise and anti-aliased edges."""
    a = np.asarray(img.convert("RGB"), dtype=np.int16)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    return (r > 180) & (r - g > 60) & (b - g > 20)


def dot_pixels(img: Image.Image, geometry: Geometry = GEOMETRY) -> np.ndarray:
    """Unit coordinates (x right, y up) of every pink pixel inside the plotted range."""
    ys, xs = np.nonzero(dot_mask(img))
    pts = geometry.to_units(np.stack([xs, ys], axis=1).astype(np.float64))
    return pts[inside_range(pts, geometry)] if len(pts) else pts.reshape(0, 2)
