"""Gradient-boosted trees on the card's numbers, a member of each fold model beside the fusion classifier.

The printed record and the dot pattern's measured numbers (the ``stats`` branch's raw vector,
asectl.stages.modalities) are tabular data, where trees find thresholds and interactions (a small cluster
dip *and* a wide spread) that a linear classifier on the aligned features does not. So, with
``fusion.numbers_trees`` on, every fold model is two members trained on the same cards: the fusion
classifier on the aligned features, and scikit-learn's HistGradientBoostingClassifier on the raw numbers
(its defaults but for ``fusion.trees_l2`` and ``fusion.trees_max_leaf_nodes``, its L2 penalty on leaf values and
its most leaves per tree; a field OCR did not read stays NaN, which the trees route as they learned to). The fold
model's class probabilities are their average, weighted by ``fusion.trees_weight``:
p = (1 - w) softmax(fusion logits) + w p_trees, and its logits are log p, so calibration, the decision
rule, `predict` and `export` treat them as any fold model's. This extends the paper (whose classifier is
an MLP on the fused vector, section 3.3); it was chosen by cross-validation on training cards
(bench/choose_numbers_trees.py, docs/benchmarks.md).

The trees are stored as plain arrays in safetensors (no pickle) and evaluated here with numpy, exactly as
scikit-learn's predictor walks them (tested to match its probabilities), so `predict` needs no scikit-learn
model object and an export needs no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asectl.models.train_config import TREES_SKLEARN_DEFAULTS

_SKLEARN = (TREES_SKLEARN_DEFAULTS["trees_l2"], TREES_SKLEARN_DEFAULTS["trees_max_leaf_nodes"])

# The node fields a prediction reads (scikit-learn's TreePredictor nodes carry more).
NODE_FIELDS = ("value", "feature_idx", "num_threshold", "missing_go_to_left", "left", "right", "is_leaf")
FORMAT = 1


@dataclass
class NumbersTrees:
    """A fitted multiclass (or binary) boosted-trees model as arrays: every tree's nodes concatenated,
    ``roots`` the index of each tree's first node, ``tree_class`` the class (output column) each tree adds
    to, ``baseline`` the raw score before any tree."""

    nodes: dict[str, np.ndarray]
    roots: np.ndarray  # [trees]
    tree_class: np.ndarray  # [trees]
    baseline: np.ndarray  # [outputs]
    n_classes: int
    n_features: int
    params: dict[str, Any]

    def raw_scores(self, x: np.ndarray) -> np.ndarray:
        """The trees' summed raw scores [n, outputs] (before the softmax or sigmoid)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"the trees read {self.n_features} numbers per card; got an array of shape {x.shape}")
        nd = self.nodes
        at = np.broadcast_to(self.roots, (len(x), len(self.roots))).copy()  # [cards, trees] current node
        rows = np.arange(len(x))[:, None]
        while True:
            inner = ~nd["is_leaf"][at].astype(bool)
            if not inner.any():
                break
            value = x[rows, nd["feature_idx"][at]]
            missing = np.isnan(value)
            left = np.where(missing, nd["missing_go_to_left"][at].astype(bool), value <= nd["num_threshold"][at])
            step = np.where(left, nd["left"][at], nd["right"][at]).astype(np.int64)
            # children are indices within their tree; a tree's nodes start at its root
            at = np.where(inner, self.roots[None, :] + step, at)
        leaves = nd["value"][at]  # [cards, trees]
        out = np.tile(self.baseline, (len(x), 1))
        for c in range(len(self.baseline)):
            out[:, c] += leaves[:, self.tree_class == c].sum(axis=1)
        return out

    def proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities [n, n_classes]."""
        raw = self.raw_scores(x)
        if self.n_classes == 2 and raw.shape[1] == 1:
            p1 = 1.0 / (1.0 + np.exp(-raw[:, 0]))
            return np.stack([1.0 - p1, p1], axis=1)
        z = raw - raw.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        arrays = {f"nodes.{k}": np.ascontiguousarray(v) for k, v in self.nodes.items()}
        arrays.update(roots=self.roots, tree_class=self.tree_class, baseline=self.baseline)
        meta = {"format": FORMAT, "n_classes": self.n_classes, "n_features": self.n_features, "params": self.params}
        save_file(arrays, str(path), metadata={"asectl_trees": json.dumps(meta)})
        return path


def load_trees(path: str | Path) -> NumbersTrees:
    from safetensors import safe_open

    from asectl.errors import ConfigError

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads(f.metadata()["asectl_trees"])
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ConfigError(
            f"{path}: not a trees file asectl wrote ({type(exc).__name__}); train the model again"
        ) from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: trees format {meta.get('format')} is not {FORMAT}; train the model again")
    return NumbersTrees(
        nodes={k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("nodes.")},
        roots=arrays["roots"],
        tree_class=arrays["tree_class"],
        baseline=arrays["baseline"],
        n_classes=int(meta["n_classes"]),
        n_features=int(meta["n_features"]),
        params=meta["params"],
    )


def fit_numbers_trees(
    x: np.ndarray, y: np.ndarray, n_classes: int, seed: int, l2: float = _SKLEARN[0], max_leaf_nodes: int = _SKLEARN[1]
) -> NumbersTrees:
    """Fit scikit-learn's HistGradientBoostingClassifier (``random_state`` = seed, ``l2_regularization`` =
    ``l2``, ``max_leaf_nodes``; the rest its defaults) on the numbers ``x`` [n, d] (NaN = not read) with class
    codes ``y`` in range(n_classes), and keep its trees. A class absent from ``y`` gets probability 0 (the
    trees' columns are mapped to the model's classes)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    clf = HistGradientBoostingClassifier(
        random_state=seed, l2_regularization=float(l2), max_leaf_nodes=int(max_leaf_nodes)
    ).fit(x, y)
    present = [int(c) for c in clf.classes_]
    per_iter = clf.n_trees_per_iteration_
    trees = [t for iteration in clf._predictors for t in iteration]  # sklearn keeps no public tree arrays
    classes_of_tree = [c for _ in clf._predictors for c in range(per_iter)]
    sizes = [len(t.nodes) for t in trees]
    roots = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    nodes = {f: np.concatenate([t.nodes[f] for t in trees]) for f in NODE_FIELDS}
    nodes["feature_idx"] = nodes["feature_idx"].astype(np.int64)
    for f in ("left", "right"):
        nodes[f] = nodes[f].astype(np.int64)
    for f in ("missing_go_to_left", "is_leaf"):
        nodes[f] = nodes[f].astype(np.uint8)
    baseline = np.asarray(clf._baseline_prediction, dtype=np.float64).ravel()
    params: dict[str, Any] = {"model": "sklearn HistGradientBoostingClassifier", "random_state": seed}
    if (l2, max_leaf_nodes) == _SKLEARN:
        params["defaults"] = True  # as models trained before the options recorded it
    else:
        params.update(l2_regularization=float(l2), max_leaf_nodes=int(max_leaf_nodes))
    if present != list(range(n_classes)):  # a fold without some class: its columns are placed by tree_proba
        params.update(classes_present=present, n_model_classes=n_classes)
    return NumbersTrees(
        nodes, roots, np.asarray(classes_of_tree, dtype=np.int64), baseline, len(present), x.shape[1], params
    )


def tree_proba(trees: NumbersTrees, x: np.ndarray) -> np.ndarray:
    """``trees.proba`` with its columns at the model's classes (a class the trees never saw: 0)."""
    p = trees.proba(x)
    present = trees.params.get("classes_present")
    if present is None:
        return p
    out = np.zeros((len(p), int(trees.params["n_model_classes"])))
    out[:, present] = p
    return out


def mixed_logits(fusion_logits: np.ndarray, trees_p: np.ndarray, weight: float) -> np.ndarray:
    """log((1 - w) softmax(fusion_logits) + w p_trees): the fold model's logits with its trees member."""
    z = fusion_logits - fusion_logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    mixed = (1.0 - weight) * p + weight * trees_p
    return np.log(np.clip(mixed, 1e-12, None)).astype(np.float32)


def with_trees(trees: NumbersTrees | None, logits: np.ndarray, features: Any) -> np.ndarray:
    """A fold model's logits with its trees member mixed in (``mixed_logits``), or as they are without one;
    the trees read the stats branch's raw numbers, ``features["stats"]``. The one place training, a bundle
    and an export mix them."""
    if trees is None:
        return logits
    p = tree_proba(trees, features["stats"])
    return mixed_logits(np.asarray(logits, dtype=np.float64), p, trees.params["weight"])


__all__ = ["NumbersTrees", "fit_numbers_trees", "load_trees", "mixed_logits", "tree_proba", "with_trees"]
