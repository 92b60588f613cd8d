"""Why the defect error of the decision rule is higher on the test split than on held-out training cards.

    python bench/defect_error_diagnosis.py --cache-dir bench/out/qcache-field

Reads the test split, for diagnosis only: nothing is chosen here. Needs the models of bench/quality.py
(or bench/calibration.py) in the cache and the per-card output bench/out/results/calibration_method-test.json
(written by ``python bench/calibration_method.py --seeds 0,1,2,3,4 --cache-dir bench/out/qcache-field
--diagnose-test``; not committed). Per seed it checks:

* the replay: ``predict``'s logits for the test cards against the fold models applied to the align
  stage's embeddings of the same cards (largest absolute difference);
* the shipped models' wrong ``defect`` decisions on the test split, and how many of them are cards whose
  inspector label differs from the class that generated them (``truth.jsonl``), each listed;
* the fold average fitted on the outer cross-validation: distinct outer cards and distinct test cards
  decided ``defect`` and wrong (each test card counted once, though every outer fold's fit classifies
  it), with Fisher's exact test;
* the split itself: label-disagreement share and mean severity of train and test cards.

Results: bench/results/defect_error_diagnosis.json and the ``defect-error-diagnosis`` section of
docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from _common import OUT, RAW, SETTINGS, dataset, save, update_section

METHOD = "fusion-cv, fold average"
MODS = ("vlm", "llm", "image")


def truth_of(seed: int) -> dict[str, dict]:
    lines = (dataset(seed) / "truth.jsonl").read_text().splitlines()
    return {r["image"]: r for r in map(json.loads, filter(None, lines))}


def disagrees(t: dict) -> bool:
    return t["generating_class"] != t["label"]


def run_seed(seed: int, rows: list[dict], cache) -> dict:
    from asectl.domain.dataset import Dataset, load_dataset
    from asectl.models.calibration import DecisionRule, stratified_folds
    from asectl.models.cmaf import predict_logits
    from asectl.stages.align import run_align
    from asectl.stages.fuse import run_fuse_train
    from asectl.stages.predict import Predictor

    ds = load_dataset(dataset(seed))
    truth = truth_of(seed)
    align = run_align(ds, cache, profile="quick", seed=seed, settings=SETTINGS)
    bundle = run_fuse_train(ds, cache, profile="quick", seed=seed).bundle
    predictor = Predictor(bundle, cache)
    preds = predictor.classify(Dataset(ds.split("test"), ds.root, ds.source, ds.labels))
    emb, index = align.embeddings(), {n: i for i, n in enumerate(align.names)}
    at = [index[s.name] for s in preds.samples]
    replayed = np.stack([predict_logits(m, {k: emb[k][at] for k in MODS}) for m in bundle.fusion_members()])
    probs = predictor.probabilities(preds.logits)
    shipped = {"defect": 0, "wrong": 0, "wrong_disagreeing": 0}
    wrong_cards = []
    for s, p, d in zip(preds.samples, probs, predictor.rule.decide(probs)):
        if d == "defect":
            shipped["defect"] += 1
            if bundle.labels[int(p.argmax())] != s.label:
                shipped["wrong"] += 1
                shipped["wrong_disagreeing"] += disagrees(truth[s.name])
                t = truth[s.name]
                wrong_cards.append(
                    {
                        "seed": seed,
                        "card": s.name,
                        "label": s.label,
                        "generating_class": t.get("generating_class"),
                        "decided": bundle.labels[int(p.argmax())],
                        "probability": float(p.max()),
                        "severity": t.get("severity"),
                    }
                )

    # The outer cross-validation's fits: which distinct cards they decided `defect`, and wrongly.
    train = np.asarray(align.train_index())
    outer_fold = stratified_folds([align.labels[i] for i in train], 5, seed + 1000)  # as calibration_method.py
    test_names = [n for n, sp in zip(align.names, align.splits) if sp == "test"]
    outer, test = {"defect": set(), "wrong": set()}, {"defect": set(), "wrong": set()}
    for r in rows:
        rule = DecisionRule.from_dict(r["methods"][METHOD]["rule"])
        outer_names = [align.names[i] for i in train[outer_fold == r["outer"]]]
        for names, p, y, seen in (
            (outer_names, r["methods"][METHOD]["probs"], r["y"], outer),
            (test_names, r["test_probs"][METHOD], r["test_y"], test),
        ):
            p = np.asarray(p)
            for n, pp, yy, d in zip(names, p, y, rule.decide(p)):
                if d == "defect":
                    seen["defect"].add(n)
                    if int(pp.argmax()) != yy:
                        seen["wrong"].add(n)
    split = {}
    for sp in ("train", "test"):
        cards = [t for t in truth.values() if t["split"] == sp]
        split[sp] = {
            "n": len(cards),
            "disagreeing": sum(map(disagrees, cards)),
            "mean_severity": float(
                np.mean([t["severity"] for t in cards if isinstance(t.get("severity"), (int, float))])
            ),
        }
    return {
        "seed": seed,
        "replay_max_abs_logit_diff": float(np.abs(replayed - preds.logits).max()),
        "shipped": shipped,
        "shipped_wrong_cards": wrong_cards,
        "split": split,
        **{f"{k}_{w}": len(v[w]) for k, v in (("outer", outer), ("test", test)) for w in ("defect", "wrong")},
        "outer_wrong_disagreeing": sum(disagrees(truth[n]) for n in outer["wrong"]),
        "test_wrong_disagreeing": sum(disagrees(truth[n]) for n in test["wrong"]),
    }


def main() -> None:
    from scipy.stats import fisher_exact

    from asectl.cache import Cache

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument(
        "--results",
        type=Path,
        default=RAW / "calibration_method-test.json",
        help="per-card output of bench/calibration_method.py --diagnose-test",
    )
    args = ap.parse_args()
    if not args.results.is_file():
        raise SystemExit(
            f"{args.results} is missing: run bench/calibration_method.py --diagnose-test first "
            "(its per-card output is not committed)"
        )
    res = json.loads(args.results.read_text())
    cache = Cache(Path(args.cache_dir))
    per_seed = [run_seed(s, [r for r in res["rows"] if r["seed"] == s], cache) for s in res["seeds"]]

    def total(key: str) -> int:
        return sum(r[key] for r in per_seed)

    table = [
        [total("outer_wrong"), total("outer_defect") - total("outer_wrong")],
        [total("test_wrong"), total("test_defect") - total("test_wrong")],
    ]
    p_value = float(fisher_exact(table)[1])
    shipped = {k: sum(r["shipped"][k] for r in per_seed) for k in ("defect", "wrong", "wrong_disagreeing")}
    save(
        "defect_error_diagnosis", {"seeds": res["seeds"], "per_seed": per_seed, "fisher_p": p_value, "shipped": shipped}
    )
    rows = [
        "| seed | replay: max abs logit difference | shipped models: wrong / `defect` decisions (label "
        "disagrees) | outer fits, distinct cards: wrong / `defect` | test, distinct cards: wrong / `defect` "
        "| label disagreement train / test | mean severity train / test |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in per_seed:
        sp = r["split"]
        rows.append(
            f"| {r['seed']} | {r['replay_max_abs_logit_diff']:.2g} | {r['shipped']['wrong']} / "
            f"{r['shipped']['defect']} ({r['shipped']['wrong_disagreeing']}) | {r['outer_wrong']} / "
            f"{r['outer_defect']} | {r['test_wrong']} / {r['test_defect']} | "
            f"{sp['train']['disagreeing']}/{sp['train']['n']} / "
            f"{sp['test']['disagreeing']}/{sp['test']['n']} | "
            f"{sp['train']['mean_severity']:.3f} / {sp['test']['mean_severity']:.3f} |"
        )
    cards = [
        "| seed | card | inspector label | generating class | decided | probability | severity |",
        "|---|---|---|---|---|---|---|",
    ]
    cards += [
        f"| {c['seed']} | {c['card']} | {c['label']} | {c['generating_class']} | {c['decided']} | "
        f"{c['probability']:.3f} | {'-' if c['severity'] is None else format(c['severity'], '.2f')} |"
        for r in per_seed
        for c in r["shipped_wrong_cards"]
    ]
    md = f"""### Diagnosis of the defect error on the test split (seeds {", ".join(map(str, res["seeds"]))})

Reads the test split for diagnosis only; nothing is chosen on it. "Shipped models": each seed's
`PFA + CMAF, no TDA` bundle (the calibration section's). "Outer fits": the `{METHOD}` candidate of
`bench/calibration_method.py --diagnose-test`, each test card counted once however many outer folds'
fits classified it.

{chr(10).join(rows)}

Totals: shipped models {shipped["wrong"]} wrong of {shipped["defect"]} `defect` decisions,
{shipped["wrong_disagreeing"]} of them on cards whose inspector label differs from the generating class.
Outer fits: {total("outer_wrong")} of {total("outer_defect")} distinct outer cards
({total("outer_wrong_disagreeing")} disagreeing) against
{total("test_wrong")} of {total("test_defect")} distinct test cards ({total("test_wrong_disagreeing")} disagreeing);
Fisher's exact test p = {p_value:.3f}.

The shipped models' wrong `defect` decisions:

{chr(10).join(cards)}
"""
    update_section("defect-error-diagnosis", md)
    print(md)


if __name__ == "__main__":
    main()
