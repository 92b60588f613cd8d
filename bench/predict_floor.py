"""The least a card costs: what each part of a warm `predict` spends on a card new to every stage, with
one thread per library, and what that allows on this machine against the goals of
bench/predict_speed.py (3 cards/s warm, 3 s cold).

    python bench/predict_floor.py [--cards 12] [--card-seed 1700] [--model DIR]

Warm: one process, the models loaded and kept (as `predict --watch`), one warm-up card, then each card
classified alone with ONNX Runtime, torch and llama.cpp on one thread each (no thread waits for another,
none spins: CPU seconds are the work itself). The cache is a new, empty one, so every card's LLM answer is
computed (on a station whose cache holds the training cards, a card whose prompt reads like an earlier
one's shares its answer, docs/reason.md). Components are timed by wrapping the functions that do the work
(OCR's `read_card`, the LLM's `answer`, `run_describe`, `encode_modalities`, `class_logits`); what is left
of a card's CPU time is the rest (cache reads and writes, hashing, prompts, parsing). Two cores can
classify at most 2 / (CPU s per card) cards/s, however the work is spread over them.

The OCR of the same cards is timed again with the engine's own text detector (`--detector model`) instead
of the line cutter that `--detector auto` (the default) uses on a clean printed record: what cutting the
record's lines out directly saves, and whether the records agree.

Cold: a new Python process importing what `asectl predict` imports (the fastest of 5), plus one card's CPU
seconds spread perfectly over 2 cores: a lower bound, since loading the models is left out. Then the real
thing, for the bundle and its export (`asectl export`) side by side in one run: `asectl predict CARD
--model M` in a new process on a card new to every stage (`--cold` cards each, after one untimed run on
another card so that the per-file memos beside the cache exist, as on a station that ran before), its
wall seconds and CPU seconds (user + system), and the CPU seconds per card by part for both paths (warm,
as above).

The model is --model, else bench/predict_speed.py's bundle (bench/out/predict-speed/bundle); its export is
--export, else written from it with `asectl export` (bench/out/predict-floor/export).
Results: bench/results/predict_floor.json and the ``predict-floor`` section of docs/benchmarks.md."""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _common import OUT, save, update_section

PARTS = ("OCR", "LLM answer", "describe", "encoders", "fusion")
# What `asectl predict` imports before it reads a card (commands -> stages -> backends).
IMPORTS = {
    "Python alone": "pass",
    "+ asectl CLI": "import asectl.cli",
    "+ numpy, PIL, onnxruntime, llama_cpp": "import asectl.cli, numpy, PIL.Image, onnxruntime, llama_cpp",
    "+ torch": "import asectl.cli, numpy, PIL.Image, onnxruntime, llama_cpp, torch",
    "+ transformers": "import asectl.cli, numpy, PIL.Image, onnxruntime, llama_cpp, torch, transformers",
    "+ cnocr (CnSTD, torchvision)": "import asectl.cli, numpy, PIL.Image, onnxruntime, llama_cpp, torch, "
    "transformers, cnocr",
}
# What `asectl predict --model EXPORT` imports instead (no torch): rapidocr's text recogniser, the
# describer's scipy.ndimage, the text encoders' tokenizers.
EXPORT_IMPORTS = (
    "import asectl.cli, numpy, PIL.Image, onnxruntime, llama_cpp, tokenizers, scipy.ndimage, rapidocr.ch_ppocr_rec"
)


def timed(spent: dict, part: str, owner, name: str) -> None:
    """Wrap ``owner.name`` so that its CPU seconds add up in ``spent[part]``."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.process_time()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[part] += time.process_time() - t0

    setattr(owner, name, wrapper)


def import_seconds(statement: str, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True)
        times.append(time.perf_counter() - t0)
    return min(times)  # the best of several: a lower bound is what this measures


def new_cards_for_cold(out: Path, seed: int, n: int) -> list[Path]:
    from predict_speed import new_cards

    return new_cards(out, seed, n)


def cold_runs(paths: dict[str, tuple[Path, str | None]], cards: list[Path], tmp: Path) -> dict[str, dict]:
    """``asectl predict CARD --model M`` in a new process, for each path (name -> (model, the asectl code to
    run: a PYTHONPATH, None for this checkout's)) in its own new cache: first one untimed run each, which
    leaves the memos beside the cache as a station's earlier runs have, then the paths in turn on new cards,
    so that they share whatever load the machine has. Wall and CPU seconds per path."""
    from predict_speed import cold_predict

    exe = [sys.executable, "-m", "asectl", "-q"]
    env = {
        name: {**os.environ, "ASECTL_CACHE_DIR": str(tmp / name), **({"PYTHONPATH": code} if code else {})}
        for name, (_, code) in paths.items()
    }
    out: dict[str, dict] = {name: {"wall": [], "cpu": []} for name in paths}
    queue = iter(cards)
    for name, (model, _) in paths.items():
        cold_predict(exe, [next(queue)], model, env[name])
    for card in queue:
        name = min(out, key=lambda n: len(out[n]["wall"]))  # the paths in turn
        wall, cpu = cold_predict(exe, [card], paths[name][0], env[name])
        out[name]["wall"] += wall
        out[name]["cpu"] += cpu
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cards", type=int, default=12)
    ap.add_argument("--card-seed", type=int, default=1700)
    ap.add_argument("--model", type=Path, default=OUT / "predict-speed" / "bundle")
    ap.add_argument("--export", type=Path, default=None, help="the model's export (default: written from it)")
    ap.add_argument("--cold", type=int, default=3, help="cold single-card runs per path")
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another checkout of asectl (its root): the export's cold runs with its code too, in turn with "
        "this checkout's (before and after a change, under the same load)",
    )
    ap.add_argument("--tag", default="", help="results and docs section of their own (e.g. no-llm, for another model)")
    args = ap.parse_args()

    work = OUT / "predict-floor"
    export = args.export
    if export is None:
        from predict_speed import export_model

        work.mkdir(parents=True, exist_ok=True)
        export = export_model(args.model, work, dict(os.environ), [sys.executable, "-m", "asectl", "-q"])

    # Cold single cards first, before this process loads anything: each path on cards of its own, each in a
    # new cache (every card new to every stage).
    cold_cards = new_cards_for_cold(work, args.card_seed + 100, (3 if args.baseline else 2) * (args.cold + 1))
    paths = {"bundle": (args.model, None), "export": (export, None)}
    if args.baseline:  # the export with another checkout's asectl: what a change of the code gained
        paths["export, baseline code"] = (export, str(args.baseline.resolve()))
    with tempfile.TemporaryDirectory(prefix="asectl-floor-cold-") as tmp:
        single = cold_runs(paths, cold_cards, Path(tmp))

    imports = {label: import_seconds(stmt) for label, stmt in IMPORTS.items()}
    imports_export = import_seconds(EXPORT_IMPORTS)

    import torch

    torch.set_num_threads(1)
    import asectl.backends.llm as llm_mod
    import asectl.export as export_mod
    import asectl.stages.describe as describe_mod
    import asectl.stages.ocr as ocr_mod
    import asectl.stages.predict as predict_mod
    from asectl.backends import warm
    from asectl.backends.ocr import get_engine
    from asectl.bundle import load_bundle
    from asectl.cache import Cache
    from asectl.domain.dataset import Dataset, Sample
    from predict_speed import new_cards

    bundle = load_bundle(args.model)
    exported = export_mod.load_export(export)
    engine = bundle.config["replay"]["ocr"].get("engine", "cnocr")
    export_engine = exported.config["replay"]["ocr"].get("engine", "cnocr")
    for name in {engine, export_engine}:
        get_engine(name, threads=1)
    load = llm_mod.LlamaCppLLM.load

    def load_one_thread(self):
        if self._llm is None:
            self.n_threads = self.n_threads_batch = 1
        return load(self)

    llm_mod.LlamaCppLLM.load = load_one_thread

    spent: dict[str, float] = defaultdict(float)
    timed(spent, "OCR", ocr_mod, "read_card")
    answers: list[dict] = []  # what each LLM answer spent its time on (tokens, prompt and decode calls)
    answer = llm_mod.LlamaCppLLM.answer

    def kept_answer(self, *args, **kwargs):
        out = answer(self, *args, **kwargs)
        answers.append({"tokens": out["tokens"], "timing": out["timing"]})
        return out

    llm_mod.LlamaCppLLM.answer = kept_answer
    timed(spent, "LLM answer", llm_mod.LlamaCppLLM, "answer")
    timed(spent, "describe", describe_mod, "run_describe")
    timed(spent, "encoders", predict_mod, "encode_modalities")
    timed(spent, "fusion", predict_mod, "class_logits")
    # The export's ONNX graphs: its encoders, then the projections and fold models.
    timed(spent, "encoders", export_mod.ExportedModel, "encode")
    timed(spent, "fusion", export_mod.ExportedModel, "fold_logits")

    cards = new_cards(OUT / "predict-floor", args.card_seed, args.cards)

    def warm_rows(model) -> list[dict]:
        rows = []
        with tempfile.TemporaryDirectory(prefix="asectl-floor-") as tmp, warm.keep_loaded():
            predictor = predict_mod.Predictor(model, Cache(Path(tmp)))
            predictor.warm_up()
            answers.clear()
            for card in cards:
                spent.clear()
                c0, w0 = time.process_time(), time.perf_counter()
                res = predictor.run(Dataset([Sample(card, card.name)], None, "images", []))
                assert res.records and "error" not in res.records[0], res.records
                rows.append(
                    {
                        "card": card.name,
                        "cpu": time.process_time() - c0,
                        "wall": time.perf_counter() - w0,
                        **{p: spent[p] for p in PARTS},
                    }
                )
        return rows

    export_rows = warm_rows(exported)
    rows = warm_rows(bundle)  # last: the LLM answers below are the bundle's

    # The same cards' OCR with the engine's text detector, on the warm engine: what the line cutter saves.
    ocr_settings = ocr_mod.OcrSettings.from_dict(bundle.config["replay"]["ocr"])
    detector_cpu, same_fields = [], 0
    for card in cards:
        cut = ocr_mod.read_card(card, engine, ocr_settings.card_spec(), "auto")
        c0 = time.process_time()
        detected = ocr_mod.read_card(card, engine, ocr_settings.card_spec(), "model")
        detector_cpu.append(time.process_time() - c0)
        same_fields += cut["fields"] == detected["fields"]

    # The LLM answer split: the card's own prompt tokens (the shared prefix is reused) against the decode
    # calls of the answer (one per real choice, each a pass over all the weights).
    k = max(len(answers), 1)
    llm_split = {
        "answers": len(answers),
        "card_prompt_tokens": sum(a["tokens"]["prompt"] - a["tokens"]["prompt_reused"] for a in answers) / k,
        "prefix_tokens": sum(a["tokens"]["prompt_reused"] for a in answers) / k,
        "answer_tokens": sum(a["tokens"]["completion"] for a in answers) / k,
        "decode_calls": sum(a["timing"]["decode_calls"] for a in answers) / k,
        "prompt_ms": sum(a["timing"]["prompt_ms"] for a in answers) / k,
        "generate_ms": sum(a["timing"]["generate_ms"] for a in answers) / k,
    }

    n = len(rows)
    det_cpu = sum(detector_cpu) / n
    mean = {k: sum(r[k] for r in rows) / n for k in ("cpu", "wall", *PARTS)}
    mean_export = {k: sum(r[k] for r in export_rows) / n for k in ("cpu", "wall", *PARTS)}
    rest_export = mean_export["cpu"] - sum(mean_export[p] for p in PARTS)
    rest = mean["cpu"] - sum(mean[p] for p in PARTS)
    most = 2 / mean["cpu"]
    no_llm = mean["cpu"] - mean["LLM answer"]
    # rapidocr needs no CnOCR import; both need torch and transformers for the encoders.
    cold_imports = {
        e: imports["+ transformers" if e == "rapidocr" else "+ cnocr (CnSTD, torchvision)"]
        for e in ("cnocr", "rapidocr")
    }
    cold = {e: sec + mean["cpu"] / 2 for e, sec in cold_imports.items()}
    data = {
        "cards": n,
        "card_seed": args.card_seed,
        "engine": engine,
        "rows": rows,
        "mean": mean,
        "rest": rest,
        "max_cards_per_second_2_cores": most,
        "cpu_without_llm": no_llm,
        "imports": imports,
        "cold_lower_bound": cold,
        "ocr_detector_model_cpu": det_cpu,
        "ocr_detector_same_fields": same_fields,
        "llm_split": llm_split,
        "export": {
            "path": str(export),
            "engine": export_engine,
            "rows": export_rows,
            "mean": mean_export,
            "rest": rest_export,
            "imports": imports_export,
        },
        "cold_single": single,
        "load_average_end": os.getloadavg(),
    }
    save("predict_floor" + (f"_{args.tag.replace('-', '_')}" if args.tag else ""), data)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    def runs(values: list[float]) -> str:
        return ", ".join(f"{v:.1f}" for v in values)

    ratio = med(single["export"]["wall"]) / med(single["bundle"]["wall"])
    both_rows = "\n".join(f"| {p} | {mean[p]:.3f} | {mean_export[p]:.3f} |" for p in PARTS)
    wall_b, wall_e = med(single["bundle"]["wall"]), med(single["export"]["wall"])
    goal = "met" if wall_e <= 3 and ratio <= 0.4 else "not met"
    bundle_imports = imports["+ transformers" if engine == "rapidocr" else "+ cnocr (CnSTD, torchvision)"]
    cold_row = (
        f"| cold `asectl predict CARD`, new process, wall s (median; runs) | **{wall_b:.2f}** "
        f"({runs(single['bundle']['wall'])}) | **{wall_e:.2f}** ({runs(single['export']['wall'])}) | export at "
        f"most 3.0 s and 0.4 x the bundle: {ratio:.2f} x, {goal} |"
    )
    cpu_row = (
        f"| cold CPU s (user + system, median) | {med(single['bundle']['cpu']):.2f} | "
        f"{med(single['export']['cpu']):.2f} | |"
    )
    import_row = (
        f"| imports of the path, new process (fastest of 5) | {bundle_imports:.2f} s | {imports_export:.2f} s | |"
    )
    baseline_line = ""
    if "export, baseline code" in single:
        base = single["export, baseline code"]
        baseline_line = (
            f"\nThe export with the code of `{args.baseline}` (`--baseline`), in turn with the runs above: "
            f"cold wall **{med(base['wall']):.2f} s** ({runs(base['wall'])}), CPU {med(base['cpu']):.2f} s, "
            f"against **{wall_e:.2f} s** and {med(single['export']['cpu']):.2f} s with this code.\n"
        )
    side_by_side = f"""### Bundle and export side by side (one run; cold: {args.cold} new cards each, paths in turn)

| | bundle (OCR {engine}) | export (OCR {export_engine}, no torch) | goal |
|---|---|---|---|
{cold_row}
{cpu_row}
{import_row}
{baseline_line}
Warm CPU seconds per card by part (one thread per library, {n} new cards each):

| part of a card | bundle | export |
|---|---|---|
{both_rows}
| the rest (cache, hashing, prompt, parsing) | {rest:.3f} | {rest_export:.3f} |
| **a card** | **{mean["cpu"]:.3f}** | **{mean_export["cpu"]:.3f}** |

Load average (1, 5, 15 min) at the end: {", ".join(f"{v:.2f}" for v in os.getloadavg())}.
"""

    if llm_split["answers"]:
        llm_text = f"""The LLM answer of a card ({llm_split["answers"]} computed): the shared prompt prefix
({llm_split["prefix_tokens"]:.0f} tokens) is restored, not evaluated; the card's own
{llm_split["card_prompt_tokens"]:.0f} prompt tokens and the answer's opening take {llm_split["prompt_ms"]:.0f} ms, and
{llm_split["decode_calls"]:.1f} decode calls (one per choice the model makes, {llm_split["answer_tokens"]:.0f} answer
tokens in all) {llm_split["generate_ms"]:.0f} ms (wall, mean per answer).

**At most {most:.2f} cards/s on 2 cores** (2 / {mean["cpu"]:.3f} CPU s), whatever the scheduling, when
every card needs its own LLM answer; the goal of 3 needs at most 0.67 CPU s per card. Without the LLM
answer a card still costs {no_llm:.3f} CPU s: even if every answer were shared with an earlier card, at
most {2 / no_llm:.2f} cards/s.
"""
    else:
        llm_text = f"""The model has no llm branch: no card needs an LLM answer.

**At most {most:.2f} cards/s on 2 cores** (2 / {mean["cpu"]:.3f} CPU s), whatever the scheduling; the goal
of 3 needs at most 0.67 CPU s per card.
"""
    part_rows = "\n".join(f"| {p} | {mean[p]:.3f} | {100 * mean[p] / mean['cpu']:.0f}% |" for p in PARTS)
    import_rows = "\n".join(f"| {label} | {s:.2f} |" for label, s in imports.items())
    md = f"""### What a card costs at the least (one thread per library, {n} new cards, OCR engine {engine})

Warm `predict` as `--watch` runs it, on cards new to every stage (a new, empty cache: every LLM answer
is computed), each library on one thread, so CPU seconds are the work itself.

| part of a card | CPU s per card (mean) | share |
|---|---|---|
{part_rows}
| the rest (cache, hashing, prompt, parsing) | {rest:.3f} | {100 * rest / mean["cpu"]:.0f}% |
| **a card** | **{mean["cpu"]:.3f}** (wall {mean["wall"]:.3f} s) | |

OCR recognises the record's lines cut straight out of the binarised card (`--detector auto`, no text
detector); with the engine's text detector instead (`--detector model`) the same cards cost
{det_cpu:.3f} CPU s each, and {same_fields} of {n} give the same fields.

{llm_text}
| cold start: a new process importing | seconds (fastest of 5) |
|---|---|
{import_rows}

Each row includes the rows above it. **Cold lower bound with `rapidocr`**, the engine that imports least
(no CnOCR): the imports up to transformers plus one card's CPU seconds spread perfectly over 2 cores
({mean["cpu"] / 2:.2f} s), loading no model: **{cold["rapidocr"]:.1f} s**, against the goal of 3 s. With
`cnocr` the imports alone take {cold_imports["cnocr"]:.1f} s.

{side_by_side}"""
    update_section("predict-floor" + (f"-{args.tag}" if args.tag else ""), md)
    print(md)


if __name__ == "__main__":
    main()
