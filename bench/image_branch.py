"""The image branch on its own: frozen EfficientNet-Lite0 features against the cards-cnn encoder trained on
the cards, by cross-validation on the training split only.

    python bench/image_branch.py --cache-dir /work/benchcache            # seed-0 `field` cards, 3 folds, seeds 0,1
    python bench/image_branch.py --data D --folds 3 --seeds 0 --variants cnn-folds3

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

A variant's score is the 5-class macro-F1 on the held-out cards, mean ± std over folds x seeds. The
quick profile's default image encoder is the variant with the highest logistic-regression mean. Training
time: one torch thread, wall and CPU seconds per training (as align runs it), and once on the whole
training split (the quickstart's cards). Results: bench/results/image_branch.json and the ``image-branch``
section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from _common import OUT, ROOT, dataset, save, update_section

sys.path.insert(0, str(ROOT / "bench"))

from asectl.cache import Cache  # noqa: E402
from asectl.dataset import Dataset, load_dataset, order_labels  # noqa: E402
from quality import logistic  # noqa: E402
from tune_profile import macro_f1, summarise, training_folds  # noqa: E402

VARIANTS = {"cnn-folds3": {"folds": 3}, "cnn-folds1": {"folds": 1}}


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
    pred = logistic(image_features(inner, enc, cache), [s.label for s in inner], image_features(held, enc, cache))
    return macro_f1([s.label for s in held], pred, classes)


def score_cnn(fold: Dataset, cache: Cache, classes: list[str], options: dict, seed: int) -> dict:
    from asectl.stages.features import image_features, train_image_encoder

    inner, held = fold.split("train"), fold.split("test")
    enc = cnn_encoder(options)
    own, record, _ = train_image_encoder(inner, [s.label for s in inner], enc, cache, seed)
    z_held = image_features(held, enc, cache)
    truth = [s.label for s in held]
    argmax = [record["classes"][j] for j in z_held.argmax(1)]
    return {"logistic": macro_f1(truth, logistic(own, [s.label for s in inner], z_held), classes),
            "argmax": macro_f1(truth, argmax, classes),
            "seconds": record["seconds"], "cpu_seconds": record.get("cpu_seconds")}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="a labelled dataset folder (default: the seed-0 `field` cards); only "
                                   "its training split is read")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--fold-seed", type=int, default=0)
    ap.add_argument("--seeds", default="0,1", help="training seeds of the CNN")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of: {', '.join(VARIANTS)}")
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(1)     # as align trains it
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = {v: VARIANTS[v] for v in args.variants.split(",")}
    cache = Cache(args.cache_dir)
    root = args.data or str(dataset(0))
    t0 = time.perf_counter()

    data = load_dataset(root)
    train_only = Dataset(data.split("train"), data.root, data.source, data.labels)
    classes = order_labels(s.label for s in train_only.samples)
    folds = training_folds(train_only, args.folds, args.fold_seed)
    frozen = [score_frozen(f, cache, classes) for f in folds]
    print(f"frozen EfficientNet-Lite0 + logistic regression: {100 * np.mean(frozen):.2f}", flush=True)
    rows = {"frozen": {"logistic": summarise(frozen * len(seeds))}}
    for name, options in variants.items():
        runs = [score_cnn(f, cache, classes, options, seed) for seed in seeds for f in folds]
        rows[name] = {"logistic": summarise([r["logistic"] for r in runs]),
                      "argmax": summarise([r["argmax"] for r in runs]),
                      "seconds": [r["seconds"] for r in runs], "cpu_seconds": [r["cpu_seconds"] for r in runs]}
        print(f"{name}: logistic {100 * rows[name]['logistic']['mean']:.2f}, argmax "
              f"{100 * rows[name]['argmax']['mean']:.2f}, {np.mean(rows[name]['seconds']):.1f} s per training",
              flush=True)
    # What align pays on the quickstart's cards: the default variant on the whole training split.
    from asectl.stages.features import train_image_encoder

    best = max(rows, key=lambda r: rows[r]["logistic"]["mean"])
    full = {}
    for name, options in variants.items():
        _, record, _ = train_image_encoder(train_only.samples, [s.label for s in train_only.samples],
                                           cnn_encoder(options), cache, seeds[0])
        full[name] = {"seconds": record["seconds"], "cpu_seconds": record.get("cpu_seconds"),
                      "n_train": record["n_train"]}
    rec = {"data": str(root), "n_train_cards": len(train_only.samples), "folds": args.folds,
           "fold_seed": args.fold_seed, "seeds": seeds, "variants": variants, "rows": rows, "full_training": full,
           "chosen": best, "seconds": time.perf_counter() - t0}
    save("image_branch", rec)
    text = markdown(rec)
    if not args.no_docs:
        update_section("image-branch", text)
    print(text)


def markdown(rec: dict) -> str:
    pct = lambda r: f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"   # noqa: E731
    n = len(rec["rows"]["frozen"]["logistic"]["scores"])
    lines = [f"### Image branch: frozen against trained on the cards ({rec['folds']}-fold cross-validation "
             "on the training split)", "",
             f"Data: `{rec['data']}`; only its {rec['n_train_cards']} training cards were read. Folds stratified "
             f"with seed {rec['fold_seed']}; CNN training seeds {', '.join(map(str, rec['seeds']))}; 5-class "
             f"macro-F1 on the held-out fold, mean ± std over {n} fold x seed runs (the frozen features have no "
             "seed: each fold counts once per seed). One torch thread. Run time "
             f"{rec['seconds'] / 60:.1f} min.", "",
             "| image modality | logistic regression on it | the CNN's own argmax | training s (wall / CPU) |",
             "|---|---|---|---|",
             f"| `efficientnet-lite0`, frozen ImageNet features (1280-d) | {pct(rec['rows']['frozen']['logistic'])} "
             "| - | - |"]
    for name, row in rec["rows"].items():
        if name == "frozen":
            continue
        folds = rec["variants"][name]["folds"]
        what = (f"{folds} cross-fitted networks, out-of-fold features for training cards" if folds > 1
                else "one network, in-sample features for training cards")
        cpu = [c for c in row["cpu_seconds"] if c is not None]
        lines.append(f"| `cards-cnn`, `encoders.image_folds={folds}` ({what}; 5-d log-probabilities) | "
                     f"{pct(row['logistic'])} | {pct(row['argmax'])} | {np.mean(row['seconds']):.1f} / "
                     f"{np.mean(cpu) if cpu else float('nan'):.1f} |")
    lines += ["", "On the whole training split (what `asectl align` trains on the quickstart's cards): "
              + "; ".join(f"`{k}` {v['seconds']:.1f} s wall, {v['cpu_seconds'] or float('nan'):.1f} s CPU "
                          f"({v['n_train']} cards)" for k, v in rec["full_training"].items()) + ".", "",
              f"Highest logistic-regression mean: `{rec['chosen']}`."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
