"""``asectl ocr``: read the printed record of each card and parse it into fields (g(.) in the paper).

OCR runs on a binarised card (grey > 128 becomes white): the pink dots (grey ~158) and the light range
circle vanish, so the engine sees only the black text."""

from __future__ import annotations

import dataclasses
import math
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from asectl.backends.ocr import EngineChoice, TextLine, engine_identity, get_engine
from asectl.cache import Cache
from asectl.domain.card import PATTERN_TIMEOUT, CardSpec, default_spec, load_spec, number_text, search
from asectl.domain.dataset import Dataset, Sample
from asectl.errors import ConfigError, DataError
from asectl.executors import Executor, resolve
from asectl.imageio import load_image
from asectl.stages.common import Remote, StageResult, run_per_image
from asectl.stages.settings import STORED_WHEN_SET, StageSettings

STAGE = "ocr"
FORMAT = 1
BINARISE_THRESHOLD = 128
# auto: cut clean text lines directly, else the engine's detector; model: always the detector; auto-checked:
# as auto, and a card whose cut lines miss a field is read again by the detector (a mode of its own, so its
# records, which can differ from auto's, have keys of their own and auto's cached records stay valid).
DETECTORS = ("auto", "model", "auto-checked")
_DASHES = dict.fromkeys(map(ord, "\u2212\u2013\u2014\u2012\u2010\u2011"), "-")


@dataclass(frozen=True)
class OcrSettings(StageSettings):
    """How cards are read: the engine, the card spec (a TOML path; None = the built-in spec of
    docs/card-format.md), the text-line detector and, for the rapidocr engine, another ONNX PP-OCR text
    recogniser (a path; None = the one in the rapidocr wheel). The defaults of ``asectl ocr`` live here only."""

    STAGE = STAGE
    engine: str = "cnocr"
    spec: str | None = None
    detector: str = "auto"
    recogniser: str | None = dataclasses.field(default=None, metadata=STORED_WHEN_SET)

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ConfigError(f"--detector {self.detector!r}: choose one of {', '.join(DETECTORS)}")
        for name in ("spec", "recogniser"):  # remembered and replayed from other folders: store where it is
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(Path(getattr(self, name)).expanduser().resolve()))

    def engine_choice(self) -> EngineChoice:
        return EngineChoice(self.engine, self.recogniser)

    def card_spec(self) -> CardSpec:
        return load_spec(self.spec) if self.spec else default_spec()


def binarise(img: Image.Image, threshold: int = BINARISE_THRESHOLD) -> Image.Image:
    grey = np.asarray(img.convert("L"))
    return Image.fromarray(np.where(grey > threshold, 255, 0).astype(np.uint8)).convert("RGB")


# Clean printed records are horizontal lines of text separated by blank rows; for those, cutting the lines
# out of the binarised card is exact and skips the text detector (about half of the OCR time). Anything
# else (touching lines, tall or tiny blobs, noise) falls back to the engine's own detector.
_LINE_HEIGHT = (8, 64)
_MAX_SEGMENTS = 80
_PAD = 4


def segment_lines(ink: np.ndarray) -> list[tuple[int, int, int, int]] | None:
    """Boxes (x0, y0, x1, y1) of text segments in an ink mask, or None if the layout is not clean lines."""
    rows = ink.any(axis=1)
    boxes: list[tuple[int, int, int, int]] = []
    y, h = 0, len(rows)
    while y < h:
        if not rows[y]:
            y += 1
            continue
        y0 = y
        while y < h and rows[y]:
            y += 1
        height = y - y0
        if not _LINE_HEIGHT[0] <= height <= _LINE_HEIGHT[1]:
            return None
        cols = np.nonzero(ink[y0:y].any(axis=0))[0]
        # Split a row where the blank gap is wider than twice the line height (two columns of text).
        start = cols[0]
        for a, b in zip(cols[:-1], cols[1:]):
            if b - a > 2 * height:
                boxes.append((int(start), y0, int(a) + 1, y))
                start = b
        boxes.append((int(start), y0, int(cols[-1]) + 1, y))
        if len(boxes) > _MAX_SEGMENTS:
            return None
    return boxes or None


def cut_lines(binary: Image.Image) -> list[tuple[int, int, int, int]] | None:
    """The padded boxes of the clean text lines of a binarised card, or None if it has none."""
    boxes = segment_lines(np.asarray(binary.convert("L")) < 128)
    if boxes is None:
        return None
    wid, hgt = binary.size
    return [
        (max(x0 - _PAD, 0), max(y0 - _PAD, 0), min(x1 + _PAD, wid), min(y1 + _PAD, hgt)) for x0, y0, x1, y1 in boxes
    ]


def read_text(
    binary: Image.Image,
    engine: EngineChoice | str,
    detector: str = "auto",
    boxes: list[tuple[int, int, int, int]] | None = None,
) -> list[TextLine]:
    """The text lines of a binarised card: recognised in ``boxes`` (e.g. from ``cut_lines``) without the
    detector when given, else found by the engine's detector (``detector`` "model") or cut (``auto``)."""
    reader = get_engine(engine)
    if boxes is None and detector == "auto":
        boxes = cut_lines(binary)
    if boxes is None:
        return reader.read(binary)
    arr = np.asarray(binary.convert("RGB"))
    texts = reader.recognize([np.ascontiguousarray(arr[b[1] : b[3], b[0] : b[2]]) for b in boxes])
    return [TextLine(t, sc, tuple(float(v) for v in b)) for (t, sc), b in zip(texts, boxes) if t.strip()]


def group_rows(lines: Sequence[TextLine]) -> list[str]:
    """Join detections that share a text row (left to right), so a label and its value that the
    detector split into two boxes are parsed as one line."""
    rows: list[list[TextLine]] = []
    for ln in sorted(lines, key=lambda t: ((t.box[1] + t.box[3]) / 2, t.box[0])):
        mid = (ln.box[1] + ln.box[3]) / 2
        if rows:
            last = rows[-1][-1]
            if last.box[1] <= mid <= last.box[3]:
                rows[-1].append(ln)
                continue
        rows.append([ln])
    return [" ".join(t.text for t in sorted(r, key=lambda t: t.box[0])) for r in rows]


def normalise(text: str) -> str:
    """What patterns match against: NFKC, unicode dashes as '-', no whitespace, upper case."""
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text).translate(_DASHES)).upper()


def parse_record(rows: Sequence[str], spec: CardSpec) -> tuple[dict[str, Any], list[str], list[str], list[str]]:
    """Rows of text -> (fields, missing, warnings, unparsed rows). Never raises on content."""
    fields: dict[str, Any] = {}
    warnings: list[str] = []
    unparsed: list[str] = []
    bins: dict[int, int] = {}
    edge_index = {
        (_edge_key(lo), _edge_key(hi)): i for i, (lo, hi) in enumerate(zip(spec.bin_edges[:-1], spec.bin_edges[1:]))
    }
    for row in rows:
        norm = normalise(row)
        if not norm:
            continue
        matched = False
        for f in spec.fields:
            m = _bounded(f.pattern, norm, f.name, warnings)
            if not m:
                continue
            matched = True
            value = _convert(m.group("value"), f.kind)
            if value is None:
                warnings.append(f"{f.name}: unreadable number in '{row}'")
            elif f.name in fields and fields[f.name] != value:
                warnings.append(f"{f.name}: read twice with different values ({fields[f.name]} and {value})")
            else:
                fields[f.name] = value
            break
        if not matched and spec.bin_pattern is not None:
            m = _bounded(spec.bin_pattern, norm, "bins", warnings)
            if m:
                matched = True
                idx = edge_index.get((_edge_key(m.group("lo")), _edge_key(m.group("hi"))))
                count = _convert(m.group("value"), "int")
                if idx is None:
                    warnings.append(f"bins: interval {m.group('lo')} to {m.group('hi')} is not in the card spec")
                elif count is None:
                    warnings.append(f"bins: unreadable count in '{row}'")
                else:
                    bins[idx] = count
        if not matched:
            unparsed.append(row)
    missing = [f.name for f in spec.fields if f.name not in fields]
    if spec.n_bins:
        if len(bins) == spec.n_bins:
            fields["bins"] = [bins[i] for i in range(spec.n_bins)]
        else:
            lost = [
                f"{number_text(spec.bin_edges[i])}-{number_text(spec.bin_edges[i + 1])}"
                for i in range(spec.n_bins)
                if i not in bins
            ]
            missing.append("bins")
            warnings.append(f"bins: no count read for interval(s) {', '.join(lost)}")
    warnings += consistency_warnings(fields)
    return fields, missing, warnings, unparsed


def _bounded(pattern, text: str, name: str, warnings: list[str]):
    try:
        return search(pattern, text)
    except TimeoutError:
        warnings.append(
            f"{name}: pattern gave up after {PATTERN_TIMEOUT} s on '{text}' (catastrophic "
            "backtracking?); simplify it in the card spec"
        )
        return None


def consistency_warnings(fields: dict[str, Any]) -> list[str]:
    out = []
    for k, v in fields.items():
        if isinstance(v, float) and not math.isfinite(v):
            out.append(f"{k}: value {v} is not finite")
    for k in ("sd_x", "sd_y"):
        if isinstance(fields.get(k), (int, float)) and fields[k] < 0:
            out.append(f"{k}: standard deviation {fields[k]} is negative")
    if "bins" in fields and isinstance(fields.get("N"), int) and sum(fields["bins"]) != fields["N"]:
        out.append(f"bins: counts add to {sum(fields['bins'])}, not N = {fields['N']}")
    return out


def _convert(text: str, kind: str) -> int | float | None:
    try:
        v = int(text) if kind == "int" else float(text)
    except (TypeError, ValueError):
        return None
    return v


def _edge_key(x: Any) -> float:
    return round(float(x), 6)


def read_card(image_path: Path, engine: EngineChoice | str, spec: CardSpec, detector: str = "auto") -> dict[str, Any]:
    """OCR one card file and parse it. A card with no readable record raises DataError; a partly read
    record is returned with ``error`` set (so it is reported and never cached)."""
    binary = binarise(load_image(image_path))
    boxes = cut_lines(binary) if detector in ("auto", "auto-checked") else None
    lines = read_text(binary, engine, "model", boxes)  # the cut lines, else the detector
    fields, missing, warnings, unparsed = parse_record(group_rows(lines), spec)
    if detector == "auto-checked" and boxes is not None and (missing or not fields):
        # The cut lines did not give the whole record (e.g. a rule under the lines spoiled some): the
        # engine's detector reads the card again, and its reading is kept when it misses fewer fields.
        again = read_text(binary, engine, "model")
        parsed = parse_record(group_rows(again), spec)
        if (len(parsed[1]), -len(parsed[0])) < (len(missing), -len(fields)):
            lines, (fields, missing, warnings, unparsed) = again, parsed
    if not fields:
        raise DataError(
            f"{image_path}: no printed record found (OCR read {len(lines)} text boxes, none "
            f"matched the card spec '{spec.name}'); check the image or pass --spec"
        )
    record: dict[str, Any] = {
        "fields": fields,
        "text": [ln.to_dict() for ln in lines],
        "missing": missing,
        "warnings": warnings,
    }
    if unparsed:
        record["unparsed"] = unparsed
    if missing:
        record["error"] = (
            f"{image_path}: could not read {', '.join(missing)}"
            + (f" (unparsed: {'; '.join(repr(u) for u in unparsed[:3])})" if unparsed else "")
            + "; check the card, or pass --spec for another layout"
        )
    return record


def ocr_identity(settings: OcrSettings | None = None, spec: CardSpec | None = None) -> dict[str, Any]:
    """What a record depends on: engine and model files, binarisation, detector, card spec contents."""
    settings = settings or OcrSettings()
    spec = spec or settings.card_spec()
    return {
        "format": FORMAT,
        "engine": engine_identity(settings.engine_choice()),
        "binarise": BINARISE_THRESHOLD,
        "detector": settings.detector,
        "spec": {"name": spec.name, "sha256": spec.digest},
    }


# --- several processes -------------------------------------------------------------------------------
# Reading a card is nearly all ONNX Runtime inference on a few small crops, which its intra-op threads
# barely parallelise; whole cards in independent processes scale with the cores. Cards do not depend on
# each other and the results do not depend on the thread count, so records equal a single process's.

# Cards per worker in one chunk: results are cached chunk by chunk, and the workers idle at each chunk's end.
CHUNK_PER_WORKER = 8
# Fewer cards to read than this are read in this process: starting workers (spawn, imports, model load)
# costs as much as reading 10-40 cards, and an engine already loaded here is reused.
SMALL_RUN = 16
_worker: dict[str, Any] = {}


def _worker_init(engine: EngineChoice, spec: CardSpec, detector: str, threads: int) -> None:
    get_engine(engine, threads=threads)
    _worker.update(engine=engine, spec=spec, detector=detector)


def _read_timed(path: Path, engine: EngineChoice, spec: CardSpec, detector: str) -> dict[str, Any] | DataError:
    """``read_card`` with its seconds; a card's DataError is returned in its place."""
    t0 = time.perf_counter()
    try:
        rec = read_card(path, engine, spec, detector)
    except DataError as exc:
        return exc
    return {**rec, "seconds": round(time.perf_counter() - t0, 4)}


def _worker_read(sample: Sample) -> dict[str, Any] | DataError:
    from asectl.workers import crash_test_hook

    crash_test_hook(sample.path.name)
    return _read_timed(sample.path, _worker["engine"], _worker["spec"], _worker["detector"])


def ocr_pool(engine: EngineChoice, spec: CardSpec, detector: str, workers: int):
    """``workers`` processes, each with its own engine, reading cards in order (as ``_read_timed``);
    any error but a card's DataError stops the run."""
    from asectl.environment import usable_cores
    from asectl.workers import WorkerPool

    return WorkerPool(
        workers,
        _worker_init,
        (engine, spec, detector, max(1, usable_cores() // workers)),
        name="an OCR worker",
        fix="rerun with fewer workers (asectl ocr --workers N)",
    )


def _cluster_reader(engine: EngineChoice, spec: CardSpec, detector: str, identity: dict[str, Any]):
    """A Ray worker's reader (asectl.executors): its engine, loaded once with one thread (one worker per
    core), must be the driver's, or the records would differ from a local run's."""
    from asectl.executors import check_same

    _worker_init(engine, spec, detector, 1)
    check_same(f"the OCR engine {engine}", engine_identity(engine), identity["engine"])
    return _worker_read_cards


def _worker_read_cards(samples: list[Sample]) -> list[dict[str, Any] | DataError]:
    return [_worker_read(s) for s in samples]


def run_ocr(
    dataset: Dataset,
    settings: OcrSettings | None = None,
    *,
    cache: Cache | None = None,
    force: bool = False,
    strict: bool = False,
    workers: int | None = None,
    remember: bool = True,
    executor: Executor | None = None,
    **choices: Any,
) -> StageResult:
    """OCR every card of a dataset (or list of images), cached per image, engine and card spec.
    ``choices`` (``engine``, ``spec``, ``detector``) change single settings. ``workers`` processes read
    the cards (default: one per core); they change the speed, not the records. A run on a dataset folder
    is remembered for the later stages on it (``remember=False``: a replay, which leaves them).
    ``executor``: where the misses are read (asectl.executors; default local)."""
    cache = cache or Cache()
    settings = (settings or OcrSettings()).replace(**choices)
    engine, detector = settings.engine_choice(), settings.detector
    card_spec = settings.card_spec()
    identity = ocr_identity(settings, card_spec)
    from asectl.environment import usable_cores

    n_workers = workers or usable_cores()  # one OCR process per core
    executor = resolve(executor)
    pool = ocr_pool(engine, card_spec, detector, n_workers) if n_workers > 1 and not executor.distributed else None

    def read_here(samples: list[Sample]) -> list[dict[str, Any] | DataError]:
        return [_read_timed(s.path, engine, card_spec, detector) for s in samples]

    def read_many(samples: list[Sample]) -> list[dict[str, Any] | DataError]:
        # The first chunk is the whole run when it is shorter than a full one (batch_size >= SMALL_RUN).
        return read_here(samples) if pool is None else pool.run_cards(_worker_read, samples, read_here, SMALL_RUN)

    def compute(s: Sample) -> dict[str, Any]:
        out = read_many([s])[0]
        if isinstance(out, DataError):
            raise out
        return out

    try:
        records = run_per_image(
            STAGE,
            dataset.samples,
            identity,
            compute,
            cache,
            force=force,
            strict=strict,
            description=f"ocr ({engine})",
            meta={"spec_source": card_spec.source},
            batch=read_many if pool else None,
            batch_size=CHUNK_PER_WORKER * n_workers,
            executor=executor,
            remote=Remote(
                "an OCR worker", _cluster_reader, (engine, card_spec, detector, identity), batch_size=CHUNK_PER_WORKER
            ),
        )
    finally:
        if pool:
            pool.close()
    if remember:
        settings.remember(cache, dataset)
    return StageResult(STAGE, records, identity, cache.summary(STAGE))
