"""Uncertainty of macro-F1 over test cards: bootstrap intervals and a paired bootstrap test.

Several seeds each give one test split. A bootstrap replicate resamples the test cards of every seed
(with replacement, independently per seed) and averages the seeds' macro-F1, so an interval covers the
card-sampling noise of the reported mean. The paired test resamples the *same* cards for two methods,
so it compares them on equal footing (the cards both saw)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from asectl.metrics import label_codes, macro_f1_from_codes

Predictions = tuple[Sequence[str], Sequence[str]]  # (true labels, predicted labels) of one seed's test cards


def _codes(labels: Sequence[str], preds: Sequence[Predictions]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(label_codes(yt, labels), label_codes(yp, labels)) for yt, yp in preds]


def _replicates(labels: Sequence[str], runs: Sequence[Sequence[Predictions]], reps: int, seed: int) -> np.ndarray:
    """[reps, len(runs)] mean-over-seeds macro-F1 per replicate; every run resamples the same cards."""
    k = len(labels)
    coded = [_codes(labels, r) for r in runs]
    n_seeds = len(runs[0])
    rng = np.random.default_rng(seed)
    out = np.zeros((reps, len(runs)))
    for s in range(n_seeds):
        n = len(coded[0][s][0])
        for r in range(reps):
            idx = rng.integers(0, n, n)
            for m, c in enumerate(coded):
                out[r, m] += macro_f1_from_codes(c[s][0][idx], c[s][1][idx], k) / n_seeds
    return out


def bootstrap_interval(
    labels: Sequence[str], preds: Sequence[Predictions], reps: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of the mean-over-seeds macro-F1."""
    rep = _replicates(labels, [preds], reps, seed)[:, 0]
    return float(np.percentile(rep, 2.5)), float(np.percentile(rep, 97.5))


def paired_test(
    labels: Sequence[str], a: Sequence[Predictions], b: Sequence[Predictions], reps: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Macro-F1 of ``a`` minus ``b`` (mean over seeds), its 95% paired-bootstrap interval, and a two-sided
    bootstrap p-value for "no difference" (twice the smaller share of replicates on either side of 0)."""
    for (ta, _), (tb, _) in zip(a, b):
        if list(ta) != list(tb):
            raise ValueError("a paired test needs the same test cards, in the same order, for both methods")
    rep = _replicates(labels, [a, b], reps, seed)
    diff = rep[:, 0] - rep[:, 1]
    k = len(labels)
    observed = float(
        np.mean(
            [
                macro_f1_from_codes(*ca, k) - macro_f1_from_codes(*cb, k)
                for ca, cb in zip(_codes(labels, a), _codes(labels, b))
            ]
        )
    )
    p = 2 * min(float(np.mean(diff <= 0)), float(np.mean(diff >= 0)))
    return {
        "difference": observed,
        "low": float(np.percentile(diff, 2.5)),
        "high": float(np.percentile(diff, 97.5)),
        "p_value": min(1.0, p),
        "replicates": reps,
    }
