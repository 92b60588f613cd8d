"""Choose the quick profile's learning rates, loss weighting and ranking warm-up without the test split.

    python bench/tune_profile.py --data D                 # the full grid, 3 folds, training seeds 0 and 1
    python bench/tune_profile.py --data D --small         # a 2 x 2 x 2 grid (a quick check)

Only the training split of D is loaded: the test cards are never read, processed or scored. The
training split is cut into stratified folds (``--fold-seed``); for each fold the held-out cards play the
part the test split plays in ``asectl align`` / ``fuse-train``: the LLM's priors come from the other
folds' cards only, PFA trains on the other folds (the held-out cards are only embedded), fusion trains
on the other folds, and the held-out cards are classified. A setting's score is its 5-class macro-F1 on
the held-out cards, averaged over folds and training seeds. Encoder features are frozen and cached, so
the grid only trains the projections and the fusion network (one torch thread).

Step 1 is the grid over ``pfa.lr`` x ``fusion.lr`` x ``fusion.class_weight`` (the epochs stay the
paper's: 15 per PFA stage, 60 for fusion); the highest mean wins. Step 2 sets the ranking warm-up
(``pfa.rank_warmup_epochs``) with step 1's values. The warm-up exists so that stage 1 takes the pairs
whose texts fit their image least, and real cards carry no record of which pairs those are, so they
are planted: in each fold, 20% of the training pairs get the texts of a training card of another class
(seeded), and the share of them that stage 1 picks is measured (20% is chance). The fewest epochs
reaching 90% of the best share win. The macro-F1 of the whole chain (on unplanted features) is
reported beside it.

Results: bench/results/tune_profile.json (grid, seeds, folds, every score) and the ``tune-profile``
section of docs/benchmarks.md. The chosen values are the quick profile's defaults in
asectl/models/train_config.py."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import OUT, SETTINGS, save, update_section
from asectl.cache import Cache
from asectl.domain.dataset import Dataset, load_dataset, order_labels
from asectl.metrics import macro_f1

GRID = {"pfa.lr": [1e-3, 3e-3, 1e-2], "fusion.lr": [1e-3, 3e-3, 1e-2], "fusion.class_weight": ["none", "balanced"]}
SMALL_GRID = {"pfa.lr": [1e-3, 1e-2], "fusion.lr": [3e-3, 1e-2], "fusion.class_weight": ["none", "balanced"]}
# Values the paper does not give, checked one at a time around the grid's winner (step 1b).
ONE_AT_A_TIME = {"pfa.batch_size": [10, 32], "fusion.dropout": [0.0, 0.1, 0.3]}
WARMUPS = [0, 1, 2, 4, 8]
PLANTED_SHARE = 0.2  # share of training pairs given another class's texts (step 2), = stage 1's size
RECALL_SHARE = 0.9


def training_folds(dataset: Dataset, folds: int, seed: int) -> list[Dataset]:
    """The training split as ``folds`` datasets: the fold's cards marked ``test`` (held out), the rest
    ``train``. Stratified by label, seeded."""
    from sklearn.model_selection import StratifiedKFold

    train = dataset.split("train")
    labels = [s.label for s in train]
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = []
    for _, held in splitter.split(np.zeros(len(train)), labels):
        held_set = set(held.tolist())
        samples = [dataclasses.replace(s, split="test" if i in held_set else "train") for i, s in enumerate(train)]
        out.append(Dataset(samples, dataset.root, dataset.source, dataset.labels))
    return out


def fold_features(fold: Dataset, cache: Cache, overrides: dict | None = None) -> dict:
    """Features of one fold's cards, as align computes them: the LLM's priors come from the fold's
    training cards, and an image encoder that learns the cards (the quick profile's ``cards-cnn``) is
    trained on them (seed 0). ``overrides``: profile keys, e.g. ``{"encoders.image": "efficientnet-lite0"}``."""
    from asectl.models.train_config import get_profile
    from asectl.stages.align import encode_for_training
    from asectl.stages.modalities import build_encoders, collect_modalities

    mods = collect_modalities(fold, cache, SETTINGS, remember=False)
    inner = [i for i, s in enumerate(mods.samples) if s.split == "train"]
    enc = get_profile("quick", overrides).encoders
    feats, _, _ = encode_for_training(mods, build_encoders(enc), cache, inner, seed=0, branches=enc.branches)
    return {
        "feats": feats,
        "labels": [s.label for s in mods.samples],
        "inner": inner,
        "held": [i for i, s in enumerate(mods.samples) if s.split == "test"],
        "dropped": len(mods.dropped),
    }


def plant_mismatches(fold: dict, seed: int) -> tuple[dict, set[int]]:
    """The fold's features with ``PLANTED_SHARE`` of its training pairs made hard on purpose: their LLM
    and VLM features replaced by those of a training card of another class (seeded). Returns the
    features and the planted positions."""
    rng = np.random.default_rng(seed)
    inner, labels = fold["inner"], fold["labels"]
    planted = rng.choice(inner, size=int(np.ceil(PLANTED_SHARE * len(inner))), replace=False).tolist()
    feats = {m: a.copy() for m, a in fold["feats"].items()}
    for i in planted:
        donor = rng.choice([j for j in inner if labels[j] != labels[i]])
        for m in ("llm", "vlm"):
            feats[m][i] = fold["feats"][m][donor]
    return feats, set(planted)


def align(fold: dict, overrides: dict, seed: int):
    from asectl.models.pfa import train_pfa
    from asectl.models.train_config import get_profile

    prof = get_profile("quick", overrides)
    feats = {m: fold["feats"][m] for m in prof.encoders.branches}
    return train_pfa(feats, prof.pfa, seed, train_index=fold["inner"], stats_hidden=prof.encoders.stats_hidden)


def fuse_score(
    fold: dict, embeddings: dict, overrides: dict, seed: int, classes: list[str], heads: object = None
) -> float:
    """Macro-F1 on the held-out cards of one fusion model trained on the fold's other cards: on the aligned
    branches (``embeddings``), or, with ``fusion.projections = end-to-end``, on the encoder features
    through a copy of the alignment's ``heads`` trained with it."""
    from asectl.models.cmaf import predict_proba, train_fusion
    from asectl.models.train_config import get_profile

    cfg = get_profile("quick", overrides).fusion
    if cfg.projections == "end-to-end":
        embeddings = {m: fold["feats"][m] for m in embeddings}
    inner, held = fold["inner"], fold["held"]
    model, _ = train_fusion(
        {m: e[inner] for m, e in embeddings.items()},
        [fold["labels"][i] for i in inner],
        cfg,
        seed,
        classes=classes,
        heads=heads,
    )
    proba = predict_proba(model, {m: e[held] for m, e in embeddings.items()})
    pred = [model.bundle.classes[j] for j in proba.argmax(1)]
    return macro_f1([fold["labels"][i] for i in held], pred, classes)


class Scorer:
    """Cross-validated macro-F1 of settings (a dict of profile keys), each computed once; alignments are
    shared by the settings that differ only in fusion keys."""

    def __init__(self, folds: list[dict], seeds: list[int], classes: list[str]):
        self.folds, self.seeds, self.classes = folds, seeds, classes
        self.done: dict[str, list[float]] = {}
        self._aligned: dict[tuple[str, int, int], Any] = {}  # PFA results

    def scores(self, setting: dict) -> list[float]:
        key = self.key(setting)
        if key not in self.done:
            pfa = {k: v for k, v in setting.items() if k.startswith(("pfa.", "encoders."))}
            fusion = {k: v for k, v in setting.items() if k.startswith("fusion.")}
            out = []
            for seed in self.seeds:
                for k, fold in enumerate(self.folds):
                    memo = (self.key(pfa), seed, k)
                    if memo not in self._aligned:
                        self._aligned[memo] = align(fold, pfa, seed)
                    result = self._aligned[memo]
                    out.append(fuse_score(fold, result.embeddings, fusion, seed, self.classes, heads=result.heads))
            self.done[key] = out
        return self.done[key]

    @staticmethod
    def key(setting: dict) -> str:
        """Settings that resolve to the same profile share one key (a key at its default is left out)."""
        from asectl.models.train_config import get_profile

        default = get_profile("quick")
        at_default = lambda k, v: getattr(getattr(default, k.split(".")[0]), k.split(".")[1]) == v  # noqa: E731
        return json.dumps({k: v for k, v in setting.items() if not at_default(k, v)}, sort_keys=True)

    def ranked(self, settings: list[dict]) -> list[dict]:
        # Ties go to the setting that changes fewer of the current defaults.
        rows = [{"setting": st, **summarise(self.scores(st))} for st in settings]
        return sorted(rows, key=lambda r: (-r["mean"], len(json.loads(self.key(r["setting"])))))


def summarise(scores: list[float]) -> dict:
    a = np.asarray(scores)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "sem": float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0,
        "scores": a.tolist(),
    }


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a labelled dataset folder; only its training split is read")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--fold-seed", type=int, default=0)
    ap.add_argument("--seeds", default="0,1", help="training seeds (PFA and fusion initialisation, batch order)")
    ap.add_argument("--small", action="store_true", help="a small grid (a quick check)")
    ap.add_argument("--cache-dir", default=str(OUT / "tune-cache"))
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    grid = SMALL_GRID if args.small else GRID
    cache = Cache(args.cache_dir)
    t0 = time.perf_counter()

    dataset = load_dataset(args.data)
    train_only = Dataset(dataset.split("train"), dataset.root, dataset.source, dataset.labels)
    classes = order_labels(s.label for s in train_only.samples)
    folds = []
    for k, fold in enumerate(training_folds(train_only, args.folds, args.fold_seed)):
        t = time.perf_counter()
        folds.append(fold_features(fold, cache))
        print(
            f"fold {k}: {len(folds[-1]['inner'])} training / {len(folds[-1]['held'])} held-out cards, "
            f"modalities and features in {time.perf_counter() - t:.0f} s",
            flush=True,
        )
    t_modalities = time.perf_counter() - t0

    scorer = Scorer(folds, seeds, classes)

    # Step 1: the grid (one alignment per PFA setting, fold and seed; every fusion setting on top).
    keys = list(grid)
    grid_settings = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    for n, setting in enumerate(grid_settings, 1):
        scorer.scores(setting)
        print(f"grid {n}/{len(grid_settings)} at {time.perf_counter() - t0:.0f} s", flush=True)
    results = scorer.ranked(grid_settings)
    best = results[0]
    within = [r for r in results if r["mean"] >= best["mean"] - best["sem"]]
    chosen = dict(best["setting"])

    # Step 1b: other settings, one at a time around the grid's winner.
    one_at_a_time = {}
    for key, values in ({} if args.small else ONE_AT_A_TIME).items():
        rows = scorer.ranked([{**chosen, key: v} for v in values])
        one_at_a_time[key] = [{"value": r["setting"][key], **r} for r in rows]
        chosen[key] = rows[0]["setting"][key]
        print(f"{key}: {chosen[key]} at {time.perf_counter() - t0:.0f} s", flush=True)

    # Step 2: the ranking warm-up with the chosen values.
    warm = {e: {"recall": [], "macro_f1": []} for e in WARMUPS}
    pfa_over = {k: v for k, v in chosen.items() if k.startswith("pfa.")}
    for seed in seeds:
        for fold in folds:
            planted_feats, planted = plant_mismatches(fold, seed)
            for e in WARMUPS:
                over = {**pfa_over, "pfa.rank_warmup_epochs": e}
                # Only stage 1's pick matters here: one epoch per stage, two stages.
                first = align(
                    {**fold, "feats": planted_feats},
                    {**over, "pfa.epochs_per_stage": 1, "pfa.strides": [PLANTED_SHARE, 1.0]},
                    seed,
                )
                warm[e]["recall"].append(len(planted & set(first.stages[0].train_indices)) / len(planted))
        print(f"warm-up ranking check, seed {seed}: done at {time.perf_counter() - t0:.0f} s", flush=True)
    for e in WARMUPS:
        warm[e]["macro_f1"] = scorer.scores({**chosen, "pfa.rank_warmup_epochs": e})
    recall = {e: float(np.mean(v["recall"])) for e, v in warm.items()}
    chosen["pfa.rank_warmup_epochs"] = min(e for e in WARMUPS if recall[e] >= RECALL_SHARE * max(recall.values()))
    total = time.perf_counter() - t0

    from asectl.models.train_config import get_profile

    record = {
        "data": str(Path(args.data).resolve()),
        "synth": _synth_params(Path(args.data)),
        "base_profile": get_profile("quick").to_dict(),  # what every unlisted key was
        "folds": args.folds,
        "fold_seed": args.fold_seed,
        "seeds": seeds,
        "grid": grid,
        "settings": SETTINGS,
        "n_train_cards": len(train_only),
        "classes": classes,
        "results": results,
        "best": best,
        "within_one_sem": [r["setting"] for r in within],
        "one_at_a_time": one_at_a_time,
        "warmup": {
            str(e): {"planted_recall": summarise(v["recall"]), "macro_f1": summarise(v["macro_f1"])}
            for e, v in warm.items()
        },
        "planted_share": PLANTED_SHARE,
        "chosen": chosen,
        "seconds": total,
        "seconds_modalities": t_modalities,
    }
    save("tune_profile" + ("-small" if args.small else ""), record)
    text = _markdown(record)
    if not args.no_docs:
        update_section("tune-profile" + ("-small" if args.small else ""), text)
    print(text)


def _synth_params(root: Path) -> dict:
    path = root / "synth.json"
    if not path.exists():
        return {}
    from asectl.cache import sha256_file

    params = json.loads(path.read_text())
    return {
        **{k: params[k] for k in ("seed", "difficulty", "counts", "test_size") if k in params},
        "synth.json sha256": sha256_file(path)[:12],
    }


def _markdown(rec: dict) -> str:
    pct = lambda r: f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"  # noqa: E731
    keys = list(rec["grid"])
    n_scores = len(rec["results"][0]["scores"])
    lines = [
        f"### Quick-profile defaults chosen on the training split ({rec['folds']}-fold cross-validation)",
        "",
        f"Data: `{rec['data']}` ({', '.join(f'{k} {v}' for k, v in rec['synth'].items())}); only its "
        f"{rec['n_train_cards']} training cards were read. Folds stratified with seed {rec['fold_seed']}; "
        f"training seeds {', '.join(map(str, rec['seeds']))}; each score is the 5-class macro-F1 on the "
        f"held-out fold (mean ± std over {n_scores} fold x seed runs). Grid: "
        + "; ".join(f"`{k}` {', '.join(map(str, v))}" for k, v in rec["grid"].items())
        + f". Run time: {rec['seconds'] / 60:.1f} min ({rec['seconds_modalities'] / 60:.1f} min of it "
        "modalities and features).",
        "",
        "| rank | " + " | ".join(f"`{k}`" for k in keys) + " | macro-F1 (held-out folds) |",
        "|---" * (len(keys) + 2) + "|",
    ]
    shown = rec["results"][:10] + ([rec["results"][-1]] if len(rec["results"]) > 10 else [])
    for r in shown:
        rank = rec["results"].index(r) + 1
        lines.append(f"| {rank} | " + " | ".join(str(r["setting"][k]) for k in keys) + f" | {pct(r)} |")
    lines += [
        "",
        f"{len(rec['within_one_sem'])} of {len(rec['results'])} settings lie within one standard "
        f"error ({100 * rec['best']['sem']:.2f} points) of the best.",
        "",
    ]
    for key, rows in rec["one_at_a_time"].items():
        lines += [
            f"`{key}`, the others as chosen above: "
            + "; ".join(f"{r['value']}: {pct(r)}" for r in sorted(rows, key=lambda r: r["value"]))
            + ".",
            "",
        ]
    lines += [
        f"Ranking warm-up (with the chosen learning rates and loss weighting): share of the planted "
        f"mismatched pairs ({int(100 * rec['planted_share'])}% of each fold's training pairs given the "
        f"texts of a card of another class) that stage 1 takes (chance: {rec['planted_share']:.2f}), and "
        "the macro-F1 of the whole chain on the unplanted features.",
        "",
        "| `pfa.rank_warmup_epochs` | planted pairs in stage 1 | macro-F1 (held-out folds) |",
        "|---|---|---|",
    ]
    for e, v in rec["warmup"].items():
        r = v["planted_recall"]
        lines.append(f"| {e} | {r['mean']:.2f} ± {r['std']:.2f} | {pct(v['macro_f1'])} |")
    lines += [
        "",
        "Chosen (the quick profile's defaults): "
        + ", ".join(f"`{k} = {v}`" for k, v in rec["chosen"].items())
        + f" (warm-up: the fewest epochs whose share reaches {int(100 * RECALL_SHARE)}% of the best).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
