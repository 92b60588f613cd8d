"""Does `asectl predict --watch --workers 2` exit on SIGTERM, and write every card exactly once across the stop
and a restart? Repeated, to look for the watcher that once did not exit within 120 s of SIGTERM
(docs/predict.md).

    python bench/watch_sigterm.py --model DIR [--tries 10] [--cards 20] [--workers 2] [--seed 900]

Each try: a new watcher on an empty folder (the cache is --cache-dir, shared by the tries; every try's
cards are new to it: generated with seed + try), its cards dropped at once (written under a hidden name,
then renamed), SIGTERM after a delay drawn from [0, 1.5] s once the first line is written (seeded), while
later chunks are still being prepared, the seconds until the process exits (a hang: still running 120 s
after SIGTERM, then killed); then a
restart on the same --out that must write the remaining cards, stopped by SIGTERM once they are all
written. Checked: both runs exit with code 0, and every card has exactly one line.
Results: bench/results/watch_sigterm.json and the ``watch-sigterm`` section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import OUT, save, update_section
from predict_speed import drop, lines, new_cards

HANG_AFTER = 120.0  # seconds after SIGTERM a watcher may take before it counts as hung (the slow test's limit)


def start(model: Path, inbox: Path, out: Path, log: Path, workers: int, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "asectl", "predict", "--watch", str(inbox), "--out", str(out)]
    cmd += ["--model", str(model), "--poll", "0.1", "--workers", str(workers)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def wait_for(predicate, proc: subprocess.Popen, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def stop(proc: subprocess.Popen) -> tuple[float, int | None]:
    """SIGTERM; (seconds until the process exited, its exit code), or (inf, None) after HANG_AFTER."""
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=HANG_AFTER)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return float("inf"), None
    return time.perf_counter() - t0, code


def one_try(model: Path, cards: list[Path], work: Path, workers: int, env: dict, delay: float) -> dict:
    inbox, out, log = work / "inbox", work / "out.jsonl", work / "watch.log"
    inbox.mkdir(parents=True)
    proc = start(model, inbox, out, log, workers, env)
    if not wait_for(lambda: "watching" in log.read_text(), proc, 300):
        raise SystemExit(f"the watcher did not start: {log.read_text()[-2000:]}")
    for i, card in enumerate(cards):
        drop(card, inbox, f"card-{i:03d}.png")
    wait_for(lambda: bool(lines(out)), proc, 300)
    time.sleep(delay)
    exit_first, code_first = stop(proc)
    written_first = len(lines(out))
    restart_log = work / "restart.log"
    proc = start(model, inbox, out, restart_log, workers, env)
    done = wait_for(lambda: "watching" in restart_log.read_text(), proc, 300)
    done = done and wait_for(lambda: len(lines(out)) >= len(cards), proc, 300)
    exit_second, code_second = stop(proc)
    names = [json.loads(x)["image"] for x in out.read_text().splitlines()]
    return {
        "delay": delay,
        "first_exit_seconds": exit_first,
        "first_exit_code": code_first,
        "written_before_sigterm_and_at_stop": written_first,
        "restart_completed": done,
        "second_exit_seconds": exit_second,
        "second_exit_code": code_second,
        "lines": len(names),
        "each_card_once": sorted(names) == sorted(f"card-{i:03d}.png" for i in range(len(cards))),
        "log_tail": log.read_text()[-300:],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True, help="a bundle or an export folder")
    ap.add_argument("--cache-dir", type=Path, default=OUT / "watch-sigterm-cache")
    ap.add_argument("--tries", type=int, default=10)
    ap.add_argument("--cards", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=900, help="cards of try k: generator seed seed + k; delays: seed")
    args = ap.parse_args()

    env = {**os.environ, "ASECTL_CACHE_DIR": str(args.cache_dir)}
    rng = random.Random(args.seed)
    tries = []
    for k in range(args.tries):
        cards = new_cards(OUT / "watch-sigterm", args.seed + k, args.cards)
        with tempfile.TemporaryDirectory(prefix="asectl-sigterm-") as tmp:
            t = one_try(args.model, cards, Path(tmp), args.workers, env, round(rng.uniform(0, 1.5), 2))
        tries.append(t)
        print(json.dumps({k: v for k, v in t.items() if k != "log_tail"}), flush=True)
        shutil.rmtree(OUT / "watch-sigterm" / f"cards-seed{args.seed + k}", ignore_errors=True)

    hung = sum(t["first_exit_code"] is None or t["second_exit_code"] is None for t in tries)
    ok = sum(
        t["each_card_once"] and t["restart_completed"] and t["first_exit_code"] == 0 and t["second_exit_code"] == 0
        for t in tries
    )
    worst = max(max(t["first_exit_seconds"], t["second_exit_seconds"]) for t in tries)
    data = {"model": str(args.model), "workers": args.workers, "cards": args.cards, "tries": tries}
    save("watch_sigterm", data)
    md = f"""### `predict --watch --workers {args.workers}`: SIGTERM and restart, {args.tries} tries

Model `{args.model}`; {args.cards} new cards per try, SIGTERM 0 to 1.5 s after the first line, then a restart
on the same `--out`. **{ok} of {args.tries} tries** exited with code 0 both times and wrote every card exactly
once; **{hung} hung** (still running {HANG_AFTER:.0f} s after SIGTERM). Slowest exit after SIGTERM:
{worst:.1f} s. Load average at the end: {", ".join(f"{v:.2f}" for v in os.getloadavg())}.
"""
    update_section("watch-sigterm", md)
    print(md)


if __name__ == "__main__":
    main()
