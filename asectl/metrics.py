"""Macro-F1, the paper's headline figure, computed one way for ``report`` and the benchmarks.

Per-class F1 = 2·precision·recall / (precision + recall) = 2·TP / (support + predicted) (paper Eq. 11);
macro-F1 is their unweighted mean (Eq. 12) over the classes present in the true or the predicted labels,
scikit-learn's default label set (``f1_score(average="macro", zero_division=0)`` gives the same value).
A class in neither counts nowhere; on test splits and folds that hold every class (the benchmarks' are
stratified) this equals the mean over all classes. Plain numpy: the bootstrap intervals call it
hundreds of thousands of times.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import numpy as np


def macro_f1_from_codes(true_codes: Any, pred_codes: Any, n_classes: int) -> float:
    """Macro-F1 of predictions given as class indices 0 .. n_classes - 1."""
    true_codes = np.asarray(true_codes, dtype=np.int64)
    pred_codes = np.asarray(pred_codes, dtype=np.int64)
    cm = np.bincount(true_codes * n_classes + pred_codes, minlength=n_classes * n_classes)
    cm = cm.reshape(n_classes, n_classes)
    tp = np.diag(cm).astype(float)
    denom = cm.sum(1) + cm.sum(0)  # support + predicted
    present = denom > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=present)
    return float(f1[present].mean()) if present.any() else 0.0


def label_codes(values: Sequence[Hashable], labels: Sequence[Hashable]) -> np.ndarray:
    """Class labels -> their indices in ``labels`` (a KeyError names a label outside them)."""
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index[v] for v in values], dtype=np.int64)


def macro_f1(y_true: Sequence[Hashable], y_pred: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    """Macro-F1 of predictions given as class labels, ``labels`` being the classes."""
    return macro_f1_from_codes(label_codes(y_true, labels), label_codes(y_pred, labels), len(labels))
