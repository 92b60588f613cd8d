"""Does a change to the built-in describer keep its records? Describes every card of benchmark datasets
afresh and compares each record (text and measurements; not the seconds it took) with the one a cache
holds from earlier code.

    python bench/describe_records.py --cache-dir C [--datasets field-0,...,clean-2] [--name N]

``C`` must hold the datasets' describe records (any quality benchmark run on them leaves them). The
fresh run uses an empty temporary cache; its seconds per card (one thread, the describer loaded first)
are reported too. Section "describe-records" of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import SETTINGS, dataset, publish
from asectl.cache import Cache
from asectl.domain.dataset import load_dataset
from asectl.stages.describe import DescribeSettings, run_describe


def describe(ds, cache: Cache) -> list[dict]:
    """The records, less the seconds each card took (the one field that never repeats)."""
    settings = DescribeSettings(**SETTINGS["describe"])
    records = run_describe(ds, settings, cache=cache, remember=False).records
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", required=True, help="a cache holding the datasets' earlier records")
    every = "field-0,field-1,field-2,field-3,field-4,clean-0,clean-1,clean-2"
    ap.add_argument("--datasets", default=every, help="DIFFICULTY-SEED,... of bench datasets")
    ap.add_argument("--name", default="describe_records")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = {}
    for item in args.datasets.split(","):
        difficulty, seed = item.rsplit("-", 1)
        ds = load_dataset(dataset(int(seed), difficulty=difficulty))
        earlier = {r["image"]: r for r in describe(ds, Cache(args.cache_dir))}
        with tempfile.TemporaryDirectory() as tmp:
            t0, c0 = time.perf_counter(), time.process_time()
            fresh = describe(ds, Cache(tmp))
            fresh_by_name = {r["image"]: r for r in fresh}
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        same_text = sum(r["text"] == earlier[r["image"]]["text"] for r in fresh)
        same = sum(r == earlier[r["image"]] for r in fresh)
        differing = [r["image"] for r in fresh if r != earlier[r["image"]]]
        # Which measurements changed, and by how much at most (numbers; lists element by element).
        changed: dict[str, float] = {}
        for name in differing:
            now, then = fresh_by_name[name]["measurements"], earlier[name]["measurements"]
            for key in set(now) | set(then):
                if now.get(key) != then.get(key):
                    a, b = np.ravel(np.array(now.get(key), dtype=float)), np.ravel(np.array(then.get(key), dtype=float))
                    gap = float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")
                    changed[key] = max(changed.get(key, 0.0), gap)
        rows[item] = {
            "cards": len(fresh),
            "same_text": same_text,
            "same_record": same,
            "examples_differing": differing[:5],
            "measurements_changed_by_at_most": changed,
            "cpu_s_per_card": cpu / len(fresh),
            "wall_s_per_card": wall / len(fresh),
        }
        print(item, rows[item])
    publish(args.name, {"code": code_version(), "datasets": rows}, started, render)


def code_version() -> str:
    """The asectl code that ran (a baseline checkout comes first on PYTHONPATH): its git commit."""
    import subprocess

    import asectl

    folder = Path(asectl.__file__).resolve().parent.parent
    rev = subprocess.run(
        ["git", "-C", str(folder), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    return f"commit {rev}" if rev else str(folder)


def render(rec: dict) -> str:
    lines = [
        f"### Built-in describer: records of the code at {rec.get('code', 'this checkout')} against the cached "
        "ones of earlier code",
        "",
        "| dataset | cards | same text | same record (text and measurements) "
        "| measurements that differ (largest difference) | CPU s per card (fresh, one thread) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rec["datasets"].items():
        changed = ", ".join(f"{k} ({v:g})" for k, v in sorted(r["measurements_changed_by_at_most"].items())) or "none"
        lines.append(
            f"| {name} | {r['cards']} | {r['same_text']} | {r['same_record']} | {changed} | {r['cpu_s_per_card']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
