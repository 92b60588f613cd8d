"""asectl.metrics.macro_f1: the one macro-F1 that report and the benchmarks use, against scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from asectl.metrics import label_codes, macro_f1, macro_f1_from_codes


def test_macro_f1_equals_scikit_learn_on_random_predictions():
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(2, 6))
        n = int(rng.integers(1, 40))
        y_true, y_pred = rng.integers(0, k, n), rng.integers(0, k - 1, n)  # some classes never predicted
        want = f1_score(y_true, y_pred, average="macro", zero_division=0)
        assert macro_f1_from_codes(y_true, y_pred, k) == pytest.approx(want, abs=1e-12)


def test_macro_f1_by_hand_with_labels():
    labels = ["normal", "type1", "type2"]
    # normal: TP 1 of support 2, predicted 1 -> 2/3; type1: TP 1, support 1, predicted 2 -> 2/3; type2 absent.
    assert macro_f1(["normal", "normal", "type1"], ["normal", "type1", "type1"], labels) == pytest.approx(2 / 3)
    assert list(label_codes(["type2", "normal"], labels)) == [2, 0]
    with pytest.raises(KeyError):
        label_codes(["type9"], labels)
