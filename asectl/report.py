"""The evaluation report: metrics (paper section 4.1), confusion matrices, t-SNE of the image embeddings
after each alignment stage (paper Fig. 8), training curves and the provenance of every modality.

``build_report(ReportInput, out_dir)`` writes ``report.html`` (self-contained: figures embedded as
base64 PNG, no external resources), ``report.md`` (same tables, links to the PNG files), ``metrics.json``,
``confusion.png``, ``confusion_binary.png``, ``tsne.png``, ``curves.png`` and, for a calibrated model,
``calibration.png`` (reliability diagrams before and after calibration, with the decision rule's
figures on the test split beside them). ``compute_metrics`` and
``format_metrics_markdown`` work on their own (benchmarks use them without a full report).

Metrics come from ``sklearn.metrics``. Per-class F1 is Eq. (11); macro-F1 is the unweighted mean of the
per-class F1 scores (Eq. (12)) over the classes that occur in the true or predicted labels (scikit-learn's
default label set): a class with no test sample and no prediction has no F1 to average. Divisions by zero
(a class never predicted) count as 0, as scikit-learn's ``zero_division=0``.

The binary view collapses the labels: ``normal`` is the negative class, every other label is
``defective``; it is derived from the multi-class predictions (a type1 card predicted as type3 is a
correct binary prediction, a normal card predicted as type2 is not).
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from asectl.cache import sha256_bytes, write_atomic
from asectl.dataset import NORMAL
from asectl.errors import ConfigError, DataError
from asectl.models.calibration import threshold_text

METRICS_FORMAT = "asectl-report-metrics/1"
BINARY_LABELS = ("normal", "defective")
# Paper Fig. 8: blue, orange, green, red, purple for normal, type1..type4 (matplotlib's tab10 order).
CLASS_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                 "tab:gray", "tab:olive", "tab:cyan")
TSNE_MIN_SAMPLES = 4
FILES = {"html": "report.html", "markdown": "report.md", "metrics": "metrics.json",
         "confusion": "confusion.png", "confusion_binary": "confusion_binary.png", "tsne": "tsne.png",
         "curves": "curves.png", "calibration": "calibration.png"}


# ---------------------------------------------------------------------------------------------------
# Inputs and outputs


@dataclass
class StageCurve:
    """One alignment stage: ITC loss per epoch on its training subset, ITC loss on D_pend after it."""

    name: str                               # e.g. "PFA stage 1 (20%)" or "direct"
    itc_loss: Sequence[float]               # L_total per epoch
    val_loss: float | None = None           # on D_pend after the stage; None when D_pend is empty
    n_train: int | None = None


@dataclass
class ReportInput:
    label_names: Sequence[str]              # class names; index i is label i
    y_true: Sequence[int]                   # test split, label indices
    y_pred: Sequence[int]
    image_names: Sequence[str]              # test split, same order
    probs: Any = None                       # [n, k] class probabilities (optional)
    # Image embeddings per stage, e.g. "unaligned", "PFA stage 1 (20%)", ..., "direct": [m, d] each,
    # over train+test samples; embedding_labels / embedding_split colour and mark the points.
    embeddings: Mapping[str, Any] = field(default_factory=dict)
    embedding_labels: Sequence[int] = ()
    embedding_split: Sequence[str] | None = None
    pfa_curves: Sequence[StageCurve] = ()
    fusion_curve: Sequence[Mapping[str, float]] = ()   # rows of train_fusion's history["epochs"]
    provenance: Mapping[str, str] = field(default_factory=dict)   # modality/part -> what produced it
    model_id: str | None = None
    dataset_fingerprint: str | None = None
    seeds: Mapping[str, int] = field(default_factory=dict)
    warnings: Sequence[str] = ()
    title: str = "asectl report"
    dataset: str | None = None              # shown in the header (a name or path)
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
    # per-card table (data: URIs from card_thumbnail), in test-split order.
    reasons: Sequence[str] | None = None
    thumbnails: Sequence[str] | None = None


@dataclass
class ReportSummary:
    paths: dict[str, Path]                  # keys of FILES -> written file
    metrics: dict[str, Any]                 # the content of metrics.json
    text: str                               # a few plain lines for a terminal

    @property
    def html(self) -> Path:
        return self.paths["html"]


# ---------------------------------------------------------------------------------------------------
# Metrics


def binary_labels(label_names: Sequence[str], y: Sequence[int]) -> list[int]:
    """Label indices -> 0 (normal) / 1 (defective)."""
    return [0 if label_names[int(i)] == NORMAL else 1 for i in y]


def _view_metrics(labels: Sequence[str], y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    from asectl.metrics import macro_f1_from_codes

    k = len(labels)
    all_idx = list(range(k))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=all_idx, zero_division=0)
    predicted = np.bincount(np.asarray(y_pred, dtype=np.int64), minlength=k)
    # Eq. (12) over scikit-learn's default label set: classes present in y_true or y_pred.
    present = sorted(set(int(v) for v in y_true) | set(int(v) for v in y_pred))
    per_class = {}
    for i, name in enumerate(labels):
        per_class[name] = {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                           "support": int(support[i]), "predicted": int(predicted[i]),
                           "in_macro": i in present}
    return {
        "labels": list(labels),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": macro_f1_from_codes(y_true, y_pred, k),
        "macro_f1_labels": [labels[i] for i in present],
        "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=all_idx).tolist(),
    }


def compute_metrics(label_names: Sequence[str], y_true: Sequence[int], y_pred: Sequence[int],
                    probs: Any = None, image_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Multi-class and binary metrics (fractions in [0, 1]) plus one record per prediction.

    ``binary`` is None when no label is called ``normal`` (no negative class to collapse to)."""
    labels = [str(x) for x in label_names]
    y_true_a, y_pred_a, probs_a = _check_predictions(labels, y_true, y_pred, probs, image_names)
    metrics: dict[str, Any] = {"format": METRICS_FORMAT, "n_test": int(len(y_true_a)),
                               "multiclass": _view_metrics(labels, y_true_a, y_pred_a), "binary": None}
    if NORMAL in labels:
        metrics["binary"] = _view_metrics(list(BINARY_LABELS), binary_labels(labels, y_true_a),
                                          binary_labels(labels, y_pred_a))
    names = list(image_names) if image_names is not None else [str(i) for i in range(len(y_true_a))]
    predictions = []
    for i, (t, p) in enumerate(zip(y_true_a, y_pred_a)):
        row: dict[str, Any] = {"image": names[i], "true": labels[t], "pred": labels[p], "correct": bool(t == p)}
        if probs_a is not None:
            row["confidence"] = float(probs_a[i, p])
            row["probs"] = [float(v) for v in probs_a[i]]
        predictions.append(row)
    metrics["predictions"] = predictions
    return metrics


def _check_predictions(labels: list[str], y_true: Sequence[int], y_pred: Sequence[int], probs: Any,
                       image_names: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    k = len(labels)
    if k < 2:
        raise DataError(f"report needs at least 2 classes, got {labels}")
    if len(set(labels)) != k:
        raise DataError(f"report: duplicate class names in {labels}")
    y_true_a = np.asarray(list(y_true), dtype=np.int64)
    y_pred_a = np.asarray(list(y_pred), dtype=np.int64)
    n = len(y_true_a)
    if n == 0:
        raise DataError("report: the test split is empty; mark some samples with split=test")
    if len(y_pred_a) != n:
        raise DataError(f"report: {n} true labels but {len(y_pred_a)} predictions")
    for what, arr in (("true label", y_true_a), ("prediction", y_pred_a)):
        bad = arr[(arr < 0) | (arr >= k)]
        if bad.size:
            raise DataError(f"report: {what} index {int(bad[0])} is outside the {k} classes {labels}")
    if image_names is not None and len(image_names) != n:
        raise DataError(f"report: {n} predictions but {len(image_names)} image names")
    probs_a = None
    if probs is not None:
        probs_a = np.asarray(probs, dtype=np.float64)
        if probs_a.shape != (n, k):
            raise DataError(f"report: probabilities have shape {probs_a.shape}, expected ({n}, {k})")
    return y_true_a, y_pred_a, probs_a


# ---------------------------------------------------------------------------------------------------
# Tables (Markdown and the rows shared with HTML and the terminal)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _per_class_f1(view: Mapping[str, Any], name: str) -> float | None:
    row = view["per_class"][name]
    return row["f1"] if row["in_macro"] else None


def headline_rows(metrics: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The paper's Table 2 layout: binary macro-F1 and per-class F1, then multi-class (percent)."""
    header, row = [], []
    binary = metrics.get("binary")
    if binary:
        header += ["macro-F1 (binary)"] + [f"F1 {c}" for c in binary["labels"]]
        row += [_pct(binary["macro_f1"])] + [_pct(_per_class_f1(binary, c)) for c in binary["labels"]]
    multi = metrics["multiclass"]
    header += ["macro-F1 (multi-class)"] + [f"F1 {c}" for c in multi["labels"]]
    row += [_pct(multi["macro_f1"])] + [_pct(_per_class_f1(multi, c)) for c in multi["labels"]]
    return header, row


def per_class_rows(view: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name in view["labels"]:
        r = view["per_class"][name]
        absent = not r["in_macro"]
        rows.append([name, "—" if absent else _pct(r["precision"]), "—" if absent else _pct(r["recall"]),
                     "—" if absent else _pct(r["f1"]), str(r["support"]), str(r["predicted"])])
    return rows


PER_CLASS_HEADER = ["class", "precision", "recall", "F1", "support", "predicted"]


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _confusion_rows(view: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = ["true \\ predicted"] + list(view["labels"])
    rows = [[name] + list(counts) for name, counts in zip(view["labels"], view["confusion_matrix"])]
    return header, rows


def format_metrics_markdown(metrics: Mapping[str, Any], detail: bool = True) -> str:
    """Markdown for a ``compute_metrics`` result: the Table 2 style summary row (percent), and with
    ``detail`` the per-class precision/recall/F1 tables and the confusion matrices."""
    header, row = headline_rows(metrics)
    multi = metrics["multiclass"]
    parts = [_md_table(header, [row]), "",
             f"Accuracy {_pct(multi['accuracy'])} % on {metrics['n_test']} test samples; multi-class macro-F1 "
             f"over {len(multi['macro_f1_labels'])} classes ({', '.join(multi['macro_f1_labels'])})."]
    if not detail:
        return "\n".join(parts) + "\n"
    views = [("Multi-class", multi)]
    if metrics.get("binary"):
        views.append(("Binary (normal vs defective)", metrics["binary"]))
    for title, view in views:
        parts += ["", f"### {title}", "", _md_table(PER_CLASS_HEADER, per_class_rows(view)), "",
                  f"macro-F1 {_pct(view['macro_f1'])}, weighted F1 {_pct(view['weighted_f1'])}, "
                  f"accuracy {_pct(view['accuracy'])} (percent).", "",
                  "Confusion matrix (rows: true class, columns: predicted class):", "",
                  _md_table(*_confusion_rows(view))]
    if not metrics.get("binary"):
        parts += ["", "No class is called `normal`, so there is no binary view."]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------
# Figures (matplotlib's Agg canvas on Figure objects: no pyplot state, no display needed)


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # No "Software" stamp: the bytes depend only on the data.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def confusion_png(view: Mapping[str, Any], title: str) -> bytes:
    from sklearn.metrics import ConfusionMatrixDisplay

    k = len(view["labels"])
    fig = _new_figure(1.6 + 0.9 * k, 1.2 + 0.85 * k)
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(np.asarray(view["confusion_matrix"]), display_labels=view["labels"]).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d")
    ax.set_title(title)
    return _png(fig)


def tsne_perplexity(n: int) -> float:
    """30 (the usual value) for large n, about (n-1)/3 for small n; always below n as t-SNE requires."""
    return float(min(30.0, max(1.0, (n - 1) / 3.0)))


def tsne_2d(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    # One OpenMP thread: the Barnes-Hut gradient slows down by 10-100x when its threads compete with
    # other processes for the cores, and report-sized inputs (hundreds of points) need no more.
    with threadpool_limits(limits=1):
        return TSNE(n_components=2, perplexity=tsne_perplexity(len(x)), init="pca", learning_rate="auto",
                    random_state=seed).fit_transform(np.asarray(x, dtype=np.float64))


def tsne_png(embeddings: Mapping[str, np.ndarray], labels: Sequence[int], label_names: Sequence[str],
             split: Sequence[str] | None, seed: int,
             tsne: Callable[[np.ndarray, int], np.ndarray] | None = None) -> bytes:
    from matplotlib.lines import Line2D

    names = list(embeddings)
    ncols = max(1, min(len(names), 5))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig = _new_figure(3.4 * ncols, 3.4 * nrows + 0.6)
    y = np.asarray(list(labels), dtype=np.int64)
    test = np.asarray([s == "test" for s in split]) if split is not None else np.zeros(len(y), bool)
    if not names:
        ax = fig.add_subplot()
        _placeholder(ax, "no embeddings recorded")
    for p, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, p + 1)
        x = embeddings[name]
        ax.set_title(f"({chr(ord('a') + p)}) {name}" if p < 26 else name, fontsize=10)
        if len(x) < TSNE_MIN_SAMPLES or x.shape[1] < 2:
            _placeholder(ax, f"too few samples for t-SNE ({len(x)})")
            continue
        xy = (tsne or tsne_2d)(x, seed)
        for c in range(len(label_names)):
            colour = CLASS_COLOURS[c % len(CLASS_COLOURS)]
            for is_test, marker in ((False, "o"), (True, "^")):
                m = (y == c) & (test == is_test)
                if m.any():
                    ax.scatter(xy[m, 0], xy[m, 1], s=14 if not is_test else 22, c=colour, marker=marker,
                               edgecolors="black" if is_test else "none", linewidths=0.4, alpha=0.85)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], marker="o", linestyle="", color=CLASS_COLOURS[c % len(CLASS_COLOURS)], label=n)
               for c, n in enumerate(label_names)]
    if split is not None and test.any():
        handles += [Line2D([], [], marker="o", linestyle="", color="grey", label="train"),
                    Line2D([], [], marker="^", linestyle="", color="grey", markeredgecolor="black",
                           label="test")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    return _png(fig)


def _placeholder(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def curves_png(pfa: Sequence[StageCurve], fusion: Sequence[Mapping[str, float]]) -> bytes:
    fig = _new_figure(15, 4)
    ax_itc, ax_val, ax_fus = fig.subplots(1, 3)

    # ITC loss, epochs counted across stages (one optimiser and schedule run over the whole alignment).
    ax_itc.set_title("Alignment: ITC loss per epoch (training subset)", fontsize=10)
    start = 0
    for i, stage in enumerate(pfa):
        losses = [_num(v) for v in stage.itc_loss]
        if losses:
            xs = np.arange(start + 1, start + len(losses) + 1)
            ax_itc.plot(xs, losses, marker="." if len(losses) < 30 else None, label=stage.name,
                        color=f"C{i % 10}")
            if start:
                ax_itc.axvline(start + 0.5, color="grey", linestyle=":", linewidth=0.8)
            start += len(losses)
    if start:
        ax_itc.set_xlabel("epoch")
        ax_itc.set_ylabel("L_total = L_llm + L_vlm")
        ax_itc.legend(fontsize=7)
    else:
        _placeholder(ax_itc, "no alignment training recorded")

    ax_val.set_title("Alignment: ITC loss on D_pend after each stage", fontsize=10)
    vals = [(s.name, s.val_loss) for s in pfa]
    if any(v is not None for _, v in vals):
        xs = np.arange(len(vals))
        ys = [np.nan if v is None else _num(v) for _, v in vals]
        ax_val.plot(xs, ys, marker="o")
        for x, (_, v) in zip(xs, vals):
            if v is None:
                ax_val.annotate("D_pend empty", (x, 0), xycoords=("data", "axes fraction"), ha="center",
                                va="bottom", fontsize=7, color="grey", xytext=(0, 4), textcoords="offset points")
        ax_val.set_xticks(xs, [n for n, _ in vals], rotation=20, ha="right", fontsize=7)
        ax_val.set_ylabel("ITC loss")
    else:
        _placeholder(ax_val, "no D_pend validation loss recorded")

    ax_fus.set_title("Fusion training", fontsize=10)
    rows = list(fusion)
    if rows:
        epochs = [int(r.get("epoch", i + 1)) for i, r in enumerate(rows)]
        ax_fus.plot(epochs, [_num(r.get("loss")) for r in rows], color="C0", label="loss")
        if any("val_loss" in r for r in rows):
            ax_fus.plot(epochs, [_num(r.get("val_loss")) for r in rows], color="C0", linestyle="--",
                        label="validation loss")
        ax_fus.set_xlabel("epoch")
        ax_fus.set_ylabel("cross-entropy loss", color="C0")
        ax_acc = ax_fus.twinx()
        if any("accuracy" in r for r in rows):
            ax_acc.plot(epochs, [_num(r.get("accuracy")) for r in rows], color="C1", label="accuracy")
        if any("val_accuracy" in r for r in rows):
            ax_acc.plot(epochs, [_num(r.get("val_accuracy")) for r in rows], color="C1", linestyle="--",
                        label="validation accuracy")
        ax_acc.set_ylim(0, 1.02)
        ax_acc.set_ylabel("accuracy", color="C1")
        handles = ax_fus.get_legend_handles_labels()[0] + ax_acc.get_legend_handles_labels()[0]
        ax_fus.legend(handles=handles, fontsize=7, loc="center right")
    else:
        _placeholder(ax_fus, "no fusion training recorded")
    return _png(fig)


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def calibration_metrics(data: "ReportInput", labels: Sequence[str]) -> tuple[dict[str, Any] | None,
                                                                          dict[str, Any] | None]:
    """ECE and reliability bins on the test split before and after calibration, and how the decision
    rule did on the test split (None, None for a report without calibration)."""
    from asectl.models.calibration import ECE_BINS, decision_stats, expected_calibration_error, reliability_bins

    if data.probs is None or data.probs_uncalibrated is None or data.calibration is None:
        return None, None
    y = np.asarray(list(data.y_true), dtype=np.int64)
    test = {}
    for when, probs in (("before", data.probs_uncalibrated), ("after", data.probs)):
        p = np.asarray(probs, dtype=np.float64)
        if p.shape != (len(y), len(labels)):
            raise DataError(f"report: {when}-calibration probabilities have shape {p.shape}, expected "
                            f"({len(y)}, {len(labels)})")
        test[f"ece_{when}"] = expected_calibration_error(p, y)
        test[f"bins_{when}"] = reliability_bins(p, y)
    test["n_bins"] = ECE_BINS
    calibration = {**{k: v for k, v in data.calibration.items() if k != "held_out"}, "test": test}
    decision = None
    if data.decision_rule is not None and data.decisions is not None:
        if len(data.decisions) != len(y):
            raise DataError(f"report: {len(y)} predictions but {len(data.decisions)} decisions")
        test_stats = decision_stats(data.decisions, y, np.asarray(list(data.y_pred)), labels)
        decision = {**dict(data.decision_rule), "test": test_stats,
                    "figures": decision_figures(test_stats, data.decision_rule)}
    return calibration, decision


# The figures a line decides on, in the order the report shows them: (name, numerator and denominator
# keys of decision_stats, target key of the rule, what the denominator counts).
DECISION_FIGURES = (("miss rate", "n_missed", "n_defective", "max_miss_rate", "defective cards"),
                    ("review share", "n_review", "n", None, "cards"),
                    ("defect error", "n_wrong_defect", "n_defect_decisions", "max_defect_error", "defect decisions"))
INTERVAL_CONFIDENCE = 0.95


def decision_figures(stats: Mapping[str, Any], rule: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Miss rate, review share and defect error on the test split, each with its exact (Clopper-Pearson)
    95% interval, its target, the held-out training cards' figure, whether the test split exceeds the
    target, and whether the split is too small to show the target is met (with none wrong, the interval
    still reaches above it)."""
    from asectl.models.calibration import exact_interval

    counts = {**stats, "n_review": stats["counts"]["review"]}
    held = rule.get("held_out") or {}
    rows = []
    for name, k_key, n_key, target_key, unit in DECISION_FIGURES:
        k, n = int(counts[k_key]), int(counts[n_key])
        target = None if target_key is None else float(rule[target_key])
        value = k / n if n else None
        interval = exact_interval(k, n, INTERVAL_CONFIDENCE)
        best_case = exact_interval(0, n, INTERVAL_CONFIDENCE)
        rows.append({"name": name, "k": k, "n": n, "unit": unit, "value": value,
                     "interval": list(interval) if interval else None, "target": target,
                     "held_out": held.get(name.replace(" ", "_")),
                     "exceeded": bool(target is not None and value is not None and value > target),
                     "too_few": bool(target is not None and best_case is not None and best_case[1] > target)})
    return rows


def figure_warnings(figures: Sequence[Mapping[str, Any]]) -> list[str]:
    """A sentence for each target the test split exceeds, and for each it is too small to check."""
    out = []
    for f in figures:
        if f["exceeded"]:
            out.append(f"test {f['name']} {_rate(f['value'], f['k'], f['n'])} exceeds its target of at most "
                       f"{_rate(f['target'])}")
        if f["too_few"]:
            out.append(f"{f['n']} {f['unit']} on the test split are too few to check the {f['name']} target of "
                       f"{_rate(f['target'])}: with none wrong, the exact {INTERVAL_CONFIDENCE:.0%} interval still "
                       f"reaches {_rate(exact_upper(f['n']))}")
    return out


def exact_upper(n: int) -> float:
    """The upper end of the exact interval of 0 of ``n``."""
    from asectl.models.calibration import exact_interval

    return exact_interval(0, n, INTERVAL_CONFIDENCE)[1]


def reliability_png(test: Mapping[str, Any] | None) -> bytes:
    """Reliability diagrams of the test split before and after calibration: accuracy per confidence bin
    against the diagonal (perfect calibration), with the number of cards per bin below."""
    fig = _new_figure(10, 5.2)
    if test is None:
        _placeholder(fig.add_subplot(), "no calibration recorded")
        return _png(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1])
    width = 1.0 / test["n_bins"]
    for col, when in enumerate(("before", "after")):
        ax, ax_n = fig.add_subplot(grid[0, col]), fig.add_subplot(grid[1, col])
        bins = test[f"bins_{when}"]
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="perfect calibration")
        ax.bar(centres, [b["accuracy"] for b in bins], width=width * 0.9, color="C0", alpha=0.8,
               label="accuracy in bin")
        # The gap between a bar's top (accuracy) and its dot (mean confidence) is the miscalibration.
        ax.scatter(centres, [b["confidence"] for b in bins], color="C3", s=14, zorder=3,
                   label="mean confidence in bin")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{when} calibration: ECE {test[f'ece_{when}']:.4f}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
        ax_n.bar(centres, [b["count"] for b in bins], width=width * 0.9, color="C7")
        ax_n.set_xlim(0, 1)
        ax_n.set_xlabel("confidence (top-class probability)")
        ax_n.set_ylabel("cards")
    return _png(fig)


# ---------------------------------------------------------------------------------------------------
# Helpers for callers holding asectl.models results


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
        curves.append(StageCurve(name=pfa_stage_name(s["stage"], s["fraction"], mode),
                                 itc_loss=[r["loss"] for r in s["curve"]], val_loss=s.get("val_loss"),
                                 n_train=s.get("n_train")))
    return curves


# ---------------------------------------------------------------------------------------------------
# The report


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
    metrics["tsne"] = {"stages": list(embeddings), "n_samples": m, "perplexity": perplexity, "init": "pca",
                       "metric": "euclidean", "learning_rate": "auto", "random_state": data.tsne_seed}
    metrics["curves"] = {
        "pfa": [{"name": s.name, "itc_loss": [_finite(v) for v in s.itc_loss], "val_loss": _finite(s.val_loss),
                 "n_train": s.n_train} for s in data.pfa_curves],
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
    pngs["tsne"] = tsne_png(embeddings, data.embedding_labels, labels, data.embedding_split, data.tsne_seed,
                            data.tsne)
    pngs["curves"] = curves_png(data.pfa_curves, data.fusion_curve)
    pngs["calibration"] = reliability_png(metrics["calibration"]["test"] if metrics["calibration"] else None)

    files: dict[str, bytes] = dict(pngs)
    files["metrics"] = (json.dumps(metrics, indent=2, allow_nan=False) + "\n").encode()
    context = _context(data, metrics)
    files["markdown"] = _markdown(context, metrics, pngs).encode()
    files["html"] = _html(context, metrics, pngs).encode()
    return files


def write_report(files: Mapping[str, bytes], out_dir: Path) -> ReportSummary:
    """Write ``render_report``'s files into ``out_dir``."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{out_dir}: cannot create the report folder ({e.strerror}); choose another "
                          "output folder") from None
    paths: dict[str, Path] = {}
    for key, data in sorted(files.items(), key=lambda kv: kv[0] == "html"):   # report.html last: the one opened
        paths[key] = out_dir / FILES[key]
        write_atomic(paths[key], data)
    metrics = json.loads(files["metrics"])
    return ReportSummary(paths=paths, metrics=metrics, text=_summary_text(metrics, paths))


def report_key_parts(data: ReportInput) -> dict[str, Any]:
    """Everything the report files depend on, JSON-able with arrays by content hash: for a cache key.
    The t-SNE memo is left out (it only makes the same coordinates faster)."""

    def plain(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v)
            return {"sha256": sha256_bytes(a.tobytes()), "shape": list(a.shape),
                    "dtype": str(a.dtype)}
        if isinstance(v, np.generic):
            return v.item()
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
            raise DataError(f"report: embeddings {name!r} have shape {arr.shape}, expected ({m}, d) to match "
                            f"{m} embedding labels")
        if not np.isfinite(arr).all():
            raise DataError(f"report: embeddings {name!r} contain NaN or infinite values")
        out[str(name)] = arr
    bad = [int(v) for v in data.embedding_labels if not 0 <= int(v) < k]
    if bad:
        raise DataError(f"report: embedding label {bad[0]} is outside the {k} classes")
    if data.embedding_split is not None and len(data.embedding_split) != m:
        raise DataError(f"report: {m} embedding labels but {len(data.embedding_split)} split entries")
    return out


def _context(data: ReportInput, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Everything both templates show, as plain strings."""
    multi, binary = metrics["multiclass"], metrics["binary"]
    headline = headline_rows(metrics)
    views = [("Multi-class", multi)] + ([("Binary (normal vs defective)", binary)] if binary else [])
    stage_rows = [[s.name, str(s.n_train) if s.n_train is not None else "—", str(len(s.itc_loss)),
                   _fmt_loss(s.itc_loss[-1] if len(s.itc_loss) else None),
                   _fmt_loss(s.val_loss) if s.val_loss is not None else "— (D_pend empty)"]
                  for s in data.pfa_curves]
    last_fusion = data.fusion_curve[-1] if data.fusion_curve else None
    info = [("model", data.model_id or "—"), ("dataset", data.dataset or "—"),
            ("dataset fingerprint", data.dataset_fingerprint or "—"),
            ("seeds", ", ".join(f"{k}={v}" for k, v in data.seeds.items()) or "—")]
    return {
        "title": data.title,
        "warnings": list(metrics["warnings"]),         # the input's, and the decision figures' flags
        "n_test": metrics["n_test"],
        "accuracy": _pct(multi["accuracy"]),
        "macro_multi": _pct(multi["macro_f1"]),
        "macro_binary": _pct(binary["macro_f1"]) if binary else "—",
        "macro_labels": ", ".join(multi["macro_f1_labels"]),
        "headline_header": headline[0], "headline_row": headline[1],
        "views": [{"title": t, "rows": per_class_rows(v), "macro": _pct(v["macro_f1"]),
                   "weighted": _pct(v["weighted_f1"]), "accuracy": _pct(v["accuracy"]),
                   "confusion": _confusion_rows(v)} for t, v in views],
        "per_class_header": PER_CLASS_HEADER,
        "stage_rows": stage_rows,
        "fusion_last": (f"{len(data.fusion_curve)} epochs; last epoch loss {_fmt_loss(last_fusion.get('loss'))}, "
                        f"training accuracy {_pct(last_fusion['accuracy']) if 'accuracy' in last_fusion else '—'} %"
                        if last_fusion else None),
        "provenance": [(str(k), str(v)) for k, v in data.provenance.items()],
        "info": info,
        "tsne": metrics["tsne"],
        "tsne_stages": ", ".join(metrics["tsne"]["stages"]) or "none",
        "calibration": _calibration_context(metrics),
        "decisions": _decisions_context(metrics),
        "cards": card_rows(metrics, data.thumbnails),
    }


FIGURES_HEADER = ["figure", "test split", "exact 95% interval", "target", "held-out training cards", "status"]
CARDS_HEADER = ["image", "true label", "class", "probability", "decision", "reason", "flag"]
# Per-card table order: what the line must look at first.
CARD_GROUPS = ("missed defect", "wrong defect", "review", "misclassified", "")


def _decisions_context(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The opening section: the decision figures against their targets (None without a decision rule)."""
    dec = metrics.get("decision")
    if not dec or "figures" not in dec:
        return None
    rows, flags = [], []
    for f in dec["figures"]:
        interval = "—" if f["interval"] is None else f"{_rate(f['interval'][0])} – {_rate(f['interval'][1])}"
        status = ("OVER TARGET" if f["exceeded"] else "too few cards to check" if f["too_few"] else
                  "within target" if f["target"] is not None and f["value"] is not None else "—")
        rows.append({"cells": [f["name"], _rate(f["value"], f["k"], f["n"]), interval,
                               "—" if f["target"] is None else f"at most {_rate(f['target'])}",
                               _rate(f["held_out"]), status], "exceeded": f["exceeded"]})
        if f["exceeded"]:
            flags.append(f"The test {f['name']}, {_rate(f['value'], f['k'], f['n'])}, exceeds its target of at "
                         f"most {_rate(f['target'])}.")

    def when(v: float | None) -> str:
        return "never (no threshold met its target on held-out cards)" if v is None else f"with p ≥ {v:.4f}"

    rule = (f"pass: top class normal {when(dec['pass_threshold'])}; defect: top class a defect class "
            f"{when(dec['defect_threshold'])}; otherwise review (thresholds chosen on held-out training cards). "
            f"Miss rate: defective cards passed, over defective cards; review share: cards sent to review, over "
            f"all cards; defect error: cards decided defect whose true class differs, over defect decisions.")
    return {"rows": rows, "flags": flags, "rule": rule, "n": dec["test"]["n"]}


def card_rows(metrics: Mapping[str, Any], thumbnails: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per test card for the per-card table, passed defects first, then wrong defect decisions,
    cards sent to review, other misclassified cards, the rest; most confident first within each."""
    rows = []
    for i, p in enumerate(metrics["predictions"]):
        decision = p.get("decision")
        flag = ("missed defect" if decision == "pass" and p["true"] != NORMAL else
                "wrong defect" if decision == "defect" and not p["correct"] else
                "review" if decision == "review" else "" if p["correct"] else "misclassified")
        rows.append({"thumbnail": thumbnails[i] if thumbnails else None, "flag": flag,
                     "confidence": p.get("confidence", 0.0),
                     "cells": [p["image"], p["true"], p["pred"],
                               f"{p['confidence']:.4f}" if "confidence" in p else "—", decision or "—",
                               p.get("reason", "—"), flag if flag != "review" else ""]})
    return sorted(rows, key=lambda r: (CARD_GROUPS.index(r["flag"]), -r["confidence"]))


def card_thumbnail(path: str | Path, height: int = 48) -> str:
    """A small PNG of a card as a data: URI, for the per-card table of report.html."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((height * 4, height))
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


TRADEOFF_HEADER = ["miss-rate target", "pass threshold", "review share", "miss rate"]
TRADEOFF_NOTE = "a stricter target sends more cards to review; retrain with --max-miss-rate to use another."


def _rate(v: float | None, k: int | None = None, n: int | None = None) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.2f} %" + (f" ({k}/{n})" if k is not None and n is not None else "")


def _calibration_context(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The calibration and decision section as plain strings (None without calibration)."""
    cal, dec = metrics.get("calibration"), metrics.get("decision")
    if not cal:
        return None
    test = cal["test"]
    ece_rows = [["ECE, test split", f"{test['ece_before']:.4f}", f"{test['ece_after']:.4f}"]]
    if cal.get("held_out_ece"):
        ece_rows.append(["ECE, held-out training cards", f"{cal['held_out_ece']['before']:.4f}",
                         f"{cal['held_out_ece']['after']:.4f}"])
    if cal.get("held_out_nll"):
        ece_rows.append(["NLL, held-out training cards", f"{cal['held_out_nll']['before']:.4f}",
                         f"{cal['held_out_nll']['after']:.4f}"])
    out: dict[str, Any] = {
        "text": (f"Temperature scaling: T = {cal['temperature']:.4f}, fitted on out-of-fold predictions of a "
                 f"{cal['folds']}-fold cross-validation on {cal['n_held_out']} training cards (seed "
                 f"{cal['seed']}); the test split was not used. The classifier is "
                 f"{cal.get('classifier', 'the model trained on every training card')}: "
                 "the probabilities shown are the mean of their calibrated probabilities. ECE over "
                 f"{test['n_bins']} equal-width confidence bins."),
        "ece_rows": ece_rows, "decision_rows": [], "rule_text": None, "tradeoff_rows": []}
    if dec:
        def thr(v: float | None) -> str:
            return threshold_text(v, 6, "p ≥ ")

        out["rule_text"] = (
            f"pass: top class normal with {thr(dec['pass_threshold'])}; defect: top class a defect class with "
            f"{thr(dec['defect_threshold'])}; otherwise review. Targets, chosen by the user at training: miss "
            f"rate at most {_rate(dec['max_miss_rate'])} (defective cards passed, over defective cards), "
            f"defect error at most {_rate(dec['max_defect_error'])} (cards decided defect whose true class "
            "differs, over defect decisions). On the held-out training cards, the pass threshold is the lowest "
            "that meets its target; the defect threshold is lowered from the most confident card until a cut "
            "first breaks its target"
            + (f" (a cut meets it only if the exact upper bound of its error at {100 * dec['defect_confidence']:g}% "
               "confidence does)" if dec.get("defect_confidence") is not None else "") + ".")
        views = [("held-out training cards", dec.get("held_out")), ("test split", dec["test"])]
        views = [(name, v) for name, v in views if v]
        out["decision_header"] = [""] + [f"{name} ({v['n']})" for name, v in views]
        out["decision_rows"] = [
            ["pass share"] + [_rate(v["pass_share"], v["counts"]["pass"], v["n"]) for _, v in views],
            ["defect share"] + [_rate(v["defect_share"], v["counts"]["defect"], v["n"]) for _, v in views],
            ["review share"] + [_rate(v["review_share"], v["counts"]["review"], v["n"]) for _, v in views],
            ["miss rate"] + [_rate(v["miss_rate"], v["n_missed"], v["n_defective"]) for _, v in views],
            ["defect error"] + [_rate(v["defect_error"], v["n_wrong_defect"], v["n_defect_decisions"])
                                for _, v in views]]
        out["tradeoff_rows"] = [[_rate(r["max_miss_rate"]), threshold_text(r["pass_threshold"], 6),
                                 _rate(r["review_share"]), _rate(r["miss_rate"])]
                                for r in dec.get("tradeoff", [])]
    return out


def _fmt_loss(v: Any) -> str:
    return "—" if v is None else f"{float(v):.4f}"


def _markdown(ctx: Mapping[str, Any], metrics: Mapping[str, Any], pngs: Mapping[str, bytes]) -> str:
    out = [f"# {ctx['title']}", ""]
    for w in ctx["warnings"]:
        out.append(f"> **Warning:** {w}")
    if ctx["warnings"]:
        out.append("")
    dec = ctx["decisions"]
    if dec:
        out += [f"## Decisions on the test split ({dec['n']} cards)", ""]
        out += [f"> **OVER TARGET:** {flag}" for flag in dec["flags"]] + ([""] if dec["flags"] else [])
        out += [_md_table(FIGURES_HEADER, [r["cells"] for r in dec["rows"]]), "", dec["rule"], ""]
    out += ["## Cards", "", f"{len(ctx['cards'])} test cards: defective cards passed first, then wrong defect "
            "decisions, cards sent to review, other misclassified cards and the rest.", "",
            _md_table(CARDS_HEADER, [r["cells"] for r in ctx["cards"]]), ""]
    out += ["## Classification", "", format_metrics_markdown(metrics, detail=True).rstrip(), ""]
    out += ["![Multi-class confusion matrix](confusion.png)", ""]
    if "confusion_binary" in pngs:
        out += ["![Binary confusion matrix](confusion_binary.png)", ""]
    out += ["## ML diagnostics", ""]
    cal = ctx["calibration"]
    if cal:
        out += ["### Confidence and decisions", "", cal["text"], "",
                _md_table(["", "before calibration", "after calibration"], cal["ece_rows"]), "",
                "![Reliability diagrams](calibration.png)", ""]
        if cal["rule_text"]:
            out += [f"Decision rule: {cal['rule_text']}", "",
                    _md_table(cal["decision_header"], cal["decision_rows"]), ""]
        if cal["tradeoff_rows"]:
            out += [f"Other miss-rate targets on the held-out training cards (same defect target): {TRADEOFF_NOTE}",
                    "", _md_table(TRADEOFF_HEADER, cal["tradeoff_rows"]), ""]
    out += ["### Image embeddings (t-SNE)", "", _tsne_caption(ctx), "", "![t-SNE of image embeddings](tsne.png)",
            "", "### Training", ""]
    if ctx["stage_rows"]:
        out += [_md_table(["stage", "training pairs", "epochs", "final ITC loss", "ITC loss on D_pend"],
                          ctx["stage_rows"]), ""]
    if ctx["fusion_last"]:
        out += [f"Fusion: {ctx['fusion_last']}.", ""]
    out += ["![Training curves](curves.png)", "", "## Provenance", ""]
    out += [_md_table(["part", "produced by"], ctx["provenance"] + ctx["info"]), ""]
    return "\n".join(out)


def _tsne_caption(ctx: Mapping[str, Any]) -> str:
    t = ctx["tsne"]
    perp = f"perplexity {t['perplexity']:.2f}" if t["perplexity"] is not None else "too few samples"
    return (f"t-SNE (scikit-learn, {perp}, PCA initialisation, random_state {t['random_state']}) of the "
            f"image embeddings of {t['n_samples']} samples after each stage: {ctx['tsne_stages']}. Colours: "
            "blue, orange, green, red, purple for the classes in label order (paper Fig. 8); circles are "
            "training samples, triangles test samples. Each panel is fitted on its own, so axes are not "
            "comparable across panels.")


def _html(ctx: Mapping[str, Any], metrics: Mapping[str, Any], pngs: Mapping[str, bytes]) -> str:
    import jinja2

    source = resources.files("asectl").joinpath("report_template.html").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    images = {k: "data:image/png;base64," + base64.b64encode(v).decode("ascii") for k, v in pngs.items()}
    return env.from_string(source).render(**ctx, images=images, tsne_caption=_tsne_caption(ctx),
                                          tradeoff_header=TRADEOFF_HEADER, tradeoff_note=TRADEOFF_NOTE,
                                          figures_header=FIGURES_HEADER, cards_header=CARDS_HEADER)


def _summary_text(metrics: Mapping[str, Any], paths: Mapping[str, Path]) -> str:
    multi, binary = metrics["multiclass"], metrics["binary"]
    lines = [f"{metrics['n_test']} test samples: accuracy {_pct(multi['accuracy'])} %, macro-F1 "
             f"{_pct(multi['macro_f1'])} (multi-class)"
             + (f", {_pct(binary['macro_f1'])} (binary)" if binary else "")]
    lines += [line for line in (_decision_line(metrics),) if line]
    lines += [f"warning: {w}" for w in metrics["warnings"]]
    lines.append(f"report: {paths['html']}")
    return "\n".join(lines)


def print_summary(summary: ReportSummary, console: Any = None, quiet: bool = False) -> None:
    """The decision figures against their targets first, then per-class F1, macro-F1 (multi-class and
    binary) and provenance as rich tables; ``quiet``: the warnings only (flags on exceeded targets
    included)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    metrics = summary.metrics
    for w in metrics["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
    if quiet:
        return
    figures = (metrics.get("decision") or {}).get("figures")
    if figures:
        table = Table(title=f"Decisions on the test split: {metrics['decision']['test']['n']} cards",
                      title_justify="left")
        for col in FIGURES_HEADER:
            table.add_column(col, justify="left" if col in ("figure", "status") else "right")
        for row in _decisions_context(metrics)["rows"]:
            table.add_row(*map(escape, row["cells"]), style="bold red" if row["exceeded"] else None)
        console.print(table)
    multi, binary = metrics["multiclass"], metrics["binary"]
    table = Table(title=f"Test split: {metrics['n_test']} samples", title_justify="left")
    for col in PER_CLASS_HEADER:
        table.add_column(col, justify="left" if col == "class" else "right")
    for row in per_class_rows(multi):
        table.add_row(*map(escape, row))
    table.add_section()
    table.add_row("macro-F1 (multi-class)", "", "", _pct(multi["macro_f1"]), "", "", style="bold")
    if binary:
        table.add_section()
        for row in per_class_rows(binary):
            table.add_row(*map(escape, row))
        table.add_row("macro-F1 (binary)", "", "", _pct(binary["macro_f1"]), "", "", style="bold")
    table.caption = f"percent; accuracy {_pct(multi['accuracy'])}"
    console.print(table)
    if metrics["provenance"]:
        prov = Table(show_header=False, box=None, padding=(0, 1))
        prov.add_column(style="dim")
        prov.add_column()
        for k, v in metrics["provenance"].items():
            prov.add_row(escape(k), escape(v))
        console.print(prov)
    line = _decision_line(metrics)
    if line:
        console.print(escape(line), highlight=False)
    console.print(f"report: {escape(str(summary.paths['html']))}", highlight=False)


def _decision_line(metrics: Mapping[str, Any]) -> str | None:
    cal, dec = metrics.get("calibration"), metrics.get("decision")
    if not cal:
        return None
    line = (f"calibration (T = {cal['temperature']:.3f}): test ECE {cal['test']['ece_before']:.4f} before, "
            f"{cal['test']['ece_after']:.4f} after")
    if dec:
        t = dec["test"]
        line += (f"; decisions on test: review {_rate(t['review_share'])}, miss rate "
                 f"{_rate(t['miss_rate'], t['n_missed'], t['n_defective'])} (target at most "
                 f"{_rate(dec['max_miss_rate'])}), defect error "
                 f"{_rate(t['defect_error'], t['n_wrong_defect'], t['n_defect_decisions'])}")
    return line
