"""The image branch on its own: frozen EfficientNet-Lite0 features against the cards-cnn encoder trained on
the cards, by cross-validation on the training split only.

    python bench/image_branch.py --cache-dir bench/out/cache            # seed-0 `field` cards, 3 folds, seeds 0,1
    python bench/image_branch.py --data D --folds 3 --seeds 0 --variants cnn-folds3
    python bench/image_branch.py --cache-dir bench/out/cache --fused   # also the whole chain with each

Only the training split of the data is loaded: the test cards are never read. The training split is cut
into stratified folds (``--fold-seed``, bench/tune_profile.py's ``training_folds``); for each fold the
held-out cards play the test split's part. Per fold and training seed:

* ``frozen``: EfficientNet-Lite0 ImageNet features (the image modality before this encoder), logistic
  regression (standardised, C = 1, as bench/quality.py's single-modality rows) trained on the fold's
  training cards, scored on its held-out cards.
* ``cnn-foldsK``: ``cards-cnn`` trained on the fold's training cards only, exactly as ``asectl align``
  trains it (``asectl.stages.features.train_image_encoder``, K cross-fitted networks, K = 1: one network);
  the image feature is the class log-probability vector (out-of-fold for the training cards, the networks'
  mean for the held-out ones); the same logistic regression on it, and the networks' own argmax.

A variant's score is the 5-class macro-F1 of the logistic regression on the held-out cards, mean ± std
over folds x seeds; beside it the regression's log-loss there (how honest its probabilities are: a
regression fitted on features that are over-confident on its own training cards pays here, as fusion
and its calibration would). The highest macro-F1 mean is chosen; a variant within one standard error of
it with a lower log-loss is preferred (``chosen`` in the results). Training
time: one torch thread, wall and CPU seconds per training (as align runs it), and once on the whole
training split (the quickstart's cards). Results: bench/results/image_branch.json and the ``image-branch``
section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from _common import OUT, ROOT, dataset, load, measured_line, save, update_section
from asectl.cache import Cache
from asectl.domain.dataset import Dataset, load_dataset, order_labels
from tune_profile import macro_f1, summarise, training_folds

VARIANTS = {
    "cnn-folds3": {"folds": 3, "coords": False},
    "cnn-folds1": {"folds": 1, "coords": False},
    "cnn-folds3-coords": {"folds": 3, "coords": True},
}


def logistic(xtr, ytr, xte) -> tuple[list[str], np.ndarray, list[str]]:
    """bench/quality.py's single-modality classifier (standardised, C = 1): predictions, probabilities
    and their class order."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0)).fit(xtr, ytr)
    return list(clf.predict(xte)), clf.predict_proba(xte), list(clf.classes_)


def log_loss(y_true: list[str], proba: np.ndarray, order: list[str]) -> float:
    """Mean negative log-likelihood of the true class: low only when the probabilities are honest, so
    features that are over-confident on the cards the classifier trained on show here."""
    p = proba[np.arange(len(y_true)), [order.index(t) for t in y_true]]
    return float(-np.log(np.clip(p, 1e-12, 1)).mean())


def cnn_encoder(options: dict):
    """cards-cnn with the quick profile's training keys, ``options`` overriding them."""
    from asectl.backends.encoders import CardsCNN, image_encoder
    from asectl.models.train_config import get_profile

    enc_cfg = get_profile("quick", {"encoders.image": "cards-cnn"}).encoders
    return image_encoder("cards-cnn", **{**CardsCNN.config_options(enc_cfg), **options})


def score_frozen(fold: Dataset, cache: Cache, classes: list[str]) -> float:
    from asectl.backends.encoders import image_encoder
    from asectl.stages.features import image_features

    inner, held = fold.split("train"), fold.split("test")
    enc = image_encoder("efficientnet-lite0")
    pred, proba, order = logistic(
        image_features(inner, enc, cache), [s.label for s in inner], image_features(held, enc, cache)
    )
    truth = [s.label for s in held]
    return {"logistic": macro_f1(truth, pred, classes), "log_loss": log_loss(truth, proba, order)}


def score_cnn(fold: Dataset, cache: Cache, classes: list[str], options: dict, seed: int) -> dict:
    from asectl.stages.features import image_features, train_image_encoder

    inner, held = fold.split("train"), fold.split("test")
    enc = cnn_encoder(options)
    own, record, _ = train_image_encoder(inner, [s.label for s in inner], enc, cache, seed)
    z_held = image_features(held, enc, cache)
    truth = [s.label for s in held]
    argmax = [record["classes"][j] for j in z_held.argmax(1)]
    pred, proba, order = logistic(own, [s.label for s in inner], z_held)
    return {
        "logistic": macro_f1(truth, pred, classes),
        "log_loss": log_loss(truth, proba, order),
        "argmax": macro_f1(truth, argmax, classes),
        "seconds": record["seconds"],
        "cpu_seconds": record.get("cpu_seconds"),
    }


def choose(rows: dict) -> str:
    """The highest macro-F1 mean; among the variants within one standard error of it, the lowest log-loss."""
    top = max(rows, key=lambda r: rows[r]["logistic"]["mean"])
    near = [
        r for r in rows if rows[r]["logistic"]["mean"] >= rows[top]["logistic"]["mean"] - rows[top]["logistic"]["sem"]
    ]
    return min(near, key=lambda r: rows[r]["log_loss"]["mean"])


def encode_cost(cards: list, cache: Cache, options: dict, seed: int) -> dict:
    """CPU seconds per card of computing image features with one torch thread (no cache), after the
    model is loaded: frozen EfficientNet-Lite0 (224 x 224) against trained cards-cnn (an 88 x 88 dot map
    and its networks), what align and predict pay per card for the image branch."""
    from asectl.backends.encoders import image_encoder
    from asectl.stages.features import train_image_encoder

    frozen = image_encoder("efficientnet-lite0")
    trained = cnn_encoder(options)
    train_image_encoder(cards, [s.label for s in cards], trained, cache, seed)  # cached: the full training
    out = {}
    paths = [str(s.path) for s in cards[:64]]
    for name, enc in (("efficientnet-lite0", frozen), ("cards-cnn", trained)):
        enc.encode(paths[:2])  # load the model first
        start = time.process_time()
        enc.encode(paths)
        out[name] = (time.process_time() - start) / len(paths)
    return out


def fused_scores(folds: list[Dataset], cache: Cache, classes: list[str], seeds: list[int]) -> dict:
    """The whole chain (PFA + CMAF, the quick profile's settings) with each image encoder, on the same
    folds: bench/tune_profile.py's fold features (the LLM's priors from the fold's training cards; cards-cnn
    trained on them) and its align and fusion scoring."""
    from tune_profile import align, fold_features, fuse_score

    out = {}
    for image in ("efficientnet-lite0", "cards-cnn"):
        scores = []
        for k, fold in enumerate(folds):
            features = fold_features(fold, cache, {"encoders.image": image})
            for seed in seeds:
                scores.append(fuse_score(features, align(features, {}, seed).embeddings, {}, seed, classes))
            print(f"fused, image {image}, fold {k}: {[round(100 * v, 2) for v in scores[-len(seeds) :]]}", flush=True)
        out[image] = summarise(scores)
    return out


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", help="a labelled dataset folder (default: the seed-0 `field` cards); only its training split is read"
    )
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--fold-seed", type=int, default=0)
    ap.add_argument("--seeds", default="0,1", help="training seeds of the CNN")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of: {', '.join(VARIANTS)}")
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument(
        "--fused",
        action="store_true",
        help="also the whole chain (PFA + CMAF) with each image encoder on the same folds (runs "
        "OCR, describe and the LLM on the training cards)",
    )
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument(
        "--render",
        action="store_true",
        help="write the docs section again from bench/results/image_branch.json (no run)",
    )
    args = ap.parse_args()
    if args.render:
        rec = load("image_branch")
        update_section("image-branch", markdown(rec), header=rec["measured"])
        return
    measured = measured_line()
    torch.set_num_threads(1)  # as align trains it
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = {v: VARIANTS[v] for v in args.variants.split(",")}
    cache = Cache(args.cache_dir)
    root = args.data or str(dataset(0))
    t0 = time.perf_counter()

    data = load_dataset(root)
    train_only = Dataset(data.split("train"), data.root, data.source, data.labels)
    classes = order_labels(s.label for s in train_only.samples)
    folds = training_folds(train_only, args.folds, args.fold_seed)
    frozen = [score_frozen(f, cache, classes) for f in folds] * len(seeds)
    rows = {
        "frozen": {
            "logistic": summarise([r["logistic"] for r in frozen]),
            "log_loss": summarise([r["log_loss"] for r in frozen]),
        }
    }
    print(
        f"frozen EfficientNet-Lite0 + logistic regression: {100 * rows['frozen']['logistic']['mean']:.2f}", flush=True
    )
    for name, options in variants.items():
        runs = [score_cnn(f, cache, classes, options, seed) for seed in seeds for f in folds]
        rows[name] = {
            "logistic": summarise([r["logistic"] for r in runs]),
            "log_loss": summarise([r["log_loss"] for r in runs]),
            "argmax": summarise([r["argmax"] for r in runs]),
            "seconds": [r["seconds"] for r in runs],
            "cpu_seconds": [r["cpu_seconds"] for r in runs],
        }
        print(
            f"{name}: logistic {100 * rows[name]['logistic']['mean']:.2f}, argmax "
            f"{100 * rows[name]['argmax']['mean']:.2f}, {np.mean(rows[name]['seconds']):.1f} s per training",
            flush=True,
        )
    # What align pays on the quickstart's cards: the default variant on the whole training split.
    from asectl.stages.features import train_image_encoder

    best = choose(rows)
    full = {}
    for name, options in variants.items():
        _, record, _ = train_image_encoder(
            train_only.samples, [s.label for s in train_only.samples], cnn_encoder(options), cache, seeds[0]
        )
        full[name] = {
            "seconds": record["seconds"],
            "cpu_seconds": record.get("cpu_seconds"),
            "n_train": record["n_train"],
        }
    cost = encode_cost(train_only.samples, cache, variants[best], seeds[0])
    fused = fused_scores(folds, cache, classes, seeds) if args.fused else None
    rec = {
        "measured": measured,
        "data": str(root),
        "fused": fused,
        "n_train_cards": len(train_only.samples),
        "folds": args.folds,
        "fold_seed": args.fold_seed,
        "seeds": seeds,
        "variants": variants,
        "rows": rows,
        "full_training": full,
        "encode_cpu_seconds_per_card": cost,
        "chosen": best,
        "seconds": time.perf_counter() - t0,
    }
    save("image_branch", rec)
    text = markdown(rec)
    if not args.no_docs:
        update_section("image-branch", text, header=measured)
    print(text)


def markdown(rec: dict) -> str:
    pct = lambda r: f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"  # noqa: E731
    loss = lambda r: f"{r['mean']:.3f} ± {r['std']:.3f}"  # noqa: E731
    n = len(rec["rows"]["frozen"]["logistic"]["scores"])
    lines = [
        f"### Image branch: frozen against trained on the cards ({rec['folds']}-fold cross-validation "
        "on the training split)",
        "",
        f"Data: `{os.path.relpath(rec['data'], ROOT)}`; only its {rec['n_train_cards']} training cards "
        "were read. Folds stratified "
        f"with seed {rec['fold_seed']}; CNN training seeds {', '.join(map(str, rec['seeds']))}; 5-class "
        f"macro-F1 on the held-out fold, mean ± std over {n} fold x seed runs (the frozen features have no "
        "seed: each fold counts once per seed). One torch thread. Training seconds are those of the run "
        "that trained each network (the weights are cached); this run took "
        f"{rec['seconds'] / 60:.1f} min.",
        "",
        "| image modality | logistic regression on it: macro-F1 | its log-loss | the CNN's own argmax: "
        "macro-F1 | training s (wall / CPU) |",
        "|---|---|---|---|---|",
        f"| `efficientnet-lite0`, frozen ImageNet features (1280-d) | {pct(rec['rows']['frozen']['logistic'])} "
        f"| {loss(rec['rows']['frozen']['log_loss'])} | - | - |",
    ]
    for name, row in rec["rows"].items():
        if name == "frozen":
            continue
        options = rec["variants"][name]
        folds = options["folds"]
        what = (
            f"{folds} cross-fitted networks, out-of-fold features for training cards"
            if folds > 1
            else "one network, in-sample features for training cards"
        )
        if options.get("coords"):
            what += "; x and y input channels"
        keys = ", ".join(f"`encoders.image_{k}={str(v).lower()}`" for k, v in options.items())
        cpu = [c for c in row["cpu_seconds"] if c is not None]
        lines.append(
            f"| `cards-cnn`, {keys} ({what}; 5-d log-probabilities) | "
            f"{pct(row['logistic'])} | {loss(row['log_loss'])} | {pct(row['argmax'])} | "
            f"{np.mean(row['seconds']):.1f} / "
            f"{np.mean(cpu) if cpu else float('nan'):.1f} |"
        )
    lines += [
        "",
        "On the whole training split (what `asectl align` trains on the quickstart's cards): "
        + "; ".join(
            f"`{k}` {v['seconds']:.1f} s wall, {v['cpu_seconds'] or float('nan'):.1f} s CPU ({v['n_train']} cards)"
            for k, v in rec["full_training"].items()
        )
        + ". Computing the "
        "image features of a card (one thread, model loaded): "
        + "; ".join(f"`{k}` {1000 * v:.0f} CPU ms" for k, v in rec["encode_cpu_seconds_per_card"].items())
        + ".",
        "",
        f"Chosen (the highest macro-F1 mean, or within one standard error of it the lowest log-loss): "
        f"`{rec['chosen']}`.",
    ]
    if rec.get("fused"):
        lines += [
            "",
            "The whole chain on the same folds (PFA + CMAF with the quick profile's settings; features "
            "as align computes them, the LLM's priors from the fold's training cards; bench/tune_profile.py's "
            "scoring), 5-class macro-F1 on the held-out folds: "
            + "; ".join(f"image encoder `{k}` {pct(v)}" for k, v in rec["fused"].items())
            + ".",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
