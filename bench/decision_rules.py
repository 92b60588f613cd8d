"""Which scores and rules could keep clear cards out of review (issue #20 item 6), on the training split only.

    python bench/decision_rules.py [--seeds 0,1,2,3,4] [--cache-dir C] [--folds 5] [--fold-seed 0]

The data are the default generated `field` cards of each generator seed (bench/out/ds-field-seed<N>, as
bench/quality.py makes them; the quickstart's cards for seed 0); only their training split is read, and the
seeds' counts are pooled. The shipped default is trained (or taken from the cache) with `fuse-train`
(training seed = generator seed), whose held-out scores are out-of-fold probabilities on the training cards.
Beside them, simple scorers on the same cards' numbers and aligned features are scored out of fold on the
same folds: 5-class ones, and normal-vs-defective ones trained for the pass decision alone. Each score is
then used in a *nested* way: the pass threshold (at most 1% of defective cards passed) or the conformal
quantiles are set on the other folds and applied to the held-out fold, so the shares below are what new
cards would see.

Rules:
- ``threshold``: pass when p(normal) reaches the lowest cut that passes at most 1% of the defective cards
  (asectl's pass rule without the "top class is normal" condition; calibration cannot change it, since
  it depends only on the order of the cards);
- ``mondrian a``: class-conditional conformal sets (one quantile per defect class); pass only when the set
  holds no defect class (then at most a of each defect class is passed);
- ``choose_rule``: asectl's whole rule (pass and defect thresholds at 1% miss, 5% defect error): review share.

Where the dataset has the generator's truth (truth.jsonl), the oracle's posterior is scored the same way:
the floor of what a score can reach on these cards. Results: bench/results/decision_rules.json and the
``decision-rules`` section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _common import OUT, dataset, save, train_quick, update_section
from asectl.cache import Cache
from asectl.domain.dataset import load_dataset
from asectl.metrics import macro_f1_from_codes
from asectl.models.calibration import choose_rule, decision_stats, stratified_folds
from default_model import DEFAULT_SETTINGS, measured_columns

MISS = 0.01
DEFECT_ERROR = 0.05


def out_of_fold(make, x: np.ndarray, y: np.ndarray, fold: np.ndarray, classes: int) -> np.ndarray:
    p = np.zeros((len(y), classes))
    for k in np.unique(fold):
        model = make().fit(x[fold != k], y[fold != k])
        p[fold == k] = model.predict_proba(x[fold == k])
    return p


def pass_cut(p_normal_defective: np.ndarray) -> float:
    """The lowest cut on p(normal) that passes at most MISS of these defective cards."""
    d = np.sort(p_normal_defective)[::-1]
    return float(np.nextafter(d[int(np.floor(MISS * len(d) + 1e-9))], np.inf))


def nested_threshold_pass(p_normal: np.ndarray, defective: np.ndarray, fold: np.ndarray) -> np.ndarray:
    passed = np.zeros(len(p_normal), bool)
    for k in np.unique(fold):
        passed[fold == k] = p_normal[fold == k] >= pass_cut(p_normal[(fold != k) & defective])
    return passed


def nested_mondrian_pass(p: np.ndarray, y: np.ndarray, fold: np.ndarray, alpha: float) -> np.ndarray:
    passed = np.zeros(len(y), bool)
    for k in np.unique(fold):
        held = fold == k
        ok = p[held].argmax(axis=1) == 0
        for c in range(1, p.shape[1]):
            scores = np.sort(p[(fold != k) & (y == c), c])
            rank = int(np.floor(alpha * (len(scores) + 1)))
            ok &= p[held, c] < (scores[rank - 1] if rank >= 1 else -np.inf)  # class c left out of the set
        passed[held] = ok
    return passed


def nested_rule(p: np.ndarray, y: np.ndarray, fold: np.ndarray, classes: list[str]) -> dict:
    decisions = np.empty(len(y), dtype=object)
    for k in np.unique(fold):
        rule = choose_rule(p[fold != k], y[fold != k], classes, MISS, DEFECT_ERROR)
        decisions[fold == k] = rule.decide(p[fold == k])
    return decision_stats(list(decisions), y, p.argmax(axis=1), classes)


def logistic(c: float):
    """A function making an unfitted standardised L2 logistic regression of inverse strength ``c``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=c))


def pass_scorers() -> dict:
    """Scorers trained for the pass decision alone (normal against every defect class, so no capacity is spent
    on the defect types), fitted on a card's numbers: {name: a function making an unfitted estimator}. Also
    used by bench/robustness_review.py."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    return {
        "boosting": lambda: HistGradientBoostingClassifier(random_state=0),
        "boosting, regularized (L2 1, 15 leaves, rate 0.05)": lambda: HistGradientBoostingClassifier(
            random_state=0, l2_regularization=1.0, max_leaf_nodes=15, learning_rate=0.05
        ),
        "logistic regression (C 1)": logistic(1.0),
        "logistic regression (C 0.1)": logistic(0.1),
    }


def seed_scores(seed: int, cache: Cache, folds: int, fold_seed: int) -> tuple[dict, np.ndarray, np.ndarray, list]:
    """The scorers' out-of-fold scores on one generator seed's training cards: {name: [n, classes]
    probabilities, or [n] p(normal) of a normal-vs-defective scorer}; the labels, the folds, the classes."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    data = dataset(seed)
    ds = load_dataset(data)
    # the shipped default, named in full, trained with the generator seed (as bench/default_model.py)
    out = train_quick(ds, cache, seed, DEFAULT_SETTINGS)
    align = out.align
    train = np.array(align.train_index())
    classes = list(out.bundle.config["classes"])
    y = np.array([classes.index(align.labels[i]) for i in train])
    normal_or_not = (y != classes.index("normal")).astype(int)  # 0: normal, so column 0 is p(normal)
    raw = {k: v[train] for k, v in align.raw_features().items()}
    aligned = {k: v[train] for k, v in align.embeddings().items()}
    measured = measured_columns(out.bundle.config["stats_fields"])
    printed = raw["stats"][:, ~measured]
    numbers = raw["stats"]  # printed and, with the default's dot pattern, measured
    fold = stratified_folds([classes[i] for i in y], folds, fold_seed)
    k = len(classes)
    held_p, held_y = out.bundle.held_out_scores()
    if not np.array_equal(held_y, y):
        raise SystemExit("the bundle's held-out cards are not the align entry's training cards in order")
    concatenated = np.hstack([aligned[b] for b in sorted(aligned)])
    scorers = {
        "fused default model (its held-out probabilities)": np.asarray(held_p),
        "boosting on the OCR'd numbers": out_of_fold(
            lambda: HistGradientBoostingClassifier(random_state=0), printed, y, fold, k
        ),
        "logistic regression on the OCR'd numbers": out_of_fold(logistic(1.0), printed, y, fold, k),
        "logistic regression on the aligned features, concatenated (C 0.01)": out_of_fold(
            logistic(0.01), concatenated, y, fold, k
        ),
        **{
            f"normal vs defective, printed and dot pattern's numbers: {name}": out_of_fold(
                make, numbers, normal_or_not, fold, 2
            )[:, 0]
            for name, make in pass_scorers().items()
        },
        "normal vs defective, aligned features: logistic regression (C 0.01)": out_of_fold(
            logistic(0.01), concatenated, normal_or_not, fold, 2
        )[:, 0],
    }
    truth = data / "truth.jsonl"
    if truth.is_file():
        import oracle
        from asectl.domain.synth import read_truth

        latents = read_truth(data)
        scorers["oracle (true latent parameters)"] = oracle.posteriors(
            [latents[align.names[i]]["latent"] for i in train], [classes[i] for i in y], classes
        )
    return scorers, y, fold, classes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0", help="generator seeds of the default field cards (pooled)")
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--fold-seed", type=int, default=0)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    cache = Cache(Path(args.cache_dir))
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: dict[str, dict] = {}
    for seed in seeds:
        scorers, y, fold, classes = seed_scores(seed, cache, args.folds, args.fold_seed)
        normal = classes.index("normal")
        defective = y != normal
        for name, p in scorers.items():
            row = rows.setdefault(name, {"scorer": name, "per_seed": {}})
            p_normal = p[:, normal] if p.ndim == 2 else p
            passed = nested_threshold_pass(p_normal, defective, fold)
            one = {
                "n": len(y),
                "n_normal": int((~defective).sum()),
                "n_defective": int(defective.sum()),
                "threshold": {
                    "pass_share": float(passed.mean()),
                    "normal_passed": int((passed & ~defective).sum()),
                    "missed": int((passed & defective).sum()),
                },
            }
            if p.ndim == 2:  # a 5-class scorer: its macro-F1, conformal sets and asectl's whole rule
                one["macro_f1"] = macro_f1_from_codes(y, p.argmax(axis=1), len(classes))
                for a in (0.01, 0.05):
                    one[f"mondrian {a}"] = {"pass_share": float(nested_mondrian_pass(p, y, fold, a).mean())}
                st = nested_rule(p, y, fold, classes)
                one["choose_rule"] = {
                    key: st[key]
                    for key in (
                        "review_share",
                        "pass_share",
                        "defect_share",
                        "n_missed",
                        "n_defective",
                        "n_wrong_defect",
                        "n_defect_decisions",
                    )
                }
            row["per_seed"][seed] = one
            print(seed, name, one["threshold"], flush=True)
    rec = {"seeds": seeds, "folds": args.folds, "fold_seed": args.fold_seed, "rows": list(rows.values())}
    save("decision_rules", rec)
    if not args.no_docs:
        update_section("decision-rules", markdown(rec))


def markdown(rec: dict) -> str:
    seeds = rec["seeds"]
    lines = [
        f"### Which scores leave clear cards alone (training split, {rec['folds']}-fold, nested; "
        f"generator seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}, pooled)",
        "",
        "Pass shares at most 1% of defective cards passed, each threshold set on the other folds; "
        "the whole rule's review share at 1% miss and 5% defect error. Normal-vs-defective scorers give "
        "p(normal) only: the pass decision alone.",
        "",
        "| scorer | out-of-fold macro-F1 | pass share, threshold on p(normal) | normal passed / missed | "
        "pass share, Mondrian 0.01 / 0.05 | whole rule: review share | misses | wrong defect decisions |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def total(row, *path):
        out = 0
        for one in row["per_seed"].values():
            v = one
            for key in path:
                v = v[key]
            out += v
        return out

    for r in rec["rows"]:
        per = list(r["per_seed"].values())
        n, n_normal, n_defective = total(r, "n"), total(r, "n_normal"), total(r, "n_defective")
        t = {key: total(r, "threshold", key) for key in ("normal_passed", "missed")}
        passed = t["normal_passed"] + t["missed"]
        cells = [f"{100 * passed / n:.1f}%", f"{t['normal_passed']}/{n_normal} / {t['missed']}/{n_defective}"]
        if "choose_rule" in per[0]:
            f1 = np.mean([one["macro_f1"] for one in per])
            mondrian = " / ".join(
                f"{100 * np.mean([one[f'mondrian {a}']['pass_share'] for one in per]):.1f}%" for a in (0.01, 0.05)
            )
            review = sum(one["choose_rule"]["review_share"] * one["n"] for one in per) / n
            rule = (
                f"{mondrian} | {100 * review:.1f}% | {total(r, 'choose_rule', 'n_missed')}/"
                f"{total(r, 'choose_rule', 'n_defective')} | {total(r, 'choose_rule', 'n_wrong_defect')}/"
                f"{total(r, 'choose_rule', 'n_defect_decisions')}"
            )
            lines.append(f"| {r['scorer']} | {100 * f1:.2f} | {cells[0]} | {cells[1]} | {rule} |")
        else:
            lines.append(f"| {r['scorer']} | - | {cells[0]} | {cells[1]} | - | - | - | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
