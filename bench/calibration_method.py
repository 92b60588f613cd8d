"""How `fuse-train` should fit its temperature and decision thresholds, chosen on training cards only.

    python bench/calibration_method.py --seeds 0,1,2,3,4 --cache-dir bench/out/qcache-field
    python bench/calibration_method.py ... --outer-priors inner    # outer cards answered as new cards are
    python bench/calibration_method.py ... --diagnose-test        # the same fits also classify the test split

The temperature and the two thresholds are fitted on held-out predictions and then applied to the
classifier that predicts. If the held-out predictions come from models that differ from that classifier
(sharper, or with alignment that saw the held-out cards), the targets hold on the held-out cards and not
on new ones. Candidates (k = 5 inner folds each):

* ``fusion-cv, final``: PFA on all training cards; fusion cross-validated for the out-of-fold logits;
  the model trained on every card predicts (what `fuse-train` did before this comparison).
* ``fusion-cv, fold average``: as above, but the k fold fusion models predict and their calibrated
  probabilities are averaged (scikit-learn's ``CalibratedClassifierCV(ensemble=True)``).
* ``fusion-cv, fold average, lowest cut``: the fold average with the defect threshold as `fuse-train` chose
  it before: the lowest cut whose held-out defect error meets the target anywhere in the scan (now: the
  scan stops at the first cut that breaks it once one has met it).
* ``fusion-cv, fold average, bound c``: the fold average, with a defect cut meeting the target only where
  the exact upper bound (confidence c) of its held-out defect error does (``--defect-confidence c``).
* ``chain-cv, final``: PFA and fusion both cross-validated (the held-out fold is outside the alignment
  too); the chain trained on every card predicts.
* ``chain-cv, fold average``: the k fold chains (alignment heads + fusion) predict, probabilities averaged.
* ``validation split``: 20% of the cards (stratified) held out from PFA and fusion; T and the
  thresholds fitted on them; the chain trained on the other 80% predicts.

Each candidate is scored by an outer 5-fold cross-validation of the *training split*: the outer fold is
outside everything the candidate fits (alignment, fusion, temperature, thresholds) and plays the new
cards. The test split is not read. The LLM texts and frozen encoder features are the cached ones of the
benchmark's models (the LLM's class priors were computed over all training cards, the outer fold's
included: a small leak shared by every candidate; ``--outer-priors inner`` answers the outer cards again
with priors of the inner cards only). Results: bench/results/calibration_method[-inner-priors][-test].json
(the scores) and the ``calibration-method[-inner-priors][-test]`` sections of docs/benchmarks.md; each
outer fit's per-card output (its calibrated out-of-fold probabilities of the inner cards, so that another
rule can be scored without training again, and with --diagnose-test its test probabilities) goes to
bench/out/results/ under the same name, not committed. The rows of the runs docs/benchmarks.md quotes are
in the repository's history (bench/results/calibration_method*.json at commit 4186cad)."""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from _common import OUT, SETTINGS, dataset, save, update_section

FOLDS = 5
VALIDATION_SHARE = 0.2
MODS = ("vlm", "llm", "image")
# The fold average's defect threshold with its held-out error's exact upper bound at these confidences
# (asectl.models.calibration.choose_rule's defect_confidence) instead of the error itself.
CONFIDENCES = (0.5, 0.8, 0.9)
BOUNDED = tuple(f"fusion-cv, fold average, bound {c}" for c in CONFIDENCES)
LOWEST_CUT = "fusion-cv, fold average, lowest cut"
METHODS = (
    "fusion-cv, final",
    "fusion-cv, fold average",
    LOWEST_CUT,
    *BOUNDED,
    "chain-cv, final",
    "chain-cv, fold average",
    "validation split",
)


def lowest_cut_rule(probs: np.ndarray, y: np.ndarray, classes: list[str]):
    """The defect threshold as `fuse-train` chose it before: the lowest cut whose held-out defect error
    meets the target anywhere in the scan, not the end of the first run of cuts that meet it."""
    from asectl.models.calibration import DecisionRule, choose_rule
    from asectl.testing import lowest_cut_anywhere

    rule = choose_rule(probs, y, classes)
    return DecisionRule(
        rule.classes,
        rule.pass_threshold,
        lowest_cut_anywhere(probs, y, rule.max_defect_error, tuple(classes)),
        rule.max_miss_rate,
        rule.max_defect_error,
    )


def _chain(raw: dict, fit: np.ndarray, labels: list[str], classes: list[str], prof, seed: int):
    """PFA on ``fit`` (None: reuse ``raw`` as aligned embeddings) then fusion on ``fit``; returns a function
    giving logits for card indices."""
    return _fusion(train_pfa_embeddings(raw, fit, prof, seed), fit, labels, classes, prof, seed)


def _fusion(emb: dict, fit: np.ndarray, labels: list[str], classes: list[str], prof, seed: int):
    from asectl.models.cmaf import predict_logits, train_fusion

    model, _ = train_fusion(
        {m: emb[m][fit] for m in MODS}, [labels[i] for i in fit], prof.fusion, seed, classes=classes
    )
    return lambda idx: predict_logits(model, {m: emb[m][idx] for m in MODS})


def run_outer(args: tuple) -> dict:
    """One outer fold of one seed: every candidate's calibrated probabilities on the outer fold."""
    import torch

    from asectl.cache import Cache
    from asectl.domain.dataset import load_dataset
    from asectl.models.calibration import choose_rule, fit_temperature, mean_softmax, softmax, stratified_folds
    from asectl.models.train_config import get_profile
    from asectl.stages.align import run_align

    seed, outer_k, cache_dir, outer_priors, with_test = args
    torch.set_num_threads(1)
    cache = Cache(Path(cache_dir))
    ds = load_dataset(dataset(seed))
    align = run_align(ds, cache, profile="quick", seed=seed, settings=SETTINGS)
    raw, labels = align.raw_features(), align.labels
    train = np.asarray(align.train_index())
    classes = sorted({labels[i] for i in train})
    y_all = np.asarray([classes.index(labels[i]) for i in range(len(labels))])
    outer_fold = stratified_folds([labels[i] for i in train], FOLDS, seed + 1000)
    inner, test = train[outer_fold != outer_k], train[outer_fold == outer_k]
    # --diagnose-test: the dataset's test cards, classified by the same candidates (never used to choose)
    test_split = np.asarray([i for i, sp in enumerate(align.splits) if sp == "test"]) if with_test else None
    if outer_priors == "inner":
        raw = {**raw, "llm": outer_llm_features(ds, align, inner, test, cache, raw["llm"])}
    prof = get_profile("quick", {"seed": seed})
    inner_fold = stratified_folds([labels[i] for i in inner], FOLDS, seed)

    def fit_rule(logits: np.ndarray, idx: np.ndarray):
        t = fit_temperature(logits, y_all[idx])
        return t, choose_rule(softmax(logits, t), y_all[idx], classes)

    out, diag = {}, {}
    # PFA on every inner card, shared by the fusion-cv candidates.
    shared = train_pfa_embeddings(raw, inner, prof, seed)
    final_fusion = _fusion(shared, inner, labels, classes, prof, seed)
    oof_f, oof_c = np.zeros((len(inner), len(classes))), np.zeros((len(inner), len(classes)))
    fold_fusions, fold_chains = [], []
    for k in range(FOLDS):
        fit, held = inner[inner_fold != k], inner[inner_fold == k]
        fold_fusions.append(_fusion(shared, fit, labels, classes, prof, seed))
        oof_f[inner_fold == k] = fold_fusions[-1](held)
        fold_chains.append(_chain(raw, fit, labels, classes, prof, seed))
        oof_c[inner_fold == k] = fold_chains[-1](held)
    for name, oof, final, members in (
        ("fusion-cv", oof_f, final_fusion, fold_fusions),
        # the chain on every inner card is PFA on them + the final fusion
        ("chain-cv", oof_c, final_fusion, fold_chains),
    ):
        t, rule = fit_rule(oof, inner)
        out[f"{name}, final"] = (softmax(final(test), t), t, rule)
        average = mean_softmax([m(test) for m in members], t)
        out[f"{name}, fold average"] = (average, t, rule)
        variants = (LOWEST_CUT, *BOUNDED) if name == "fusion-cv" else ()
        if name == "fusion-cv":
            inner_oof = softmax(oof, t)
            out[LOWEST_CUT] = (average, t, lowest_cut_rule(inner_oof, y_all[inner], classes))
            for c, label in zip(CONFIDENCES, BOUNDED):
                out[label] = (average, t, choose_rule(inner_oof, y_all[inner], classes, defect_confidence=c))
        if test_split is not None:
            diag[f"{name}, final"] = softmax(final(test_split), t)
            diag[f"{name}, fold average"] = mean_softmax([m(test_split) for m in members], t)
            for label in variants:
                diag[label] = diag[f"{name}, fold average"]
    val_mark = stratified_folds([labels[i] for i in inner], round(1 / VALIDATION_SHARE), seed) == 0
    fit, val = inner[~val_mark], inner[val_mark]
    model = _chain(raw, fit, labels, classes, prof, seed)
    t, rule = fit_rule(model(val), val)
    out["validation split"] = (softmax(model(test), t), t, rule)
    if test_split is not None:
        diag["validation split"] = softmax(model(test_split), t)
    # The fusion-cv out-of-fold probabilities the rules were chosen on: other rules can be scored from them.
    return {
        "seed": seed,
        "outer": outer_k,
        "y": y_all[test].tolist(),
        "classes": classes,
        "inner_y": y_all[inner].tolist(),
        "inner_probs": inner_oof.tolist(),
        **(
            {"test_y": y_all[test_split].tolist(), "test_probs": {m: p.tolist() for m, p in diag.items()}}
            if test_split is not None
            else {}
        ),
        "methods": {m: {"probs": p.tolist(), "temperature": t, "rule": r.to_dict()} for m, (p, t, r) in out.items()},
    }


def outer_llm_features(ds, align, inner: np.ndarray, test: np.ndarray, cache, llm: np.ndarray) -> np.ndarray:
    """The LLM features with the outer fold's texts answered the way a new card's are: with priors built
    from the inner cards only (the benchmark's cached texts used priors of every training card, the
    outer fold's included). Needs one LLM answer per outer card (cached)."""
    import dataclasses

    from asectl.domain.dataset import Dataset
    from asectl.models.train_config import get_profile
    from asectl.stages.features import text_features
    from asectl.stages.modalities import ModalitySettings, build_encoders, collect_modalities
    from asectl.stages.ocr import run_ocr
    from asectl.stages.reason import priors_from_dataset

    by_name = {s.name: s for s in ds.samples}
    inner_names = {align.names[i] for i in inner}
    inner_ds = Dataset(
        [dataclasses.replace(by_name[n], split="train") for n in sorted(inner_names)], ds.root, ds.source, ds.labels
    )
    settings = ModalitySettings.from_dict(SETTINGS)
    ocr = run_ocr(inner_ds, settings.ocr, cache=cache, remember=False).by_image()
    priors = priors_from_dataset(inner_ds, ocr, list(settings.ocr.card_spec().bin_edges))
    outer_ds = Dataset(
        [dataclasses.replace(by_name[align.names[i]], split="test") for i in test], ds.root, ds.source, ds.labels
    )
    mods = collect_modalities(outer_ds, cache, SETTINGS, priors=priors, remember=False)
    assert [s.name for s in mods.samples] == [align.names[i] for i in test], "an outer card lost a modality"
    encoder = build_encoders(get_profile("quick").encoders)[2]
    out = llm.copy()
    out[test] = text_features(mods.llm_texts, encoder, cache, "llm")
    return out


def train_pfa_embeddings(raw: dict, fit: np.ndarray, prof, seed: int) -> dict:
    from asectl.models.pfa import train_pfa

    return train_pfa(raw, prof.pfa, seed, train_index=fit.tolist()).stages[-1].embeddings


def score(rows: list[dict], method: str, on_test: bool = False) -> dict:
    """Pooled figures of one candidate on the outer folds (or, ``on_test``, on the test split: each outer
    fold's fitted candidate classifies the same test cards, so those are counted once per outer fold)."""
    from asectl.metrics import macro_f1_from_codes
    from asectl.models.calibration import DecisionRule, decision_stats, expected_calibration_error

    if on_test:
        rows = [
            {**r, "y": r["test_y"], "methods": {m: {**v, "probs": r["test_probs"][m]} for m, v in r["methods"].items()}}
            for r in rows
        ]
    per, ys, ps = [], [], []
    for r in rows:
        m = r["methods"][method]
        p, y = np.asarray(m["probs"]), np.asarray(r["y"])
        rule = DecisionRule.from_dict(m["rule"])
        per.append(decision_stats(rule.decide(p), y, p.argmax(1), r["classes"]))
        ys.append(y)
        ps.append(p)
    y, p = np.concatenate(ys), np.concatenate(ps)
    tot = {k: sum(d[k] for d in per) for k in ("n", "n_defective", "n_missed", "n_defect_decisions", "n_wrong_defect")}
    tot["n_review"] = sum(d["counts"]["review"] for d in per)
    f1 = [
        macro_f1_from_codes(r["y"], np.asarray(r["methods"][method]["probs"]).argmax(1), len(r["classes"]))
        for r in rows
    ]
    return {
        **tot,
        "ece": expected_calibration_error(p, y),
        "accuracy": float((p.argmax(1) == y).mean()),
        "macro_f1_mean": float(np.mean(f1)),
        "macro_f1_sd": float(np.std(f1, ddof=1)) if len(f1) > 1 else 0.0,
    }


def _ci(k: int, n: int) -> str:
    from scipy.stats import binomtest

    if not n:
        return "n/a"
    lo, hi = binomtest(k, n).proportion_ci(0.95, method="exact")
    return f"{k}/{n} = {100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--outer-priors",
        choices=["all", "inner"],
        default="all",
        help="the outer fold's LLM texts: as cached (priors of every training card) or answered "
        "again with priors of the inner cards only, as a new card's are",
    )
    ap.add_argument(
        "--diagnose-test",
        action="store_true",
        help="also classify the test split with every fitted candidate: reads the test split, to "
        "see whether it behaves like the outer folds (never used to choose)",
    )
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    jobs = [(s, k, args.cache_dir, args.outer_priors, args.diagnose_test) for s in seeds for k in range(FOLDS)]
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(run_outer, jobs))
    total = time.perf_counter() - t0
    scores = {m: score(rows, m) for m in METHODS}
    test_scores = {m: score(rows, m, on_test=True) for m in METHODS} if args.diagnose_test else None
    inner = args.outer_priors == "inner"
    suffix = ("-inner-priors" if inner else "") + ("-test" if args.diagnose_test else "")
    summary = {
        "seeds": seeds,
        "outer_priors": args.outer_priors,
        "folds": FOLDS,
        "validation_share": VALIDATION_SHARE,
        "scores": scores,
        "test_scores": test_scores,
        "seconds": total,
    }
    save("calibration_method" + suffix, summary, raw={**summary, "rows": rows})

    def table(scores: dict) -> str:
        out = [
            "| candidate | miss rate (target <= 1 %) | defect error (target <= 5 %) | review share | ECE | "
            "accuracy | macro-F1 (mean ± sd over fits) |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, s in scores.items():
            out.append(
                f"| {m} | {_ci(s['n_missed'], s['n_defective'])} | "
                f"{_ci(s['n_wrong_defect'], s['n_defect_decisions'])} | {100 * s['n_review'] / s['n']:.1f}% | "
                f"{s['ece']:.3f} | {100 * s['accuracy']:.1f}% | {100 * s['macro_f1_mean']:.2f} ± "
                f"{100 * s['macro_f1_sd']:.2f} |"
            )
        return "\n".join(out)

    priors_note = (
        "The outer fold's LLM texts were answered again with priors of the inner cards only, as a new card's are."
        if inner
        else "The outer fold's LLM texts are the cached ones (priors of "
        "every training card, the outer fold's included)."
    )
    test_note = (
        "The test split is not read."
        if test_scores is None
        else "Diagnosis only (nothing is chosen on it): every fitted candidate also classified the test "
        "split, second table (the same 130 test cards per seed, counted once per outer fold)."
    )
    md = f"""### How the temperature and thresholds are fitted (training split{
        " and, for diagnosis, test split" if test_scores else " only"
    }, {len(seeds)} seeds{", outer fold answered with inner priors" if inner else ""})

Seeds {", ".join(map(str, seeds))}; each seed's 325 training cards cut into {FOLDS} outer folds (stratified),
each outer fold classified by every candidate fitted on the other four ({FOLDS} inner folds; validation
share {VALIDATION_SHARE:.0%}); counts summed over outer folds and seeds, 95% exact binomial intervals.
Targets: `--max-miss-rate 0.01`, `--max-defect-error 0.05`. {priors_note} {test_note}
Run time {total / 60:.1f} min.

Outer folds:

{table(scores)}
"""
    if test_scores:
        md += f"""
Test split, classified by the same fits:

{table(test_scores)}
"""
    update_section("calibration-method" + suffix, md)
    print(md)


if __name__ == "__main__":
    main()
