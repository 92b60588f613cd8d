"""The paper's ablation tables 4 (PFA stride) and 5 (fusion strategy), and the module rows of its table 3
that need no TDA copy, on the shipped default, on the test split.

    python bench/paper_tables.py [--seeds 0,1,2,3,4] [--cache-dir C]

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
cards. No row's result chose anything: the defaults were chosen on training folds before this ran. TDA rows
(table 3) need the TDA copy of every seed's cards and their modalities (bench/quality.py makes them); they are
not part of this run. Results: bench/results/paper_tables.json and the ``paper-tables`` section of
docs/benchmarks.md."""

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    started = time.perf_counter()
    cache = Cache(Path(args.cache_dir))
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed: dict = {}
    for seed in seeds:
        ds = load_dataset(dataset(seed))
        test = Dataset(ds.split("test"), ds.root, ds.source, ds.labels)
        per_seed[seed] = {}
        for name, over in ROWS.items():
            per_seed[seed][name] = score_fused(ds, test, cache, seed, over)[0]
            print(seed, name, round(100 * per_seed[seed][name]["macro_f1"], 2), flush=True)
    rec = summarise(per_seed, seeds, [(DEFAULT, row) for row in ROWS if row != DEFAULT])
    rec["settings"] = ROWS
    publish("paper_tables", rec, started, render, docs=not args.no_docs)


def render(rec: dict) -> str:
    return markdown(rec, "The paper's tables 3 (without TDA), 4 and 5 on the default")


if __name__ == "__main__":
    main()
