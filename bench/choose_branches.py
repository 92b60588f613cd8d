"""Choose the quick profile's branches and CMAF attention by cross-validation on the training split.

    python bench/choose_branches.py --data D --cache-dir bench/out/cache

Only the training split of D is read. Its cards are cut into stratified folds (bench/tune_profile.py's
``training_folds``); for each fold, PFA trains on the other folds (the held-out cards are only embedded)
and one fusion model trains on the other folds and classifies the held-out cards, as in tune_profile.py
(its ``Scorer``). The candidates: the paper's three branches with chunk attention (the earlier default)
or token attention, the three plus the OCR'd numbers (``stats``) with token attention or concatenation,
and image + stats alone. Beside them, as yardsticks on the same folds: gradient boosting on the OCR'd
numbers, and on the numbers plus k principal components of the frozen image features (PCA fitted on
the fold's training cards; k chosen here too).

One difference from tune_profile.py, for time: the modalities are those of the whole training split, so
the LLM's prompt carries class priors from every training card, the held-out fold's included (the
held-out labels reach the LLM text as class statistics, never card by card). tune_profile.py recomputes
the LLM answers per fold instead. Results: bench/results/choose_branches.json and the
``choose-branches`` section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import numpy as np

from _common import OUT, SETTINGS, save, update_section
from asectl.cache import Cache  # noqa: E402
from asectl.domain.dataset import Dataset, load_dataset, order_labels  # noqa: E402
from tune_profile import Scorer, macro_f1, summarise, training_folds

# Every key named, so a candidate means the same whatever the profile's defaults are.
CANDIDATES = [
    {"encoders.branches": "image,vlm,llm", "fusion.variant": "cmaf", "fusion.attention": "chunks"},
    {"encoders.branches": "image,vlm,llm", "fusion.variant": "cmaf", "fusion.attention": "tokens"},
    {"encoders.branches": "image,vlm,llm,stats", "fusion.variant": "cmaf", "fusion.attention": "tokens"},
    {"encoders.branches": "image,vlm,llm,stats", "fusion.variant": "concat", "fusion.attention": "tokens"},
    {"encoders.branches": "image,stats", "fusion.variant": "cmaf", "fusion.attention": "tokens"},
]
PCS = [4, 8, 16]


def shared_folds(dataset: Dataset, cache: Cache, folds: int, fold_seed: int) -> list[dict]:
    """Fold dicts (tune_profile.py's shape) over one set of features of the training split."""
    from asectl.models.train_config import get_profile
    from asectl.stages.modalities import build_encoders, collect_modalities, encode_modalities

    train_only = Dataset(dataset.split("train"), dataset.root, dataset.source, dataset.labels)
    mods = collect_modalities(train_only, cache, SETTINGS, remember=False)
    feats = encode_modalities(mods, build_encoders(get_profile("quick").encoders), cache)
    index = {s.name: i for i, s in enumerate(mods.samples)}
    out = []
    for fold in training_folds(train_only, folds, fold_seed):
        held = {s.name for s in fold.samples if s.split == "test"}
        out.append(
            {
                "feats": feats,
                "labels": [s.label for s in mods.samples],
                "inner": [index[s.name] for s in fold.samples if s.name in index and s.name not in held],
                "held": [index[s.name] for s in fold.samples if s.name in index and s.name in held],
                "dropped": len(mods.dropped),
            }
        )
    return out


def boosting_scores(folds: list[dict], seeds: list[int], classes: list[str], pcs: int) -> list[float]:
    """Gradient boosting on the OCR'd numbers (``pcs`` = 0) or on them plus ``pcs`` principal components
    of the image features, PCA fitted on the fold's training cards."""
    from sklearn.decomposition import PCA
    from sklearn.ensemble import HistGradientBoostingClassifier

    out = []
    for seed in seeds:
        for fold in folds:
            inner, held = fold["inner"], fold["held"]
            x = fold["feats"]["stats"]
            if pcs:
                pca = PCA(pcs, random_state=seed).fit(fold["feats"]["image"][inner])
                x = np.hstack([x, pca.transform(fold["feats"]["image"])])
            gb = HistGradientBoostingClassifier(random_state=seed).fit(x[inner], [fold["labels"][i] for i in inner])
            out.append(macro_f1([fold["labels"][i] for i in held], list(gb.predict(x[held])), classes))
    return out


def cv_arguments(description: str) -> argparse.ArgumentParser:
    """The options of a cross-validation on the training split (this script's and choose_heads.py's)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data", required=True, help="a labelled dataset folder; only its training split is read")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--fold-seed", type=int, default=0)
    ap.add_argument("--seeds", default="0", help="training seeds")
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument("--no-docs", action="store_true")
    return ap


def score_candidates(
    args: argparse.Namespace, candidates: list[dict], make_folds: Callable[[Dataset, Cache, int, int], list[dict]]
) -> tuple:
    """The dataset, its training classes, the training seeds, the folds (``make_folds``) and one row per
    candidate setting with its cross-validated scores (tune_profile.py's ``Scorer``)."""
    import torch

    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    dataset = load_dataset(args.data)
    classes = order_labels(s.label for s in dataset.split("train"))
    folds = make_folds(dataset, Cache(args.cache_dir), args.folds, args.fold_seed)
    print(f"modalities ready in {time.perf_counter() - t0:.0f} s", flush=True)
    scorer = Scorer(folds, seeds, classes)
    rows = []
    for setting in candidates:
        rows.append({"setting": setting, **summarise(scorer.scores(setting))})
        print(setting, f"{100 * rows[-1]['mean']:.2f}", f"at {time.perf_counter() - t0:.0f} s", flush=True)
    return dataset, classes, seeds, folds, rows


def main() -> None:
    ap = cv_arguments(__doc__.split("\n\n")[0])
    ap.add_argument(
        "--name",
        default="choose-branches",
        help="results file and docs section (another name keeps a run on other cards apart)",
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    dataset, classes, seeds, folds, rows = score_candidates(args, CANDIDATES, shared_folds)
    ranked = sorted(rows, key=lambda r: -r["mean"])
    yardsticks = {
        f"gradient boosting on the OCR'd numbers{f' + {k} image PCs' if k else ''}": summarise(
            boosting_scores(folds, seeds, classes, k)
        )
        for k in [0, *PCS]
    }
    best_pcs = max(PCS, key=lambda k: yardsticks[f"gradient boosting on the OCR'd numbers + {k} image PCs"]["mean"])
    record = {
        "data": str(Path(args.data).resolve()),
        "folds": args.folds,
        "fold_seed": args.fold_seed,
        "seeds": seeds,
        "n_train_cards": len(dataset.split("train")),
        "classes": classes,
        "results": ranked,
        "chosen": ranked[0]["setting"],
        "yardsticks": yardsticks,
        "chosen_pcs": best_pcs,
        "seconds": time.perf_counter() - t0,
    }
    save(args.name.replace("-", "_"), record)
    text = markdown(record)
    if not args.no_docs:
        update_section(args.name, text)
    print(text)


def markdown(rec: dict) -> str:
    pct = lambda r: f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"  # noqa: E731
    n = len(rec["results"][0]["scores"])
    lines = [
        f"### Branches and attention chosen on the training split ({rec['folds']}-fold cross-validation)",
        "",
        f"Data: `{rec['data']}`; only its {rec['n_train_cards']} training cards were read. Folds stratified "
        f"with seed {rec['fold_seed']}; training seeds {', '.join(map(str, rec['seeds']))}; 5-class macro-F1 "
        f"on the held-out fold, mean ± std over {n} fold x seed runs; one fusion model per fold (no fold "
        "ensemble, no TDA). The LLM text's class priors come from the whole training split (see the "
        f"script's docstring). Run time: {rec['seconds'] / 60:.1f} min.",
        "",
        "| rank | branches | fusion | macro-F1 (held-out folds) |",
        "|---|---|---|---|",
    ]
    for k, r in enumerate(rec["results"], 1):
        st = r["setting"]
        fusion = (
            "concat"
            if st.get("fusion.variant") == "concat"
            else f"{st.get('fusion.variant', 'cmaf')}, attention {st.get('fusion.attention')}"
        )
        lines.append(f"| {k} | {st['encoders.branches']} | {fusion} | {pct(r)} |")
    lines += ["", "Yardsticks on the same folds:", "", "| method | macro-F1 (held-out folds) |", "|---|---|"]
    lines += [f"| {name} | {pct(r)} |" for name, r in rec["yardsticks"].items()]
    best = rec["results"][0]
    lines += [
        "",
        f"Chosen: {', '.join(f'`{k} = {v}`' for k, v in rec['chosen'].items())} "
        f"({100 * best['mean']:.2f}, standard error {100 * best['sem']:.2f}); image principal components "
        f"for the boosting yardstick: {rec['chosen_pcs']}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
