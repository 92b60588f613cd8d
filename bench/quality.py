"""Classification quality on generated data: the shipped default with each of its parts off, the paper's tables
3-5 on it, baselines and the oracle; with ``--earlier``, the paper's rows in their first configuration too.

    python bench/quality.py                 # five generator seeds (0-4), `field` cards, full epochs
    python bench/quality.py --earlier       # also the paper's configuration, answer-only text, robustness
    python bench/quality.py --fast          # one seed, half the epochs (quick check)
    python bench/quality.py --seeds 0,1 --cache-dir /tmp/c --jobs 2 --robustness-seeds ''

Per seed: the default 455 cards with the stratified 325/130 split, and the same split for every method.
The shipped default (the quick profile as shipped, bench/default_model.py's models) with each of its parts
off in turn (stats branch, trained image encoder, frozen heads, concatenation against token attention, the
llm branch, TDA) and the boosting yardsticks on its numbers; the paper's tables 3-5 on the default
(bench/paper_tables.py's rows); token against chunk attention on the paper's three branches; the single
modalities, the best of them chosen by 3-fold cross-validation of the training split (never the test
split); the oracle. ``--earlier`` adds the paper's method and tables 3-5 in the configuration they were
first measured with (``EARLIER``, pinned in full), the answer-only LLM text (a second LLM pass over every
card) and, by default on seeds 0-2, the robustness table, which trains on one difficulty and tests on the
other (``--robustness-seeds``; it makes the `clean` cards and their modalities). Every number is mean ±
std over seeds with a 95% bootstrap interval over test cards (bench/intervals.py); differences are paired
bootstraps on the same test cards. Every pipeline stage runs through the library (cached in --cache-dir,
default bench/out/cache, so a rerun only trains): the modalities of each seed in turn, each stage using
all cores, and each seed's training and scoring (one core each, --jobs seeds at once) as soon as its
modalities are ready. Results: bench/results/quality.json (quality-earlier.json with ``--earlier``) and
docs/benchmarks.md.
Binary macro-F1 is derived from the 5-class predictions (normal vs every defect class)."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

import default_model
from _common import OUT, SETTINGS, dataset, load, measured_line, save, update_section
from asectl.cache import Cache
from asectl.domain.dataset import Dataset, load_dataset
from asectl.report import compute_metrics

LABELS = ["normal", "type1", "type2", "type3", "type4"]

# The paper's numbers (ASE data, real VLM/LLM): macro-F1 binary / 5-class, in percent.
PAPER = {
    "table2": {
        "EfficientNet-b6a (image only)": (77.48, 64.58),
        "Proposed (PFA+CMAF)": (85.65, 75.91),
        "Proposed with TDA": (92.52, 80.77),
    },
    "table3": {
        (1, 0, 0): (83.47, 69.72),
        (0, 1, 0): (78.19, 64.58),
        (1, 1, 0): (85.65, 75.91),
        (0, 1, 1): (80.60, 69.19),
        (1, 0, 1): (86.50, 76.64),
        (1, 1, 1): (92.52, 80.77),
    },
    "table4": {
        "none": (80.60, 64.19),
        "direct": (84.76, 70.45),
        "0.2/0.6/1": (90.46, 78.13),
        "0.2/0.4/0.6/0.8/1": (92.52, 80.77),
    },
    "table5": {"concat": (86.50, 76.44), "cmaf-nosigmoid": (87.56, 77.56), "cmaf": (92.52, 80.77)},
}


def scores(y_true: list[str], y_pred: list[str]) -> dict:
    """Metrics, and the predictions themselves (for the bootstrap intervals and the paired test)."""
    m = compute_metrics(LABELS, [LABELS.index(t) for t in y_true], [LABELS.index(p) for p in y_pred])
    return {
        "macro_f1": m["multiclass"]["macro_f1"],
        "binary_macro_f1": m["binary"]["macro_f1"],
        "per_class_f1": {c: m["multiclass"]["per_class"][c]["f1"] for c in LABELS},
        "y_true": list(y_true),
        "y_pred": list(y_pred),
    }


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

    size, box = 88, 5  # crop (20, 20, 460, 460) is 440 px; 440 / 5 = 88

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
        net = nn.Sequential(
            *block(1, 8),
            nn.MaxPool2d(2),  # 44
            *block(8, 16),
            nn.MaxPool2d(2),  # 22
            *block(16, 32),
            nn.MaxPool2d(2),  # 11
            *block(32, 32),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(32 * 16, len(LABELS)),
        )
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


# Principal components of the image features beside the OCR'd numbers in the boosting yardstick: chosen
# by bench/choose_branches.py on the training split of seed 0 (docs/benchmarks.md, "choose-branches").
IMAGE_PCS = 16
STATS_PCS = f"stats + image PCs: gradient boosting on OCR'd fields + {IMAGE_PCS} image principal components"


def boosting_with_image_pcs(xs, image, tr, te, ytr, seed: int) -> list[str]:
    """Gradient boosting on the OCR'd numbers plus a few principal components of the frozen image features
    (PCA fitted on the training cards): the simple recipe that does well on tabular-plus-image data."""
    from sklearn.decomposition import PCA
    from sklearn.ensemble import HistGradientBoostingClassifier

    pca = PCA(IMAGE_PCS, random_state=seed).fit(image[tr])
    x = np.hstack([xs, pca.transform(image)])
    return list(HistGradientBoostingClassifier(random_state=seed).fit(x[tr], ytr).predict(x[te]))


# The configuration the paper's rows were first measured with (2026-12-01), pinned in full so that they keep
# measuring it whatever the shipped default becomes: the paper's three branches, CMAF over chunks (or
# concatenation where a row says so), frozen ImageNet EfficientNet-Lite0 features, the MLP classifier, no
# dot pattern and no trees member.
EARLIER = {
    "encoders.branches": "image,vlm,llm",
    "fusion.attention": "chunks",
    "encoders.image": "efficientnet-lite0",
    "encoders.dot_pattern": False,
    "fusion.numbers_trees": False,
    "fusion.classifier": "mlp",
}
# The image encoder of the paper rows' ablation: the one trained on the cards.
OTHER_IMAGE = "cards-cnn"
# The fused rows of the branch and attention ablations (PFA + TDA unless the key says tda=0).
BRANCH_ROWS = {
    "attention tokens tda=1": {"fusion.attention": "tokens"},
    "branches +stats tokens tda=1": {"encoders.branches": "image,vlm,llm,stats", "fusion.attention": "tokens"},
    "attention tokens tda=0": {"fusion.attention": "tokens"},
    "branches +stats tokens tda=0": {"encoders.branches": "image,vlm,llm,stats", "fusion.attention": "tokens"},
    "branches +stats concat tda=0": {"encoders.branches": "image,vlm,llm,stats"},
}
# Token against chunk attention on the paper's three branches: measured in every run.
TOKENS = "attention tokens tda=0"
CHUNKS = "grid pfa=1 cmaf=1 tda=0"

ANSWER_ONLY = {**SETTINGS, "llm_text": "answer"}
# The single-modality image rows and the frozen ablation use the pretrained image encoder's features.
FROZEN_IMAGE = {"encoders.image": "efficientnet-lite0"}

# The shipped default and each of its parts off in turn: bench/default_model.py's rows (the same models from
# the same cache) and the default with TDA. Chunk attention needs exactly the paper's three branches, so token
# against chunk attention is measured on those (the "attention tokens" rows against the paper's CMAF rows).
SHIPPED = "shipped default"
SHIPPED_TDA = "shipped default, TDA"
SHIPPED_ROWS = {
    SHIPPED: default_model.DEFAULT_SETTINGS,
    SHIPPED_TDA: default_model.DEFAULT_SETTINGS,
    "shipped default without the llm branch": default_model.ROWS[default_model.NO_LLM],
    **{f"shipped {name[len('default ') :]}": over for name, over in default_model.ABLATIONS.items()},
}
# The boosting rows on the default's stats vectors (printed numbers, the dot pattern's, both).
NUMBERS = (default_model.BOOSTING, default_model.BOOSTING_DOTS, default_model.BOOSTING_BOTH)
CV_FOLDS = 3


def prepare_seed(seed: int, cache: Cache, difficulty: str = "field", answer_only: bool = True) -> Path:
    """A seed's dataset, its TDA copy, and every modality and feature both need (the composite LLM text
    and, with ``answer_only``, the answer-only one, which only the `field` rows read), cached. Runs in the
    main process, where OCR and the LLM use one worker process per core."""
    from asectl.models.train_config import get_profile
    from asectl.stages.align import real_training_priors, resolve_training_dataset
    from asectl.stages.modalities import build_encoders, collect_modalities, encode_modalities
    from asectl.stages.synth import run_augment

    root = dataset(seed, difficulty=difficulty)
    ds = load_dataset(root)
    aug_root = OUT / f"ds-{difficulty}-seed{seed}-tda"
    if not (aug_root / "labels.csv").exists():
        run_augment(root, aug_root, factor=2.0, seed=seed, stats_source="ocr", cache=cache, force=True)
    encoders = build_encoders(get_profile("quick", FROZEN_IMAGE).encoders)
    priors = real_training_priors(ds, cache, SETTINGS)
    for settings in (SETTINGS, ANSWER_ONLY) if answer_only else (SETTINGS,):
        encode_modalities(collect_modalities(ds, cache, settings), encoders, cache)
        # With TDA, the synthetic cards' LLM answers use priors from the real training cards (as align does).
        aug_mods = collect_modalities(resolve_training_dataset(ds, aug_root), cache, settings, priors=priors)
        encode_modalities(aug_mods, encoders, cache)
    return aug_root


def _features(ds, cache: Cache, settings=SETTINGS):
    from asectl.models.train_config import get_profile
    from asectl.stages.modalities import build_encoders, collect_modalities, encode_modalities

    mods = collect_modalities(ds, cache, settings)
    return mods, encode_modalities(mods, build_encoders(get_profile("quick", FROZEN_IMAGE).encoders), cache)


def _split(mods, split: str) -> list[int]:
    return [i for i, s in enumerate(mods.samples) if s.split == split]


def _fused(ds, aug_root: Path, cache: Cache, seed: int, over: dict, fusion: str, tda: bool, test_ds=None) -> dict:
    """Align + fuse-train on ``ds`` (its TDA copy with ``tda``), then predict ``test_ds`` (default: ds's
    own test split) with the bundle, which replays every stage on those cards."""
    from asectl.stages.align import run_align
    from asectl.stages.fuse import run_fuse_train
    from asectl.stages.predict import Predictor

    settings = {**SETTINGS, "llm_text": over.get("encoders.llm_text", "composite")}
    run_align(
        ds, cache, profile="quick", overrides=over, seed=seed, augmented=aug_root if tda else None, settings=settings
    )
    res = run_fuse_train(
        ds, cache, fusion=fusion, profile="quick", overrides=over, seed=seed, augmented=aug_root if tda else None
    )
    test_ds = test_ds or Dataset(ds.split("test"), ds.root, ds.source, ds.labels)
    truth_lab = {s.name: s.label for s in test_ds.samples}
    # asectl's predictor on exactly the test cards (`asectl predict` on a part of the model's own folder
    # refuses, since it cannot tell that part's split from the model's)
    recs = [r for r in Predictor(res.bundle, cache).run(test_ds).records if not r.get("error")]
    return scores([truth_lab[r["image"]] for r in recs], [r["label"] for r in recs])


def fused_row(ds, test, cache: Cache, seed: int, over: dict, augmented: Path | None) -> tuple[dict, object]:
    """A default-based row (bench/default_model.py's ``score_fused``) as this benchmark stores it: its
    scores with the stored rule's decisions; and the run."""
    r, res = default_model.score_fused(ds, test, cache, seed, over, augmented)
    return {**scores(r["y_true"], r["y_pred"]), "decisions": r["decisions"]}, res


def shipped_rows(
    ds, aug_root: Path, cache: Cache, seed: int, epochs: dict, names: list[str]
) -> tuple[dict, np.ndarray]:
    """The shipped default's rows (``SHIPPED_ROWS``, scored through asectl's own predictor with the stored
    decision rule) and the boosting rows on its stats vectors; and the dot pattern's numbers of the cards
    ``names``, in that order (rows of cards the alignment dropped are NaN)."""
    test = Dataset(ds.split("test"), ds.root, ds.source, ds.labels)
    out = {}
    for key, over in SHIPPED_ROWS.items():
        augmented = aug_root if key == SHIPPED_TDA else None
        out[key], res = fused_row(ds, test, cache, seed, {**epochs, **over}, augmented)
        if key == SHIPPED:
            align, fields = res.align, res.bundle.config["stats_fields"]
    numbers, _, _ = default_model.numbers_rows(align, fields, test, seed)
    out.update({k: scores(v["y_true"], v["y_pred"]) for k, v in numbers.items()})
    measured = default_model.measured_columns(fields)
    index = {n: i for i, n in enumerate(align.names)}
    stats = align.raw_features()["stats"][:, measured]
    dots = np.full((len(names), int(measured.sum())), np.nan)
    for i, name in enumerate(names):
        if name in index:
            dots[i] = stats[index[name]]
    return out, dots


def paper_table_rows(ds, aug_root: Path, cache: Cache, seed: int, epochs: dict) -> dict:
    """The paper's tables 3-5 on the shipped default (bench/paper_tables.py's rows, its TDA rows on the
    seed's TDA copy), scored as the shipped rows are. Its default and default-with-TDA rows are the shipped
    rows' models, so they are not trained again here."""
    import paper_tables

    test = Dataset(ds.split("test"), ds.root, ds.source, ds.labels)
    out = {}
    rows = {**paper_tables.ROWS, **paper_tables.TDA_ROWS}
    for key, over in rows.items():
        if over == default_model.DEFAULT_SETTINGS:  # SHIPPED and SHIPPED_TDA
            continue
        augmented = aug_root if key in paper_tables.TDA_ROWS else None
        out[key], _ = fused_row(ds, test, cache, seed, {**epochs, **over}, augmented)
    return out


def earlier_rows(results: dict, pipeline, full: list[float]) -> None:
    """The paper's rows and tables 3-5 in the configuration they were first measured with (``EARLIER``),
    added to ``results``: the grid of modules, the alignment strides, CMAF without the sigmoid, the answer-only
    LLM text and the image encoder trained on the cards."""
    for pfa in (1, 0):
        for cmaf in (1, 0):
            for tda in (0, 1):
                key = f"grid pfa={pfa} cmaf={cmaf} tda={tda}"
                if key not in results:  # CHUNKS is measured in every run
                    results[key] = pipeline(
                        "progressive" if pfa else "none", full, "cmaf" if cmaf else "concat", bool(tda)
                    )
    results["stride direct"] = pipeline("direct", full, "cmaf", True)
    results["stride 0.2/0.6/1"] = pipeline("progressive", [0.2, 0.6, 1.0], "cmaf", True)
    results["fusion cmaf-nosigmoid"] = pipeline("progressive", full, "cmaf-nosigmoid", True)
    results["llm answer only pfa=1 cmaf=1 tda=1"] = pipeline(
        "progressive", full, "cmaf", True, **{"encoders.llm_text": "answer"}
    )
    results["other image encoder pfa=1 cmaf=1 tda=1"] = pipeline(
        "progressive", full, "cmaf", True, **{"encoders.image": OTHER_IMAGE}
    )


def single_cv(candidates: dict, ytr: list[str], seed: int) -> list[list]:
    """Each single-modality candidate {row: fit_predict(train_idx, test_idx) -> labels}, scored by
    CV_FOLDS-fold stratified cross-validation of the training split (macro-F1 of the out-of-fold labels):
    [[row, macro-F1], ...]. The best single modality is chosen from these, never from the test split."""
    from asectl.models.calibration import stratified_folds

    fold = stratified_folds(ytr, CV_FOLDS, seed)
    out = []
    for row, fit_predict in candidates.items():
        pred = np.empty(len(ytr), dtype=object)
        for k in range(CV_FOLDS):
            held = np.flatnonzero(fold == k)
            pred[held] = fit_predict(np.flatnonzero(fold != k), held)
        out.append([row, scores(list(ytr), [str(p) for p in pred])["macro_f1"]])
    return out


def run_seed(
    seed: int, cache: Cache, fast: bool, robustness: bool = False, subset: str = "all", earlier: bool = False
) -> dict:
    """Every method on one seed of `field` cards (and, with ``robustness``, across difficulties); the
    modalities come from the cache ``prepare_seed`` filled, so this is training and scoring only, on one
    core. ``earlier``: also the paper's rows and tables in the configuration they were first measured with
    (``EARLIER``) and the answer-only LLM text; without it, of the ``EARLIER`` rows only the pair that
    measures token against chunk attention. ``subset="branches"``: only what the branch and attention
    ablations need without TDA (the baselines on the composite modalities, the oracle, the fused rows with
    tda=0)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    import oracle
    from asectl.domain.synth import read_truth

    t_seed = time.perf_counter()
    root = dataset(seed)
    ds = load_dataset(root)
    aug_root = OUT / f"ds-field-seed{seed}-tda"
    results: dict[str, dict] = {}

    # Single-modality baselines on the same split and the same cached modalities.
    mods, feats = _features(ds, cache)
    tr, te = _split(mods, "train"), _split(mods, "test")
    ytr = [mods.samples[i].label for i in tr]
    yte = [mods.samples[i].label for i in te]
    for name, key in (
        ("image only: EfficientNet-Lite0 features + logistic regression", "image"),
        ("VLM text only: MiniLM features + logistic regression", "vlm"),
        ("LLM text only: MiniLM features + logistic regression", "llm"),
    ):
        results[name] = scores(yte, logistic(feats[key][tr], ytr, feats[key][te]))
    if subset == "all" and earlier:
        a_mods, a_feats = _features(ds, cache, ANSWER_ONLY)
        a_tr, a_te = _split(a_mods, "train"), _split(a_mods, "test")
        results["LLM answer only: MiniLM features + logistic regression"] = scores(
            [a_mods.samples[i].label for i in a_te],
            logistic(a_feats["llm"][a_tr], [a_mods.samples[i].label for i in a_tr], a_feats["llm"][a_te]),
        )
    xs = np.array([stats_vector(f) for f in mods.ocr_fields])
    gb = HistGradientBoostingClassifier(random_state=seed).fit(xs[tr], ytr)
    results["stats only: gradient boosting on OCR'd fields"] = scores(yte, list(gb.predict(xs[te])))
    results[STATS_PCS] = scores(yte, boosting_with_image_pcs(xs, feats["image"], tr, te, ytr, seed))
    if subset == "all":
        results["image only: small CNN trained on the cards"] = scores(
            yte,
            small_cnn(
                [mods.samples[i].path for i in tr],
                ytr,
                [mods.samples[i].path for i in te],
                seed,
                epochs=10 if fast else 30,
            ),
        )

    # The oracle: Bayes-optimal given each test card's true latent parameters (it predicts the most
    # likely inspector label, so label disagreement costs it too).
    truth = read_truth(root)
    test_names = [s.name for s in ds.split("test")]
    pred = oracle.predict([truth[n]["latent"] for n in test_names], [s.label for s in ds.split("train")], LABELS)
    results["oracle (true latent parameters)"] = scores([s.label for s in ds.split("test")], pred)

    # The fused pipeline and its ablations: the profile's defaults, half the epochs in fast mode.
    from asectl.models.train_config import get_profile

    prof = get_profile("quick")
    epochs = (
        {
            "pfa.epochs_per_stage": max(1, prof.pfa.epochs_per_stage // 2),
            "fusion.epochs": max(1, prof.fusion.epochs // 2),
        }
        if fast
        else {}
    )
    full = [0.2, 0.4, 0.6, 0.8, 1.0]

    def pipeline(mode: str, strides, fusion: str, tda: bool, **extra) -> dict:
        # The paper's branches and chunk attention unless a row says otherwise: the earlier tables' setting,
        # whatever the profile's default is now.
        return _fused(
            ds,
            aug_root,
            cache,
            seed,
            {**epochs, **EARLIER, "pfa.mode": mode, "pfa.strides": strides, **extra},
            fusion,
            tda,
        )

    for key, extra in BRANCH_ROWS.items():
        if (subset == "all" and earlier) or (key.endswith("tda=0") and (subset == "branches" or key == TOKENS)):
            results[key] = pipeline(
                "progressive", full, "concat" if "concat" in key else "cmaf", key.endswith("tda=1"), **extra
            )
    # Chunk attention needs exactly the paper's three branches: its row beside the token row above.
    results[CHUNKS] = pipeline("progressive", full, "cmaf", False)
    if subset == "branches":
        results["_seconds"] = time.perf_counter() - t_seed
        return results
    shipped, dots_tr = shipped_rows(ds, aug_root, cache, seed, epochs, [mods.samples[i].name for i in tr])
    results.update(shipped)
    results.update(paper_table_rows(ds, aug_root, cache, seed, epochs))
    if earlier:
        earlier_rows(results, pipeline, full)
    y_arr = np.array(ytr)
    paths_tr = [mods.samples[i].path for i in tr]

    def on(x):
        return lambda a, b: logistic(x[a], y_arr[a], x[b])

    def boosted(x):
        return lambda a, b: list(HistGradientBoostingClassifier(random_state=seed).fit(x[a], y_arr[a]).predict(x[b]))

    candidates = {
        SINGLE[0]: on(feats["image"][tr]),
        SINGLE[1]: lambda a, b: small_cnn(
            [paths_tr[i] for i in a], list(y_arr[a]), [paths_tr[i] for i in b], seed, 10 if fast else 30
        ),
        SINGLE[2]: boosted(xs[tr]),
        SINGLE[3]: on(feats["vlm"][tr]),
        SINGLE[4]: on(feats["llm"][tr]),
        default_model.BOOSTING_DOTS: boosted(dots_tr),
    }
    if earlier:
        if [a_mods.samples[i].name for i in a_tr] != [mods.samples[i].name for i in tr]:
            raise SystemExit(f"seed {seed}: the answer-only modalities hold other training cards")
        candidates[SINGLE[5]] = on(a_feats["llm"][a_tr])
    # The best single modality is chosen by cross-validation of the training split (never the test split).
    results["_single_cv"] = single_cv(candidates, ytr, seed)

    if robustness:  # train on one difficulty, test on the other (same seed, same methods)
        clean = load_dataset(dataset(seed, difficulty="clean"))
        clean_aug = OUT / f"ds-clean-seed{seed}-tda"
        c_mods, c_feats = _features(clean, cache)
        c_tr, c_te = _split(c_mods, "train"), _split(c_mods, "test")
        c_ytr = [c_mods.samples[i].label for i in c_tr]
        c_yte = [c_mods.samples[i].label for i in c_te]
        field_test = Dataset(ds.split("test"), ds.root, ds.source, ds.labels)
        clean_test = Dataset(clean.split("test"), clean.root, clean.source, clean.labels)
        c_xs = np.array([stats_vector(f) for f in c_mods.ocr_fields])
        c_gb = HistGradientBoostingClassifier(random_state=seed).fit(c_xs[c_tr], c_ytr)
        over = {**epochs, **EARLIER, "pfa.mode": "progressive", "pfa.strides": full}
        results["robust image clean->clean"] = scores(
            c_yte, logistic(c_feats["image"][c_tr], c_ytr, c_feats["image"][c_te])
        )
        results["robust image clean->field"] = scores(yte, logistic(c_feats["image"][c_tr], c_ytr, feats["image"][te]))
        results["robust image field->clean"] = scores(c_yte, logistic(feats["image"][tr], ytr, c_feats["image"][c_te]))
        results["robust stats clean->clean"] = scores(c_yte, list(c_gb.predict(c_xs[c_te])))
        results["robust stats clean->field"] = scores(yte, list(c_gb.predict(xs[te])))
        results["robust stats field->clean"] = scores(c_yte, list(gb.predict(c_xs[c_te])))
        results["robust fused clean->clean"] = _fused(clean, clean_aug, cache, seed, over, "cmaf", True)
        results["robust fused clean->field"] = _fused(clean, clean_aug, cache, seed, over, "cmaf", True, field_test)
        results["robust fused field->clean"] = _fused(ds, aug_root, cache, seed, over, "cmaf", True, clean_test)
    results["_seconds"] = time.perf_counter() - t_seed
    return results


def fmt(vals: list[float]) -> str:
    v = np.array(vals) * 100
    return f"{v.mean():.2f} ± {v.std():.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def preds(per_seed: list[dict], key: str) -> list[tuple[list[str], list[str]]]:
    return [(r[key]["y_true"], r[key]["y_pred"]) for r in per_seed]


def interval(per_seed: list[dict], key: str) -> str:
    from intervals import bootstrap_interval

    lo, hi = bootstrap_interval(LABELS, preds(per_seed, key))
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def table(rows: list[tuple[str, str, tuple | None]], per_seed: list[dict]) -> str:
    out = [
        "| method | ours: macro-F1 binary | ours: macro-F1 5-class | 95% interval (5-class) "
        "| paper (ASE): binary / 5-class |",
        "|---|---|---|---|---|",
    ]
    for label, key, paper in rows:
        b = [r[key]["binary_macro_f1"] for r in per_seed]
        m = [r[key]["macro_f1"] for r in per_seed]
        out.append(
            f"| {label} | {fmt(b)} | {fmt(m)} | {interval(per_seed, key)} "
            f"| {f'{paper[0]:.2f} / {paper[1]:.2f}' if paper else '-'} |"
        )
    return "\n".join(out)


def effect(per_seed: list[dict], a: str, b: str) -> str:
    """a minus b, 5-class macro-F1 points, with the paired-bootstrap interval and p-value."""
    from intervals import paired_test

    t = paired_test(LABELS, preds(per_seed, a), preds(per_seed, b))
    per = ", ".join(f"{100 * (r[a]['macro_f1'] - r[b]['macro_f1']):+.1f}" for r in per_seed)
    return (
        f"{100 * t['difference']:+.2f} points [{100 * t['low']:+.2f}, {100 * t['high']:+.2f}], "
        f"p = {t['p_value']:.3f} (per seed: {per})"
    )


def _idle_share():
    """A function giving the share of the machine's CPU time spent idle since this call (Linux
    /proc/stat; None elsewhere): how much of the cores a phase of the run left unused."""

    def read() -> tuple[int, int] | None:
        try:
            values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError):
            return None
        return values[3] + values[4], sum(values)  # idle + iowait, all

    start = read()

    def share() -> float | None:
        now = read()
        if start is None or now is None or now[1] == start[1]:
            return None
        return (now[0] - start[0]) / (now[1] - start[1])

    return share


def _percent(share: float | None) -> str:
    return "?" if share is None else f"{100 * share:.0f}%"


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _run_seed_job(job: tuple[int, str, bool, bool, str, bool]) -> dict:
    seed, cache_dir, fast, robustness, subset, earlier = job
    return run_seed(seed, Cache(cache_dir), fast, robustness, subset, earlier)


SINGLE = (
    "image only: EfficientNet-Lite0 features + logistic regression",
    "image only: small CNN trained on the cards",
    "stats only: gradient boosting on OCR'd fields",
    "VLM text only: MiniLM features + logistic regression",
    "LLM text only: MiniLM features + logistic regression",
    "LLM answer only: MiniLM features + logistic regression",
)
ORACLE = "oracle (true latent parameters)"
# The oracle, the single modalities and the boosting yardstick as the docs' tables name them (the paper's
# image-only figure beside its row).
SINGLE_ROWS = [
    ("oracle (Bayes-optimal on true latent parameters)", ORACLE, None),
    (
        "image only: EfficientNet-Lite0 + logistic regression",
        SINGLE[0],
        PAPER["table2"]["EfficientNet-b6a (image only)"],
    ),
    ("image only: small CNN", SINGLE[1], None),
    ("stats only: gradient boosting on OCR'd fields", SINGLE[2], None),
    (f"gradient boosting on OCR'd fields + {IMAGE_PCS} image principal components", STATS_PCS, None),
    ("VLM text only (built-in describer) + logistic regression", SINGLE[3], None),
    ("LLM text only, composite (SmolLM2 answer + record) + logistic regression", SINGLE[4], None),
    ("LLM text only, answer only (SmolLM2, no record, no hint) + logistic regression", SINGLE[5], None),
]
PROPOSED = "grid pfa=1 cmaf=1 tda=1"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default=None, help="comma-separated generator seeds (default 0,1,2,3,4; --fast: 0)")
    ap.add_argument(
        "--robustness-seeds",
        default=None,
        help="seeds that also train on clean and test on field and the reverse (default: 0,1,2; --fast: none)",
    )
    ap.add_argument("--fast", action="store_true")
    ap.add_argument(
        "--earlier",
        action="store_true",
        help="also the paper's rows and tables in the configuration they were first measured with, the "
        "answer-only LLM text (a second LLM pass over every card) and the robustness table (the clean cards' "
        "modalities); results in quality-earlier.json and its own docs section (the default's section "
        "stays the default run's)",
    )
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument(
        "--jobs",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="seeds trained at once, one core each (default: the number of cores)",
    )
    ap.add_argument(
        "--subset",
        choices=["all", "branches"],
        default="all",
        help="branches: only the branch and attention ablations without TDA and the baselines they "
        "need (composite modalities only; a partial run), written to its own section",
    )
    ap.add_argument(
        "--render",
        action="store_true",
        help="write the docs section again from bench/results/quality[-earlier][-fast].json (no run)",
    )
    args = ap.parse_args()
    if args.earlier and args.subset == "branches":
        raise SystemExit("--earlier adds to the whole run; leave out --subset branches")
    name = (
        "quality"
        + ("-earlier" if args.earlier else "")
        + ("-fast" if args.fast else "")
        + ("-branches" if args.subset == "branches" else "")
    )
    show = render_branches if args.subset == "branches" else render
    if args.render:
        show(load(name))
        return
    seeds = [int(s) for s in (args.seeds or ("0" if args.fast else "0,1,2,3,4")).split(",")]
    rob_default = "0,1,2" if args.earlier and not args.fast else ""
    rob_seeds = [
        int(s)
        for s in (args.robustness_seeds if args.robustness_seeds is not None else rob_default).split(",")
        if s.strip() and int(s) in seeds
    ]
    cache = Cache(args.cache_dir)
    t0 = time.perf_counter()
    measured = measured_line()
    # The modalities (OCR, describer, LLM) of each seed in turn, each stage using every core; a seed's
    # training and scoring (one core a seed, --jobs seeds at once) starts as soon as its modalities are
    # cached, beside the next seeds' modalities, so that no core waits for the slowest phase. Every result
    # is the same whatever runs beside it (a model is the same bits whatever the load; docs/benchmarks.md).
    prep, submitted, idle = {}, {}, _idle_share()
    jobs = max(1, min(args.jobs, len(seeds)))
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_one_thread) as pool:
        for seed in seeds:
            t = time.perf_counter()
            if args.subset == "branches":
                _features(load_dataset(dataset(seed)), cache)
            else:
                prepare_seed(seed, cache, "field", answer_only=args.earlier)
            if seed in rob_seeds:
                prepare_seed(seed, cache, "clean", answer_only=False)  # the robustness rows read the composite text
            prep[seed] = time.perf_counter() - t
            print(f"seed {seed}: modalities ready in {prep[seed]:.0f} s", flush=True)
            job = (seed, args.cache_dir, args.fast, seed in rob_seeds, args.subset, args.earlier)
            submitted[seed] = pool.submit(_run_seed_job, job)
            for done in (f for f in submitted.values() if f.done()):
                done.result()  # a seed that failed stops the run now, not after every seed's modalities
        modalities_done = time.perf_counter() - t0
        idle_modalities = idle()
        per_seed = []
        for seed in seeds:
            r = submitted[seed].result()
            r["_prepare_seconds"] = prep[seed]
            per_seed.append(r)
            print(
                f"seed {seed}: trained and scored in {r['_seconds']:.0f} s;",
                json.dumps({k: round(v["macro_f1"], 4) for k, v in r.items() if isinstance(v, dict)}),
                flush=True,
            )
    total, idle_all = time.perf_counter() - t0, idle()
    print(
        f"modalities of every seed done at {modalities_done / 60:.1f} min (the cores idle "
        f"{_percent(idle_modalities)} of it); all done at {total / 60:.1f} min (idle {_percent(idle_all)} in all)",
        flush=True,
    )
    record = {
        "seeds": seeds,
        "robustness_seeds": rob_seeds,
        "fast": args.fast,
        "seconds": total,
        "modalities_done_seconds": modalities_done,
        "idle_share": {"until_modalities_done": idle_modalities, "all": idle_all},
        "per_seed": per_seed,
        "measured": measured,
    }
    save(name, record)
    show(record)


def render(record: dict) -> None:
    """The docs/benchmarks.md section of a run's saved record: the shipped default's for the default run,
    the paper configuration's for an ``--earlier`` run. An ``--earlier`` run also holds the default's rows,
    but its time is not the default run's, so it leaves that section to the default run."""
    seeds, fast, total, per_seed = record["seeds"], record["fast"], record["seconds"], record["per_seed"]
    rob_seeds, measured = record["robustness_seeds"], record["measured"]
    modalities_done = record.get("modalities_done_seconds")  # a run from before it was recorded has none
    cv: dict[str, list[float]] = {}
    for r in per_seed:
        for row, f1 in r.get("_single_cv", []):
            cv.setdefault(row, []).append(f1)
    mean = lambda k: float(np.mean([r[k]["macro_f1"] for r in per_seed]))  # noqa: E731
    # The best single modality by the training split's cross-validation; a run from before it existed
    # falls back on the test split, and says so.
    best_single = max(cv, key=lambda k: np.mean(cv[k])) if cv else max(SINGLE, key=mean)
    chosen_on = f"{CV_FOLDS}-fold cross-validation of each seed's training split" if cv else "the test split"
    suffix = "-fast" if fast else ""
    earlier = PROPOSED in per_seed[0]
    if not earlier:
        text = render_default(seeds, fast, total, per_seed, modalities_done, cv, best_single, chosen_on)
        update_section("quality" + suffix, text, measured)
        print(text)
    else:
        text = render_earlier(seeds, rob_seeds, fast, total, per_seed, best_single, chosen_on)
        update_section("quality-earlier" + suffix, text, measured)
        print(text)


def _title(seeds: list[int], fast: bool) -> str:
    n = len(seeds)
    return f"{n} seed{'s' * (n > 1)}: " + ", ".join(map(str, seeds)) + (", fast mode" if fast else "")


def render_default(
    seeds: list[int],
    fast: bool,
    total: float,
    per_seed: list[dict],
    modalities_done: float | None,
    cv: dict,
    best_single: str,
    chosen_on: str,
) -> str:
    """The shipped default's section: its rows and parts (render_shipped), the single modalities, the
    paper's tables 3-5 on the default, and token against chunk attention on the paper's branches."""
    import paper_tables

    singles = [row for row in SINGLE_ROWS if row[1] in per_seed[0]]
    present = [k for k in {**paper_tables.ROWS, **paper_tables.TDA_ROWS} if k in per_seed[0]]
    tda = [k for k in present if k in paper_tables.TDA_ROWS]
    tables = [SHIPPED, *(k for k in present if k not in tda), SHIPPED_TDA, *tda]
    timing = (
        f" The modalities of every seed were ready at {modalities_done / 60:.1f} min; each seed's training and "
        "scoring ran beside the next seeds' modalities."
        if modalities_done
        else ""
    )
    attention = [
        ("CMAF, token attention (one token per branch), no TDA", TOKENS, None),
        ("CMAF, chunk attention (eight chunks of one vector), no TDA", CHUNKS, None),
    ]
    return f"""### Quality on generated `field` cards ({_title(seeds, fast)})

Synthetic cards from `asectl synth` at the default `field` difficulty (docs/dataset.md), **not** the
paper's private ASE data. Macro-F1 in percent, mean ± std over seeds, and a 95% bootstrap interval over
test cards (bench/intervals.py). Built-in describer, SmolLM2-135M reasoning, CnOCR. Labels are the
inspectors' (some differ from the generating class, as on real lines). Binary macro-F1 is derived from the
5-class predictions. Run time: {total / 60:.1f} min.{timing}
{render_shipped(per_seed, cv, best_single, chosen_on)}
The single modalities and the simple yardsticks on the test split (the paper's image-only figure beside,
for orientation only):

{table(singles, per_seed)}

The paper's tables 3, 4 and 5 on the shipped default (bench/paper_tables.py's rows: one setting changed
from the default as the paper's tables change it; the default's own rows are the models above):

{decision_table(tables, per_seed)}

{chr(10).join(f"- default minus {k}: {effect(per_seed, SHIPPED, k)}" for k in tables if k != SHIPPED)}

Token against chunk attention needs the paper's three branches (chunks split one vector of them): both
on the paper's configuration (`EARLIER` in bench/quality.py: image, VLM and LLM branches, frozen
EfficientNet-Lite0, the MLP classifier), PFA, no TDA:

{table(attention, per_seed)}

- token minus chunk attention: {effect(per_seed, TOKENS, CHUNKS)}
"""


def decision_table(keys: list[str], per_seed: list[dict]) -> str:
    """Rows ``keys`` with macro-F1, its interval and the line's figures at the stored targets."""
    lines = [
        "| method | macro-F1 binary | macro-F1 5-class | 95% interval (5-class) | review share | missed / defective |",
        "|---|---|---|---|---|---|",
    ]
    for key in keys:
        review, missed, _, _ = default_model.decision_cells([r[key].get("decisions") for r in per_seed])
        lines.append(
            f"| {key} | {fmt([r[key]['binary_macro_f1'] for r in per_seed])} | "
            f"{fmt([r[key]['macro_f1'] for r in per_seed])} | {interval(per_seed, key)} | {review} | {missed} |"
        )
    return "\n".join(lines)


def render_earlier(
    seeds: list[int],
    rob_seeds: list[int],
    fast: bool,
    total: float,
    per_seed: list[dict],
    best_single: str,
    chosen_on: str,
) -> str:
    """The paper configuration's section (``--earlier``): the paper's rows and tables 3-5 as first
    measured, beside the paper's figures, with the robustness table when run."""
    main_rows = [
        *(row for row in SINGLE_ROWS if row[1] != STATS_PCS),
        ("concat fusion (PFA), no TDA", "grid pfa=1 cmaf=0 tda=0", None),
        ("concat fusion (PFA), TDA", "grid pfa=1 cmaf=0 tda=1", None),
        ("PFA + CMAF, no TDA", "grid pfa=1 cmaf=1 tda=0", PAPER["table2"]["Proposed (PFA+CMAF)"]),
        ("PFA + CMAF, TDA (LLM text: composite)", PROPOSED, PAPER["table2"]["Proposed with TDA"]),
        ("PFA + CMAF, TDA (LLM text: answer only)", "llm answer only pfa=1 cmaf=1 tda=1", None),
        (f"PFA + CMAF, TDA (image encoder: {OTHER_IMAGE})", "other image encoder pfa=1 cmaf=1 tda=1", None),
    ]
    grid_rows = [
        (
            f"PFA {'✓' if p else '-'} / CMAF {'✓' if c else '-'} / TDA {'✓' if t else '-'}",
            f"grid pfa={p} cmaf={c} tda={t}",
            PAPER["table3"].get((p, c, t)),
        )
        for p in (1, 0)
        for c in (1, 0)
        for t in (0, 1)
    ]
    stride_rows = [
        (
            "without alignment (untrained projections, same update count)",
            "grid pfa=0 cmaf=1 tda=1",
            PAPER["table4"]["none"],
        ),
        ("direct alignment (whole, same update count)", "stride direct", PAPER["table4"]["direct"]),
        ("PFA 0.2/0.6/1", "stride 0.2/0.6/1", PAPER["table4"]["0.2/0.6/1"]),
        ("PFA 0.2/0.4/0.6/0.8/1", PROPOSED, PAPER["table4"]["0.2/0.4/0.6/0.8/1"]),
    ]
    fusion_rows = [
        ("direct concatenation", "grid pfa=1 cmaf=0 tda=1", PAPER["table5"]["concat"]),
        ("CMAF without sigmoid", "fusion cmaf-nosigmoid", PAPER["table5"]["cmaf-nosigmoid"]),
        ("CMAF with sigmoid", PROPOSED, PAPER["table5"]["cmaf"]),
        ("CMAF with sigmoid, token attention (one token per branch)", "attention tokens tda=1", None),
    ]
    main_rows = [row for row in main_rows if row[1] in per_seed[0]]  # a run before a row existed
    mean = lambda k: float(np.mean([r[k]["macro_f1"] for r in per_seed]))  # noqa: E731
    best_key = max((k for k in per_seed[0] if k.startswith(("grid", "stride", "fusion", "llm answer"))), key=mean)
    per_class = ["| method | " + " | ".join(LABELS) + " |", "|---" * (len(LABELS) + 1) + "|"]
    for label, key, _ in main_rows:
        per_class.append(
            f"| {label} | " + " | ".join(fmt([r[key]["per_class_f1"][c] for r in per_seed]) for c in LABELS) + " |"
        )
    effects = [
        ("PFA + CMAF + TDA vs the best single modality", PROPOSED, best_single),
        ("PFA (progressive vs no alignment, with CMAF + TDA)", PROPOSED, "grid pfa=0 cmaf=1 tda=1"),
        ("progressive vs direct alignment (with CMAF + TDA)", PROPOSED, "stride direct"),
        ("CMAF vs concatenation (with PFA + TDA)", PROPOSED, "grid pfa=1 cmaf=0 tda=1"),
        ("CMAF: chunk vs token attention (with PFA + TDA)", PROPOSED, "attention tokens tda=1"),
        ("TDA (with PFA + CMAF)", PROPOSED, "grid pfa=1 cmaf=1 tda=0"),
        ("PFA + CMAF without TDA vs the best single modality", "grid pfa=1 cmaf=1 tda=0", best_single),
        ("CMAF vs concatenation (with PFA, no TDA)", "grid pfa=1 cmaf=1 tda=0", "grid pfa=1 cmaf=0 tda=0"),
        ("image only: small CNN vs frozen EfficientNet-Lite0 + LR", SINGLE[1], SINGLE[0]),
        ("LLM text composite vs answer only (with PFA + CMAF + TDA)", PROPOSED, "llm answer only pfa=1 cmaf=1 tda=1"),
        (
            f"image encoder: EfficientNet-Lite0 vs {OTHER_IMAGE} (with PFA + CMAF + TDA)",
            PROPOSED,
            "other image encoder pfa=1 cmaf=1 tda=1",
        ),
        ("oracle vs PFA + CMAF + TDA", ORACLE, PROPOSED),
    ]
    effect_lines = "\n".join(
        f"- {name}: {effect(per_seed, a, b)}" for name, a, b in effects if a in per_seed[0] and b in per_seed[0]
    )
    rob = [r for r in per_seed if "robust fused clean->field" in r]
    rob_text = ""
    if rob:
        rob_rows = [
            "| method | trained clean, tested clean | trained clean, tested field | "
            "trained field, tested field | trained field, tested clean |",
            "|---|---|---|---|---|",
        ]
        for label, short, field_key in (
            ("image only: EfficientNet-Lite0 + LR", "image", SINGLE[0]),
            ("stats only: gradient boosting", "stats", SINGLE[2]),
            ("PFA + CMAF + TDA", "fused", PROPOSED),
        ):
            cell = lambda k: f"{fmt([r[k]['macro_f1'] for r in rob])} {interval(rob, k)}"  # noqa: E731
            rob_rows.append(
                f"| {label} | {cell(f'robust {short} clean->clean')} | {cell(f'robust {short} clean->field')} "
                f"| {cell(field_key)} | {cell(f'robust {short} field->clean')} |"
            )
        rob_text = (
            f"\nRobustness (5-class macro-F1, seeds {', '.join(str(s) for s in rob_seeds)}; the same "
            "seed's clean and field datasets):\n\n" + "\n".join(rob_rows) + "\n"
        )
    text = f"""### The paper's configuration on generated `field` cards ({_title(seeds, fast)})

The paper's rows and tables (`--earlier`) in the configuration they were first measured with (the paper's
three branches, CMAF with chunk attention over frozen EfficientNet-Lite0 and MiniLM features, the MLP
classifier; hyperparameters from bench/tune_profile.py on held-out training folds), whatever the shipped
default is (`EARLIER` in bench/quality.py names every setting), so that they keep measuring the method as
the paper describes it. The same cards, split and metrics as "Quality on generated `field` cards"; the
paper's numbers (ASE data) beside ours for orientation only. Run time of the whole run (both sections):
{total / 60:.1f} min.

{table(main_rows, per_seed)}

Per-class F1 (5-class):

{chr(10).join(per_class)}

Table 3 (ablation grid: PFA off = `--mode none`, CMAF off = `--fusion concat`):

{table(grid_rows, per_seed)}

Table 4 (alignment strategy, with CMAF and TDA; every mode gets the same number of projection updates):

{table(stride_rows, per_seed)}

Table 5 (fusion, with PFA and TDA):

{table(fusion_rows, per_seed)}

Effects (5-class macro-F1, first minus second, mean over seeds; paired bootstrap over the same test cards,
95% interval and two-sided p-value):

{effect_lines}
{rob_text}
Best of the paper's configurations: `{best_key}` at {100 * mean(best_key):.2f}; best single modality (chosen
on {chosen_on}): {best_single} at {100 * mean(best_single):.2f}; oracle {100 * mean(ORACLE):.2f}. Ratio of
PFA + CMAF + TDA to the oracle: {mean(PROPOSED) / mean(ORACLE):.3f}; PFA + CMAF + TDA minus the best single
modality: {100 * (mean(PROPOSED) - mean(best_single)):+.2f} points.
"""
    return text


def render_shipped(per_seed: list[dict], cv: dict, best_single: str, chosen_on: str) -> str:
    """The shipped default's part of the quality section: its rows with the line's figures, the single
    modalities' cross-validation on the training split, and its effects and goals."""
    n = len(per_seed)
    ablations = [k for k in SHIPPED_ROWS if k not in (SHIPPED, SHIPPED_TDA)]
    rows = [SHIPPED, SHIPPED_TDA, *ablations, *NUMBERS, ORACLE]
    mean = lambda k: float(np.mean([r[k]["macro_f1"] for r in per_seed]))  # noqa: E731
    cv_lines = ["| single modality | cross-validation, training split | test split |", "|---|---|---|"]
    for row in sorted(cv, key=lambda k: -np.mean(cv[k])):
        mark = " (chosen)" if row == best_single else ""
        cv_lines.append(f"| {row}{mark} | {fmt(cv[row])} | {fmt([r[row]['macro_f1'] for r in per_seed])} |")
    effects = [
        ("the shipped default vs the best single modality", SHIPPED, best_single),
        ("the shipped default vs boosting on the printed and the dot pattern's numbers", SHIPPED, NUMBERS[2]),
        *((f"the shipped default vs the shipped {k[len('shipped ') :]}", SHIPPED, k) for k in ablations),
        ("TDA (the shipped default with TDA vs without)", SHIPPED_TDA, SHIPPED),
        ("oracle vs the shipped default", ORACLE, SHIPPED),
    ]
    gap = effect(per_seed, SHIPPED, best_single)
    return f"""
**The shipped default** (`asectl fuse-train` with the quick profile as shipped, trained with the generator
seed, scored through asectl's own predictor with its stored decision rule at 1% miss and 5% defect error;
the same models as bench/default_model.py's from the same cache), each of its parts off in turn, gradient
boosting on its stats vectors, and the oracle ({n} seed{"s" * (n > 1)}):

{decision_table(rows, per_seed)}

The single modalities, {CV_FOLDS}-fold cross-validation of each seed's training split (macro-F1 of the
out-of-fold labels, mean ± std over seeds) beside the test split; the best single modality is the first,
chosen on {chosen_on}:

{chr(10).join(cv_lines)}

Effects (5-class macro-F1, first minus second; paired bootstrap over the same test cards):

{chr(10).join(f"- {name}: {effect(per_seed, a, b)}" for name, a, b in effects)}

Goals: the shipped default reaches {mean(SHIPPED) / mean(ORACLE):.3f} x the oracle (goal: at least 0.95);
against the best single modality ({best_single}): {gap}; goal: at least +5, the interval above 0.
"""


def render_branches(record: dict) -> None:
    """The docs/benchmarks.md section of a ``--subset branches`` run's saved record: the stats branch on
    and off, token against chunk attention, and the boosting yardsticks, all without TDA."""
    seeds, fast, total, per_seed = record["seeds"], record["fast"], record["seconds"], record["per_seed"]
    measured = record["measured"]
    n = len(seeds)
    rows = [
        ("oracle (Bayes-optimal on true latent parameters)", ORACLE, None),
        ("image only: EfficientNet-Lite0 + logistic regression", SINGLE[0], None),
        ("stats only: gradient boosting on OCR'd fields", SINGLE[2], None),
        (f"gradient boosting on OCR'd fields + {IMAGE_PCS} image principal components", STATS_PCS, None),
        ("VLM text only (built-in describer) + logistic regression", SINGLE[3], None),
        ("LLM text only, composite + logistic regression", SINGLE[4], None),
        ("PFA + CMAF, chunk attention, branches image/vlm/llm (the earlier default)", "grid pfa=1 cmaf=1 tda=0", None),
        ("PFA + CMAF, token attention, branches image/vlm/llm", "attention tokens tda=0", None),
        ("PFA + CMAF, token attention, branches image/vlm/llm/stats", "branches +stats tokens tda=0", None),
        ("PFA + concatenation, branches image/vlm/llm/stats", "branches +stats concat tda=0", None),
    ]
    effects = [
        ("stats branch on vs off (token attention)", "branches +stats tokens tda=0", "attention tokens tda=0"),
        ("token vs chunk attention (image/vlm/llm)", "attention tokens tda=0", "grid pfa=1 cmaf=1 tda=0"),
        (
            "token attention vs concatenation (with stats)",
            "branches +stats tokens tda=0",
            "branches +stats concat tda=0",
        ),
        ("fused with stats (tokens) vs boosting on numbers + image PCs", "branches +stats tokens tda=0", STATS_PCS),
        ("fused with stats (tokens) vs boosting on the numbers alone", "branches +stats tokens tda=0", SINGLE[2]),
        ("oracle vs fused with stats (tokens)", ORACLE, "branches +stats tokens tda=0"),
    ]
    seed_list = _title(seeds, fast)
    text = f"""### Branches and attention on generated `field` cards (partial run: {seed_list}, no TDA)

A partial run: {"seed " if n == 1 else "seeds "}{", ".join(map(str, seeds))} only (not the five seeds of the section
above), every fused row without TDA, and the single fusion settings of the quick profile otherwise. Same
cards, split, modalities and metrics as the section above (`--subset branches` of bench/quality.py).
Run time: {total / 60:.1f} min.

{table(rows, per_seed)}

Effects (5-class macro-F1, first minus second; paired bootstrap over the same test cards):

{chr(10).join(f"- {name}: {effect(per_seed, a, b)}" for name, a, b in effects)}
"""
    update_section("quality-branches" + ("-fast" if fast else ""), text, measured)
    print(text)


if __name__ == "__main__":
    main()
