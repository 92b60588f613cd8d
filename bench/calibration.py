"""Calibration and the decision rule on generated data: ECE on the test split before and after
temperature scaling, and what the default decision rule does (review share, miss rate, defect error) on
the held-out training cards it was chosen on and on the test split.

    python bench/calibration.py                    # seeds 0 and 1
    python bench/calibration.py --seeds 0,1,2 --cache-dir /tmp/c
    python bench/calibration.py --seeds 5,6,7 --name calibration-replication   # other seeds, own section

Per seed: the default 455 cards (325 train / 130 test), quick profile with its default epochs, built-in
describer, SmolLM2-135M reasoning, CnOCR (the settings of bench/quality.py), `fuse-train` with its
defaults (5-fold calibration, --max-miss-rate 0.01, --max-defect-error 0.05). The test split is read once,
for the numbers below. Results: bench/results/NAME.json and the NAME section of docs/benchmarks.md
(--name, default calibration)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _common import OUT, SETTINGS, dataset, save, update_section
from asectl.cache import Cache
from asectl.domain.dataset import Dataset, load_dataset
from asectl.models.calibration import threshold_text


def run_seed(seed: int, cache: Cache) -> dict:
    from asectl.models.calibration import decision_stats, expected_calibration_error
    from asectl.stages.align import run_align
    from asectl.stages.fuse import run_fuse_train
    from asectl.stages.predict import Predictor

    t0 = time.perf_counter()
    ds = load_dataset(dataset(seed))
    run_align(ds, cache, profile="quick", seed=seed, settings=SETTINGS)
    t_fuse = time.perf_counter()
    res = run_fuse_train(ds, cache, profile="quick", seed=seed)
    fuse_seconds = time.perf_counter() - t_fuse
    cfg = res.bundle.config
    predictor = Predictor(res.bundle, cache)
    test_ds = Dataset(ds.split("test"), ds.root, ds.source, ds.labels)
    preds = predictor.classify(test_ds)
    classes = res.bundle.labels
    y = np.array([classes.index(s.label) for s in preds.samples])
    before, after = predictor.uncalibrated(preds.logits), predictor.probabilities(preds.logits)
    rule, held = res.bundle.operating_point()  # the predictor's rule (completed for models older than `defective`)
    decisions = rule.decide(after)
    return {
        "seed": seed,
        "n_test": len(y),
        "n_dropped": len(preds.dropped),
        "temperature": cfg["calibration"]["temperature"],
        "held_out": {
            "n": cfg["calibration"]["n_held_out"],
            "errors": cfg["calibration"]["held_out_errors"],
            "ece": cfg["calibration"]["held_out_ece"],
            "nll": cfg["calibration"]["held_out_nll"],
            "decision": held,
        },
        "thresholds": {
            "pass": rule.pass_threshold,
            "defect": rule.defect_threshold,
            "defective": rule.defective_threshold,
        },
        "test": {
            "accuracy": float((after.argmax(1) == y).mean()),
            "ece_before": expected_calibration_error(before, y),
            "ece_after": expected_calibration_error(after, y),
            "mean_confidence_before": float(before.max(1).mean()),
            "mean_confidence_after": float(after.max(1).mean()),
            "decision": decision_stats(decisions, y, after.argmax(1), classes),
        },
        "fuse_train_seconds": fuse_seconds,
        "seconds": time.perf_counter() - t0,
        "model": res.key,
        "from_cache": res.from_cache,
    }


def _ms(vals: list[float], digits: int = 4, pct: bool = False) -> str:
    v = np.array(vals, dtype=float) * (100 if pct else 1)
    unit = " %" if pct else ""
    if len(v) == 1:
        return f"{v[0]:.{digits}f}{unit}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}{unit}"


def _count(rows: list[dict], k: str, n: str) -> str:
    return f"{sum(r[k] for r in rows)}/{sum(r[n] for r in rows)}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument(
        "--name",
        default="calibration",
        help="results file and docs/benchmarks.md section, e.g. calibration-replication for seeds "
        "other than the benchmark's",
    )
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cache = Cache(Path(args.cache_dir))
    t0 = time.perf_counter()
    per_seed = [run_seed(s, cache) for s in seeds]
    total = time.perf_counter() - t0
    save(args.name, {"seeds": seeds, "per_seed": per_seed, "seconds": total})

    held = [r["held_out"]["decision"] for r in per_seed]
    test = [r["test"]["decision"] for r in per_seed]
    rows = [
        ("temperature T", _ms([r["temperature"] for r in per_seed], 3), ""),
        (
            "ECE, plain softmax",
            _ms([r["held_out"]["ece"]["before"] for r in per_seed]),
            _ms([r["test"]["ece_before"] for r in per_seed]),
        ),
        (
            "ECE, calibrated",
            _ms([r["held_out"]["ece"]["after"] for r in per_seed]),
            _ms([r["test"]["ece_after"] for r in per_seed]),
        ),
        (
            "NLL plain -> calibrated",
            " / ".join(
                f"{r['held_out']['nll']['before']:.4f} -> {r['held_out']['nll']['after']:.4f}" for r in per_seed
            ),
            "",
        ),
        (
            "misclassified cards",
            _count([{"e": r["held_out"]["errors"], "n": r["held_out"]["n"]} for r in per_seed], "e", "n"),
            _count(
                [{"e": round((1 - r["test"]["accuracy"]) * r["n_test"]), "n": r["n_test"]} for r in per_seed], "e", "n"
            ),
        ),
        (
            "review share",
            _ms([d["review_share"] for d in held], 2, True),
            _ms([d["review_share"] for d in test], 2, True),
        ),
        (
            "review cards",
            _count([d["counts"] | {"n": d["n"]} for d in held], "review", "n"),
            _count([d["counts"] | {"n": d["n"]} for d in test], "review", "n"),
        ),
        (
            "miss rate (target <= 1 %): defective cards passed",
            _count(held, "n_missed", "n_defective"),
            _count(test, "n_missed", "n_defective"),
        ),
        (
            "defect error (target <= 5 %): defect decisions of another class",
            _count(held, "n_wrong_defect", "n_defect_decisions"),
            _count(test, "n_wrong_defect", "n_defect_decisions"),
        ),
    ]
    if all("n_defective_decisions" in d for d in held + test):  # runs from before `defective` lack it
        rows.append(
            (
                "defective error (target <= 5 %): normal cards among defective decisions",
                _count(held, "n_wrong_defective", "n_defective_decisions"),
                _count(test, "n_wrong_defective", "n_defective_decisions"),
            )
        )
    table = ["| | held-out training cards (out-of-fold) | test split |", "|---|---|---|"]
    table += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    per = [
        "| seed | T | test ECE before | test ECE after | test review | test misses | thresholds pass / defect "
        "/ defective |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in per_seed:
        d = r["test"]["decision"]
        per.append(
            f"| {r['seed']} | {r['temperature']:.3f} | {r['test']['ece_before']:.4f} | "
            f"{r['test']['ece_after']:.4f} | "
            f"{d['counts']['review']}/{d['n']} | {d['n_missed']}/{d['n_defective']} | "
            f"{threshold_text(r['thresholds']['pass'])} / {threshold_text(r['thresholds']['defect'])} / "
            f"{threshold_text(r['thresholds'].get('defective'))} |"
        )
    cached = [r["seed"] for r in per_seed if r["from_cache"]]
    trained_note = (
        f"; the models of seeds {', '.join(map(str, cached))} came from the cache (trained earlier with "
        "the same settings, e.g. by bench/default_model.py), "
        "so only their test cards were classified here"
        if cached
        else ""
    )
    md = f"""### Calibration and the decision rule ({len(seeds)} seeds: {", ".join(map(str, seeds))})

Default 455 generated cards per seed (325 train / 130 test; cards whose record OCR cannot read are left
out), quick profile, default `fuse-train` (5-fold
cross-validation on the training split, whose 5 fold models are the classifier; `--max-miss-rate 0.01`,
`--max-defect-error 0.05`). ECE: 15
equal-width bins of top-class probability. Mean ± std over seeds; counts are summed over seeds. Run time
{total / 60:.1f} min{trained_note}.

{chr(10).join(table)}

{chr(10).join(per)}
"""
    update_section(args.name, md)
    print(md)


if __name__ == "__main__":
    main()
