"""Building a report: metrics, figures and documents in memory, then written into the report folder."""

from __future__ import annotations

import json
import math
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from asectl.cache import sha256_bytes, write_atomic
from asectl.errors import ConfigError, DataError
from asectl.report._figures import (
    TSNE_MIN_SAMPLES,
    confusion_png,
    curves_png,
    reliability_png,
    tsne_perplexity,
    tsne_png,
)
from asectl.report._metrics import calibration_metrics, compute_metrics
from asectl.report._records import FILES, CardImages, ReportInput, ReportSummary
from asectl.report._render import figure_warnings, render_html, render_markdown, report_context
from asectl.report._terminal import summary_text


def build_report(data: ReportInput, out_dir: Path) -> ReportSummary:
    """Compute the metrics, draw the figures and write every report file into ``out_dir``."""
    return write_report(render_report(data), out_dir)


def render_report(data: ReportInput) -> dict[str, bytes]:
    """Every report file in memory: keys of FILES -> bytes (the same bytes for the same input)."""
    labels = [str(x) for x in data.label_names]
    metrics = compute_metrics(labels, data.y_true, data.y_pred, data.probs, data.image_names)
    embeddings = _check_embeddings(data, len(labels))
    m = len(data.embedding_labels)
    perplexity = tsne_perplexity(m) if m >= TSNE_MIN_SAMPLES else None
    metrics["tsne"] = {
        "stages": list(embeddings),
        "n_samples": m,
        "perplexity": perplexity,
        "init": "pca",
        "metric": "euclidean",
        "learning_rate": "auto",
        "random_state": data.tsne_seed,
    }
    metrics["curves"] = {
        "pfa": [
            {
                "name": s.name,
                "itc_loss": [_finite(v) for v in s.itc_loss],
                "val_loss": _finite(s.val_loss),
                "n_train": s.n_train,
            }
            for s in data.pfa_curves
        ],
        "fusion": [{k: _finite(v) for k, v in r.items()} for r in data.fusion_curve],
    }
    metrics["provenance"] = {str(k): str(v) for k, v in data.provenance.items()}
    metrics["model_id"] = data.model_id
    metrics["dataset"] = data.dataset
    metrics["dataset_fingerprint"] = data.dataset_fingerprint
    metrics["seeds"] = {str(k): int(v) for k, v in data.seeds.items()}
    metrics["calibration"], metrics["decision"] = calibration_metrics(data, labels)
    flags = figure_warnings(metrics["decision"]["figures"]) if metrics["decision"] else []
    metrics["warnings"] = [str(w) for w in data.warnings] + flags
    if data.decisions is not None:
        for row, decision in zip(metrics["predictions"], data.decisions):
            row["decision"] = str(decision)
    if data.reasons is not None:
        for row, reason in zip(metrics["predictions"], data.reasons):
            row["reason"] = str(reason)

    pngs = {"confusion": confusion_png(metrics["multiclass"], "Multi-class confusion matrix")}
    if metrics["binary"]:
        pngs["confusion_binary"] = confusion_png(metrics["binary"], "Binary confusion matrix")
    pngs["tsne"] = tsne_png(embeddings, data.embedding_labels, labels, data.embedding_split, data.tsne_seed, data.tsne)
    pngs["curves"] = curves_png(data.pfa_curves, data.fusion_curve)
    pngs["calibration"] = reliability_png(metrics["calibration"]["test"] if metrics["calibration"] else None)

    files: dict[str, bytes] = dict(pngs)
    files["metrics"] = (json.dumps(metrics, indent=2, allow_nan=False) + "\n").encode()
    context = report_context(data, metrics)
    files["markdown"] = render_markdown(context, metrics, pngs).encode()
    files["html"] = render_html(context, metrics, pngs).encode()
    return files


def write_report(files: Mapping[str, bytes], out_dir: Path) -> ReportSummary:
    """Write ``render_report``'s files into ``out_dir``."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"{out_dir}: cannot create the report folder ({e.strerror}); choose another output folder"
        ) from None
    paths: dict[str, Path] = {}
    for key, data in sorted(files.items(), key=lambda kv: kv[0] == "html"):  # report.html last: the one opened
        paths[key] = out_dir / FILES[key]
        write_atomic(paths[key], data)
    metrics = json.loads(files["metrics"])
    return ReportSummary(paths=paths, metrics=metrics, text=summary_text(metrics, paths))


def report_key_parts(data: ReportInput) -> dict[str, Any]:
    """Everything the report files depend on, JSON-able with arrays by content hash: for a cache key.
    The t-SNE memo is left out (it only makes the same coordinates faster)."""

    def plain(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v)
            return {"sha256": sha256_bytes(a.tobytes()), "shape": list(a.shape), "dtype": str(a.dtype)}
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, CardImages):  # by content: the same cards elsewhere give the same report
            return {"card_images_sha256": v.content_hashes()}
        if is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return {f.name: plain(getattr(data, f.name)) for f in fields(data) if f.name != "tsne"}


def _finite(v: Any) -> Any:
    """JSON has no NaN/inf: a diverged loss becomes null."""
    if v is None or isinstance(v, (str, bool)):
        return v
    f = float(v)
    return f if math.isfinite(f) else None


def _check_embeddings(data: ReportInput, k: int) -> dict[str, np.ndarray]:
    out = {}
    m = len(data.embedding_labels)
    for name, x in data.embeddings.items():
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 2 or len(arr) != m:
            raise DataError(
                f"report: embeddings {name!r} have shape {arr.shape}, expected ({m}, d) to match {m} embedding labels"
            )
        if not np.isfinite(arr).all():
            raise DataError(f"report: embeddings {name!r} contain NaN or infinite values")
        out[str(name)] = arr
    bad = [int(v) for v in data.embedding_labels if not 0 <= int(v) < k]
    if bad:
        raise DataError(f"report: embedding label {bad[0]} is outside the {k} classes")
    if data.embedding_split is not None and len(data.embedding_split) != m:
        raise DataError(f"report: {m} embedding labels but {len(data.embedding_split)} split entries")
    return out
