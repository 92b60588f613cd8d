"""Frozen CPU encoders: a call's items on one Python thread per core against one core, and whether the
features are the same bits.

    python bench/encoder_threads.py [--cards 64] [--texts 96] [--repeats 3]

Each item goes through its encoder alone with one-thread kernels either way (asectl.backends.encoders
frozen_encode); the encoder uses as many threads as the process has cores, so the one-core runs narrow this
process's CPU affinity to one core. Cards: the default `field` cards of seed 0 (bench/out/ds-field-seed0);
texts: their built-in descriptions. Median wall seconds over ``--repeats`` calls after one warm-up call.
Results: bench/results/encoder_threads.json and the ``encoder-threads`` section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from _common import OUT, dataset, save, update_section
from asectl.backends.encoders import EfficientNetLite0, MiniLM
from asectl.cache import Cache
from asectl.domain.dataset import Dataset, load_dataset
from asectl.stages.describe import run_describe


def timed(encode, items, repeats: int) -> tuple[float, np.ndarray]:
    encode(items[:2])  # loads the model
    seconds, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = encode(items)
        seconds.append(time.perf_counter() - t)
    return statistics.median(seconds), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cards", type=int, default=64)
    ap.add_argument("--texts", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    ds = load_dataset(dataset(0))
    cards = ds.samples[: max(args.cards, args.texts)]
    described = run_describe(Dataset(cards, ds.root), cache=Cache(OUT / "cache"), remember=False)
    texts = [r["text"] for r in described.records]
    cores = os.sched_getaffinity(0)
    rows = {}
    for name, encoder, items in (
        ("minilm (texts)", MiniLM(), texts[: args.texts]),
        ("efficientnet-lite0 (cards)", EfficientNetLite0(), [str(s.path) for s in cards[: args.cards]]),
    ):
        threads_s, threaded = timed(encoder.encode, items, args.repeats)
        os.sched_setaffinity(0, {min(cores)})
        try:
            one_s, alone = timed(encoder.encode, items, args.repeats)
        finally:
            os.sched_setaffinity(0, cores)
        rows[name] = {
            "items": len(items),
            "cores": len(cores),
            "threads_seconds": round(threads_s, 3),
            "one_core_seconds": round(one_s, 3),
            "speed_up": round(one_s / threads_s, 2),
            "same_bits": bool(np.array_equal(threaded, alone)),
        }
        print(name, rows[name], flush=True)
    save("encoder_threads", {"repeats": args.repeats, "rows": rows})
    if not args.no_docs:
        lines = [
            "### Frozen CPU encoders: one thread per core against one core",
            "",
            "| encoder | items | cores | one thread per core, s | one core, s | speed-up | same bits |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {n} | {r['items']} | {r['cores']} | {r['threads_seconds']} | {r['one_core_seconds']} | "
                f"{r['speed_up']} x | {'yes' if r['same_bits'] else 'NO'} |"
                for n, r in rows.items()
            ),
        ]
        update_section("encoder-threads", "\n".join(lines))


if __name__ == "__main__":
    main()
