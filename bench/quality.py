"""Classification quality on generated data: baselines, the oracle, and the paper's ablations.

    python bench/quality.py                 # five generator seeds (0-4), full epochs
    python bench/quality.py --fast          # one seed, fewer epochs (quick check)
    python bench/quality.py --seeds 0,1 --cache-dir /tmp/c --jobs 2

Per seed: the default 455 cards with the stratified 325/130 split, the quick profile, and the same split
for every method. Every pipeline stage runs through the library (cached in --cache-dir, default
bench/out/cache, so a rerun only trains): first the modalities of every seed, each stage using all cores,
then training and scoring with --jobs seeds at once, one core each. Results: bench/results/quality.json and docs/benchmarks.md.
Binary macro-F1 is derived from the 5-class predictions (normal vs every defect class)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from _common import OUT, ROOT, dataset, save, update_section

sys.path.insert(0, str(ROOT / "bench"))

from asectl.cache import Cache  # noqa: E402
from asectl.dataset import Dataset, load_dataset  # noqa: E402
from asectl.report import compute_metrics  # noqa: E402

LABELS = ["normal", "type1", "type2", "type3", "type4"]
SETTINGS = {"ocr": {"engine": "cnocr"}, "describe": {"vlm": "builtin"}, "reason": {}}

# The paper's numbers (ASE data, real VLM/LLM): macro-F1 binary / 5-class, in percent.
PAPER = {
    "table2": {"EfficientNet-b6a (image only)": (77.48, 64.58), "Proposed (PFA+CMAF)": (85.65, 75.91),
               "Proposed with TDA": (92.52, 80.77)},
    "table3": {(1, 0, 0): (83.47, 69.72), (0, 1, 0): (78.19, 64.58), (1, 1, 0): (85.65, 75.91),
               (0, 1, 1): (80.60, 69.19), (1, 0, 1): (86.50, 76.64), (1, 1, 1): (92.52, 80.77)},
    "table4": {"none": (80.60, 64.19), "direct": (84.76, 70.45), "0.2/0.6/1": (90.46, 78.13),
               "0.2/0.4/0.6/0.8/1": (92.52, 80.77)},
    "table5": {"concat": (86.50, 76.44), "cmaf-nosigmoid": (87.56, 77.56), "cmaf": (92.52, 80.77)},
}


def scores(y_true: list[str], y_pred: list[str]) -> dict:
    m = compute_metrics(LABELS, [LABELS.index(t) for t in y_true], [LABELS.index(p) for p in y_pred])
    return {"macro_f1": m["multiclass"]["macro_f1"], "binary_macro_f1": m["binary"]["macro_f1"],
            "per_class_f1": {c: m["multiclass"]["per_class"][c]["f1"] for c in LABELS}}


def logistic(xtr, ytr, xte) -> list[str]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0))
    return list(clf.fit(xtr, ytr).predict(xte))


def small_cnn(train_paths, ytr, test_paths, seed: int, epochs: int) -> list[str]:
    """A small CNN trained from scratch on the plotted range, the image-only deep baseline.

    Input: one "pinkness" channel computed from the card's RGB pixels ((R - G) / 150, so the pink dots
    are 1 and the white background, grey circle and axes are 0), box-averaged 5 x 5 from the 440 px
    range to 88 x 88 (a dot-density map) and standardised with the training mean and std. BatchNorm,
    class-weighted loss, AdamW with a one-cycle schedule. Raw [0, 1] RGB (almost all white, std ~0.01-0.08)
    without BatchNorm left the loss at ln 5 and the net predicted one class for every card. Runs on one
    thread so a seed gives the same predictions whatever the core count."""
    import torch
    from torch import nn

    from asectl.imageio import load_image

    size, box = 88, 5   # crop (20, 20, 460, 460) is 440 px; 440 / 5 = 88

    def load(paths):
        out = []
        for p in paths:
            a = np.asarray(load_image(p).crop((20, 20, 460, 460)), dtype=np.float32)
            pink = np.clip((a[..., 0] - a[..., 1]) / 150.0, 0.0, 1.0)
            out.append(pink.reshape(size, box, size, box).mean(axis=(1, 3)))
        return torch.from_numpy(np.stack(out)[:, None])

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        xtr, xte = load(train_paths), load(test_paths)
        mean, std = xtr.mean(), xtr.std()
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
        y = torch.tensor([LABELS.index(v) for v in ytr])
        net = nn.Sequential(*block(1, 8), nn.MaxPool2d(2),       # 44
                            *block(8, 16), nn.MaxPool2d(2),      # 22
                            *block(16, 32), nn.MaxPool2d(2),     # 11
                            *block(32, 32), nn.AdaptiveAvgPool2d(4),
                            nn.Flatten(), nn.Dropout(0.3), nn.Linear(32 * 16, len(LABELS)))
        batch = 32
        steps = epochs * -(-len(y) // batch)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(steps, 1))
        counts = torch.bincount(y, minlength=len(LABELS)).float()
        weight = len(y) / (len(LABELS) * counts.clamp(min=1))
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            net.train()
            for idx in torch.randperm(len(y), generator=gen).split(batch):
                loss = nn.functional.cross_entropy(net(xtr[idx]), y[idx], weight=weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        with torch.no_grad():
            return [LABELS[i] for i in net(xte).argmax(1).tolist()]
    finally:
        torch.set_num_threads(threads)


def stats_vector(fields: dict) -> list[float]:
    return [fields["N"], fields["mu_x"], fields["mu_y"], fields["sd_x"], fields["sd_y"], *fields["bins"]]


def prepare_seed(seed: int, cache: Cache) -> Path:
    """A seed's dataset, its TDA copy, and every modality and feature both need, cached. Runs in the main
    process, where OCR and the LLM use one worker process per core."""
    from asectl.models.train_config import get_profile
    from asectl.pipeline import build_encoders, collect_modalities, encode_modalities
    from asectl.stages.align import real_training_priors, resolve_training_dataset
    from asectl.stages.synth import run_augment

    root = dataset(seed)
    ds = load_dataset(root)
    aug_root = OUT / f"ds-seed{seed}-tda"
    if not (aug_root / "labels.csv").exists():
        run_augment(root, aug_root, factor=2.0, seed=seed, stats_source="ocr", cache=cache, force=True)
    encoders = build_encoders(get_profile("quick").encoders)
    encode_modalities(collect_modalities(ds, cache, SETTINGS), encoders, cache)
    # With TDA, the synthetic cards' LLM answers use priors from the real training cards (as align does).
    aug_mods = collect_modalities(resolve_training_dataset(ds, aug_root), cache, SETTINGS,
                                  priors=real_training_priors(ds, cache, SETTINGS))
    encode_modalities(aug_mods, encoders, cache)
    return aug_root


def run_seed(seed: int, cache: Cache, fast: bool) -> dict:
    """Every method on one seed; the modalities come from the cache ``prepare_seed`` filled, so this is
    training and scoring only, on one core."""
    import oracle
    from asectl.pipeline import build_encoders, collect_modalities, encode_modalities
    from asectl.models.train_config import get_profile
    from asectl.stages.fuse import run_fuse_train
    from asectl.stages.predict import run_predict
    from asectl.synth import read_truth

    t_seed = time.perf_counter()
    root = dataset(seed)
    ds = load_dataset(root)
    aug_root = prepare_seed(seed, cache)
    results: dict[str, dict] = {}

    # Single-modality baselines on the same split and the same cached modalities.
    mods = collect_modalities(ds, cache, SETTINGS)
    feats = encode_modalities(mods, build_encoders(get_profile("quick").encoders), cache)
    tr = [i for i, s in enumerate(mods.samples) if s.split == "train"]
    te = [i for i, s in enumerate(mods.samples) if s.split == "test"]
    ytr = [mods.samples[i].label for i in tr]
    yte = [mods.samples[i].label for i in te]
    for name, key in (("image only: EfficientNet-Lite0 features + logistic regression", "image"),
                      ("VLM text only: MiniLM features + logistic regression", "vlm"),
                      ("LLM text only: MiniLM features + logistic regression", "llm")):
        results[name] = scores(yte, logistic(feats[key][tr], ytr, feats[key][te]))
    from sklearn.ensemble import HistGradientBoostingClassifier

    xs = np.array([stats_vector(f) for f in mods.ocr_fields])
    gb = HistGradientBoostingClassifier(random_state=seed).fit(xs[tr], ytr)
    results["stats only: gradient boosting on OCR'd fields"] = scores(yte, list(gb.predict(xs[te])))
    results["image only: small CNN trained on the cards"] = scores(
        yte, small_cnn([mods.samples[i].path for i in tr], ytr, [mods.samples[i].path for i in te], seed,
                       epochs=10 if fast else 30))

    # The oracle: Bayes-optimal given each test card's true latent parameters.
    truth = read_truth(root)
    test_names = [s.name for s in ds.split("test")]
    pred = oracle.predict([truth[n]["latent"] for n in test_names], [s.label for s in ds.split("train")], LABELS)
    results["oracle (true latent parameters)"] = scores([truth[n]["label"] for n in test_names], pred)

    # The fused pipeline and its ablations.
    epochs = {"pfa.epochs_per_stage": 8 if fast else 15, "fusion.epochs": 30 if fast else 60}
    test_ds = Dataset(ds.split("test"), ds.root, ds.source, ds.labels)

    def pipeline(mode: str, strides, fusion: str, tda: bool) -> dict:
        over = {**epochs, "pfa.mode": mode, "pfa.strides": strides}
        from asectl.stages.align import run_align

        run_align(ds, cache, profile="quick", overrides=over, seed=seed, augmented=aug_root if tda else None,
                  settings=SETTINGS)
        res = run_fuse_train(ds, cache, fusion=fusion, profile="quick", overrides=over, seed=seed,
                             augmented=aug_root if tda else None)
        recs = [r for r in run_predict(test_ds, res.bundle, cache).records if not r.get("error")]
        truth_lab = {s.name: s.label for s in ds.split("test")}
        return scores([truth_lab[r["image"]] for r in recs], [r["label"] for r in recs])

    full = [0.2, 0.4, 0.6, 0.8, 1.0]
    for pfa in (1, 0):
        for cmaf in (1, 0):
            for tda in (0, 1):
                key = f"grid pfa={pfa} cmaf={cmaf} tda={tda}"
                results[key] = pipeline("progressive" if pfa else "none", full, "cmaf" if cmaf else "concat",
                                        bool(tda))
    results["stride direct"] = pipeline("direct", full, "cmaf", True)
    results["stride 0.2/0.6/1"] = pipeline("progressive", [0.2, 0.6, 1.0], "cmaf", True)
    results["fusion cmaf-nosigmoid"] = pipeline("progressive", full, "cmaf-nosigmoid", True)
    results["_seconds"] = time.perf_counter() - t_seed
    return results


def fmt(vals: list[float]) -> str:
    v = np.array(vals) * 100
    return f"{v.mean():.2f} ± {v.std():.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def table(rows: list[tuple[str, str, tuple | None]], per_seed: list[dict]) -> str:
    out = ["| method | ours: macro-F1 binary | ours: macro-F1 5-class | paper (ASE): binary / 5-class |",
           "|---|---|---|---|"]
    for label, key, paper in rows:
        b = [r[key]["binary_macro_f1"] for r in per_seed]
        m = [r[key]["macro_f1"] for r in per_seed]
        out.append(f"| {label} | {fmt(b)} | {fmt(m)} | {f'{paper[0]:.2f} / {paper[1]:.2f}' if paper else '-'} |")
    return "\n".join(out)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _run_seed_job(job: tuple[int, str, bool]) -> dict:
    seed, cache_dir, fast = job
    return run_seed(seed, Cache(cache_dir), fast)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default=None, help="comma-separated generator seeds (default 0,1,2,3,4; --fast: 0)")
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                    help="seeds trained at once, one core each (default: the number of cores)")
    args = ap.parse_args()
    seeds = [int(s) for s in (args.seeds or ("0" if args.fast else "0,1,2,3,4")).split(",")]
    cache = Cache(args.cache_dir)
    t0 = time.perf_counter()
    # Two phases: the modalities (OCR, describer, LLM), which use every core on their own, seed after
    # seed; then training and scoring, one core per seed, several seeds at once.
    prep = {}
    for seed in seeds:
        t = time.perf_counter()
        prepare_seed(seed, cache)
        prep[seed] = time.perf_counter() - t
        print(f"seed {seed}: modalities ready in {prep[seed]:.0f} s", flush=True)
    jobs = max(1, min(args.jobs, len(seeds)))
    per_seed = []
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_one_thread) as pool:
        for seed, r in zip(seeds, pool.map(_run_seed_job, [(s, args.cache_dir, args.fast) for s in seeds])):
            r["_prepare_seconds"] = prep[seed]
            per_seed.append(r)
            print(f"seed {seed}: trained and scored in {r['_seconds']:.0f} s;", json.dumps(
                {k: round(v["macro_f1"], 4) for k, v in r.items() if isinstance(v, dict)}), flush=True)
    total = time.perf_counter() - t0
    save("quality" + ("-fast" if args.fast else ""), {"seeds": seeds, "fast": args.fast, "seconds": total,
                                                       "per_seed": per_seed})
    n = len(seeds)
    main_rows = [
        ("oracle (Bayes-optimal on true latent parameters)", "oracle (true latent parameters)", None),
        ("image only: EfficientNet-Lite0 + logistic regression", "image only: EfficientNet-Lite0 features + logistic regression",
         PAPER["table2"]["EfficientNet-b6a (image only)"]),
        ("image only: small CNN", "image only: small CNN trained on the cards", None),
        ("stats only: gradient boosting on OCR'd fields", "stats only: gradient boosting on OCR'd fields", None),
        ("VLM text only (built-in describer) + logistic regression", "VLM text only: MiniLM features + logistic regression", None),
        ("LLM text only (SmolLM2) + logistic regression", "LLM text only: MiniLM features + logistic regression", None),
        ("concat fusion (PFA), no TDA", "grid pfa=1 cmaf=0 tda=0", None),
        ("concat fusion (PFA), TDA", "grid pfa=1 cmaf=0 tda=1", None),
        ("PFA + CMAF, no TDA", "grid pfa=1 cmaf=1 tda=0", PAPER["table2"]["Proposed (PFA+CMAF)"]),
        ("PFA + CMAF, TDA", "grid pfa=1 cmaf=1 tda=1", PAPER["table2"]["Proposed with TDA"]),
    ]
    grid_rows = [(f"PFA {'✓' if p else '-'} / CMAF {'✓' if c else '-'} / TDA {'✓' if t else '-'}",
                  f"grid pfa={p} cmaf={c} tda={t}", PAPER["table3"].get((p, c, t)))
                 for p in (1, 0) for c in (1, 0) for t in (0, 1)]
    stride_rows = [("without alignment", "grid pfa=0 cmaf=1 tda=1", PAPER["table4"]["none"]),
                   ("direct alignment (whole)", "stride direct", PAPER["table4"]["direct"]),
                   ("PFA 0.2/0.6/1", "stride 0.2/0.6/1", PAPER["table4"]["0.2/0.6/1"]),
                   ("PFA 0.2/0.4/0.6/0.8/1", "grid pfa=1 cmaf=1 tda=1", PAPER["table4"]["0.2/0.4/0.6/0.8/1"])]
    fusion_rows = [("direct concatenation", "grid pfa=1 cmaf=0 tda=1", PAPER["table5"]["concat"]),
                   ("CMAF without sigmoid", "fusion cmaf-nosigmoid", PAPER["table5"]["cmaf-nosigmoid"]),
                   ("CMAF with sigmoid", "grid pfa=1 cmaf=1 tda=1", PAPER["table5"]["cmaf"])]
    best_single = max(("image only: EfficientNet-Lite0 features + logistic regression",
                       "image only: small CNN trained on the cards", "stats only: gradient boosting on OCR'd fields",
                       "VLM text only: MiniLM features + logistic regression",
                       "LLM text only: MiniLM features + logistic regression"),
                      key=lambda k: np.mean([r[k]["macro_f1"] for r in per_seed]))
    mean = lambda k: float(np.mean([r[k]["macro_f1"] for r in per_seed]))  # noqa: E731
    best_key = max((k for k in per_seed[0] if k.startswith(("grid", "stride", "fusion"))), key=mean)
    per_class = ["| method | " + " | ".join(LABELS) + " |", "|---" * (len(LABELS) + 1) + "|"]
    for label, key, _ in main_rows:
        per_class.append(f"| {label} | " + " | ".join(fmt([r[key]["per_class_f1"][c] for r in per_seed])
                                                     for c in LABELS) + " |")
    text = f"""### Quality on generated ASE-like data ({n} seed{'s' * (n > 1)}: {', '.join(map(str, seeds))}{', fast mode' if args.fast else ''})

Synthetic cards from `asectl synth` (docs/dataset.md), **not** the paper's private ASE data: the paper's
numbers are shown beside ours for orientation only. Macro-F1 in percent, mean ± std over seeds. Quick
profile (frozen EfficientNet-Lite0 + MiniLM), built-in describer, SmolLM2-135M reasoning, CnOCR. Binary
macro-F1 is derived from the 5-class predictions. Run time: {total / 60:.1f} min.

{table(main_rows, per_seed)}

Per-class F1 (5-class):

{chr(10).join(per_class)}

Table 3 (ablation grid: PFA off = `--mode none`, CMAF off = `--fusion concat`):

{table(grid_rows, per_seed)}

Table 4 (alignment strategy, with CMAF and TDA):

{table(stride_rows, per_seed)}

Table 5 (fusion, with PFA and TDA):

{table(fusion_rows, per_seed)}

Best fused configuration: `{best_key}` at {100 * mean(best_key):.2f}; best single modality: {best_single} at
{100 * mean(best_single):.2f}; oracle {100 * mean('oracle (true latent parameters)'):.2f}. Ratio of PFA + CMAF + TDA to the
oracle: {mean('grid pfa=1 cmaf=1 tda=1') / mean('oracle (true latent parameters)'):.3f}; PFA + CMAF + TDA minus best
single modality: {100 * (mean('grid pfa=1 cmaf=1 tda=1') - mean(best_single)):+.2f} points.
"""
    update_section("quality" + ("-fast" if args.fast else ""), text)
    print(text)


if __name__ == "__main__":
    main()
