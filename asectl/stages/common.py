"""The per-image stage loop every image stage shares: cache lookup, compute, atomic put, error records."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from asectl import ui
from asectl.cache import Cache, make_key, remember_file_hashes, sha256_file, write_atomic
from asectl.domain.dataset import Dataset, Sample
from asectl.errors import DataError, describe_exception
from asectl.executors import Executor, Job, Work, resolve


@dataclass
class StageResult:
    stage: str
    records: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)
    cache_summary: str = ""

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("error")]

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.records if not r.get("error")]

    def by_image(self) -> dict[str, dict[str, Any]]:
        return {r["image"]: r for r in self.records}


def image_key(stage: str, sample: Sample, identity: dict[str, Any]) -> str:
    return make_key(stage, input=sha256_file(sample.path), **identity)


def run_per_image(
    stage: str,
    samples: Sequence[Sample],
    identity: dict[str, Any],
    compute: Callable[[Sample], dict[str, Any]],
    cache: Cache,
    *,
    force: bool = False,
    strict: bool = False,
    description: str | None = None,
    meta: dict[str, Any] | None = None,
    status: Callable[[], str] | None = None,
    batch: Callable[[list[Sample]], list[dict[str, Any] | DataError]] | None = None,
    batch_size: int = 1,
    executor: Executor | None = None,
    remote: Remote | None = None,
) -> list[dict[str, Any]]:
    """Run ``compute`` for every sample not already cached under (input bytes, stage, identity).

    ``identity`` must hold everything the result depends on (parameters, backend, model hash).
    A ``DataError`` for one image becomes an error record and the loop goes on (``strict`` re-raises);
    any other error (configuration, missing model) stops the run. Errors are never cached.
    ``batch`` (optional) computes several misses at once, e.g. for batched generation on a GPU or worker
    processes; it returns one record per sample, or the DataError of a bad sample in its place.
    On a distributed ``executor`` (asectl.executors) the misses go to its workers, set up as ``remote``
    says; they store the records themselves, and ``compute`` and ``batch`` are unused."""
    records: list[dict[str, Any] | None] = [None] * len(samples)
    misses: list[int] = []
    keys: dict[int, str] = {}
    executor = resolve(executor)
    remember_file_hashes([s.path for s in samples])
    with ui.progress(len(samples), description or stage) as advance:
        for i, s in enumerate(samples):
            try:
                key = image_key(stage, s, identity)
            except OSError as exc:
                records[i] = _error(s, DataError(f"{s.path}: unreadable ({exc.strerror})"), strict)
                advance()
                continue
            hit = None if force else cache.get_json(stage, key)
            if hit is not None:
                records[i] = {**hit, "image": s.name}
                advance()
            else:
                misses.append(i)
                keys[i] = key
        if misses and remote is not None and executor.distributed:
            work = Work(
                remote.name,
                stage,
                _per_image_worker,
                (remote.load, remote.args),
                {"params": identity, **(meta or {})},
                remote.batch_size,
                remote.cpus,
                _lost_card,
            )
            jobs = [Job(keys[i], samples[i], {"input": samples[i].name}) for i in misses]
            with contextlib.closing(executor.map(work, jobs, cache)) as results:  # closing stops the workers
                for n, rec in results:
                    if rec.get("error") and strict:
                        raise DataError(rec["error"])
                    records[misses[n]] = rec
                    advance(status=status() if status else None)
            return [r for r in records if r is not None]
        group = batch_size if batch else 1
        for start in range(0, len(misses), group):
            chunk = misses[start : start + group]
            results = _compute_chunk([samples[i] for i in chunk], compute, batch, strict)
            for i, rec in zip(chunk, results):
                s = samples[i]
                rec = {**rec, "image": s.name}
                if rec.get("error") and strict:
                    raise DataError(rec["error"])
                if not rec.get("error"):
                    cache.put_json(
                        stage, image_key(stage, s, identity), rec, {"params": identity, "input": s.name, **(meta or {})}
                    )
                records[i] = rec
            advance(len(chunk), status=status() if status else None)
    return [r for r in records if r is not None]


@dataclass(frozen=True)
class Remote:
    """How a worker of a distributed executor computes a stage's records. ``load(*args)`` runs once per
    worker (loads the engine) and returns ``batch(samples) -> [record or DataError]``, like
    ``run_per_image``'s ``batch``; the worker turns the results into the records ``run_per_image`` makes
    (the card's name, error records for bad cards) and stores them under the same keys and metadata.
    ``load`` must be importable and ``args`` plain data: they are pickled to other machines."""

    name: str  # who the workers are, for messages ("an OCR worker")
    load: Callable[..., Callable[[list[Sample]], list[Any]]]
    args: tuple = ()
    batch_size: int = 8  # cards per batch unless --ray-batch-size says otherwise
    cpus: float = 1.0  # cores one worker keeps busy


def _lost_card(job: Job, why: str) -> dict[str, Any]:
    """The error record of a card whose worker died each time it computed it: the rest of the run goes on."""
    return {"image": job.meta["input"], "error": f"{job.item.path}: {why}"}


def _per_image_worker(load: Callable[..., Any], args: tuple) -> Callable[[list[Sample]], list[dict[str, Any]]]:
    batch = load(*args)

    def compute(sample: Sample) -> dict[str, Any]:
        out = batch([sample])[0]
        if isinstance(out, DataError):
            raise out
        return out

    def records(samples: list[Sample]) -> list[dict[str, Any]]:
        return [{**rec, "image": s.name} for s, rec in zip(samples, _compute_chunk(samples, compute, batch, False))]

    return records


def _compute_chunk(chunk: list[Sample], compute, batch, strict: bool) -> list[dict[str, Any]]:
    if batch and len(chunk) > 1:
        try:
            t0 = time.perf_counter()
            out = batch(chunk)
            dt = (time.perf_counter() - t0) / len(chunk)
            return [
                _error(s, r, strict) if isinstance(r, DataError) else {**r, "seconds": round(r.get("seconds", dt), 4)}
                for s, r in zip(chunk, out)
            ]
        except DataError:
            pass  # the batch as a whole failed: one at a time, so only the bad image gets an error record
    results = []
    for s in chunk:
        t0 = time.perf_counter()
        try:
            rec = compute(s)
            rec.setdefault("seconds", round(time.perf_counter() - t0, 4))
            results.append(rec)
        except DataError as exc:
            results.append(_error(s, exc, strict))
    return results


def _error(sample: Sample, exc: Exception, strict: bool) -> dict[str, Any]:
    if strict:
        raise exc
    return {"image": sample.name, "error": describe_exception(exc)}


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Export records; written atomically so a killed export never leaves a torn file."""
    data = "".join(json.dumps(r, default=str) + "\n" for r in records).encode()
    write_atomic(Path(path), data)


def dataset_id(dataset: Dataset) -> str:
    """A stable name for "the latest run of stage X on this dataset" pointers."""
    from asectl.cache import sha256_bytes

    if dataset.root:
        return folder_id(dataset.root)
    return sha256_bytes("|".join(str(s.path) for s in dataset.samples).encode())[:16]


def folder_id(root: str | Path) -> str:
    """``dataset_id`` of the dataset in folder ``root``, known before the folder is read."""
    from asectl.cache import sha256_bytes

    return sha256_bytes(str(Path(root).expanduser().resolve()).encode())[:16]
