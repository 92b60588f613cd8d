"""The dot pattern's numbers and the trees member, chosen on the training split.

    python bench/choose_numbers_trees.py [--seeds 0,1] [--fold-seeds 0,1,2] [--cache-dir C] [--no-docs]
    python bench/choose_numbers_trees.py --compare trees_weight=0.5,0.25,0.75   # one fusion setting, own section
    python bench/choose_numbers_trees.py --compare trees_l2=0,1 --compare trees_max_leaf_nodes=31,15

Per generator seed (the default `field` cards, bench/out/ds-field-seed<N>; only the training split is read): the
quick profile's alignment with and without the dot pattern's numbers in the stats branch
(`encoders.dot_pattern`), and on each, `fuse-train`'s own cross-validation (``asectl.stages.fuse.calibrate``:
stratified 5-fold fold models, out-of-fold probabilities on every training card) with and without the trees
member on the stats numbers (`fusion.numbers_trees`, weight 0.5), once per fold seed. Scored: macro-F1 of the
out-of-fold argmax, and the review share of the decision rule chosen on those same held-out probabilities at the
stored targets (in-sample for the rule: a guide, not a promise). The caveat of bench/choose_classifier.py holds:
the alignment and the cards-cnn features were trained on the whole training split. Results:
bench/results/choose_numbers_trees.json and the ``choose-numbers-trees`` section of docs/benchmarks.md.
``--compare FIELD=V1,V2,..``: instead, the default (the dot pattern with the trees member) with the fusion setting
FIELD at each value (e.g. `trees_weight`, the trees' share of the fold model's probabilities, or `variant`,
concat or cmaf), the first value the reference; section ``choose-FIELD`` (underscores as dashes). Repeated, the
fields change together: ``--compare trees_l2=0,1 --compare trees_max_leaf_nodes=31,15`` compares scikit-learn's
defaults with both set (section ``choose-trees-l2-trees-max-leaf-nodes``)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from _common import OUT, dataset, publish, train_quick
from asectl.cache import Cache
from asectl.domain.dataset import load_dataset
from asectl.metrics import macro_f1_from_codes
from asectl.models.train_config import get_profile

# name: (alignment overrides, fusion settings); the first is the reference of the differences
CANDIDATES = {
    "printed numbers (earlier default)": ({"encoders.dot_pattern": False}, {"numbers_trees": False}),
    "printed + dot pattern": ({"encoders.dot_pattern": True}, {"numbers_trees": False}),
    "printed, with trees": ({"encoders.dot_pattern": False}, {"numbers_trees": True}),
    "printed + dot pattern, with trees": ({"encoders.dot_pattern": True}, {"numbers_trees": True}),
}
TARGETS = {"max_miss_rate": 0.01, "max_defect_error": 0.05}


def main() -> None:
    from asectl.stages.fuse import calibrate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1", help="generator seeds of the default field cards")
    ap.add_argument("--fold-seeds", default="0,1,2")
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument(
        "--compare",
        action="append",
        metavar="FIELD=V1,V2",
        help="compare these values of a fusion setting; repeated, the i-th values of each field go together",
    )
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    start = time.perf_counter()
    cache = Cache(Path(args.cache_dir))
    fold_seeds = [int(s) for s in args.fold_seeds.split(",")]
    candidates, field = CANDIDATES, None
    if args.compare:
        settings = {}
        for item in args.compare:
            name, values = item.split("=", 1)
            kind = type(getattr(get_profile("quick").fusion, name))  # an unknown field stops here
            parse = (lambda v: v.lower() in ("1", "true", "yes")) if kind is bool else kind
            settings[name] = [parse(v) for v in values.split(",")]
        counts = {len(v) for v in settings.values()}
        if len(counts) != 1:
            raise SystemExit("--compare: give every field the same number of values (the i-th of each go together)")
        field = "_".join(settings)
        candidates = {
            ", ".join(f"{k} {v[i]}" for k, v in settings.items()): (
                {"encoders.dot_pattern": True},
                {"numbers_trees": True, **{k: v[i] for k, v in settings.items()}},
            )
            for i in range(counts.pop())
        }
    rows: dict[str, dict[str, list]] = {name: {"macro_f1": [], "review_share": []} for name in candidates}
    for seed in (int(s) for s in args.seeds.split(",")):
        ds = load_dataset(dataset(seed))
        for name, (align_over, fusion_over) in candidates.items():
            align = train_quick(ds, cache, seed, align_over).align
            prof = get_profile("quick", align_over)
            config = dataclasses.replace(prof.fusion, **fusion_over)
            train = align.train_index()
            emb, raw = align.embeddings(), align.raw_features()
            feats = {m: emb[m][train] for m in prof.encoders.branches}
            labels = [align.labels[i] for i in train]
            classes = sorted(set(labels))
            for fold_seed in fold_seeds:
                _, _, _, decision = calibrate(
                    feats,
                    labels,
                    [align.names[i] for i in train],
                    [True] * len(train),
                    config,
                    fold_seed,
                    classes,
                    "cpu",
                    {"folds": 5, **TARGETS, "defect_confidence": None},
                    numbers=raw["stats"][train],
                )
                p, y = decision["held_out_scores"]
                rows[name]["macro_f1"].append(macro_f1_from_codes(y, np.asarray(p).argmax(axis=1), len(classes)))
                rows[name]["review_share"].append(decision["held_out"]["review_share"])
                print(f"seed {seed} fold seed {fold_seed} {name}: {100 * rows[name]['macro_f1'][-1]:.2f}", flush=True)
    rec = {
        "seeds": args.seeds,
        "fold_seeds": fold_seeds,
        "rows": rows,
    }
    rec["field"] = field
    name = f"choose_{field}" if field else "choose_numbers_trees"
    publish(name, rec, start, markdown, docs=not args.no_docs)


def markdown(rec: dict) -> str:
    reference = next(iter(rec["rows"]))
    base = np.asarray(rec["rows"][reference]["macro_f1"]) * 100
    titles = {
        "trees_weight": "The trees member's weight",
        "logistic_c": "The logistic classifier's inverse L2 strength with the dot pattern and trees",
        "trees_l2_trees_max_leaf_nodes": "The trees member's regularization",
        "variant": "The fusion variant with the dot pattern and trees",
    }
    field = rec.get("field")
    title = titles.get(field, f"fusion.{field}") if field else "The dot pattern and the trees member"
    lines = [
        f"### {title}, chosen on the training split (generator seeds {rec['seeds']})",
        "",
        f"`fuse-train`'s 5-fold cross-validation of the training cards, fold seeds {rec['fold_seeds']} per "
        f"generator seed; macro-F1 of the out-of-fold argmax, its paired difference from `{reference}` "
        "(mean and the range over runs), and the review share of the rule chosen on the same held-out "
        "probabilities (1% miss, 5% defect error).",
        "",
        "| stats branch and classifier | macro-F1 | minus the first row (min, max) | runs ahead of the first row "
        "| review share |",
        "|---|---|---|---|---|",
    ]
    for name, r in rec["rows"].items():
        v = np.asarray(r["macro_f1"]) * 100
        d = v - base
        ahead = "-" if name == reference else f"{int((d > 0).sum())} of {len(d)}"
        lines.append(
            f"| {name} | {v.mean():.2f} ± {v.std(ddof=1):.2f} | {d.mean():+.2f} ({d.min():+.1f}, {d.max():+.1f}) | "
            f"{ahead} | {100 * np.mean(r['review_share']):.1f}% |"
        )
    lines += ["", f"Run time: {rec['seconds'] / 60:.1f} min."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
