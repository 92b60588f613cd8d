"""``asectl calibrate``: a trained model's decision thresholds re-set on a line's own labelled cards.

A model's pass, defect and defective thresholds are cut on its held-out training cards (asectl.stages.fuse).
Cards of another line (another renderer, machine or defect mix) can score differently: on the benchmark, a
model trained on `field` cards sent 43% of `clean` cards to review because their p(normal) stayed under a
pass threshold set by `field`'s borderline defects (docs/benchmarks.md, "Thresholds re-set on the line's
cards"). This stage classifies the training split of the line's labelled folder with the model as it is
(fold models, temperature and all: nothing is retrained), cuts the thresholds on those cards for the same
targets (asectl.models.calibration.choose_rule, exactly as fuse-train does on its held-out cards), and stores
the result as a model of its own in the cache: the parent's files, the line's scores as its held-out scores
(so ``predict --max-miss-rate`` moves the line's operating point), and the line's split (so ``report`` on
the line's folder scores only the cards the thresholds were not set on, asectl.stages.split)."""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asectl.bundle import HELD_OUT_SCORES, LATEST_POINTER, Bundle, load_bundle, write_checksums, write_held_out_scores
from asectl.cache import Cache, make_key
from asectl.domain.dataset import Dataset, binary_label
from asectl.errors import ConfigError, DataError
from asectl.stages.fuse import STAGE, dataset_model_pointer, miss_rate_tradeoff

log = logging.getLogger("asectl")

FORMAT = 1  # in the key: how the line's cards are scored and the rule cut


@dataclass
class CalibrateOutcome:
    key: str
    bundle: Any  # the model with the re-set thresholds: a Bundle, or an ExportedModel for an export parent
    parent: Any  # Bundle or ExportedModel
    before: dict[str, Any]  # the parent's stored rule on the line's cards (decision_stats)
    after: dict[str, Any]  # the re-set rule on the same cards
    dropped: list[dict[str, Any]]  # line cards that could not be classified
    from_cache: bool


def check_line_cards(dataset: Dataset, parent: Bundle) -> list[Any]:
    """The line's cards the thresholds are cut on (its training split), checked: labelled, none of them a
    card the model was trained on, both normal and defective ones among them."""
    from asectl.cache import sha256_file

    if not dataset.labelled:
        raise DataError(
            f"{dataset.root}: the line's cards need labels to set thresholds on; give a folder with "
            "labels.csv or one subfolder per class"
        )
    known = {c["sha256"]: c["image"] for c in parent.config["split"]["cards"]}
    shared = [s.name for s in dataset.samples if sha256_file(s.path) in known]
    if shared:
        raise ConfigError(
            f"{dataset.root}: {len(shared)} card(s) are cards the model was trained on (e.g. {shared[0]}); its "
            "thresholds were already cut on those; give cards of the line it has never seen"
        )
    cards = dataset.split("train")
    if not cards:
        raise DataError(
            f"{dataset.root}: no training split to set thresholds on; mark rows with split=train in "
            "labels.csv (the split=test rows stay for `asectl report`)"
        )
    normal = sum(s.label == "normal" for s in cards)
    if normal == 0 or normal == len(cards):
        raise DataError(
            f"{dataset.root}: the training split holds {normal} normal card(s) of {len(cards)}; the thresholds "
            "need both normal and defective cards of the line"
        )
    return cards


def run_calibrate(
    dataset: Dataset,
    parent: Bundle,
    cache: Cache | None = None,
    *,
    max_miss_rate: float | None = None,
    max_defect_error: float | None = None,
    max_defective_error: float | None = None,
    defective_decision: bool | None = None,
    force: bool = False,
    out: str | Path | None = None,
) -> CalibrateOutcome:
    """Re-set ``parent``'s thresholds on the training split of the line's labelled ``dataset``; a target
    left None keeps the parent's. A bundle: stores and returns the new model (a cache hit when the same
    model, cards and targets were given before), and makes it the latest model and the line folder's
    model. An export (asectl.export.ExportedModel): writes the new model as an export folder at ``out``
    (nothing in the cache; the report and predict take it with --model)."""
    import numpy as np

    from asectl.models.calibration import DecisionRule, choose_rule, decision_stats
    from asectl.stages.predict import Predictor

    exported = not isinstance(parent, Bundle)
    if exported and out is None:
        raise ConfigError(
            f"{parent.path}: an exported model's re-set thresholds are written as a new export folder; give --out DIR"
        )
    cards = check_line_cards(dataset, parent)
    stored = DecisionRule.from_dict(parent.config["decision"])
    targets = stored.targets(
        max_miss_rate=max_miss_rate,
        max_defect_error=max_defect_error,
        max_defective_error=max_defective_error,
        defective_decision=defective_decision,
    )
    split = dataset.split_record()
    key = make_key(
        STAGE,
        recut=FORMAT,
        parent=parent.digest,
        cards=[(c["image"], c["label"], c["sha256"]) for c in split["cards"] if c["split"] == "train"],
        targets=targets,
    )
    cache = cache or Cache()
    entry = None if force or exported else cache.get(STAGE, key)
    if entry is not None:  # the same model, cards and targets: nothing to classify again
        bundle = load_bundle(entry.path)
        recut = bundle.config["recalibration"]
        warn_few_defective(dataset, recut["class_counts"], targets)
        set_latest(cache, key, bundle, dataset)
        before, after = recut["parent_rule_on_these_cards"], bundle.config["decision"]["held_out"]
        return CalibrateOutcome(key, bundle, parent, before, after, [], True)

    classes = parent.labels
    predictor = Predictor(parent, cache)
    preds = predictor.classify(Dataset(cards, dataset.root, dataset.source, dataset.labels, dataset.split_seed))
    if not preds.samples:
        first = preds.dropped[0]["error"] if preds.dropped else "?"
        raise DataError(f"{dataset.root}: no card of the training split could be classified (first error: {first})")
    binary = parent.config["task"] == "binary"
    truth = {s.name: binary_label(s.label) if binary else s.label for s in cards}
    unknown = sorted({truth[s.name] for s in preds.samples} - set(classes))
    if unknown:
        raise ConfigError(
            f"{dataset.root}: labels {unknown} are not among the model's classes {classes}; name the line's "
            "cards with the model's classes"
        )
    probs = predictor.probabilities(preds.logits)
    y = np.array([classes.index(truth[s.name]) for s in preds.samples], dtype=np.int64)
    top = probs.argmax(axis=1)
    counts = {c: int((y == k).sum()) for k, c in enumerate(classes)}
    warn_few_defective(dataset, counts, targets)
    rule = choose_rule(probs, y, classes, **targets)
    before = decision_stats(stored.decide(probs), y, top, classes)
    after = decision_stats(rule.decide(probs), y, top, classes)

    decision = {**rule.to_dict(), "held_out": after, "tradeoff": miss_rate_tradeoff(probs, y, classes, targets)}
    recalibration = {
        "what": "decision thresholds re-set on the line's labelled cards (asectl calibrate); the fold "
        "models and the temperature are the parent's",
        "parent": {
            "digest": parent.digest,
            "path": str(parent.path),
            "exported": exported,
            "dataset": parent.config["training"].get("dataset"),
            "decision": parent.config["decision"],
        },
        "dataset": str(dataset.root),
        "split": split,
        "n_cards": len(preds.samples),
        "n_dropped": len(preds.dropped),
        "class_counts": counts,
        "targets": targets,
        "parent_rule_on_these_cards": before,
    }
    changes = {"decision": decision, "recalibration": recalibration}

    def line_scores(folder: Path) -> None:
        write_held_out_scores(folder, probs, y)  # the line's scores: predict --max-miss-rate moves from them

    if exported:
        from asectl.export import copy_export

        model = copy_export(parent, out, {**parent.manifest["model"], **changes}, line_scores)
        return CalibrateOutcome(key, model, parent, before, after, preds.dropped, False)

    def build(tmp: Path) -> dict[str, Any]:
        for name in parent.config["files"]:
            if name != HELD_OUT_SCORES:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(parent.path / name, tmp / name)
        line_scores(tmp)
        config = {**parent.config, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **changes}
        write_checksums(tmp, config)
        return {"params": {"parent": parent.digest, "dataset": str(dataset.root)}}

    bundle = load_bundle(cache.put_tree(STAGE, key, build).path)
    set_latest(cache, key, bundle, dataset)
    return CalibrateOutcome(key, bundle, parent, before, after, preds.dropped, False)


def warn_few_defective(dataset: Dataset, counts: dict[str, int], targets: dict[str, Any]) -> None:
    """Warn when the line's defective cards are too few to resolve the miss-rate target."""
    n_defective = sum(n for c, n in counts.items() if c != "normal")
    need = math.ceil(1 / targets["max_miss_rate"] - 1e-9) if targets["max_miss_rate"] > 0 else 0
    if n_defective < need:
        log.warning(
            "%s: %d defective cards set the pass threshold; a miss rate of %g cannot be told from 0 on fewer "
            "than %d, so the threshold lets none of them pass (label more of the line's defective cards to "
            "resolve the target)",
            dataset.root,
            n_defective,
            targets["max_miss_rate"],
            need,
        )


def set_latest(cache: Cache, key: str, bundle: Bundle, dataset: Dataset) -> None:
    """The re-cut model becomes the cache's latest and the line folder's model (``report LINE``)."""
    pointer = {"key": key, "dataset": bundle.config["training"]["dataset"], "created": bundle.config["created"]}
    cache.set_pointer(LATEST_POINTER, pointer)
    cache.set_pointer(dataset_model_pointer(dataset), pointer)
