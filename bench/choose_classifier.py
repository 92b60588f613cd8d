"""The fusion's classifier, chosen on the training split: the MLP (AdamW) against an L2 logistic regression.

    python bench/choose_classifier.py [--seed 0] [--fold-seeds 0,1,2] [--cache-dir C] [--set KEY=VALUE ...]

The data are the default generated `field` cards of the generator seed (bench/out/ds-field-seed0, as
bench/quality.py makes them); only their training split is read. The default model's alignment is trained (or
taken from the cache) with `fuse-train`; every candidate classifier then trains on the same aligned features of
4 of 5 stratified folds of the training cards and is scored (macro-F1 of the argmax) on the fifth, for each fold
seed. One caveat, shared by every candidate: the `cards-cnn` image features of the training cards are those
`align` computed, out of fold over the whole training split, so the held-out fold's cards took part in training
the networks that scored the other cards. ``--set`` changes the alignment's settings (profile keys, e.g.
``encoders.dot_pattern=true``); the results of a seed other than 0 or with settings go to files and a section
named after them. Results: bench/results/choose_classifier[-seedS][-KEY-VALUE].json and the
``choose-classifier[-seedS][-KEY-VALUE]`` section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from _common import OUT, dataset, save, update_section
from asectl.cache import Cache
from asectl.domain.dataset import load_dataset
from asectl.metrics import macro_f1_from_codes
from asectl.models.calibration import stratified_folds
from asectl.models.cmaf import predict_logits, train_fusion
from asectl.models.train_config import get_profile

CANDIDATES = {
    "mlp (AdamW, the earlier default)": {"classifier": "mlp"},
    **{f"logistic C {c}": {"classifier": "logistic", "logistic_c": c} for c in (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)},
}


def main() -> None:
    from asectl.stages.fuse import run_fuse_train

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="generator seed of the default field cards")
    ap.add_argument("--fold-seeds", default="0,1,2")
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an alignment setting")
    args = ap.parse_args()
    settings = dict(kv.split("=", 1) for kv in args.set)
    tag = (f"-seed{args.seed}" if args.seed else "") + "".join(f"-{k}-{v}" for k, v in sorted(settings.items()))

    data = dataset(args.seed)
    # The alignment of the earlier default (the MLP classifier); every candidate reads its aligned features.
    out = run_fuse_train(
        load_dataset(data), Cache(Path(args.cache_dir)), overrides={**settings, "fusion.classifier": "mlp"}
    )
    align = out.align
    train = np.array(align.train_index())
    classes = list(out.bundle.config["classes"])
    y = np.array([classes.index(align.labels[i]) for i in train])
    feats = {k: v[train] for k, v in align.embeddings().items() if k in out.bundle.config["branches"]}
    base = get_profile("quick").fusion
    rows = {name: [] for name in CANDIDATES}
    seconds = {name: 0.0 for name in CANDIDATES}
    for fold_seed in (int(s) for s in args.fold_seeds.split(",")):
        fold = stratified_folds([classes[i] for i in y], 5, fold_seed)
        for name, over in CANDIDATES.items():
            config = dataclasses.replace(base, **over)
            start = time.process_time()
            logits = np.zeros((len(y), len(classes)))
            for k in range(5):
                model, _ = train_fusion(
                    {b: v[fold != k] for b, v in feats.items()},
                    [classes[i] for i in y[fold != k]],
                    config,
                    args.seed,
                    classes=classes,
                )
                logits[fold == k] = predict_logits(model, {b: v[fold == k] for b, v in feats.items()})
            seconds[name] += time.process_time() - start
            rows[name].append(macro_f1_from_codes(y, logits.argmax(axis=1), len(classes)))
            print(f"fold seed {fold_seed} {name}: {100 * rows[name][-1]:.2f}", flush=True)
    rec = {
        "data": data.name,
        "fold_seeds": args.fold_seeds,
        "branches": out.bundle.config["branches"],
        "settings": settings,
        "rows": {name: {"macro_f1": v, "cpu_seconds": seconds[name]} for name, v in rows.items()},
    }
    save("choose_classifier" + tag, rec)
    if not args.no_docs:
        update_section("choose-classifier" + tag, markdown(rec))


def markdown(rec: dict) -> str:
    base = rec["rows"]["mlp (AdamW, the earlier default)"]["macro_f1"]
    lines = [
        f"### The fusion's classifier chosen on the training split (5-fold, fold seeds {rec['fold_seeds']})",
        "",
        f"Cards: `{rec['data']}`, training split only; branches {', '.join(rec['branches'])} "
        + "".join(f"(`{k} = {v}`) " for k, v in rec.get("settings", {}).items())
        + "concatenated; macro-F1 of the held-out folds, mean ± std over fold seeds, and the paired "
        "difference from the MLP.",
        "",
        "| classifier | macro-F1 | minus MLP (per fold seed) | CPU s (all folds and seeds) |",
        "|---|---|---|---|",
    ]
    for name, r in rec["rows"].items():
        v = np.asarray(r["macro_f1"]) * 100
        diff = v - np.asarray(base) * 100
        lines.append(
            f"| {name} | {v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0:.2f} | "
            f"{diff.mean():+.2f} ({', '.join(f'{d:+.1f}' for d in diff)}) | {r['cpu_seconds']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
