"""The default trained on `field` cards, deciding `clean` cards: review share, miss rate, defect error, macro-F1.

    python bench/robustness_review.py [--seeds 0,1,2] [--cache-dir C] [--no-docs]

Per generator seed: the quick default trained with `fuse-train` on the default `field` cards
(bench/out/ds-field-seed<N>, its training split), then `asectl`'s own predictor (calibrated fold-model average,
stored decision rule at 1% miss and 5% defect error) on the test split of the `clean` cards of the same seed
(bench/out/ds-clean-seed<N>: the same class models without the field difficulty, docs/dataset.md). This is the
robustness table's setting (bench/quality.py, "field -> clean") with the line's figures; the goal is a
review share of at most 10% with the miss rate held. Nothing is chosen here; each clean test split is read once.
Results: bench/results/robustness_review.json and the ``robustness-review`` section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _common import OUT, dataset, publish, train_quick
from asectl.cache import Cache
from asectl.domain.dataset import Dataset, load_dataset
from asectl.metrics import macro_f1_from_codes
from asectl.models.calibration import decision_stats


def run_seed(seed: int, cache: Cache) -> dict:
    from asectl.stages.predict import Predictor

    over = {"encoders.branches": "image,vlm,llm,stats", "encoders.dot_pattern": True, "fusion.numbers_trees": True}
    model = train_quick(load_dataset(dataset(seed)), cache, seed, over).bundle  # the default, named in full
    clean = load_dataset(dataset(seed, difficulty="clean"))
    test = Dataset(clean.split("test"), clean.root, clean.source, clean.labels)
    predictor = Predictor(model, cache)
    preds = predictor.classify(test)
    probs = predictor.probabilities(preds.logits)
    classes = list(model.labels)
    truth = {s.name: s.label for s in test.samples}
    y = np.array([classes.index(truth[s.name]) for s in preds.samples])
    decisions = np.array(predictor.rule.decide(probs))
    stats = decision_stats(list(decisions), y, probs.argmax(axis=1), classes)
    per_class = {  # where each true class's cards went, and how sure the model was of them
        c: {
            "n": int((y == k).sum()),
            "review": int((decisions[y == k] == "review").sum()),
            "median_p_normal": float(np.median(probs[y == k, 0])),
            "median_p_top": float(np.median(probs[y == k].max(axis=1))),
        }
        for k, c in enumerate(classes)
    }
    rule = predictor.rule
    return {
        "macro_f1": macro_f1_from_codes(y, probs.argmax(axis=1), len(classes)),
        "decisions": stats,
        "per_class": per_class,
        "thresholds": {"pass": rule.pass_threshold, "defect": rule.defect_threshold},
        "n_dropped": len(preds.dropped),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    start = time.perf_counter()
    cache = Cache(Path(args.cache_dir))
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = {}
    for seed in seeds:
        per_seed[seed] = run_seed(seed, cache)
        d = per_seed[seed]["decisions"]
        print(seed, round(100 * per_seed[seed]["macro_f1"], 2), d["review_share"], d["n_missed"], flush=True)
    publish("robustness_review", {"seeds": seeds, "per_seed": per_seed}, start, markdown, docs=not args.no_docs)


def markdown(rec: dict) -> str:
    rows = rec["per_seed"].values()
    n = sum(r["decisions"]["n"] for r in rows)
    review = sum(r["decisions"]["counts"]["review"] for r in rows)
    missed = sum(r["decisions"]["n_missed"] for r in rows)
    defective = sum(r["decisions"]["n_defective"] for r in rows)
    wrong = sum(r["decisions"]["n_wrong_defect"] for r in rows)
    decided = sum(r["decisions"]["n_defect_decisions"] for r in rows)
    false_defective = sum(r["decisions"].get("n_wrong_defective", 0) for r in rows)
    n_defective_dec = sum(r["decisions"].get("n_defective_decisions", 0) for r in rows)
    f1 = [100 * r["macro_f1"] for r in rows]
    lines = [
        "### Trained on `field`, deciding `clean` cards (the line's figures)",
        "",
        f"Seeds {', '.join(map(str, rec['seeds']))}: the quick default trained on each seed's `field` training "
        "cards, its stored rule (1% miss, 5% defect error) on the same seed's `clean` test cards.",
        "",
        "| seed | macro-F1 | review | missed / defective | wrong / `defect` decisions | normal / `defective` "
        "decisions |",
        "|---|---|---|---|---|---|",
    ]
    for seed, r in rec["per_seed"].items():
        d = r["decisions"]
        lines.append(
            f"| {seed} | {100 * r['macro_f1']:.2f} | {d['counts']['review']}/{d['n']} | "
            f"{d['n_missed']}/{d['n_defective']} | {d['n_wrong_defect']}/{d['n_defect_decisions']} | "
            f"{d.get('n_wrong_defective', 0)}/{d.get('n_defective_decisions', 0)} |"
        )
    lines += [
        f"| all | {np.mean(f1):.2f} | {review}/{n} = {100 * review / n:.1f}% | {missed}/{defective} | "
        f"{wrong}/{decided} | {false_defective}/{n_defective_dec} |",
        "",
        "Where each true class went (per seed: cards sent to review / cards; median p(normal); median probability "
        "of the top class), beside the stored thresholds:",
        "",
        "| seed | pass threshold | defect threshold | "
        + " | ".join(rec["per_seed"][rec["seeds"][0]]["per_class"])
        + " |",
        "|---|---|---|" + "---|" * len(rec["per_seed"][rec["seeds"][0]]["per_class"]),
    ]
    for seed, r in rec["per_seed"].items():
        cells = [
            f"{c['review']}/{c['n']}; {c['median_p_normal']:.3f}; {c['median_p_top']:.3f}"
            for c in r["per_class"].values()
        ]
        t = r["thresholds"]
        lines.append(f"| {seed} | {t['pass']:.3f} | {t['defect']:.3f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Run time: {rec['seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
