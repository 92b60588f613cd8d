"""Which scores and rules could keep clear cards out of review (issue #20 item 6), on the training split only.

    python bench/decision_rules.py [--seed 0] [--cache-dir C] [--folds 5] [--fold-seed 0]

The data are the default generated `field` cards of the generator seed (bench/out/ds-field-seed0, as
bench/quality.py makes them; the quickstart's cards for seed 0); only their training split is read. The
default model is trained (or taken from the cache) with `fuse-train`, whose held-out scores are out-of-fold
probabilities on the training cards. Beside them, simple scorers on the same cards' encoder features and
aligned features are scored out of fold on the same folds. Each score is then used in a *nested* way: the pass
threshold (at most 1% of defective cards passed) or the conformal quantiles are set on the other folds and
applied to the held-out fold, so the shares below are what new cards would see.

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

from _common import OUT, dataset, save, update_section
from asectl.cache import Cache
from asectl.domain.dataset import load_dataset
from asectl.metrics import macro_f1_from_codes
from asectl.models.calibration import choose_rule, decision_stats, stratified_folds

MISS = 0.01
DEFECT_ERROR = 0.05


def out_of_fold(make, x: np.ndarray, y: np.ndarray, fold: np.ndarray, classes: int) -> np.ndarray:
    p = np.zeros((len(y), classes))
    for k in np.unique(fold):
        model = make().fit(x[fold != k], y[fold != k])
        p[fold == k] = model.predict_proba(x[fold == k])
    return p


def nested_threshold_pass(p_normal: np.ndarray, defective: np.ndarray, fold: np.ndarray) -> np.ndarray:
    passed = np.zeros(len(p_normal), bool)
    for k in np.unique(fold):
        d = np.sort(p_normal[(fold != k) & defective])[::-1]
        cut = np.nextafter(d[int(np.floor(MISS * len(d) + 1e-9))], np.inf)
        passed[fold == k] = p_normal[fold == k] >= cut
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


def main() -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from asectl.stages.fuse import run_fuse_train

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="generator seed of the default field cards")
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--fold-seed", type=int, default=0)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()

    data = dataset(args.seed)
    ds = load_dataset(data)
    out = run_fuse_train(ds, Cache(Path(args.cache_dir)))
    align = out.align
    train = np.array(align.train_index())
    classes = list(out.bundle.config["classes"])
    y = np.array([classes.index(align.labels[i]) for i in train])
    defective = y != classes.index("normal")
    raw = {k: v[train] for k, v in align.raw_features().items()}
    aligned = {k: v[train] for k, v in align.embeddings().items()}
    fold = stratified_folds([classes[i] for i in y], args.folds, args.fold_seed)
    k = len(classes)

    def logistic(c):
        return lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=c))

    held_p, held_y = out.bundle.held_out_scores()
    if not np.array_equal(held_y, y):
        raise SystemExit("the bundle's held-out cards are not the align entry's training cards in order")
    scorers = {
        "fused default model (its held-out probabilities)": np.asarray(held_p),
        "boosting on the OCR'd numbers": out_of_fold(
            lambda: HistGradientBoostingClassifier(random_state=0), raw["stats"], y, fold, k
        ),
        "logistic regression on the OCR'd numbers": out_of_fold(logistic(1.0), raw["stats"], y, fold, k),
        "logistic regression on the aligned features, concatenated (C 0.01)": out_of_fold(
            logistic(0.01), np.hstack([aligned[b] for b in sorted(aligned)]), y, fold, k
        ),
    }
    truth = data / "truth.jsonl"
    if truth.is_file():
        import oracle
        from asectl.domain.synth import read_truth

        latents = read_truth(data)
        scorers["oracle (true latent parameters)"] = oracle.posteriors(
            [latents[align.names[i]]["latent"] for i in train], [classes[i] for i in y], classes
        )
    rows = []
    for name, p in scorers.items():
        row = {
            "scorer": name,
            "macro_f1": macro_f1_from_codes(y, p.argmax(axis=1), k),
            "n": len(y),
            "n_normal": int((~defective).sum()),
            "n_defective": int(defective.sum()),
        }
        for rule, passed in [
            ("threshold", nested_threshold_pass(p[:, 0], defective, fold)),
            *[(f"mondrian {a}", nested_mondrian_pass(p, y, fold, a)) for a in (0.01, 0.05)],
        ]:
            row[rule] = {
                "pass_share": float(passed.mean()),
                "normal_passed": int((passed & ~defective).sum()),
                "missed": int((passed & defective).sum()),
            }
        st = nested_rule(p, y, fold, classes)
        row["choose_rule"] = {
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
        rows.append(row)
        print(name, {key: row[key] for key in ("macro_f1", "threshold", "choose_rule")}, flush=True)
    rec = {"data": data.name, "folds": args.folds, "fold_seed": args.fold_seed, "rows": rows}
    save("decision_rules", rec)
    if not args.no_docs:
        update_section("decision-rules", markdown(rec))


def markdown(rec: dict) -> str:
    lines = [
        f"### Which scores leave clear cards alone (training split, {rec['folds']}-fold, nested)",
        "",
        "Pass shares at most 1% of defective cards passed, each threshold set on the other folds; "
        "the whole rule's review share at 1% miss and 5% defect error.",
        "",
        "| scorer | out-of-fold macro-F1 | pass share, threshold on p(normal) | normal passed / missed | "
        "pass share, Mondrian 0.01 / 0.05 | whole rule: review share | misses | wrong defect decisions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rec["rows"]:
        t, c = r["threshold"], r["choose_rule"]
        lines.append(
            f"| {r['scorer']} | {100 * r['macro_f1']:.2f} | {100 * t['pass_share']:.1f}% | "
            f"{t['normal_passed']}/{r['n_normal']} / {t['missed']}/{r['n_defective']} | "
            f"{100 * r['mondrian 0.01']['pass_share']:.1f}% / {100 * r['mondrian 0.05']['pass_share']:.1f}% | "
            f"{100 * c['review_share']:.1f}% | {c['n_missed']}/{c['n_defective']} | "
            f"{c['n_wrong_defect']}/{c['n_defect_decisions']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
