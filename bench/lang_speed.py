"""Speed of the language stages on generated cards, with a cold cache each time.

    python bench/lang_speed.py [--cards 20] [--threads 1,2]

describe: images/s of the built-in describer and of a tiny random InstructBLIP on the CPU (the real
code path: processor, batched generate); reason: SmolLM2-135M-Instruct (the default GGUF) seconds per
card and prompt/generated tokens per second for each thread count. Stats come from truth.jsonl so OCR
time is not counted."""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import dataset, save, update_section
from asectl.cache import Cache
from asectl.domain.dataset import Dataset, load_dataset
from asectl.domain.synth import read_truth
from asectl.stages.describe import run_describe
from asectl.stages.reason import run_reason


def subset(ds: Dataset, n: int) -> Dataset:
    return Dataset(ds.samples[:n], ds.root, ds.source, ds.labels)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cards", type=int, default=20)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    root = dataset(0)
    full = load_dataset(root)
    ds = subset(full, args.cards)
    truth = read_truth(root)
    rows = {}

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_describe(ds, vlm="builtin", cache=Cache(f"{tmp}/c1"))
        dt = time.perf_counter() - t0
        rows["describe builtin"] = {"cards": len(ds), "seconds": dt, "images_per_s": len(ds) / dt}

        from asectl.testing import build_tiny_instructblip

        folder = build_tiny_instructblip(f"{tmp}/tiny-instructblip")
        t0 = time.perf_counter()
        run_describe(
            ds,
            vlm="instructblip",
            model=folder,
            device="cpu",
            batch_size=8,
            generation={"max_new_tokens": 32, "num_beams": 1},
            cache=Cache(f"{tmp}/c2"),
        )
        dt = time.perf_counter() - t0
        rows["describe tiny InstructBLIP (CPU, fp32, batch 8, 32 new tokens, greedy)"] = {
            "cards": len(ds),
            "seconds": dt,
            "images_per_s": len(ds) / dt,
        }

        fields = {s.name: truth[s.name]["printed"] for s in full.samples}
        for threads in (int(t) for t in args.threads.split(",")):
            t0 = time.perf_counter()
            # Priors from the full training split, as in a real run; only the subset is reasoned about.
            from asectl.domain.card import default_spec
            from asectl.stages.reason import build_priors

            priors = build_priors(
                [fields[s.name] for s in full.split("train")],
                [s.label for s in full.split("train")],
                list(default_spec().bin_edges),
                "normal",
            )
            res = run_reason(ds, n_threads=threads, fields=fields, priors=priors, cache=Cache(f"{tmp}/r{threads}"))
            dt = time.perf_counter() - t0
            recs = [r for r in res.records if not r.get("error")]
            # Token counts per generated answer: cards whose prompts read alike share one answer.
            made = [r for r in recs if not r.get("answer_shared")]
            gen = sum(r["tokens"]["completion"] for r in made)
            prompt = sum(r["tokens"]["prompt"] - r["tokens"].get("prompt_reused", 0) for r in made)
            p_ms = sum(r.get("timing", {}).get("prompt_ms", 0) for r in made)
            g_ms = sum(r.get("timing", {}).get("generate_ms", 0) for r in made)
            calls = sum(r.get("timing", {}).get("decode_calls", 0) for r in made)
            from asectl.backends.llm import default_workers

            workers = default_workers(threads, 0)
            rows[f"reason SmolLM2-135M Q4_1, {workers} worker process(es) x {threads} thread(s)"] = {
                "cards": len(recs),
                "answers_generated": len(made),
                "seconds": dt,
                "seconds_per_card": dt / max(len(recs), 1),
                "prompt_tokens_evaluated_per_answer": prompt / max(len(made), 1),
                "prompt_tokens_per_s": prompt / (p_ms / 1000) if p_ms else None,
                "generated_tokens_per_answer": gen / max(len(made), 1),
                "decode_calls_per_answer": calls / max(len(made), 1),
                "generated_tokens_per_s": gen / (g_ms / 1000) if g_ms else None,
            }
    for k, v in rows.items():
        print(k, v)
    save("lang_speed", rows)
    lines = ["| stage / backend | cards | wall s | images/s or s/card | tokens |", "|---|---|---|---|---|"]
    for k, v in rows.items():
        if "images_per_s" in v:
            lines.append(f"| {k} | {v['cards']} | {v['seconds']:.1f} | {v['images_per_s']:.2f} images/s | |")
        else:
            lines.append(
                f"| {k} | {v['cards']} | {v['seconds']:.1f} | {v['seconds_per_card']:.2f} s/card | "
                f"{v['answers_generated']} answers generated (cards with alike prompts share one); per "
                f"answer {v['prompt_tokens_evaluated_per_answer']:.0f} prompt tokens evaluated at "
                f"{v['prompt_tokens_per_s'] or 0:.0f} tok/s, "
                f"{v['generated_tokens_per_answer']:.0f} answer tokens in "
                f"{v.get('decode_calls_per_answer', 0):.1f} decode calls, "
                f"{v['generated_tokens_per_s'] or 0:.0f} tok/s |"
            )
    update_section(
        "lang-speed",
        "### Language stages (cold cache; reason uses printed stats, no OCR; tokens/s are "
        "per process, wall s includes loading the models)\n\n" + "\n".join(lines),
    )


if __name__ == "__main__":
    main()
