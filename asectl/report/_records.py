"""The report's input and output records, and the stage names and curves made from a PFA summary."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

FILES = {
    "html": "report.html",
    "markdown": "report.md",
    "metrics": "metrics.json",
    "confusion": "confusion.png",
    "confusion_binary": "confusion_binary.png",
    "tsne": "tsne.png",
    "curves": "curves.png",
    "calibration": "calibration.png",
}


def card_thumbnail(path: str | Path, height: int = 48) -> str:
    """A small PNG of a card as a data: URI, for the per-card table of report.html."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((height * 4, height))
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass(frozen=True)
class CardImages:
    """The test cards' image files, in test-split order. The per-card table's thumbnails are drawn from them
    only when the report is rendered, so a cached report decodes no card; the report's cache key holds the
    files' content hashes instead of the thumbnails."""

    paths: tuple[str, ...]

    def thumbnails(self) -> list[str]:
        return [card_thumbnail(p) for p in self.paths]

    def content_hashes(self) -> list[str]:
        from asectl.cache import sha256_file

        return [sha256_file(p) for p in self.paths]


@dataclass
class StageCurve:
    """One alignment stage: ITC loss per epoch on its training subset, ITC loss on D_pend after it."""

    name: str  # e.g. "PFA stage 1 (20%)" or "direct"
    itc_loss: Sequence[float]  # L_total per epoch
    val_loss: float | None = None  # on D_pend after the stage; None when D_pend is empty
    n_train: int | None = None


@dataclass
class ReportInput:
    label_names: Sequence[str]  # class names; index i is label i
    y_true: Sequence[int]  # test split, label indices
    y_pred: Sequence[int]
    image_names: Sequence[str]  # test split, same order
    probs: Any = None  # [n, k] class probabilities (optional)
    # Image embeddings per stage, e.g. "unaligned", "PFA stage 1 (20%)", ..., "direct": [m, d] each,
    # over train+test samples; embedding_labels / embedding_split colour and mark the points.
    embeddings: Mapping[str, Any] = field(default_factory=dict)
    embedding_labels: Sequence[int] = ()
    embedding_split: Sequence[str] | None = None
    pfa_curves: Sequence[StageCurve] = ()
    fusion_curve: Sequence[Mapping[str, float]] = ()  # rows of train_fusion's history["epochs"]
    provenance: Mapping[str, str] = field(default_factory=dict)  # modality/part -> what produced it
    model_id: str | None = None
    dataset_fingerprint: str | None = None
    seeds: Mapping[str, int] = field(default_factory=dict)
    warnings: Sequence[str] = ()
    title: str = "asectl report"
    dataset: str | None = None  # shown in the header (a name or path)
    tsne_seed: int = 0
    # Optional memo for t-SNE coordinates: (array, seed) -> [n, 2], so an unchanged report is fast.
    tsne: Callable[[np.ndarray, int], np.ndarray] | None = None
    # Calibration (optional; ``probs`` are then the calibrated probabilities): the probabilities before
    # calibration, the bundle's calibration record (temperature, folds, held-out figures) and decision
    # rule (targets, thresholds, held-out figures), and each test card's decision.
    probs_uncalibrated: Any = None
    calibration: Mapping[str, Any] | None = None
    decision_rule: Mapping[str, Any] | None = None
    decisions: Sequence[str] | None = None
    # Why each card got its decision (DecisionRule.explain), and a small image of each card for the
    # per-card table (data: URIs from card_thumbnail, or the CardImages to draw them from), in test-split
    # order.
    reasons: Sequence[str] | None = None
    thumbnails: Sequence[str] | CardImages | None = None


@dataclass
class ReportSummary:
    paths: dict[str, Path]  # keys of FILES -> written file
    metrics: dict[str, Any]  # the content of metrics.json
    text: str  # a few plain lines for a terminal

    @property
    def html(self) -> Path:
        return self.paths["html"]


def pfa_stage_name(index: int, fraction: float, mode: str = "progressive") -> str:
    """The name used for a stage in t-SNE panels and curves, e.g. "PFA stage 2 (40%)"."""
    if mode == "direct":
        return "direct"
    if mode == "none" or index == 0:
        return "unaligned"
    return f"PFA stage {index} ({fraction:.0%})"


def stage_curves_from_pfa(summary: Mapping[str, Any]) -> list[StageCurve]:
    """``PFAResult.summary()`` -> one StageCurve per trained stage (none for mode "none")."""
    mode = summary.get("mode", "progressive")
    curves = []
    for s in summary.get("stages", []):
        if mode == "none" or not s.get("curve"):
            continue
        curves.append(
            StageCurve(
                name=pfa_stage_name(s["stage"], s["fraction"], mode),
                itc_loss=[r["loss"] for r in s["curve"]],
                val_loss=s.get("val_loss"),
                n_train=s.get("n_train"),
            )
        )
    return curves
