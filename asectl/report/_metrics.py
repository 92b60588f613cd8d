"""Metrics (paper section 4.1): multi-class and binary views from ``sklearn.metrics``, the calibration
figures on the test split and the decision rule's figures with their exact intervals."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from asectl.domain.dataset import NORMAL
from asectl.errors import DataError
from asectl.report._records import ReportInput

METRICS_FORMAT = "asectl-report-metrics/1"
BINARY_LABELS = ("normal", "defective")


def binary_labels(label_names: Sequence[str], y: Sequence[int]) -> list[int]:
    """Label indices -> 0 (normal) / 1 (defective)."""
    return [0 if label_names[int(i)] == NORMAL else 1 for i in y]


def _view_metrics(labels: Sequence[str], y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    from asectl.metrics import macro_f1_from_codes

    k = len(labels)
    all_idx = list(range(k))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=all_idx, zero_division=0)
    predicted = np.bincount(np.asarray(y_pred, dtype=np.int64), minlength=k)
    # Eq. (12) over scikit-learn's default label set: classes present in y_true or y_pred.
    present = sorted(set(int(v) for v in y_true) | set(int(v) for v in y_pred))
    per_class = {}
    for i, name in enumerate(labels):
        per_class[name] = {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
            "predicted": int(predicted[i]),
            "in_macro": i in present,
        }
    return {
        "labels": list(labels),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": macro_f1_from_codes(y_true, y_pred, k),
        "macro_f1_labels": [labels[i] for i in present],
        "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=all_idx).tolist(),
    }


def compute_metrics(
    label_names: Sequence[str],
    y_true: Sequence[int],
    y_pred: Sequence[int],
    probs: Any = None,
    image_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Multi-class and binary metrics (fractions in [0, 1]) plus one record per prediction.

    ``binary`` is None when no label is called ``normal`` (no negative class to collapse to)."""
    labels = [str(x) for x in label_names]
    y_true_a, y_pred_a, probs_a = _check_predictions(labels, y_true, y_pred, probs, image_names)
    metrics: dict[str, Any] = {
        "format": METRICS_FORMAT,
        "n_test": int(len(y_true_a)),
        "multiclass": _view_metrics(labels, y_true_a, y_pred_a),
        "binary": None,
    }
    if NORMAL in labels:
        metrics["binary"] = _view_metrics(
            list(BINARY_LABELS), binary_labels(labels, y_true_a), binary_labels(labels, y_pred_a)
        )
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


def _check_predictions(
    labels: list[str], y_true: Sequence[int], y_pred: Sequence[int], probs: Any, image_names: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
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


def calibration_metrics(
    data: ReportInput, labels: Sequence[str]
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
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
            raise DataError(
                f"report: {when}-calibration probabilities have shape {p.shape}, expected ({len(y)}, {len(labels)})"
            )
        test[f"ece_{when}"] = expected_calibration_error(p, y)
        test[f"bins_{when}"] = reliability_bins(p, y)
    test["n_bins"] = ECE_BINS
    calibration = {**{k: v for k, v in data.calibration.items() if k != "held_out"}, "test": test}
    decision = None
    if data.decision_rule is not None and data.decisions is not None:
        if len(data.decisions) != len(y):
            raise DataError(f"report: {len(y)} predictions but {len(data.decisions)} decisions")
        test_stats = decision_stats(data.decisions, y, np.asarray(list(data.y_pred)), labels)
        decision = {
            **dict(data.decision_rule),
            "test": test_stats,
            "figures": decision_figures(test_stats, data.decision_rule),
        }
    return calibration, decision


# The figures a line decides on, in the order the report shows them: (name, numerator and denominator
# keys of decision_stats, target key of the rule, what the denominator counts).
DECISION_FIGURES = (
    ("miss rate", "n_missed", "n_defective", "max_miss_rate", "defective cards"),
    ("review share", "n_review", "n", None, "cards"),
    ("defect error", "n_wrong_defect", "n_defect_decisions", "max_defect_error", "defect decisions"),
    ("defective error", "n_wrong_defective", "n_defective_decisions", "max_defective_error", "defective decisions"),
)
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
        k, n = int(counts.get(k_key, 0)), int(counts.get(n_key, 0))  # stats of older models lack defective
        target = None if target_key is None else _target(rule, target_key)
        value = k / n if n else None
        interval = exact_interval(k, n, INTERVAL_CONFIDENCE)
        best_case = exact_interval(0, n, INTERVAL_CONFIDENCE)
        rows.append(
            {
                "name": name,
                "k": k,
                "n": n,
                "unit": unit,
                "value": value,
                "interval": list(interval) if interval else None,
                "target": target,
                "held_out": held.get(name.replace(" ", "_")),
                "exceeded": bool(target is not None and value is not None and value > target),
                "too_few": bool(target is not None and best_case is not None and best_case[1] > target),
            }
        )
    return rows


def _target(rule: Mapping[str, Any], key: str) -> float:
    """A stored rule's target (the defective decision's: the defect error's unless the user gave one)."""
    from asectl.models.calibration import DecisionRule

    if key == "max_defective_error":
        return DecisionRule.from_dict(rule).defective_error_target
    return float(rule[key])


def exact_upper(n: int) -> float:
    """The upper end of the exact interval of 0 of ``n``."""
    from asectl.models.calibration import exact_interval

    return exact_interval(0, n, INTERVAL_CONFIDENCE)[1]
