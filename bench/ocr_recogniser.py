"""Cheaper text recognisers for the line-side OCR: CPU time per card and whether the records stay the same.

    python bench/ocr_recogniser.py [--cards 60] [--seed 0] [--difficulty field] [--rounds 3]
    python bench/ocr_recogniser.py --cards 455 --variants "shipped,ASCII head" --rounds 1 --name ocr_recogniser_field

OCR is most of a new card's CPU time once the LLM branch is off (docs/benchmarks.md, "What a card costs at
the least"). This script reads the same `field` cards' cut lines (`--detector auto`) with RapidOCR's PP-OCR
recogniser as shipped and with variants that do less work, each with one thread, and counts the cards
whose parsed record (every field) equals the shipped recogniser's and the truth's:

- `shipped`: every line padded to the recogniser's input width (320 at height 48) in batches of 6;
- `own width`: each batch only as wide as its widest line (the model takes any width);
- `int8 MatMul`: ONNX Runtime's dynamic int8 quantization of the recogniser's MatMul weights;
- `int8 MatMul + Conv`: the same for its convolutions too;
- `ASCII head`: the recogniser's last layer and softmax cut from its 18,710 characters to the 96 a printed
  record can hold (printable ASCII, space and the CTC blank): the argmax over the kept characters is the
  full model's wherever the full model reads ASCII;
- `each line alone`: batches of one line (each padded to the input width on its own, not to its batch's
  widest).

A variant can replace the shipped recogniser at the line only where every card's record is unchanged
(issue #21: an export may read with another ONNX engine where bench/ shows its records are identical):
`asectl export` reads with the ASCII head (asectl.backends.ocr.ascii_recogniser) on that evidence.
Results: bench/results/NAME.json and the NAME section of docs/benchmarks.md (``--name``, default
ocr_recogniser)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import dataset, publish
from ocr_accuracy import numbers

VARIANTS = ("shipped", "own width", "int8 MatMul", "int8 MatMul + Conv", "ASCII head", "each line alone")


def main() -> None:
    import statistics

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from PIL import Image

    from asectl.backends.ocr import REC_MODEL, RapidOcrEngine, TextLine, ascii_recogniser, bundled_model_dir
    from asectl.domain.card import default_spec
    from asectl.domain.synth import read_truth
    from asectl.stages.ocr import binarise, cut_lines, group_rows, parse_record

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cards", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--difficulty", choices=("field", "clean"), default="field")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, the first the reference")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes over the cards, variants interleaved")
    ap.add_argument("--name", default="ocr_recogniser", help="results file and docs section")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or variants[0] != "shipped":
        raise SystemExit(f"--variants: shipped first, then any of {', '.join(VARIANTS[1:])} (not {unknown})")
    started = time.perf_counter()
    root = dataset(args.seed, difficulty=args.difficulty)
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
    models = {"shipped": shipped, "own width": shipped, "each line alone": shipped}
    models["ASCII head"] = str(tmp / "ascii.onnx")
    ascii_recogniser(shipped, models["ASCII head"])
    for name, ops in (("int8 MatMul", ["MatMul"]), ("int8 MatMul + Conv", ["MatMul", "Conv"])):
        if name in variants:
            models[name] = str(tmp / f"{len(ops)}.onnx")
            quantize_dynamic(shipped, models[name], op_types_to_quantize=ops, weight_type=QuantType.QUInt8)

    engines = {}
    for name in variants:
        engine = RapidOcrEngine(threads=1)
        engine._params["Rec.model_path"] = models[name]  # noqa: SLF001 (a bench of the engine's own settings)
        if name == "own width":
            engine._params["Rec.rec_img_shape"] = [3, 48, 48]  # noqa: SLF001
        if name == "each line alone":
            engine._params["Rec.rec_batch_num"] = 1  # noqa: SLF001
        engine.recognize(cards[0][2])  # load outside the timing
        engines[name] = engine
    # Rounds over every variant in turn, the order reversed every other round: a variant's CPU time is the
    # median of its rounds, so none gains from coming first or last (the machine's state drifts).
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    texts: dict[str, list] = {}
    for r in range(args.rounds):
        for name in variants if r % 2 == 0 else variants[::-1]:
            t0 = time.process_time()
            texts[name] = [engines[name].recognize(crops) for _, _, crops in cards]
            cpu[name].append((time.process_time() - t0) / len(cards))

    rows: dict = {}
    reference = shipped_texts = None
    for name in variants:
        records = []
        for (image, boxes, _), read in zip(cards, texts[name]):
            lines = [TextLine(t, s, tuple(float(v) for v in b)) for (t, s), b in zip(read, boxes) if t.strip()]
            records.append((image, parse_record(group_rows(lines), spec)[0]))
        if reference is None:
            reference, shipped_texts = records, texts[name]
        same = sum(a[1] == b[1] for a, b in zip(records, reference))
        exact = sum(numbers(f) == numbers(truth[image]["printed"]) for image, f in records)
        lines_same = sum(
            a[0].replace(" ", "") == b[0].replace(" ", "")
            for r, q in zip(texts[name], shipped_texts)
            for a, b in zip(r, q)
        )
        rows[name] = {
            "cpu_s_per_card": round(statistics.median(cpu[name]), 4),
            "cpu_s_rounds": [round(c, 4) for c in cpu[name]],
            "cards_same_record": same,
            "cards_exact": exact,
            "lines_same_text": lines_same,
            "lines": sum(len(r) for r in texts[name]),
            "cards": len(cards),
        }
        print(name, rows[name], flush=True)
    rec = {"seed": args.seed, "difficulty": args.difficulty, "rounds": args.rounds, "variants": rows}
    publish(args.name, rec, started, markdown, docs=not args.no_docs)


def markdown(rec: dict) -> str:
    base = rec["variants"]["shipped"]["cpu_s_per_card"]
    n = rec["variants"]["shipped"]["cards"]
    lines = [
        f"### Cheaper text recognisers on the cut lines ({n} `{rec.get('difficulty', 'field')}` cards of seed "
        f"{rec['seed']}, one thread, CPU s the median of {rec.get('rounds', 1)} interleaved rounds)",
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
