"""The shipped default against the earlier default, the printed numbers alone and the oracle, on the test split.

    python bench/default_model.py [--seeds 0] [--cache-dir C] [--rows default]

Per generator seed: the default generated `field` cards (bench/out/ds-field-seed<N>, 325 train / 130 test), the
quick profile as shipped, with the trees member at scikit-learn's defaults (the previous default: no
`fusion.trees_l2`, 31 leaves), without the dot pattern's numbers and the trees member (the earlier default),
without the llm branch (`encoders.branches image,vlm,stats`: no LLM at training or prediction), and with each
other part of the default off in turn (the stats branch, the trained image encoder, concatenation for CMAF token
attention, frozen heads for heads trained end to end), each trained with
`fuse-train` and scored on the test split through `asectl`'s own predictor (the calibrated fold-model average and
the stored decision rule, as `report` and `predict` use them); gradient boosting on the OCR'd printed numbers, on
the dot pattern's measured numbers (an image-only model) and on both (the strong simple alternative); and the
oracle (accuracy-optimal: the most probable label given the true latent parameters, with its own decision rule
chosen on the training cards' posteriors, bench/oracle.py). Macro-F1, paired bootstrap differences over the same
test cards (bench/intervals.py), and the line's figures at the stored targets: review share, miss rate, defect
error. Every setting was chosen on training folds before this script read a test card. Results:
bench/results/default_model.json and the ``default-model`` section of docs/benchmarks.md.

``--rows default``: the shipped default alone with the boosting rows and the oracle, one model per seed (a
cold five-seed rerun of the headline: 47 minutes on 2 cores, most of it the cards' modalities); its results
go to bench/results/default_model-default.json and the ``default-model-default`` section."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import oracle
from _common import OUT, dataset, save, train_quick, update_section
from asectl.cache import Cache
from asectl.domain.dataset import Dataset, load_dataset
from asectl.metrics import macro_f1_from_codes
from asectl.models.calibration import decision_stats
from intervals import bootstrap_interval, paired_test

CLASSES = ["normal", "type1", "type2", "type3", "type4"]
DEFAULT = "default (dot pattern in the stats branch, regularized trees member)"
PREVIOUS = "previous default (trees with scikit-learn's defaults)"
EARLIER = "earlier default (printed numbers only, no trees)"
NO_LLM = "default without the llm branch"
# Every row names all the settings it changes: fuse-train keeps a dataset's earlier alignment overrides.
FOUR = "image,vlm,llm,stats"
ROWS = {
    DEFAULT: {"encoders.branches": FOUR, "encoders.dot_pattern": True, "fusion.numbers_trees": True},
    PREVIOUS: {
        "encoders.branches": FOUR,
        "encoders.dot_pattern": True,
        "fusion.numbers_trees": True,
        "fusion.trees_l2": 0.0,
        "fusion.trees_max_leaf_nodes": 31,
    },
    EARLIER: {"encoders.branches": FOUR, "encoders.dot_pattern": False, "fusion.numbers_trees": False},
    NO_LLM: {"encoders.branches": "image,vlm,stats", "encoders.dot_pattern": True, "fusion.numbers_trees": True},
}
# Each part of the default off in turn, the rest as the default (the trees member needs the stats branch and
# frozen heads, so it is off in the rows without them; CMAF and end-to-end heads train the MLP classifier).
DEFAULT_SETTINGS = ROWS[DEFAULT]
ABLATIONS = {
    "default without the stats branch": {**DEFAULT_SETTINGS, "encoders.branches": "image,vlm,llm"},
    "default with the frozen ImageNet image encoder": {**DEFAULT_SETTINGS, "encoders.image": "efficientnet-lite0"},
    "default with CMAF token attention": {**DEFAULT_SETTINGS, "fusion.variant": "cmaf"},
    "default with heads trained end to end": {**DEFAULT_SETTINGS, "fusion.projections": "end-to-end"},
}
ROWS.update(ABLATIONS)
BOOSTING = "gradient boosting on the OCR'd numbers"
BOOSTING_DOTS = "gradient boosting on the dot pattern's numbers (image only)"
BOOSTING_BOTH = "gradient boosting on the printed and the dot pattern's numbers"
ORACLE = "oracle (accuracy-optimal, true latent parameters)"


def score_fused(
    ds: Dataset, test: Dataset, cache: Cache, seed: int, over: dict, augmented: Path | None = None
) -> tuple[dict, object]:
    """Train the quick profile with ``over`` on ``ds`` (its TDA copy ``augmented`` if given; training seed
    ``seed``) and score ``test`` through ``asectl``'s own predictor: labels, macro-F1 and the stored decision
    rule's line figures; and the run."""
    from asectl.stages.predict import Predictor

    # the training seed is the generator seed, as bench/calibration.py and bench/quality.py train
    res = train_quick(ds, cache, seed, over, augmented)
    predictor = Predictor(res.bundle, cache)
    preds = predictor.classify(test)
    probs = predictor.probabilities(preds.logits)
    truth = {s.name: s.label for s in test.samples}
    y = np.array([CLASSES.index(truth[s.name]) for s in preds.samples])
    decisions = predictor.rule.decide(probs)
    return {
        "y_true": [CLASSES[i] for i in y],
        "y_pred": [CLASSES[i] for i in probs.argmax(axis=1)],
        "macro_f1": macro_f1_from_codes(y, probs.argmax(axis=1), 5),
        "decisions": decision_stats(decisions, y, probs.argmax(axis=1), CLASSES),
        "held_out": res.bundle.operating_point()[1],
        "n_dropped": len(preds.dropped),
    }, res


def measured_columns(fields: list[str]) -> np.ndarray:
    """Which entries of a stats vector (a bundle's ``stats_fields``) the dot pattern measured; the rest are
    the printed numbers."""
    return np.array([f.startswith("dots.") for f in fields])


def decision_cells(decisions: list[dict]) -> tuple[str, str, str, str]:
    """The line's figures of a row over seeds (``decision_stats`` per seed) as table cells: review share,
    missed / defective, wrong / `defect` decisions, normal / `defective` decisions ("-" when not measured)."""
    dec = [d for d in decisions if d]
    if not dec:
        return "-", "-", "-", "-"
    n = sum(d["n"] for d in dec)
    review = f"{sum(d['counts']['review'] for d in dec)}/{n}"
    miss = f"{sum(d['n_missed'] for d in dec)}/{sum(d['n_defective'] for d in dec)}"
    derr = f"{sum(d['n_wrong_defect'] for d in dec)}/{sum(d['n_defect_decisions'] for d in dec)}"
    false_defective = (  # runs from before the `defective` decision have no such figures
        f"{sum(d['n_wrong_defective'] for d in dec)}/{sum(d['n_defective_decisions'] for d in dec)}"
        if all("n_defective_decisions" in d for d in dec)
        else "-"
    )
    return review, miss, derr, false_defective


def numbers_rows(align, fields: list[str], test: Dataset, seed: int) -> tuple[dict, list[int], list[str]]:
    """Gradient boosting on the printed numbers, on the dot pattern's measured numbers (an image-only model)
    and on both, from the stats vectors of a default model's align entry (``fields``: the bundle's
    ``stats_fields``): {row: {"y_true", "y_pred", "macro_f1"}}, the training rows and the test cards' names
    (the same cards in the same order as the fused model's)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    stats = align.raw_features()["stats"]
    measured = measured_columns(fields)
    tr = [i for i, s in enumerate(align.splits) if s == "train"]
    index = {n: i for i, n in enumerate(align.names)}
    test_names = [s.name for s in test.samples if s.name in index]
    te = [index[n] for n in test_names]
    y_tr = [align.labels[i] for i in tr]
    out = {}
    for row, columns in ((BOOSTING, ~measured), (BOOSTING_DOTS, measured), (BOOSTING_BOTH, measured | ~measured)):
        gb = HistGradientBoostingClassifier(random_state=seed).fit(stats[tr][:, columns], y_tr)
        y_true, y_pred = [align.labels[i] for i in te], list(gb.predict(stats[te][:, columns]))
        out[row] = {
            "y_true": y_true,
            "y_pred": y_pred,
            "macro_f1": macro_f1_from_codes([CLASSES.index(c) for c in y_true], [CLASSES.index(c) for c in y_pred], 5),
        }
    return out, tr, test_names


def run_seed(seed: int, cache: Cache, rows: dict | None = None) -> dict:
    """Every row of ``rows`` (default ``ROWS``, which must include ``DEFAULT``) trained and scored on the seed's
    test split, with the boosting rows and the oracle."""
    from asectl.domain.synth import read_truth

    root = dataset(seed)
    ds = load_dataset(root)
    test = Dataset(ds.split("test"), ds.root, ds.source, ds.labels)
    out: dict = {}
    for name, over in (rows or ROWS).items():
        out[name], res = score_fused(ds, test, cache, seed, over)
        if name == DEFAULT:
            default_align, default_fields = res.align, res.bundle.config["stats_fields"]
    # The numbers: the default's align entry's stats vectors, printed then measured (every card; the same
    # cards in the same order).
    numbers, tr, test_names = numbers_rows(default_align, default_fields, test, seed)
    out.update(numbers)
    align = default_align
    y_tr = [align.labels[i] for i in tr]
    latents = read_truth(root)
    floor = oracle.rule_on_posteriors(
        [latents[align.names[i]]["latent"] for i in tr],
        y_tr,
        [latents[n]["latent"] for n in test_names],
        out[BOOSTING]["y_true"],
        CLASSES,
    )
    out[ORACLE] = {
        "y_true": [CLASSES[i] for i in floor["y_test"]],
        "y_pred": [CLASSES[i] for i in floor["p_test"].argmax(axis=1)],
        "decisions": floor["test"],
    }
    out[ORACLE]["macro_f1"] = macro_f1_from_codes(floor["y_test"], floor["p_test"].argmax(axis=1), 5)
    if len(out[DEFAULT]["y_true"]) != len(test_names):
        raise SystemExit(
            f"seed {seed}: the fused model scored {len(out[DEFAULT]['y_true'])} test cards, the numbers "
            f"{len(test_names)}: compare on the same cards"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument(
        "--rows",
        choices=["all", "default"],
        default="all",
        help="default: the shipped default alone with the boosting rows and the oracle, saved apart",
    )
    args = ap.parse_args()
    cache = Cache(Path(args.cache_dir))
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, name, title = {
        "all": (ROWS, "default_model", "The default on the test split"),
        "default": ({DEFAULT: ROWS[DEFAULT]}, "default_model-default", "The shipped default alone on the test split"),
    }[args.rows]
    per_seed = {seed: run_seed(seed, cache, rows) for seed in seeds}
    pairs = [
        *((DEFAULT, row) for row in rows if row != DEFAULT),
        (DEFAULT, BOOSTING),
        (DEFAULT, BOOSTING_DOTS),
        (DEFAULT, BOOSTING_BOTH),
        (ORACLE, DEFAULT),
    ]
    rec = summarise(per_seed, seeds, pairs)
    save(name, rec)
    if not args.no_docs:
        update_section(name.replace("_", "-"), markdown(rec, title=title))


def summarise(per_seed: dict, seeds: list[int], pairs: list[tuple[str, str]]) -> dict:
    """Per row: macro-F1 per seed, the bootstrap interval over all seeds' test cards and the line figures;
    the paired differences ``pairs`` (a minus b) on the same cards; the per-card labels."""
    rows = list(next(iter(per_seed.values())))
    summary = {}
    for row in rows:
        preds = [(per_seed[s][row]["y_true"], per_seed[s][row]["y_pred"]) for s in seeds]
        summary[row] = {
            "macro_f1": [per_seed[s][row]["macro_f1"] for s in seeds],
            "interval": bootstrap_interval(CLASSES, preds),
            "decisions": [per_seed[s][row].get("decisions") for s in seeds],
        }
        print(row, summary[row]["macro_f1"], flush=True)
    tests = {
        f"{a} vs {b}": paired_test(
            CLASSES,
            [(per_seed[s][a]["y_true"], per_seed[s][a]["y_pred"]) for s in seeds],
            [(per_seed[s][b]["y_true"], per_seed[s][b]["y_pred"]) for s in seeds],
        )
        for a, b in pairs
    }
    return {
        "seeds": seeds,
        "rows": summary,
        "paired": tests,
        "per_card": {s: {r: {k: per_seed[s][r][k] for k in ("y_true", "y_pred")} for r in rows} for s in seeds},
    }


def markdown(rec: dict, title: str = "The default on the test split", tda: str = "no TDA") -> str:
    seeds = ", ".join(str(s) for s in rec["seeds"])
    lines = [
        f"### {title} (seeds {seeds}, `field`, {tda})",
        "",
        "| method | 5-class macro-F1 (per seed) | 95% interval | review share | miss rate | defect error | "
        "defective decisions: normal cards among them |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rec["rows"].items():
        v = 100 * np.asarray(r["macro_f1"])
        review, miss, derr, false_defective = decision_cells(r["decisions"])
        lo, hi = r["interval"]
        lines.append(
            f"| {name} | {v.mean():.2f} ({', '.join(f'{x:.1f}' for x in v)}) | [{100 * lo:.1f}, "
            f"{100 * hi:.1f}] | {review} | {miss} | {derr} | {false_defective} |"
        )
    lines += ["", "Paired differences (5-class macro-F1, same test cards, 95% paired bootstrap):", ""]
    for name, t in rec["paired"].items():
        lines.append(
            f"- {name}: {100 * t['difference']:+.2f} [{100 * t['low']:+.2f}, {100 * t['high']:+.2f}], "
            f"p = {t['p_value']:.3f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
