"""Frozen against end-to-end projection heads (``fusion.projections``) by cross-validation on the training split.

    python bench/choose_heads.py --data D --cache-dir DIR

Only the training split of D is read. The modalities are those of the whole training split, as in
choose_branches.py (the LLM's class priors come from every training card; see its docstring). For each of
the stratified folds (tune_profile.py's ``training_folds``), as ``align`` would on the fold's other cards:
the image encoder (the quick profile's ``cards-cnn``) trains on them, PFA trains on them (the held-out cards
are only embedded), and one fusion model per setting trains on them and classifies the held-out fold
(tune_profile.py's ``Scorer``: both settings share each fold's alignment). The settings differ only in
``fusion.projections``: ``frozen`` (the heads as PFA left them) or ``end-to-end`` (asectl/models/adapters.py:
the heads fine-tune at ``fusion.projections_lr``, two adapters on the text branches). Everything else is
the quick profile. Results: bench/results/choose_heads.json and the ``choose-heads`` section of
docs/benchmarks.md."""

from __future__ import annotations

import time

from _common import SETTINGS, save, update_section
from asectl.cache import Cache
from asectl.domain.dataset import Dataset
from choose_branches import cv_arguments, score_candidates
from tune_profile import summarise, training_folds

# The default rate of the heads (a tenth of the fusion's), and the fusion's own rate for them.
CANDIDATES = [
    {"fusion.projections": "frozen"},
    {"fusion.projections": "end-to-end"},
    {"fusion.projections": "end-to-end", "fusion.projections_lr": 3e-3},
]


def folds_with_features(dataset: Dataset, cache: Cache, folds: int, fold_seed: int) -> list[dict]:
    """Fold dicts (tune_profile.py's shape): the training split's modalities once, and per fold the
    encoder features as align computes them with the fold's other cards as its training cards."""
    from asectl.models.train_config import get_profile
    from asectl.stages.align import encode_for_training
    from asectl.stages.modalities import build_encoders, collect_modalities

    train_only = Dataset(dataset.split("train"), dataset.root, dataset.source, dataset.labels)
    mods = collect_modalities(train_only, cache, SETTINGS, remember=False)
    enc = get_profile("quick").encoders
    index = {s.name: i for i, s in enumerate(mods.samples)}
    out = []
    for fold in training_folds(train_only, folds, fold_seed):
        held = {s.name for s in fold.samples if s.split == "test"}
        inner = [index[s.name] for s in fold.samples if s.name in index and s.name not in held]
        feats, _, _ = encode_for_training(mods, build_encoders(enc), cache, inner, seed=0, branches=enc.branches)
        out.append(
            {
                "feats": feats,
                "labels": [s.label for s in mods.samples],
                "inner": inner,
                "held": [index[s.name] for s in fold.samples if s.name in index and s.name in held],
                "dropped": len(mods.dropped),
            }
        )
    return out


def main() -> None:
    args = cv_arguments(__doc__.split("\n\n")[0]).parse_args()
    t0 = time.perf_counter()
    dataset, classes, seeds, _, rows = score_candidates(args, CANDIDATES, folds_with_features)
    frozen = rows[0]["scores"]
    for r in rows[1:]:  # paired by fold and seed: the same alignment under both
        r["minus_frozen"] = summarise([b - a for a, b in zip(frozen, r["scores"])])
    record = {
        "data": args.data,
        "folds": args.folds,
        "fold_seed": args.fold_seed,
        "seeds": seeds,
        "n_train_cards": len(dataset.split("train")),
        "classes": classes,
        "results": rows,
        "seconds": time.perf_counter() - t0,
    }
    save("choose_heads", record)
    text = markdown(record)
    if not args.no_docs:
        update_section("choose-heads", text)
    print(text)


def markdown(rec: dict) -> str:
    pct = lambda r: f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"  # noqa: E731
    n = len(rec["results"][0]["scores"])
    lines = [
        f"### Frozen or end-to-end projection heads ({rec['folds']}-fold cross-validation on the training split)",
        "",
        f"Data: `{rec['data']}`; only its {rec['n_train_cards']} training cards were read. Folds "
        f"stratified with seed {rec['fold_seed']}; training seeds {', '.join(map(str, rec['seeds']))}; the "
        "quick profile otherwise (four branches, concatenation, fusion lr 3e-3); 5-class macro-F1 on the "
        f"held-out fold, mean ± std over {n} fold x seed runs, one fusion model per fold. Run time: "
        f"{rec['seconds'] / 60:.1f} min.",
        "",
        "| heads | heads' lr | macro-F1 (held-out folds) | minus frozen, paired (standard error) |",
        "|---|---|---|---|",
    ]
    for r in rec["results"]:
        st, d = r["setting"], r.get("minus_frozen")
        lr = "-" if st["fusion.projections"] == "frozen" else f"{st.get('fusion.projections_lr', 3e-4):g}"
        diff = "" if d is None else f"{100 * d['mean']:+.2f} ({100 * d['sem']:.2f})"
        lines.append(f"| {st['fusion.projections']} | {lr} | {pct(r)} | {diff} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
