"""Cheaper text recognisers for the line-side OCR: CPU time per card and whether the records stay the same.

    python bench/ocr_recogniser.py [--cards 60] [--seed 0]

OCR is most of a new card's CPU time once the LLM branch is off (docs/benchmarks.md, "What a card costs at
the least"). This script reads the same `field` cards' cut lines (`--detector auto`) with RapidOCR's PP-OCR
recogniser as shipped and with variants that do less work, each with one thread, and counts the cards
whose parsed record (every field) equals the shipped recogniser's and the truth's:

- `shipped`: every line padded to the recogniser's input width (320 at height 48) in batches of 6;
- `own width`: each batch only as wide as its widest line (the model takes any width);
- `int8 MatMul`: ONNX Runtime's dynamic int8 quantization of the recogniser's MatMul weights;
- `int8 MatMul + Conv`: the same for its convolutions too.

A variant can replace the shipped recogniser at the line only where every card's record is unchanged
(issue #21: an export may read with another ONNX engine where bench/ shows its records are identical).
Results: bench/results/ocr_recogniser.json and the ``ocr-recogniser`` section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import dataset, publish
from ocr_accuracy import numbers

VARIANTS = ("shipped", "own width", "int8 MatMul", "int8 MatMul + Conv")


def main() -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from PIL import Image

    from asectl.backends.ocr import REC_MODEL, RapidOcrEngine, TextLine, bundled_model_dir
    from asectl.domain.card import default_spec
    from asectl.domain.synth import read_truth
    from asectl.stages.ocr import binarise, cut_lines, group_rows, parse_record

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cards", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    started = time.perf_counter()
    root = dataset(args.seed)
    truth = read_truth(root)
    files = sorted((root / "images").glob("*.png"))[: args.cards]
    spec = default_spec()
    cards = []
    for f in files:
        binary = binarise(Image.open(f))
        boxes = cut_lines(binary)
        arr = np.asarray(binary.convert("RGB"))
        cards.append((f"images/{f.name}", boxes, [np.ascontiguousarray(arr[b[1] : b[3], b[0] : b[2]]) for b in boxes]))

    shipped = str(bundled_model_dir() / REC_MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="asectl-rec-"))
    models = {"shipped": shipped, "own width": shipped}
    for name, ops in (("int8 MatMul", ["MatMul"]), ("int8 MatMul + Conv", ["MatMul", "Conv"])):
        models[name] = str(tmp / f"{len(ops)}.onnx")
        quantize_dynamic(shipped, models[name], op_types_to_quantize=ops, weight_type=QuantType.QUInt8)

    rows: dict = {}
    reference = shipped_texts = None
    for name in VARIANTS:
        engine = RapidOcrEngine(threads=1)
        engine._params["Rec.model_path"] = models[name]  # noqa: SLF001 (a bench of the engine's own settings)
        if name == "own width":
            engine._params["Rec.rec_img_shape"] = [3, 48, 48]  # noqa: SLF001
        engine.recognize(cards[0][2])  # load outside the timing
        t0 = time.process_time()
        texts = [engine.recognize(crops) for _, _, crops in cards]
        cpu = (time.process_time() - t0) / len(cards)
        records = []
        for (image, boxes, _), read in zip(cards, texts):
            lines = [TextLine(t, s, tuple(float(v) for v in b)) for (t, s), b in zip(read, boxes) if t.strip()]
            records.append((image, parse_record(group_rows(lines), spec)[0]))
        if reference is None:
            reference, shipped_texts = records, texts
        same = sum(a[1] == b[1] for a, b in zip(records, reference))
        exact = sum(numbers(f) == numbers(truth[image]["printed"]) for image, f in records)
        lines_same = sum(
            a[0].replace(" ", "") == b[0].replace(" ", "") for r, q in zip(texts, shipped_texts) for a, b in zip(r, q)
        )
        rows[name] = {
            "cpu_s_per_card": round(cpu, 4),
            "cards_same_record": same,
            "cards_exact": exact,
            "lines_same_text": lines_same,
            "lines": sum(len(r) for r in texts),
            "cards": len(cards),
        }
        print(name, rows[name], flush=True)
    rec = {"seed": args.seed, "variants": rows}
    publish("ocr_recogniser", rec, started, markdown, docs=not args.no_docs)


def markdown(rec: dict) -> str:
    base = rec["variants"]["shipped"]["cpu_s_per_card"]
    n = rec["variants"]["shipped"]["cards"]
    lines = [
        f"### Cheaper text recognisers on the cut lines ({n} `field` cards of seed {rec['seed']}, one thread)",
        "",
        "| recogniser | CPU s per card | x shipped | cards whose record equals the shipped one's | cards read "
        "exactly | lines whose text equals the shipped one's (spaces ignored) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rec["variants"].items():
        lines.append(
            f"| {name} | {r['cpu_s_per_card']:.3f} | {r['cpu_s_per_card'] / base:.2f} | "
            f"{r['cards_same_record']}/{r['cards']} | {r['cards_exact']}/{r['cards']} | "
            f"{r['lines_same_text']}/{r['lines']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
