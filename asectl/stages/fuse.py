"""``asectl fuse-train``: cross-modality attention fusion (CMAF, paper section 3.4) and the classifier.

Takes the aligned features of the training split from the ``align`` entry (running alignment first if
it is not cached), trains CMAF + MLP with cross-entropy, and stores a model bundle in the cache.

The classifier is the average of the fold models of a k-fold cross-validation on the training split
(scikit-learn's ``CalibratedClassifierCV(ensemble=True)``): each fold model's held-out predictions fit
the temperature and the pass/defect/defective/review rule (asectl.models.calibration), and the same fold models
classify new cards, so the rule is applied to the models it was chosen on. bench/calibration_method.py
compared this with one model trained on every card (the rule then missed both targets on held-out
training folds) and with a validation split. The test split is never read here."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from asectl import __version__, ui
from asectl.bundle import (
    FUSION_MEMBER,
    LATEST_POINTER,
    Bundle,
    bundle_format,
    load_bundle,
    write_checksums,
    write_held_out_scores,
)
from asectl.cache import Cache, make_key
from asectl.domain.card import load_spec
from asectl.domain.dataset import Dataset
from asectl.environment import training_machine
from asectl.models.calibration import DEFAULT_CALIBRATION_FOLDS, DEFAULT_MAX_DEFECT_ERROR, DEFAULT_MAX_MISS_RATE
from asectl.stages.align import AlignOutcome, run_align
from asectl.stages.common import dataset_id, folder_id

log = logging.getLogger("asectl")

STAGE = "model"


@dataclass
class FuseOutcome:
    key: str
    bundle: Bundle
    align: AlignOutcome
    from_cache: bool


def align_args(cache: Cache, dataset: Dataset) -> dict[str, Any]:
    """The alignment settings last used on this dataset (so fuse-train continues what align did)."""
    ptr = cache.get_pointer(f"align-{dataset_id(dataset)}") or {}
    keys = ("profile", "overrides", "seed", "augmented", "settings_sources")
    return {k: ptr[k] for k in keys if ptr.get(k) is not None}


def run_fuse_train(
    dataset: Dataset,
    cache: Cache | None = None,
    *,
    fusion: str | None = None,
    task: str | None = None,
    attention: str | None = None,
    projections: str | None = None,
    augmented: str | Path | None = None,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    seed: int | None = None,
    force: bool = False,
    max_miss_rate: float = DEFAULT_MAX_MISS_RATE,
    max_defect_error: float = DEFAULT_MAX_DEFECT_ERROR,
    calibration_folds: int = DEFAULT_CALIBRATION_FOLDS,
    defect_confidence: float | None = None,
    max_defective_error: float | None = None,
    defective_decision: bool = True,
    settings_sources: Mapping[str, str] | None = None,
) -> FuseOutcome:
    """Train the fusion over the dataset's alignment (run_align with the settings align last used on it,
    ``overrides``' pfa./encoders. keys above them) and store a bundle. ``settings_sources`` (setting key ->
    where its value came from) is recorded in the bundle with the align pointer's, never in the cache key:
    a bundle says where the settings of the run that trained it came from."""
    from asectl.models.calibration import check_confidence, check_target
    from asectl.models.train_config import get_profile

    cache = cache or Cache()
    prev = align_args(cache, dataset)
    a_profile = profile or prev.get("profile", "quick")
    a_over = {
        **prev.get("overrides", {}),
        **{k: v for k, v in (overrides or {}).items() if k.startswith(("pfa.", "encoders."))},
    }
    kept = {k: v for k, v in prev.get("overrides", {}).items() if k not in (overrides or {})}
    if kept:  # settings no one gave this run: say so, an earlier run's --set may be among them
        log.info(
            "fuse-train: the dataset's alignment keeps %s from its last run (asectl align DATA starts afresh)",
            ", ".join(f"{k}={v}" for k, v in sorted(kept.items())),
        )
    a_seed = prev.get("seed", 0) if seed is None else seed
    a_aug = augmented if augmented is not None else prev.get("augmented")
    given_sources = dict(settings_sources or {})
    a_sources = {
        **prev.get("settings_sources", {}),
        **{k: v for k, v in given_sources.items() if k.startswith(("pfa.", "encoders."))},
    }
    f_over = {k: v for k, v in (overrides or {}).items() if k.startswith("fusion.")}
    if fusion:
        f_over["fusion.variant"] = fusion
    if attention:
        f_over["fusion.attention"] = attention
    if projections:
        f_over["fusion.projections"] = projections
    if task:
        f_over["fusion.task"] = task
    prof = get_profile(a_profile, {**a_over, **f_over, "seed": a_seed})
    end_to_end = check_end_to_end(prof)  # before align: a refused setting costs no alignment
    align = run_align(
        dataset,
        cache,
        profile=a_profile,
        overrides=a_over,
        seed=a_seed,
        augmented=a_aug,
        settings_sources=a_sources,
    )
    branches = align_branches(align)
    check_fusion_branches(prof.fusion, branches)
    trees = prof.fusion.trees_apply(branches)
    if prof.fusion.numbers_trees and not trees:
        prof.fusion.numbers_trees = False  # recorded as not used: the model and its key are those without trees
        log.info("the trees member is not used: it reads the stats branch and needs frozen heads")
    targets = {
        "max_miss_rate": check_target("max_miss_rate", max_miss_rate),
        "max_defect_error": check_target("max_defect_error", max_defect_error),
        # In the key only when given: models trained before these existed keep their keys.
        **(
            {}
            if max_defective_error is None
            else {"max_defective_error": check_target("max_defective_error", max_defective_error)}
        ),
        **({} if defective_decision else {"defective_decision": False}),
    }
    # defect_scan names how the defect threshold is chosen (asectl.models.calibration.choose_rule), so
    # models whose rule was chosen the earlier way ("lowest cut") are not reused.
    # held_out_scores: the bundle stores the held-out scores (predict --max-miss-rate), so older models are not reused.
    calib_args = {
        "method": "temperature",
        "folds": int(calibration_folds),
        **targets,
        "defect_scan": "first-failure",
        "held_out_scores": True,
        "defect_confidence": None if defect_confidence is None else check_confidence(defect_confidence),
    }
    # A frozen profile's dict leaves the end-to-end settings out (TrainProfile.to_dict): frozen models keep
    # the keys they had before end-to-end training existed.
    key = make_key(
        STAGE,
        format=bundle_format(end_to_end, trees),
        align=align.key,
        fusion=prof.to_dict()["fusion"],
        seed=a_seed,
        calibration=calib_args,
    )
    entry = None if force else cache.get(STAGE, key)
    if entry is None:
        from asectl.models.cmaf import map_labels, save_fusion
        from asectl.models.seeding import one_cpu_thread

        train = align.train_index()
        # End to end: the encoder features, projected by each fold model's own heads and adapters; frozen:
        # the alignment's aligned features.
        emb = align.raw_features() if end_to_end else align.embeddings()
        feats = {m: emb[m][train] for m in branches}
        labels = [align.labels[i] for i in train]
        names = [align.names[i] for i in train]
        # Cards TDA added train the fold models but are not held-out evidence: the temperature and the
        # rule are fitted on the user's own training cards only.
        real = {s.name for s in dataset.split("train")}
        with one_cpu_thread(prof.encoders.device):
            members, histories, calibration, decision = calibrate(
                feats,
                labels,
                names,
                [n in real for n in names],
                prof.fusion,
                a_seed,
                map_labels(labels, prof.fusion.task)[1],
                prof.encoders.device,
                calib_args,
                heads=align.heads() if end_to_end else None,
                numbers=align.raw_features()["stats"][train] if trees else None,
            )
        held_out_scores = decision.pop("held_out_scores")
        history = mean_history(histories)
        spec_arg = align.summary["replay"]["ocr"].get("spec")
        spec = load_spec(spec_arg)

        def build(tmp: Path) -> dict[str, Any]:
            import shutil

            shutil.copyfile(align.path / "heads.safetensors", tmp / "heads.safetensors")
            for k, member in enumerate(members):
                save_fusion(member, tmp / FUSION_MEMBER.format(k))
            write_held_out_scores(tmp, *held_out_scores)
            if (align.path / "encoders").is_dir():
                shutil.copytree(align.path / "encoders", tmp / "encoders")
            pfa = align.summary["pfa"]
            config = {
                "format": bundle_format(end_to_end, trees),
                "asectl_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "classes": members[0].bundle.classes,
                "task": members[0].bundle.task,
                "variant": prof.fusion.variant,
                "attention": prof.fusion.attention,
                "branches": list(branches),
                "classifier": prof.fusion.resolved_classifier(),
                **({"numbers_trees": {"weight": prof.fusion.trees_weight, **members[0].trees.params}} if trees else {}),
                **({"projections": end_to_end_record(members[0], prof.fusion)} if end_to_end else {}),
                "stats_fields": align.summary.get("stats_fields", []),
                "fusion_members": len(members),
                "profile": prof.to_dict(),
                "settings_sources": {**a_sources, **given_sources},
                "seed": a_seed,
                "encoders": align.summary["encoders"],
                "heads": pfa["heads"],
                "replay": align.summary["replay"],
                "provenance": align.summary["provenance"],
                "card_spec": {"name": spec.name, "sha256": spec.digest, "toml": Path(spec.source).read_text()},
                "split": dataset.split_record(),
                "training": {
                    "dataset": str(dataset.root),
                    "align_key": align.key,
                    "data_fingerprint": _fingerprint(align),
                    "n_train": len(train),
                    "augmented": str(a_aug) if a_aug else None,
                    "class_counts": {c: labels.count(c) for c in sorted(set(labels))},
                    "machine": training_machine(),  # the fusion's; the alignment's is align_machine
                    "align_machine": align.summary.get("machine"),  # None: aligned by a version before it
                    # where a cached image encoder was trained (None: frozen, or trained by a version before it)
                    "image_encoder_machine": (align.summary.get("image_training") or {}).get("machine"),
                },
                "metrics": {
                    "d_pend": [
                        {"stage": s["stage"], "n_pend": s["n_pend"], "val_loss": s["val_loss"], "note": s["val_note"]}
                        for s in pfa["stages"]
                    ],
                    "train_accuracy_last_epoch": history[-1]["accuracy"],
                    "train_loss_last_epoch": history[-1]["loss"],
                },
                "fusion_history": history,
                "calibration": calibration,
                "decision": decision,
            }
            write_checksums(tmp, config)
            return {"params": {"align": align.key, "variant": prof.fusion.variant, "task": prof.fusion.task}}

        entry = cache.put_tree(STAGE, key, build)
        from_cache = False
    else:
        from_cache = True
    bundle = load_bundle(entry.path)
    # The dataset a model was trained on is the one its bundle names: a cache hit from a folder of the
    # same cards (a copy) makes it that folder's model too, but never relabels where it came from.
    pointer = {"key": key, "dataset": bundle.config["training"]["dataset"], "created": bundle.config["created"]}
    cache.set_pointer(LATEST_POINTER, pointer)
    cache.set_pointer(dataset_model_pointer(dataset), pointer)
    return FuseOutcome(key, bundle, align, from_cache)


def check_end_to_end(prof: Any) -> bool:
    """Whether the fusion trains the projection heads too (asectl.models.adapters). That reads align's cached
    encoder features, which are not those of encoders fine-tuned in align: such a profile is refused."""
    from asectl.errors import ConfigError

    if prof.fusion.projections != "end-to-end":
        return False
    if prof.encoders.finetune:
        raise ConfigError(
            "--heads end-to-end trains the projection heads on align's cached encoder features, but "
            "this profile fine-tunes its encoders in align (encoders.finetune); use --heads frozen "
            "or --set encoders.finetune=false"
        )
    return True


def end_to_end_record(member: Any, config: Any) -> dict[str, Any]:
    """What bundle.json says of heads trained end to end (each fold model carries its own)."""
    meta = member.projections.meta()
    return {
        "training": "end-to-end",
        "heads_lr": config.projections_lr,
        "adapter_dim": meta["adapter_dim"],
        "adapters": meta["adapters"],
        "stored": "in each fold model (fusion-K.safetensors)",
    }


def align_branches(align: AlignOutcome) -> list[str]:
    """The branches an alignment was trained with (the paper's three for entries before branches existed)."""
    return list(align.summary.get("branches") or align.summary["pfa"].get("branches") or ("image", "llm", "vlm"))


def check_fusion_branches(config: Any, branches: list[str]) -> None:
    """Chunk attention has fixed roles (Q = VLM, K = LLM, V = image): it takes exactly those three branches.
    (Checked here, without importing torch, so a cached rerun stays light.)"""
    from asectl.errors import ConfigError
    from asectl.models.train_config import PAPER_BRANCHES

    if config.variant != "concat" and config.attention == "chunks" and set(branches) != set(PAPER_BRANCHES):
        raise ConfigError(
            f"--attention chunks attends from VLM (Q) and LLM (K) to image (V) and needs exactly "
            f"the branches {','.join(PAPER_BRANCHES)} (this alignment has {','.join(branches)}); "
            "use --attention tokens, --fusion concat, or align with those branches"
        )


def dataset_model_pointer(dataset: Dataset | str | Path) -> str:
    """The cache pointer naming the latest model trained on a dataset (a Dataset or its folder)."""
    return f"model-{folder_id(dataset) if isinstance(dataset, (str, Path)) else dataset_id(dataset)}"


def remembered_split_seed(cache: Cache, folder: str | Path) -> int:
    """The split seed ``align`` last used on the dataset in ``folder`` (0 if none): fuse-train trains on
    the split that was aligned."""
    ptr = cache.get_pointer(f"align-{folder_id(folder)}") or {}
    return int(ptr.get("split_seed") or 0)


def _fingerprint(align: AlignOutcome) -> str:
    from asectl.cache import canonical_json, sha256_bytes

    return sha256_bytes(canonical_json(align.summary["samples"]).encode())


def calibrate(
    feats: Mapping[str, Any],
    labels: list[str],
    names: list[str],
    held_out: list[bool],
    config: Any,
    seed: int,
    classes: list[str],
    device: str,
    args: Mapping[str, Any],
    heads: Any = None,
    numbers: Any = None,
) -> tuple[list[Any], list[list[dict]], dict[str, Any], dict[str, Any]]:
    """The classifier, its temperature and its decision rule from a stratified k-fold cross-validation on
    the training cards: k fold models (each trained like a single model would be: same settings, same
    seed, on the other folds), their out-of-fold logits on the cards marked ``held_out`` (the user's own
    cards; TDA's only train), the temperature minimising those logits' NLL and the rule chosen on them.
    ``heads``: the alignment's heads, which fold models trained end to end start from (``feats`` are then
    encoder features). ``numbers``: the stats branch's raw vectors of the same cards, which each fold
    model's trees member learns from when ``config.numbers_trees`` (asectl.models.trees). Returns (fold
    models, their training histories, calibration record, decision record); the decision record's
    ``held_out_scores`` are the (calibrated probabilities, true class indices) the rule was chosen on."""
    import numpy as np

    from asectl.models.calibration import (
        choose_rule,
        decision_stats,
        expected_calibration_error,
        fit_temperature,
        nll,
        softmax,
        stratified_folds,
    )
    from asectl.models.cmaf import map_labels, predict_logits, train_fusion

    y, _ = map_labels(labels, config.task, classes)
    fold = stratified_folds([classes[i] for i in y], args["folds"], seed)
    logits = np.zeros((len(y), len(classes)), dtype=np.float64)
    members, histories = [], []
    steps = 1 if config.resolved_classifier() == "logistic" else config.epochs  # the logistic fit is one step
    with ui.progress(args["folds"] * steps, f"fuse-train ({config.variant}, {args['folds']} fold models)") as advance:
        for k in range(args["folds"]):
            fit, held = fold != k, fold == k
            model, history = train_fusion(
                {m: v[fit] for m, v in feats.items()},
                [labels[i] for i in np.flatnonzero(fit)],
                config,
                seed,
                classes=classes,
                device=device,
                heads=heads,
                on_epoch=lambda row: advance(status=f"loss {row['loss']:.3f} acc {row['accuracy']:.2f}"),
            )
            logits[held] = predict_logits(model, {m: v[held] for m, v in feats.items()})
            if config.numbers_trees:
                from asectl.models.trees import fit_numbers_trees, with_trees

                model.trees = fit_numbers_trees(
                    numbers[fit], y[fit], len(classes), seed, config.trees_l2, config.trees_max_leaf_nodes
                )
                model.trees.params["weight"] = config.trees_weight
                logits[held] = with_trees(model.trees, logits[held], {"stats": numbers[held]})
            members.append(model)
            histories.append(history["epochs"])
    scored = np.asarray(held_out, dtype=bool)
    if not scored.any():
        from asectl.errors import DataError

        raise DataError(
            "no training card of the dataset itself reached fuse-train (only augmented ones); "
            "check that OCR reads its cards"
        )
    z, y_s = logits[scored], y[scored]
    temperature = fit_temperature(z, y_s)
    before, after = softmax(z), softmax(z, temperature)
    rule = choose_rule(after, y_s, classes, **rule_targets(args))
    top = after.argmax(axis=1)
    calibration = {
        "method": "temperature scaling",
        "classifier": f"the average of the {args['folds']} fold models",
        "temperature": temperature,
        "folds": args["folds"],
        "seed": seed,
        "n_held_out": int(scored.sum()),
        "n_augmented": int((~scored).sum()),
        "held_out": {n: int(f) for n, f, s in zip(names, fold, scored) if s},
        "held_out_nll": {"before": nll(z, y_s), "after": nll(z, y_s, temperature)},
        "held_out_ece": {
            "before": expected_calibration_error(before, y_s),
            "after": expected_calibration_error(after, y_s),
        },
        "held_out_accuracy": float((top == y_s).mean()),
        "held_out_errors": int((top != y_s).sum()),
    }
    decision = {
        **rule.to_dict(),
        "held_out": decision_stats(rule.decide(after), y_s, top, classes),
        "tradeoff": miss_rate_tradeoff(after, y_s, classes, rule_targets(args)),
        "held_out_scores": (after, y_s),
    }  # stored in the bundle as arrays, not in bundle.json
    return members, histories, calibration, decision


def mean_history(histories: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per epoch, the mean over fold models of each figure (loss, accuracy, ...): one training curve."""
    import numpy as np

    return [
        {
            key: (row[key] if key == "epoch" else float(np.mean([h[e][key] for h in histories])))
            for key in row
            if isinstance(row[key], (int, float))
        }
        for e, row in enumerate(histories[0])
    ]


MISS_RATE_TARGETS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1)


def rule_targets(args: Mapping[str, Any]) -> dict[str, Any]:
    """choose_rule's targets and switches from a model's calibration arguments (absent ones: defaults)."""
    return {
        "max_miss_rate": args["max_miss_rate"],
        "max_defect_error": args["max_defect_error"],
        "defect_confidence": args.get("defect_confidence"),
        "defective_decision": args.get("defective_decision", True),
        "max_defective_error": args.get("max_defective_error"),
    }


def miss_rate_tradeoff(probs: Any, y: Any, classes: list[str], targets: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Held-out review share and miss rate for a few other miss-rate targets (the other ``targets`` as
    given): what a stricter or looser target would cost, without retraining to find out."""
    from asectl.models.calibration import choose_rule, decision_stats

    rows = []
    for target in MISS_RATE_TARGETS:
        rule = choose_rule(probs, y, classes, **{**targets, "max_miss_rate": target})
        st = decision_stats(rule.decide(probs), y, probs.argmax(axis=1), classes)
        rows.append(
            {
                "max_miss_rate": target,
                "pass_threshold": rule.pass_threshold,
                "review_share": st["review_share"],
                "miss_rate": st["miss_rate"],
            }
        )
    return rows
