"""The paper's ablation tables 4 (PFA stride) and 5 (fusion strategy), and the module rows of its table 3
that need no TDA copy, on the shipped default, on the test split.

    python bench/paper_tables.py [--seeds 0,1,2,3,4] [--cache-dir C] [--tda]

Per generator seed: the default generated `field` cards (bench/out/ds-field-seed<N>, 325 train / 130 test),
the quick profile as shipped (PFA at stride 0.2, concatenation, the trees member), and the same with one
setting changed as the paper's tables change it (paper lines 246-261):

- Table 4, alignment: none (`pfa.mode none`), direct (`pfa.mode direct`, the whole training set at once),
  progressive 0.2/0.6/1, progressive 0.2/0.4/0.6/0.8/1 (the default);
- Table 5, fusion: direct concatenation (the default), CMAF without the sigmoid, CMAF with it (both with
  attention across modality tokens, the quick profile's attention, and the MLP classifier; the trees member
  stays in every row, since all keep the stats branch and frozen heads);
- Table 3's module rows without TDA: PFA off and CMAF on (with the sigmoid).

Each row is trained with `fuse-train` and scored through `asectl`'s own predictor, as bench/default_model.py
scores its rows (the default row is the same model as there). Macro-F1 per seed, a bootstrap interval over all
test cards, the line's figures at the stored targets, and paired differences (default minus row) on the same
cards. No row's result chose anything: the defaults were chosen on training folds before this ran. With
``--tda``, also table 3's TDA rows: the default and CMAF with the sigmoid trained on each seed's TDA copy
(bench/out/ds-field-seed<N>-tda, factor 2, made here once; its 910 cards' modalities, LLM answers included, are
computed on the first run, about 10 minutes a seed on 2 cores). Results: bench/results/paper_tables.json and the
``paper-tables`` section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import OUT, dataset, publish
from asectl.cache import Cache
from asectl.domain.dataset import Dataset, load_dataset
from default_model import DEFAULT_SETTINGS, markdown, score_fused, summarise

DEFAULT = "default: PFA 0.2/0.4/0.6/0.8/1, direct concatenation"
ROWS = {
    DEFAULT: DEFAULT_SETTINGS,
    "table 4: without alignment": {**DEFAULT_SETTINGS, "pfa.mode": "none"},
    "table 4: direct alignment (whole)": {**DEFAULT_SETTINGS, "pfa.mode": "direct"},
    "table 4: PFA 0.2/0.6/1": {**DEFAULT_SETTINGS, "pfa.strides": "0.2/0.6/1"},
    "table 5: CMAF without sigmoid": {**DEFAULT_SETTINGS, "fusion.variant": "cmaf-nosigmoid"},
    "table 5: CMAF with sigmoid": {**DEFAULT_SETTINGS, "fusion.variant": "cmaf"},
    "table 3: CMAF with sigmoid, without alignment": {
        **DEFAULT_SETTINGS,
        "fusion.variant": "cmaf",
        "pfa.mode": "none",
    },
}


# Table 3's TDA rows (with --tda): trained on each seed's TDA copy (bench/quality.py's recipe: factor 2, the
# copies' statistics from the OCR'd records), the paper's full method on the default's branches last.
TDA_ROWS = {
    "table 3: default with TDA": DEFAULT_SETTINGS,
    "table 3: CMAF with sigmoid, PFA and TDA": {**DEFAULT_SETTINGS, "fusion.variant": "cmaf"},
}


def tda_copy(root: Path, seed: int, cache: Cache) -> Path:
    """A seed's TDA copy (bench/out/ds-field-seed<N>-tda), made once (deterministic)."""
    from asectl.stages.synth import run_augment

    aug = OUT / f"{root.name}-tda"
    if not (aug / "labels.csv").exists():
        run_augment(root, aug, factor=2.0, seed=seed, stats_source="ocr", cache=cache, force=True)
    return aug


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--tda", action="store_true", help="also table 3's TDA rows (each seed's TDA copy is made)")
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    started = time.perf_counter()
    cache = Cache(Path(args.cache_dir))
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed: dict = {}
    rows = {**ROWS, **(TDA_ROWS if args.tda else {})}
    for seed in seeds:
        root = dataset(seed)
        ds = load_dataset(root)
        test = Dataset(ds.split("test"), ds.root, ds.source, ds.labels)
        per_seed[seed] = {}
        for name, over in rows.items():
            aug = tda_copy(root, seed, cache) if name in TDA_ROWS else None
            per_seed[seed][name] = score_fused(ds, test, cache, seed, over, aug)[0]
            print(seed, name, round(100 * per_seed[seed][name]["macro_f1"], 2), flush=True)
    rec = summarise(per_seed, seeds, [(DEFAULT, row) for row in rows if row != DEFAULT])
    rec["settings"] = rows
    publish("paper_tables", rec, started, render, docs=not args.no_docs)


def render(rec: dict) -> str:
    if any(name in TDA_ROWS for name in rec["settings"]):
        return markdown(rec, "The paper's tables 3, 4 and 5 on the default", "TDA in the rows that say so")
    return markdown(rec, "The paper's tables 3 (without TDA), 4 and 5 on the default")


if __name__ == "__main__":
    main()
