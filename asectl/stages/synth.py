"""``asectl synth``: generate an ASE-like dataset, or grow a training split with TDA."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from asectl import ui
from asectl.cache import Cache
from asectl.domain.dataset import load_dataset
from asectl.domain.synth import augment, check_difficulty, generate, parse_counts, read_truth
from asectl.errors import DataError


def run_generate(
    out: str | Path,
    seed: int = 0,
    counts: str | Sequence[int] | None = None,
    test_size: int | None = None,
    force: bool = False,
    difficulty: str = "field",
    workers: int | None = None,
) -> dict[str, Any]:
    """Generate a dataset; ``difficulty`` "field" (default) or "clean" (docs/dataset.md); ``workers``:
    processes rendering the cards (default one per core from 64 cards; the bytes do not depend on it)."""
    check_difficulty(difficulty)
    total = sum(parse_counts(counts))
    with ui.progress(total, "synth") as advance:
        return generate(
            out,
            seed=seed,
            counts=counts,
            test_size=test_size,
            force=force,
            progress=advance,
            difficulty=difficulty,
            workers=workers,
        )


def run_augment(
    source: str | Path,
    out: str | Path,
    factor: float = 2.0,
    seed: int = 0,
    stats_source: str = "ocr",
    engine: str | None = None,
    cache: Cache | None = None,
    force: bool = False,
    workers: int | None = None,
) -> dict[str, Any]:
    """TDA over a dataset folder; per-card stats come from the OCR stage (cached; the OCR settings last
    used on the dataset, ``engine`` changed if given) or truth.jsonl."""
    dataset = load_dataset(source)  # the split of a folder without labels.csv: split seed 0, whatever the TDA seed
    if stats_source == "printed":
        truth = read_truth(dataset.root)
        missing = [s.name for s in dataset.samples if s.name not in truth]
        if missing:
            raise DataError(
                f"{dataset.root / 'truth.jsonl'}: no printed record for {missing[0]} "
                f"(and {len(missing) - 1} more); use --stats ocr"
            )
        records = [truth[s.name]["printed"] for s in dataset.samples]
    else:
        from asectl.stages.ocr import OcrSettings, run_ocr

        cache = cache or Cache()
        result = run_ocr(dataset, OcrSettings.recall(cache, dataset).replace(engine=engine), cache=cache)
        by_image = result.by_image()
        records = []
        for s in dataset.samples:
            rec = by_image[s.name]
            if rec.get("error") and s.split == "train":
                raise DataError(f"{rec['error']} (TDA needs every training card's record)")
            records.append(rec.get("fields", {}))
    n_new = int(round((factor - 1.0) * len(dataset.split("train"))))
    with ui.progress(n_new, "tda") as advance:
        return augment(
            dataset,
            records,
            out,
            factor=factor,
            seed=seed,
            force=force,
            stats_source=stats_source,
            progress=advance,
            workers=workers,
        )
