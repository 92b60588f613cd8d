"""Does an export's encoder need batches? Its image and text graphs run over the same cards one item per run
(what `asectl predict --model EXPORT` does) and in batches (16 images or 32 texts per run, padded to the
longest text, as earlier code did): seconds per pass over the cards (median of interleaved rounds, one
thread per library) and whether each card's features are the same bits both ways.

    python bench/export_batches.py --model EXPORT --data DATA [--cache-dir C] [--split test] [--rounds 3]

EXPORT is an `asectl export` folder; the cards are DATA's split (`all`: every card), read, described and
reasoned over as the export's predict does (cached in C). Results: bench/results/export_batches.json and
docs/benchmarks.md."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from _common import save, update_section

IMAGE_BATCH, TEXT_BATCH = 16, 32


def batched_images(model, spec, paths):
    from asectl.backends.encoders import prepare_image

    sess = model.session(spec["graph"])
    name = sess.get_inputs()[0].name
    out = []
    for s in range(0, len(paths), IMAGE_BATCH):
        batch = np.stack([prepare_image(p, **spec["preprocessing"]) for p in paths[s : s + IMAGE_BATCH]])
        out.append(sess.run(None, {name: batch})[0])
    return np.concatenate(out)


def batched_texts(model, spec, texts):
    sess = model.session(spec["graph"])
    tok = model.tokenizer(spec)
    wanted = {i.name for i in sess.get_inputs()}
    out = []
    for s in range(0, len(texts), TEXT_BATCH):
        enc = tok.encode_batch(texts[s : s + TEXT_BATCH])
        feeds = {
            "input_ids": [e.ids for e in enc],
            "attention_mask": [e.attention_mask for e in enc],
            "token_type_ids": [e.type_ids for e in enc],
        }
        out.append(sess.run(None, {k: np.asarray(v, dtype=np.int64) for k, v in feeds.items() if k in wanted})[0])
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True, help="an asectl export folder")
    ap.add_argument("--data", type=Path, required=True, help="a dataset folder")
    ap.add_argument("--cache-dir", type=Path, default=None, help="the artifact cache (default: the user's)")
    ap.add_argument("--split", default="test", help="test, train or all")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from threadpoolctl import threadpool_limits

    from asectl.cache import Cache
    from asectl.domain.dataset import Dataset, load_dataset
    from asectl.export import image_features, load_export, text_features
    from asectl.stages.modalities import collect_modalities, modality_inputs

    model = load_export(args.model)
    ds = load_dataset(args.data)
    samples = ds.samples if args.split == "all" else ds.split(args.split)
    mods = collect_modalities(Dataset(samples, ds.root), Cache(args.cache_dir), model.config["replay"], remember=False)
    inputs = modality_inputs(mods)
    rows = []
    with threadpool_limits(1):
        for modality, spec in model.graphs["encoders"].items():
            image = spec["kind"] == "image"
            items = [s.path for s in inputs[modality]] if image else [str(t) for t in inputs[modality]]
            ways = {
                "one per run": (image_features if image else text_features),
                "batches": (batched_images if image else batched_texts),
            }
            ways["one per run"](model, spec, items)  # sessions made, files in the page cache
            seconds = {w: [] for w in ways}
            for r in range(args.rounds):
                for w in ways if r % 2 == 0 else list(ways)[::-1]:
                    t = time.perf_counter()
                    feats = ways[w](model, spec, items)
                    seconds[w].append(time.perf_counter() - t)
                    if w == "one per run":
                        one = feats
                    else:
                        batched = feats
            rows.append(
                {
                    "modality": modality,
                    "kind": spec["kind"],
                    "items": len(items),
                    "batch": IMAGE_BATCH if image else TEXT_BATCH,
                    "seconds": seconds,
                    "median_one_per_run": statistics.median(seconds["one per run"]),
                    "median_batches": statistics.median(seconds["batches"]),
                    "cards_bit_equal": int((one == batched).all(axis=1).sum()),
                    "largest_difference": float(np.abs(one - batched).max()),
                }
            )
    save(
        "export_batches",
        {"model": str(args.model), "data": str(args.data), "split": args.split, "rounds": args.rounds, "rows": rows},
    )
    lines = [
        f"### An export's encoders: one item per run against batches ({len(mods.samples)} cards, one thread, "
        f"median of {args.rounds} interleaved rounds)",
        "",
        "| encoder | items | batch | s one per run | s in batches | cards whose features are the same bits | "
        "largest difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['modality']} ({r['kind']}) | {r['items']} | {r['batch']} | {r['median_one_per_run']:.2f} | "
            f"{r['median_batches']:.2f} | {r['cards_bit_equal']}/{r['items']} | {r['largest_difference']:.1e} |"
        )
    update_section("export-batches", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
