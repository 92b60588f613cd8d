"""The default trained on `field` cards, deciding `clean` cards: review share, miss rate, defect error, macro-F1.

    python bench/robustness_review.py [--seeds 0,1,2] [--cache-dir C] [--no-docs]

Per generator seed: the quick default trained with `fuse-train` on the default `field` cards
(bench/out/ds-field-seed<N>, its training split), then `asectl`'s own predictor (calibrated fold-model average,
stored decision rule at 1% miss and 5% defect error) on the test split of the `clean` cards of the same seed
(bench/out/ds-clean-seed<N>: the same class models without the field difficulty, docs/dataset.md). This is the
robustness table's setting (bench/quality.py, "field -> clean") with the line's figures; the goal is a
review share of at most 10% with the miss rate held. Beside the default, scorers trained for the pass
decision alone (bench/decision_rules.py's ``pass_scorers``: normal against every defect class on the printed
and dot pattern's numbers of the field training cards, the pass cut set out of fold on them) decide the same
clean cards' pass. Nothing is chosen here; each clean test split is read once.
Results: bench/results/robustness_review.json and the ``robustness-review`` section of docs/benchmarks.md;
the field model's per-card probabilities (for bench/unlabelled_cut.py) in bench/out/results/, not committed."""

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
from decision_rules import out_of_fold, pass_cut, pass_scorers


def clean_pass(run, test: Dataset, cache: Cache, seed: int) -> dict:
    """Each of bench/decision_rules.py's pass scorers: its pass cut set on the field training cards'
    out-of-fold scores (5 folds, at most 1% of the defective cards passed), then the scorer fitted on every
    field training card and applied to the clean test cards (their numbers computed with the model's stored
    replay settings)."""
    from asectl.models.calibration import stratified_folds
    from asectl.stages.modalities import collect_modalities

    align, fields = run.align, run.bundle.config["stats_fields"]
    tr = [i for i, s in enumerate(align.splits) if s == "train"]
    x = align.raw_features()["stats"][tr]
    labels = [align.labels[i] for i in tr]
    defective = np.array([c != "normal" for c in labels]).astype(int)  # 0: normal, so column 0 is p(normal)
    fold = stratified_folds(labels, 5, seed)
    mods = collect_modalities(test, cache, run.bundle.config["replay"], remember=False)
    if list(mods.stats_names) != list(fields):
        raise SystemExit(f"seed {seed}: the clean cards' numbers are not the model's ({mods.stats_names})")
    truth = {s.name: s.label for s in test.samples}
    clean_defective = np.array([truth[s.name] != "normal" for s in mods.samples])
    out = {}
    for name, make in pass_scorers().items():
        oof = out_of_fold(make, x, defective, fold, 2)[:, 0]
        cut = pass_cut(oof[defective == 1])
        p_clean = make().fit(x, defective).predict_proba(mods.stats)[:, 0]
        passed = p_clean >= cut
        out[name] = {
            "cut": cut,
            "field_pass_share": float((oof >= cut).mean()),
            "normal_passed": int((passed & ~clean_defective).sum()),
            "n_normal": int((~clean_defective).sum()),
            "defective_passed": int((passed & clean_defective).sum()),
            "n_defective": int(clean_defective.sum()),
            "median_p_normal": float(np.median(p_clean[~clean_defective])),
        }
    return out


LINE_CARDS = (40, 80, 160, None)  # labelled line cards the thresholds are re-set on; None: the whole training split


def recut(model, clean: Dataset, probs, y, cache: Cache, seed: int) -> dict:
    """The model's thresholds re-set by ``asectl calibrate`` (asectl.stages.calibrate) on the first n cards of
    a seeded shuffle of the clean training split (the line's labelled cards; nothing retrained), for each n of
    ``LINE_CARDS``, then deciding the clean test cards (``probs``: the model's calibrated probabilities of
    them, which the re-set model shares)."""
    import dataclasses

    from asectl.stages.calibrate import run_calibrate

    train, test = clean.split("train"), clean.split("test")
    order = np.random.default_rng(seed).permutation(len(train))
    classes = list(model.labels)
    out = {}
    for n in LINE_CARDS:
        cards = [train[i] for i in order[: n or len(train)]]
        line = dataclasses.replace(clean, samples=cards + test)
        res = run_calibrate(line, model, cache)
        rule = res.bundle.decision_rule()
        decisions = rule.decide(probs)
        out[str(n or len(train))] = {
            "n_defective_line": int(sum(c.label != "normal" for c in cards)),
            "thresholds": {"pass": rule.pass_threshold, "defect": rule.defect_threshold},
            "line_cards": res.after,
            "decisions": decision_stats(decisions, y, probs.argmax(axis=1), classes),
        }
    return out


def probability_record(probs, labels) -> dict:
    """Class probabilities [n, classes] and true class indices, as the per-card output keeps them."""
    return {"probs": np.asarray(probs).round(7).tolist(), "labels": [int(k) for k in labels]}


def scored(predictor, cards: Dataset, classes: list[str]) -> dict:
    """The model's calibrated class probabilities of these cards and their true class indices."""
    preds = predictor.classify(cards)
    truth = {s.name: s.label for s in cards.samples}
    probs = predictor.probabilities(preds.logits)
    return probability_record(probs, [classes.index(truth[s.name]) for s in preds.samples])


def line_scores(predictor, model, field: Dataset, clean: Dataset, clean_test: dict) -> dict:
    """The field model's probabilities of: its own held-out training cards (those its thresholds were cut
    on), the field test cards, and the clean training and test cards (``clean_test``: already scored); and
    its stored rule. For the label-free cuts of bench/unlabelled_cut.py (the labels score those cuts,
    never make them)."""
    classes = list(model.labels)
    probs, labels = model.held_out_scores()
    out = {
        "classes": classes,
        "rule": model.config["decision"],
        "field_held_out": probability_record(probs, labels),
        "clean_test": clean_test,
    }
    for name, ds, split in (("field_test", field, "test"), ("clean_train", clean, "train")):
        out[name] = scored(predictor, Dataset(ds.split(split), ds.root, ds.source, ds.labels), classes)
    return out


def run_seed(seed: int, cache: Cache) -> dict:
    from asectl.stages.predict import Predictor

    over = {"encoders.branches": "image,vlm,llm,stats", "encoders.dot_pattern": True, "fusion.numbers_trees": True}
    field = load_dataset(dataset(seed))
    run = train_quick(field, cache, seed, over)  # the default, named in full
    model = run.bundle
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
        "pass_scorers": clean_pass(run, test, cache, seed),
        "recut": recut(model, clean, probs, y, cache, seed),
        "scores": line_scores(predictor, model, field, clean, probability_record(probs, y)),
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
    raw = {seed: per_seed[seed].pop("scores") for seed in seeds}  # per card: out of git
    rec = {"seeds": seeds, "per_seed": per_seed}
    publish("robustness_review", rec, start, markdown, docs=not args.no_docs, raw=raw)


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
    scorers = [r.get("pass_scorers") for r in rows]
    if all(scorers):
        lines += [
            "",
            "Scorers trained for the pass decision alone (normal against every defect class, on the printed and "
            "dot pattern's numbers of the `field` training cards), their pass cut set out of fold on those cards "
            "at 1% of the defective cards passed, then deciding the `clean` test cards (all seeds; field pass "
            "share and median p(normal) of the clean normal cards per seed):",
            "",
            "| scorer | clean normal cards passed | clean defective cards passed | field pass share | "
            "median p(normal), clean normal cards |",
            "|---|---|---|---|---|",
        ]
        for name in scorers[0]:
            one = [sc[name] for sc in scorers]
            total = {key: sum(o[key] for o in one) for key in ("normal_passed", "n_normal", "defective_passed")}
            total["n_defective"] = sum(o["n_defective"] for o in one)
            shares = ", ".join(f"{100 * o['field_pass_share']:.1f}%" for o in one)
            medians = ", ".join(f"{o['median_p_normal']:.3f}" for o in one)
            lines.append(
                f"| {name} | {total['normal_passed']}/{total['n_normal']} | "
                f"{total['defective_passed']}/{total['n_defective']} | {shares} | {medians} |"
            )
    recuts = [r.get("recut") for r in rows]
    if all(recuts):
        lines += [
            "",
            "The same models with their thresholds re-set by `asectl calibrate` on the first n cards of a seeded "
            "shuffle of each seed's `clean` training split (the line's labelled cards; nothing retrained, the "
            "same targets), then deciding the same `clean` test cards (all seeds):",
            "",
            "| line cards per seed | their defective cards | review | missed / defective | wrong / `defect` "
            "decisions | normal / `defective` decisions | pass thresholds |",
            "|---|---|---|---|---|---|---|",
        ]
        for n in recuts[0]:
            one = [rc[n] for rc in recuts]
            d = [o["decisions"] for o in one]
            total = sum(x["n"] for x in d)
            review = sum(x["counts"]["review"] for x in d)
            lines.append(
                f"| {n} | {', '.join(str(o['n_defective_line']) for o in one)} | {review}/{total} = "
                f"{100 * review / total:.1f}% | {sum(x['n_missed'] for x in d)}/{sum(x['n_defective'] for x in d)} | "
                f"{sum(x['n_wrong_defect'] for x in d)}/{sum(x['n_defect_decisions'] for x in d)} | "
                f"{sum(x.get('n_wrong_defective', 0) for x in d)}/{sum(x.get('n_defective_decisions', 0) for x in d)}"
                f" | {', '.join(format(o['thresholds']['pass'], '.3f') for o in one)} |"
            )
    lines += [
        "",
        f"Run time: {rec['seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
