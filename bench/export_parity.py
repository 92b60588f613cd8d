"""Does an export classify like its bundle? A model bundle and its export (`asectl export`: ONNX graphs,
rapidocr in place of cnocr, no torch) classify the test split of the same dataset: the largest difference
of their calibrated probabilities, the cards whose decision or class differs, and the macro-F1 of each.

    python bench/export_parity.py [--cache-dir bench/out/cache-export] [--counts 30,12,10,10,10] [--model DIR]

The model is --model, else the seed-0 model of the cache (trained if absent, as bench/predict_speed.py does;
``--counts`` a smaller seed-0 dataset). Results: bench/results/export_parity.json and docs/benchmarks.md."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from _common import OUT, dataset, save, update_section
from predict_speed import trained_bundle


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument("--model", type=Path, default=None, help="a model bundle folder (default: see above)")
    ap.add_argument("--counts", default=None, help="train on a smaller seed-0 dataset (cards per class)")
    args = ap.parse_args()

    from asectl.bundle import load_bundle
    from asectl.cache import Cache
    from asectl.domain.dataset import Dataset, load_dataset
    from asectl.export import load_export
    from asectl.report import compute_metrics
    from asectl.stages.export import run_export
    from asectl.stages.predict import Predictor

    out = OUT / "export-parity"
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(args.cache_dir)
    from asectl.models.calibration import DECISIONS

    # where the model lives, with the cache folder masked as in the measured command line
    model_name = (
        "the bundle `" + str(args.model).replace(str(Path(args.cache_dir)), "C") + "`"
        if args.model
        else "the seed-0 bundle of the cache"
    )
    bundle = load_bundle(trained_bundle(Path(args.cache_dir), out, args.model, "cnocr", args.counts))
    shutil.rmtree(out / "export", ignore_errors=True)
    exported = load_export(run_export(bundle, out / "export").path)
    ds = load_dataset(dataset(0, args.counts))
    test = Dataset(ds.split("test"), ds.root, ds.source, ds.labels)
    rows = {}
    for name, model in (("bundle", bundle), ("export", exported)):
        predictor = Predictor(model, cache)
        preds = predictor.classify(test)
        probs = predictor.probabilities(preds.logits)
        rows[name] = {
            "names": [s.name for s in preds.samples],
            "probs": probs,
            "decisions": predictor.rule.decide(probs),
            "top": probs.argmax(axis=1).tolist(),
        }
    a, b = rows["bundle"], rows["export"]
    if a["names"] != b["names"]:
        raise SystemExit(f"the two paths kept other cards: {len(a['names'])} and {len(b['names'])}")
    labels = bundle.labels
    truth = [labels.index(s.label) for s in test.samples if s.name in set(a["names"])]
    f1 = {k: compute_metrics(labels, truth, r["top"])["multiclass"]["macro_f1"] for k, r in rows.items()}
    data = {
        "cards": len(a["names"]),
        "max_probability_difference": float(np.abs(a["probs"] - b["probs"]).max()),
        "decisions_differing": sum(x != y for x, y in zip(a["decisions"], b["decisions"])),
        "classes_differing": sum(x != y for x, y in zip(a["top"], b["top"])),
        "macro_f1": f1,
        "decisions": {k: {d: r["decisions"].count(d) for d in DECISIONS} for k, r in rows.items()},
        "model": model_name,
        "ocr": exported.manifest["ocr"],
    }
    save("export_parity", data)
    recogniser = (data["ocr"].get("recogniser") or {}).get("file")

    def counts(path: str) -> str:
        return ", ".join(str(v) for v in data["decisions"][path].values())

    md = f"""### An export against its bundle on the same test cards

Model: {model_name}{
        f", trained on the {args.counts} cards per class of a smaller seed-0 field dataset" if args.counts else ""
    }.
Each path classified the dataset's {data["cards"]} test cards in its own way: the bundle with cnocr and the
torch models, the export with {data["ocr"]["engine"]}{
        f" (its recogniser `{recogniser}`, cut to printable ASCII)" if recogniser else ""
    } and its ONNX graphs.

| measure | result | goal |
|---|---|---|
| largest difference of a calibrated probability | {data["max_probability_difference"]:.1e} | at most 1e-4 |
| cards whose decision differs | {data["decisions_differing"]} of {data["cards"]} | 0 |
| cards whose class differs | {data["classes_differing"]} of {data["cards"]} | 0 |
| macro-F1, bundle / export | {100 * f1["bundle"]:.2f} / {100 * f1["export"]:.2f} | equal |
| decisions, bundle / export ({", ".join(DECISIONS)}) | {counts("bundle")} / {counts("export")} | |
"""
    update_section("export-parity", md)
    print(md)


if __name__ == "__main__":
    main()
