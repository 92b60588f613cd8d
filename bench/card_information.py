"""What a card itself can tell: a learner on the exact hole positions, against the oracle on the latent parameters.

    python bench/card_information.py [--seeds 0,1,2,3,4] [--train-seeds 10] [--no-docs]

The oracle (bench/oracle.py) sees each card's latent parameters: the centre, variances, within-cluster
correlation, cluster share and ring share that drew its holes. A card shows only 61 to 596 holes drawn from
them, so part of what the oracle knows is not on the card at all. This script measures how much, with no
image and no OCR in the way: it takes the generator's exact hole positions (``sample_cards``, the same
cards `synth` renders) and

1. regresses each latent parameter on numbers computed from the exact holes (moments, a two-component
   Gaussian mixture's separation share and within-cluster correlation, whitened radial and directional
   kurtosis, a radial histogram, and the hole count), 5-fold cross-validated R^2 on the training cards of
   the first seed: how well the holes reveal each parameter;
2. trains gradient boosting on those numbers with far more labelled cards than a user has (the training
   splits of ``--train-seeds`` other generator seeds, 100 onwards, 325 cards each), and scores it on the
   test split of each seed in ``--seeds``, beside the oracle on the same cards: a reference for what a
   classifier of the card, even with exact holes and ten times the data, reaches.

No setting of asectl is chosen here; each seed's test split is read once. Results:
bench/results/card_information.json and the ``card-information`` section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

import oracle
from _common import publish
from asectl.metrics import macro_f1_from_codes

CLASSES = ["normal", "type1", "type2", "type3", "type4"]
LATENTS = ("rho", "cluster_share", "ring_share")


def hole_numbers(points: np.ndarray) -> list[float]:
    """Numbers of one card's exact holes (see the module docstring)."""
    from sklearn.mixture import GaussianMixture

    mu, cov = points.mean(0), np.cov(points.T)
    d = points - mu
    sd = np.sqrt(np.diag(cov))
    gm = GaussianMixture(2, covariance_type="tied", random_state=0).fit(points)
    gap = gm.means_[1] - gm.means_[0]
    axis = gap / (np.linalg.norm(gap) + 1e-12)
    share = gm.weights_[0] * gm.weights_[1] * float(gap @ axis) ** 2 / float(axis @ cov @ axis)
    within = gm.covariances_
    white = np.linalg.solve(np.linalg.cholesky(cov), d.T).T
    r = np.hypot(*white.T)
    angles = np.linspace(0.0, math.pi, 18, endpoint=False)
    proj = d @ np.stack([np.cos(angles), np.sin(angles)])
    kurt = np.mean(proj**4, 0) / np.mean(proj**2, 0) ** 2
    radial = np.histogram(r, bins=[0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, np.inf])[0] / len(r)
    return [
        *mu,
        *np.log(sd),
        cov[0, 1] / (sd[0] * sd[1]),
        share,
        within[0, 1] / math.sqrt(within[0, 0] * within[1, 1]),
        float(gm.weights_.min()),
        kurt.min(),
        kurt.max(),
        kurt.mean(),
        np.mean(r**4) / np.mean(r**2) ** 2,
        math.log(len(points)),
        *radial,
    ]


def split_cards(seed: int, split: str) -> list:
    from asectl.domain.synth import sample_cards

    return [c for c in sample_cards(seed) if c.split == split]


def main() -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.model_selection import cross_val_predict

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4", help="generator seeds whose test splits are scored")
    ap.add_argument("--train-seeds", type=int, default=10, help="how many other seeds' training splits to learn from")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]

    first = split_cards(seeds[0], "train")
    x_first = np.array([hole_numbers(c.points) for c in first])
    r2 = {}
    for name in LATENTS:
        target = np.array([c.latent[name] for c in first])
        fit = cross_val_predict(HistGradientBoostingRegressor(random_state=0), x_first, target, cv=5)
        r2[name] = float(1 - np.mean((fit - target) ** 2) / np.var(target))
        print(f"R^2 of {name} from the exact holes: {r2[name]:.3f}", flush=True)

    train = [c for s in range(100, 100 + args.train_seeds) for c in split_cards(s, "train")]
    x_train = np.array([hole_numbers(c.points) for c in train])
    y_train = [c.label for c in train]
    model = HistGradientBoostingClassifier(random_state=0).fit(x_train, y_train)
    rows = {"learner on the exact holes": [], "oracle (true latent parameters)": []}
    for seed in seeds:
        test = split_cards(seed, "test")
        y = np.array([CLASSES.index(c.label) for c in test])
        pred = model.predict(np.array([hole_numbers(c.points) for c in test]))
        rows["learner on the exact holes"].append(macro_f1_from_codes(y, [CLASSES.index(p) for p in pred], 5))
        prior_cards = split_cards(seed, "train")
        post = oracle.posteriors([c.latent for c in test], [c.label for c in prior_cards], CLASSES)
        rows["oracle (true latent parameters)"].append(macro_f1_from_codes(y, post.argmax(axis=1), 5))
        print(seed, {k: round(100 * v[-1], 2) for k, v in rows.items()}, flush=True)
    rec = {
        "seeds": seeds,
        "train_seeds": list(range(100, 100 + args.train_seeds)),
        "n_train": len(train),
        "r2": r2,
        "rows": rows,
    }
    publish("card_information", rec, start, markdown, docs=not args.no_docs)


def markdown(rec: dict) -> str:
    lines = [
        "### What a card can tell: a learner on the exact holes against the oracle",
        "",
        f"How well the exact hole positions reveal each latent parameter the oracle reads (5-fold R^2 on the "
        f"training cards of seed {rec['seeds'][0]}): " + ", ".join(f"{k} {v:.2f}" for k, v in rec["r2"].items()) + ".",
        "",
        f"Test split of seeds {', '.join(map(str, rec['seeds']))} (macro-F1, 5 classes). The learner is gradient "
        f"boosting on numbers of the exact holes, trained on {rec['n_train']} labelled cards of other generator "
        f"seeds (about {rec['n_train'] // 325} times a user's 325), with no image or OCR in the way.",
        "",
        "| model | macro-F1 mean (per seed) |",
        "|---|---|",
    ]
    for name, v in rec["rows"].items():
        v = 100 * np.asarray(v)
        lines.append(f"| {name} | {v.mean():.2f} ({', '.join(f'{x:.1f}' for x in v)}) |")
    lines += ["", f"Run time: {rec['seconds'] / 60:.1f} min."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
