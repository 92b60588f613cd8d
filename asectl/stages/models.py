"""The trained models of a cache: which exist, what each was trained on, how its last report scored it,
and which one ``report DATA`` uses (the latest trained on DATA, never one of another folder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from asectl.bundle import Bundle, load_bundle, pointer_text
from asectl.cache import Cache
from asectl.errors import ConfigError
from asectl.stages.fuse import STAGE, dataset_model_pointer

REPORT_POINTER = "report-{}"  # per model (bundle digest): the figures of its latest report


def list_models(cache: Cache) -> list[dict[str, Any]]:
    """One row per model in the cache, newest first: id, dataset, date, classes, targets, split and the
    test macro-F1 of its latest report (None if never reported)."""
    rows = []
    for path in cache.iter_entries(STAGE):
        try:
            config = json.loads((path / "bundle.json").read_text())
            bundle = Bundle(path, config)
            dec, training = config["decision"], config["training"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unfinished or foreign entry: not a model to offer
        reported = cache.get_pointer(REPORT_POINTER.format(bundle.digest)) or {}
        rows.append(
            {
                "id": path.name,
                "dataset": training.get("dataset"),
                # a model whose thresholds were re-set on a line's cards (asectl calibrate): that line's folder
                "thresholds_set_on": (config.get("recalibration") or {}).get("dataset"),
                "created": config.get("created"),
                "classes": config.get("classes"),
                "variant": config.get("variant"),
                "task": config.get("task"),
                "n_train": training.get("n_train"),
                "targets": {
                    "max_miss_rate": dec.get("max_miss_rate"),
                    "max_defect_error": dec.get("max_defect_error"),
                    "max_defective_error": dec.get("max_defective_error"),
                    "defective_decision": dec.get("defective_decision", True),
                },
                "test_macro_f1": reported.get("macro_f1"),
                "reported_on": reported.get("dataset"),
                "path": str(path),
            }
        )
    return sorted(rows, key=lambda r: (r["created"] or "", r["id"]), reverse=True)


def record_report(cache: Cache, bundle: Bundle, dataset: str, metrics: dict[str, Any], out: Path) -> None:
    """Remember a report's headline figures for ``models list``."""
    cache.set_pointer(
        REPORT_POINTER.format(bundle.digest),
        {
            "dataset": dataset,
            "macro_f1": metrics["multiclass"]["macro_f1"],
            "n_test": metrics["n_test"],
            "binary_macro_f1": (metrics.get("binary") or {}).get("macro_f1"),
            "report": str(out),
        },
    )


def model_for_dataset(cache: Cache, folder: str | Path) -> tuple[Bundle, str]:
    """The latest model trained on the dataset in ``folder`` (or on a folder of the same cards), and a
    sentence saying which; a ConfigError naming the models there are when none was."""
    ptr = cache.get_pointer(dataset_model_pointer(folder))
    entry = cache.get(STAGE, ptr["key"]) if ptr else None
    if entry is None:
        models = list_models(cache)
        listed = "; ".join(f"{m['id'][:12]} on {m['dataset']}" for m in models[:5])
        raise ConfigError(
            f"no model trained on {folder} in {cache.root}; train one (asectl fuse-train {folder}) "
            "or pass --model DIR"
            + (f" (models here: {listed}{' ...' if len(models) > 5 else ''}; asectl models list)" if models else "")
        )
    return load_bundle(entry.path), pointer_text(ptr)
