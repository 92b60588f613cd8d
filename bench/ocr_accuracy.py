"""OCR accuracy and speed against truth.jsonl on the default 455 generated cards.

    python bench/ocr_accuracy.py [--seed 0] [--difficulty field|clean] [--engines cnocr,rapidocr] [--limit N]
                                 [--detector auto|model|auto-checked]

Counts every printed number (N, four statistics and the radius-interval counts) read exactly, cards
read fully exactly, and seconds per image with a cold cache (engine loading excluded)."""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import dataset, save, update_section
from asectl.backends.ocr import get_engine
from asectl.cache import Cache
from asectl.domain.dataset import Dataset, load_dataset
from asectl.domain.synth import read_truth
from asectl.stages.ocr import run_ocr


def numbers(rec: dict) -> list:
    return [rec.get(k) for k in ("N", "mu_x", "mu_y", "sd_x", "sd_y")] + list(rec.get("bins") or [None] * 9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engines", default="cnocr,rapidocr")
    ap.add_argument("--limit", type=int, default=None, help="only the first N cards (quick check)")
    ap.add_argument("--difficulty", default="field", choices=["field", "clean"], help="generated cards to read")
    ap.add_argument("--detector", default="auto", help="how the text is found (asectl ocr --detector)")
    args = ap.parse_args()
    root = dataset(args.seed, difficulty=args.difficulty)
    ds = load_dataset(root)
    if args.limit:
        ds = Dataset(ds.samples[: args.limit], ds.root, ds.source, ds.labels)
    truth = read_truth(root)
    rows = {}
    for engine in args.engines.split(","):
        get_engine(engine)  # load once, outside the timing
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = run_ocr(ds, engine=engine, detector=args.detector, cache=Cache(tmp))
            seconds = time.perf_counter() - t0
        n_num = n_ok = cards_ok = 0
        misreads = []
        for rec in result.records:
            want = numbers(truth[rec["image"]]["printed"])
            got = numbers(rec.get("fields", {}))
            ok = [a == b for a, b in zip(want, got)]
            n_num += len(want)
            n_ok += sum(ok)
            cards_ok += all(ok)
            if not all(ok) and len(misreads) < 5:
                misreads.append({"image": rec["image"], "error": rec.get("error"), "warnings": rec.get("warnings")})
        rows[engine] = {
            "cards": len(result.records),
            "numbers": n_num,
            "numbers_exact": n_ok,
            "numbers_exact_pct": 100 * n_ok / n_num,
            "cards_exact": cards_ok,
            "cards_exact_pct": 100 * cards_ok / len(result.records),
            "seconds_per_image": seconds / len(result.records),
            "examples_of_misreads": misreads,
        }
        print(engine, {k: v for k, v in rows[engine].items() if k != "examples_of_misreads"})
    # Clean-card results keep their earlier names; field cards get their own.
    tag = "" if args.difficulty == "clean" else f"_{args.difficulty}"
    mode = "" if args.detector == "auto" else "_" + args.detector.replace("-", "_")
    save(f"ocr_accuracy{tag}_seed{args.seed}{mode}", rows)
    lines = [
        "| engine | cards | numbers read exactly | cards fully exact | s / image (cold cache) |",
        "|---|---|---|---|---|",
    ]
    for engine, r in rows.items():
        lines.append(
            f"| {engine} | {r['cards']} | {r['numbers_exact']}/{r['numbers']} "
            f"({r['numbers_exact_pct']:.2f}%) | {r['cards_exact']} ({r['cards_exact_pct']:.1f}%) "
            f"| {r['seconds_per_image']:.2f} |"
        )
    title = (
        "OCR accuracy"
        + (f" on {args.difficulty} cards" if tag else "")
        + (f" (--detector {args.detector})" if mode else "")
    )
    update_section(
        "ocr-accuracy" + (tag + mode).replace("_", "-"),
        f"### {title} (target: at least 99.5% of numbers exact)\n\n" + "\n".join(lines),
    )


if __name__ == "__main__":
    main()
