"""The trees member on the stats numbers (asectl.models.trees): its numpy evaluation is scikit-learn's
model exactly, it survives a save and load, and the fold model's mixture is what the docs say."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier

from asectl.errors import ConfigError
from asectl.models.trees import fit_numbers_trees, load_trees, mixed_logits, tree_proba


def _cards(n=240, d=9, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, d))
    x[:, 0] += y  # a learnable signal
    x[:, 1] *= y - 2  # an interaction the trees can use
    x[::6, 2] = np.nan  # a field OCR did not read
    return x, y


@pytest.mark.parametrize("classes", [5, 2])
def test_evaluation_equals_scikit_learn(classes, tmp_path):
    x, y = _cards(classes=classes)
    new, _ = _cards(n=100, seed=1)
    new[::3, 0] = np.nan
    trees = fit_numbers_trees(x, y, classes, seed=3)
    reference = HistGradientBoostingClassifier(random_state=3).fit(x, y).predict_proba(new)
    np.testing.assert_allclose(tree_proba(trees, new), reference, rtol=0, atol=1e-12)
    back = load_trees(trees.save(tmp_path / "t.safetensors"))
    assert np.array_equal(tree_proba(back, new), tree_proba(trees, new))


def test_a_class_missing_from_the_fold_gets_probability_zero():
    x, y = _cards()
    y = np.where(y == 4, 0, y)
    p = tree_proba(fit_numbers_trees(x, y, 5, seed=0), x[:7])
    assert p.shape == (7, 5) and np.all(p[:, 4] == 0) and np.allclose(p.sum(axis=1), 1)


def test_mixture_and_bad_files(tmp_path):
    fusion = np.log(np.array([[0.7, 0.2, 0.1]]))
    mixed = mixed_logits(fusion, np.array([[0.1, 0.1, 0.8]]), 0.5)
    np.testing.assert_allclose(np.exp(mixed), [[0.4, 0.15, 0.45]], rtol=1e-6)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="bad.safetensors: not a trees file"):
        load_trees(bad)
    with pytest.raises(ValueError, match="read 9 numbers per card"):
        tree_proba(fit_numbers_trees(*_cards(), 5, seed=0), np.zeros((2, 4)))


def test_regularization_settings_reach_the_trees_and_are_recorded(tmp_path):
    """``fusion.trees_l2`` and ``fusion.trees_max_leaf_nodes`` are scikit-learn's ``l2_regularization`` and
    ``max_leaf_nodes``: the stored trees are that model's exactly, no tree has more leaves than allowed, and
    the values are recorded with the trees (scikit-learn's defaults as before the settings existed)."""
    x, y = _cards()
    new, _ = _cards(n=50, seed=2)
    trees = fit_numbers_trees(x, y, 5, seed=1, l2=1.0, max_leaf_nodes=4)
    reference = HistGradientBoostingClassifier(random_state=1, l2_regularization=1.0, max_leaf_nodes=4).fit(x, y)
    np.testing.assert_allclose(tree_proba(trees, new), reference.predict_proba(new), rtol=0, atol=1e-12)
    leaves = trees.nodes["is_leaf"].astype(bool)
    bounds = [*trees.roots[1:], len(leaves)]
    assert max(int(leaves[a:b].sum()) for a, b in zip(trees.roots, bounds)) <= 4
    assert trees.params["l2_regularization"] == 1.0 and trees.params["max_leaf_nodes"] == 4
    assert "defaults" not in trees.params
    assert load_trees(trees.save(tmp_path / "t.safetensors")).params == trees.params
    assert fit_numbers_trees(x, y, 5, seed=1).params["defaults"] is True


def test_regularization_settings_are_checked_and_keep_earlier_keys():
    from asectl.models.train_config import get_profile

    quick = get_profile("quick")
    assert (quick.fusion.trees_l2, quick.fusion.trees_max_leaf_nodes) == (1.0, 15)
    assert quick.to_dict()["fusion"]["trees_max_leaf_nodes"] == 15
    # scikit-learn's own values: the profile's dict (and so its cache key) is the one it had before
    sklearn_values = get_profile("quick", {"fusion.trees_l2": 0, "fusion.trees_max_leaf_nodes": 31}).to_dict()
    assert "trees_l2" not in sklearn_values["fusion"] and "trees_max_leaf_nodes" not in sklearn_values["fusion"]
    with pytest.raises(ConfigError, match="fusion.trees_max_leaf_nodes 1: must be 2 or more"):
        get_profile("quick", {"fusion.trees_max_leaf_nodes": 1})
    with pytest.raises(ConfigError, match="fusion.trees_l2 -1.0: must be 0 or more"):
        get_profile("quick", {"fusion.trees_l2": -1})
