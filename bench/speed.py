"""Speed of every stage on the default 455 cards, the whole quick pipeline cold and fully cached, and
the latency of one warm prediction.

    python bench/speed.py [--out bench/out/speed]

Runs the same commands as examples/quickstart.sh, one process per stage, in a fresh cache folder, and
records wall seconds, images/s and the peak resident memory of each stage (its process and children)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from _common import OUT, ROOT, save, update_section


def run(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB over the process tree) of one command."""
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0.0]

    def watch() -> None:
        while proc.poll() is None:
            try:
                procs = [proc, *proc.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.1)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    _, err = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return time.perf_counter() - t0, peak[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(OUT / "speed"))
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "ASECTL_CACHE_DIR": str(out / "cache")}
    exe = [sys.executable, "-m", "asectl", "-q"]
    data, new = out / "data", out / "new-card"
    steps = [
        ("synth", [*exe, "synth", "--out", data, "--seed", "0"], 455),
        (
            "synth (new card)",
            [*exe, "synth", "--out", new, "--seed", "1000", "--counts", "1,0,1,0,0", "--test-size", "1"],
            2,
        ),
        ("ocr (cnocr)", [*exe, "ocr", data], 455),
        ("describe (built-in)", [*exe, "describe", data], 455),
        ("reason (SmolLM2-135M)", [*exe, "reason", data], 455),
        ("align (PFA, stride 0.2)", [*exe, "align", data, "--stride", "0.2"], 455),
        ("fuse-train", [*exe, "fuse-train", data], 325),
        ("report", [*exe, "report", data, "--out", out / "report"], 130),
        ("predict (1 new card, cold)", [*exe, "predict", new / "images" / "0000.png"], 1),
    ]
    rows = []
    for name, cmd, n in steps:
        sec, mem = run([str(c) for c in cmd], env)
        rows.append({"stage": name, "seconds": sec, "items": n, "per_s": n / sec, "peak_mib": mem})
        if name.startswith("reason"):  # cards whose prompts read alike share one answer
            from asectl.cache import Cache
            from asectl.stages.reason import ANSWER_STAGE

            rows[-1]["answers_generated"] = sum(1 for _ in Cache(out / "cache").iter_entries(ANSWER_STAGE))
        print(rows[-1], flush=True)
    cold = sum(r["seconds"] for r in rows)
    # The fully cached rerun: every stage again on the same data and cache (what a second quickstart does).
    t0 = time.perf_counter()
    for name, cmd, _count in steps:
        if name.startswith("synth"):
            continue
        run([str(c) for c in cmd], env)
    cached = time.perf_counter() - t0
    warm, _ = run([*exe, "predict", str(new / "images" / "0000.png")], env)
    result = {"stages": rows, "cold_total_seconds": cold, "cached_rerun_seconds": cached, "warm_predict_seconds": warm}
    save("speed", result)
    lines = ["| stage | items | wall s | items/s | peak memory (MiB) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['items']} | {r['seconds']:.1f} | {r['per_s']:.2f} | {r['peak_mib']:.0f} |")
    text = (
        "### Speed of the quick pipeline (455 cards, one process per stage, cold cache)\n\n"
        + "\n".join(lines)
        + f"\n\n- whole quick pipeline, cold: **{cold / 60:.1f} min** (goal: at most 10 min)\n"
        f"- every stage again, fully cached: **{cached:.1f} s** for 7 commands "
        f"(goal: at most 5 s; each command starts Python and reads its entries back, no model is loaded)\n"
        f"- warm `predict` of one card (all its steps cached): **{warm:.2f} s** including process start\n"
        + "".join(
            f"- {r['stage']}: {r['answers_generated']} answers generated for {r['items']} cards (cards "
            "whose prompts read alike share one)\n"
            for r in rows
            if "answers_generated" in r
        )
    )
    update_section("speed", text)
    print(text)


if __name__ == "__main__":
    main()
