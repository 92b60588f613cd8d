"""Does a trained model decide the same cards the same way on a machine whose kernels use another instruction set?

    python bench/replay_machine.py --cache-dir C --data D [--model M] [--render]

A station's machine is often not the one the model was trained on. Training on another instruction set
gives another model (bench/reproducibility.py); this asks whether one model, once trained, is portable.
The model M (default: the latest in C) classifies the test split of D twice, each time in a fresh copy of
C without its encoder features and predictions (`asectl report D --model M --json`), so the test cards
are encoded and classified anew; the OCR, descriptions and LLM answers are text and come from C. Once
with the machine's own kernels, once with torch, oneDNN, MKL and OpenBLAS told to use AVX2 kernels only
(as on a machine without AVX-512; on such a machine the two runs are the same). Compared: the test
cards' classes, decisions and probabilities.
Results: bench/results/replay_machine.json and the ``replay-machine`` section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import OUT, load, publish, update_section
from reproducibility import AVX2_ONLY, DECISIONS, asectl, decision_counts, differences

NAME = "replay_machine"
RUNS = ("own kernels", "AVX2 kernels only")
RECOMPUTED = ("features", "predict")  # cache stages a report encodes and classifies anew without


def replay(source: Path, data: Path, model: str, extra_env: dict) -> dict:
    with tempfile.TemporaryDirectory(dir=OUT) as work:
        cache = Path(work) / "cache"
        shutil.copytree(source, cache, copy_function=os.link)  # entries are never rewritten in place
        for stage in RECOMPUTED:
            shutil.rmtree(cache / "entries" / stage, ignore_errors=True)
        start = time.perf_counter()
        env = {**os.environ, **extra_env, "ASECTL_CACHE_DIR": str(cache)}
        out = str(Path(work) / "report")
        metrics = json.loads(asectl(env, "report", str(data), "--model", model, "--out", out, "--json"))
    rows = metrics["predictions"]
    return {
        "macro_f1": metrics["multiclass"]["macro_f1"],
        "per_card": [[r["image"], r["pred"]] for r in rows],
        "decisions": [r.get("decision") for r in rows],
        "probs": [r.get("probs") for r in rows],
        "seconds": round(time.perf_counter() - start, 1),
    }


def render(rec: dict) -> str:
    lines = [
        "### A trained model on a machine with other kernels (its test cards encoded and classified anew)",
        "",
        f"Model `{rec['model'][:12]}` (trained on: {rec['trained_on']}), the test split of `{rec['data']}` "
        f"({rec['cards']} cards); the OCR, descriptions and LLM answers from the cache, the encoder "
        "features and predictions computed anew in each run.",
        "",
        "| kernels | test macro-F1 | decisions (pass/defect/defective/review) | cards predicted differently | "
        "decided differently | largest probability difference |",
        "|---|---|---|---|---|---|",
    ]
    for name in RUNS:
        r = rec["runs"][name]
        decided = "/".join(str(r["decision_counts"].get(d, 0)) for d in DECISIONS)
        v = r["vs_own_kernels"]
        cells = (
            ["-", "-", "-"]
            if name == RUNS[0]
            else [str(v["cards_predicted_differently"]), str(v["cards_decided_differently"])]
            + [f"{v['largest_probability_gap']:.2g}"]
        )
        lines.append(f"| {name} | {100 * r['macro_f1']:.2f} | {decided} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, help="a cache holding the model and the cards' text records")
    ap.add_argument("--data", type=Path, help="the dataset folder the model was trained on (its test split)")
    ap.add_argument("--model", default=None, help="a model id or folder (default: the latest in the cache)")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--render", action="store_true", help="write the docs section again from the saved results")
    args = ap.parse_args()
    if args.render:
        rec = load(NAME)
        update_section("replay-machine", render(rec), header=rec["measured"])
        return
    if args.cache_dir is None or args.data is None:
        raise SystemExit("--cache-dir and --data are required (or --render)")
    started = time.perf_counter()
    models = json.loads(asectl({**os.environ, "ASECTL_CACHE_DIR": str(args.cache_dir)}, "models", "list", "--json"))
    chosen = next((m for m in models if args.model is None or m["id"].startswith(args.model)), None)
    if chosen is None:
        raise SystemExit(f"{args.cache_dir}: no model {args.model or ''} in this cache")
    bundle = json.loads((Path(chosen["path"]) / "bundle.json").read_text())
    machine = bundle["training"].get("machine") or {}
    OUT.mkdir(parents=True, exist_ok=True)
    runs = {
        name: replay(args.cache_dir, args.data, chosen["path"], {} if name == RUNS[0] else AVX2_ONLY) for name in RUNS
    }
    own = runs[RUNS[0]]
    for r in runs.values():
        r["decision_counts"] = decision_counts(r["decisions"])
        r["vs_own_kernels"] = differences(r, own)
    for r in runs.values():
        del r["per_card"], r["decisions"], r["probs"]
    rec = {
        "cards": sum(own["decision_counts"].values()),
        "model": chosen["id"],
        "data": "/".join(args.data.resolve().parts[-2:]),  # e.g. quickstart/data
        "trained_on": f"{machine.get('cpu', '?')}, torch kernels {machine.get('torch_cpu_capability', '?')}",
        "runs": runs,
    }
    publish(NAME, rec, started, render, docs=not args.no_docs)
    print(render(rec))


if __name__ == "__main__":
    main()
