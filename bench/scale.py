"""Cards/s of `ocr` and `reason` with the local executor and with Ray at 1 and 2 workers, Ray's overhead,
and a scaling model fitted from the measurements with its prediction for more workers (docs/scale.md).

    python bench/scale.py [--repeats 2] [--counts 225,92,44,50,44]

Every variant is the real command (`python -m asectl ...`) on the default generated cards (seed 0) in a
fresh cache folder; the Ray variants join a Ray instance with 2 CPUs that this script starts once (as a
user joins a running cluster), so its start-up is measured on its own. The machine is shared with other
programs: the variants run in rounds, each round in the reverse order of the one before, so a change of
background load falls on every variant alike; the load average before each run is recorded.

Model (one per stage):

    wall(W) = A + N_cards * d + N_jobs * c / W

    d  the driver's serial cost per card (image hash, cache lookups; for reason also making the card
       records from the answers), measured: the stage with nothing left for the workers, all cards minus
       one card, in one process
    c  one worker's time per job (a card for ocr, a distinct prompt for reason), measured inside the
       worker (the records' `seconds`) in the 1-worker runs
    A  start-up: join the cluster, start the workers, each loads its engine, the last batch's tail;
       fitted to the Ray runs given each run's own measured time per job

W is capped at the number of batches. The prediction for 8, 64 and 512 workers assumes one core per
worker, the per-job time measured here (under this machine's load), and storage and network that keep up.
`--analyse-only` repeats the analysis from bench/results/scale.json and the run folders in --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import _common
from _common import OUT, ROOT, dataset, load, machine, save, update_section

VOLATILE = {"seconds", "timing"}
PREDICT_WORKERS = (8, 64, 512)
ARCHIVE = 10**6
BATCH = {"ocr": 8, "reason": 4}  # the stages' Ray batch sizes (asectl.stages.ocr / reason)


def run(args: list[str], cache: Path, out: Path | None = None) -> dict:
    """Wall seconds of one command (and the load average before it)."""
    cmd = [sys.executable, "-m", "asectl", "-q", "--cache-dir", str(cache), *args]
    if out is not None:
        cmd += ["--out", str(out)]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return {"wall_s": wall, "load_before": load}


def canonical(path: Path) -> list[str]:
    return [
        json.dumps({k: v for k, v in json.loads(line).items() if k not in VOLATILE}, sort_keys=True)
        for line in path.read_text().splitlines()
    ]


def entries(cache: Path, stage: str) -> list[Path]:
    return sorted((cache / "entries" / stage).glob("*/*/record.json"))


def engine_load_seconds(stage: str) -> float:
    """One worker's start-up measured on its own: a fresh process loading the engine (minus Python's and
    asectl's import)."""
    load = {
        "ocr": "from asectl.backends.ocr import get_engine; get_engine('cnocr', threads=1)",
        "reason": "from asectl.backends.llm import make_llm; make_llm().load()",
    }[stage]
    code = (
        "import time, asectl.stages.ocr, asectl.stages.reason; t = time.perf_counter(); "
        + load
        + "; print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def driver_cost(stage: str, data: Path, cache_root: Path) -> tuple[float, dict]:
    """Seconds per card of the stage's serial part on the driver (image hash, cache lookups; reason: the
    card records made from cached answers), as (wall on all cards - wall on one card) / (cards - 1)."""
    from asectl.cache import Cache, forget_file_hashes
    from asectl.domain.dataset import Dataset, load_dataset
    from asectl.stages.ocr import run_ocr
    from asectl.stages.reason import run_reason

    ds = load_dataset(data)
    one = Dataset(ds.samples[:1], ds.root, ds.source, ds.labels)
    walls = {}
    priors = None
    for name, part in (("all", ds), ("one", one)):
        forget_file_hashes()  # hash every image again, as a new command would
        if stage == "reason":
            shutil.rmtree(cache_root / "entries" / "reason", ignore_errors=True)
        t0 = time.perf_counter()
        if stage == "ocr":
            run_ocr(part, cache=Cache(cache_root), remember=False)
        else:  # the same priors on one card, so its prompt and answer are the same
            priors = run_reason(part, cache=Cache(cache_root), priors=priors, remember=False).params["priors"]
        walls[name] = time.perf_counter() - t0
    return (walls["all"] - walls["one"]) / (len(ds.samples) - 1), walls


def per_job(cache: Path, stage: str) -> tuple[int, float]:
    """(jobs computed, mean seconds per job inside a worker) of one run, from its cache entries."""
    found = entries(cache, "ocr" if stage == "ocr" else "reason-answer")
    secs = [json.loads(p.read_bytes())["seconds"] for p in found]
    return len(secs), float(np.mean(secs))


def analyse(res: dict, out: Path) -> None:
    """The model of each stage from the raw runs (see the module docstring), filled into ``res``."""
    n = res["cards"]
    for stage, s in res["stages"].items():
        for name, rs in s["runs"].items():
            for r in rs:
                if "jobs" not in r:
                    r["jobs"], r["worker_s_per_job"] = per_job(out / f"{stage}-{name}-{r['round']}", stage)
        jobs = s["runs"]["ray-1"][0]["jobs"]
        d = s["driver_s_per_card"]
        # Each Ray run: wall - cards x d = A + k x (jobs x its measured seconds per job / W); k near 1 says
        # the workers' own time explains the wall.
        xs, ys = [], []
        for name, rs in s["runs"].items():
            if name.startswith("ray-"):
                w = int(name.split("-")[1])
                for r in rs:
                    xs.append(r["jobs"] * r["worker_s_per_job"] / w)
                    ys.append(r["wall_s"] - n * d)
        design = np.column_stack([np.ones(len(xs)), xs])
        (a, k), *_ = np.linalg.lstsq(design, np.array(ys), rcond=None)
        start_ups = [y - x for x, y in zip(xs, ys)]  # A of each run with k = 1
        c = float(np.mean([r["worker_s_per_job"] for r in s["runs"]["ray-1"]]))
        model = {
            "A_s": float(np.mean(start_ups)),
            "A_spread_s": [float(min(start_ups)), float(max(start_ups))],
            "slope_k": float(k),
            "intercept_with_k_s": float(a),
            "c_s": c,
            "d_s": d,
            "jobs": jobs,
        }
        mean = {name: float(np.mean([r["wall_s"] for r in rs])) for name, rs in s["runs"].items()}
        s.update(
            model=model,
            mean_wall_s=mean,
            overhead_ray2_vs_local=mean["ray-2"] / mean["local"],
            overhead_ray1_vs_local=mean["ray-1"] / mean["local"],
            prediction_measured_cards=[predict(model, n, jobs, w, BATCH[stage]) for w in PREDICT_WORKERS],
            prediction_archive=[
                predict(model, ARCHIVE, round(jobs * ARCHIVE / n), w, BATCH[stage]) for w in PREDICT_WORKERS
            ],
        )


def predict(model: dict, n_cards: int, n_jobs: int, workers: int, batch: int) -> dict:
    w = min(workers, max(1, math.ceil(n_jobs / batch)))
    wall = model["A_s"] + n_cards * model["d_s"] + n_jobs * model["c_s"] / w
    return {"workers": workers, "workers_used": w, "wall_s": wall, "cards_per_s": n_cards / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2, help="rounds of every variant (alternating order)")
    ap.add_argument("--counts", default=None, help="cards per class (default: the 455 default cards)")
    ap.add_argument("--out", default=str(OUT / "scale"))
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument(
        "--analyse-only",
        action="store_true",
        help="analyse the runs saved in bench/results/scale.json (and --out) again, without measuring",
    )
    args = ap.parse_args()
    if args.analyse_only:
        report(load("scale"), Path(args.out), args.no_docs)
        return

    import ray

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = dataset(seed=0, counts=args.counts)
    n_cards = len((data / "labels.csv").read_text().splitlines()) - 1

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray_start = time.perf_counter() - t0
    address = ray.get_runtime_context().gcs_address
    variants = {
        "local": [],
        "ray-1": ["--executor", "ray", "--ray-address", address, "--ray-workers", "1"],
        "ray-2": ["--executor", "ray", "--ray-address", address, "--ray-workers", "2"],
    }
    results: dict = {
        "cards": n_cards,
        "ray_instance_start_s": ray_start,
        "stages": {},
        "command": sys.argv,
        "machine": machine(),
    }
    try:
        ocr_done = None
        for stage in ("ocr", "reason"):
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            same = True
            reference = None
            for rnd in range(args.repeats):
                order = list(variants) if rnd % 2 == 0 else list(reversed(variants))
                for name in order:
                    cache = out / f"{stage}-{name}-{rnd}"
                    if stage == "reason":  # the cards' OCR records are there; the answers are not
                        shutil.copytree(ocr_done, cache)
                    records = out / f"{stage}-{name}-{rnd}.jsonl"
                    r = run([stage, str(data), *variants[name]], cache, records)
                    r["round"] = rnd
                    runs[name].append(r)
                    print(f"{stage} {name} round {rnd}: {r['wall_s']:.1f} s (load {r['load_before']:.2f})", flush=True)
                    recs = canonical(records)
                    reference = reference or recs
                    same = same and recs == reference
                    if stage == "ocr" and ocr_done is None:
                        ocr_done = cache
            # The driver's serial part, in this process: the stage with every job already done by the workers
            # (reason: the card records made again from the cached answers), minus the same on one card.
            probe = out / f"{stage}-driver-only"
            shutil.copytree(out / f"{stage}-ray-2-0", probe)
            d, driver_walls = driver_cost(stage, data, probe)
            results["stages"][stage] = {
                "runs": runs,
                "records_identical": same,
                "driver_s_per_card": d,
                "driver_walls_s": driver_walls,
                "engine_load_s": engine_load_seconds(stage),
            }
    finally:
        ray.shutdown()
    report(results, out, args.no_docs)


def report(results: dict, out: Path, no_docs: bool) -> None:
    analyse(results, out)
    save("scale", results)
    text = markdown(results)
    if not no_docs:  # the docs name the command and machine state of the measurement, also when re-analysed
        argv, measured_on = sys.argv, _common.machine
        sys.argv, _common.machine = results["command"], lambda: results["machine"]
        try:
            update_section("scale", text)
        finally:
            sys.argv, _common.machine = argv, measured_on
    print(text)


def markdown(res: dict) -> str:
    n = res["cards"]
    repeats = max(len(rs) for s in res["stages"].values() for rs in s["runs"].values())
    lines = [
        f"### Scaling out: the local executor and Ray (1 and 2 workers) on {n} cards, 2 cores",
        "",
        f"Each variant ran {repeats} times, in rounds of alternating order, as `asectl ocr|reason DATA "
        "[--executor ray --ray-address ADDR --ray-workers W]` in a fresh cache (reason: with the cards' OCR "
        "records cached); local is the default local executor (two worker processes). The Ray runs join a "
        f"Ray instance with 2 CPUs started once by the script ({res['ray_instance_start_s']:.1f} s, not "
        "counted), as a user joins a running cluster. The machine was shared with other jobs throughout "
        "(load average before each run in brackets), the same for every variant.",
        "",
        "| stage | executor | wall s per run (load before) | mean wall s | cards/s | jobs | s per job in a worker |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage, s in res["stages"].items():
        for name, rs in s["runs"].items():
            walls = ", ".join(f"{r['wall_s']:.1f} ({r['load_before']:.1f})" for r in rs)
            per_job = ", ".join(f"{r['worker_s_per_job']:.3f}" for r in rs)
            lines.append(
                f"| {stage} | {name} | {walls} | {s['mean_wall_s'][name]:.1f} | "
                f"{n / s['mean_wall_s'][name]:.2f} | {rs[0]['jobs']} | {per_job} |"
            )
    lines += [
        "",
        "| stage | records identical to local | Ray 2 workers / local wall (goal <= 1.3) "
        "| Ray 1 worker / local | A start-up s (range) | slope k | d driver per card "
        "| c per job, one worker s | one engine load alone s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stage, s in res["stages"].items():
        m = s["model"]
        lines.append(
            f"| {stage} | {'yes' if s['records_identical'] else 'NO'} | {s['overhead_ray2_vs_local']:.2f} "
            f"| {s['overhead_ray1_vs_local']:.2f} | {m['A_s']:.1f} ({m['A_spread_s'][0]:.1f} to "
            f"{m['A_spread_s'][1]:.1f}) | {m['slope_k']:.2f} | {m['d_s'] * 1000:.2f} ms | {m['c_s']:.3f} "
            f"| {s['engine_load_s']:.1f} |"
        )
    lines += [
        "",
        "Model: wall = A + cards x d + jobs x c / W. d is measured (the stage with nothing left for the "
        "workers, all cards minus one card, in one process), c is the mean time per job inside the worker "
        "of the 1-worker runs, and A, the start-up (joining the cluster, starting the workers, each "
        "loading its engine, the last batch's tail), is fitted to the Ray runs given each run's own "
        "measured time per job; k is the least-squares slope of wall - cards x d against that busy time "
        "(1 when the workers' own time explains the wall).",
        "",
        "**Prediction, not measured**: the model for more workers, one core each, with the per-job time "
        "measured here under the load above, and storage and network that keep up; W is capped at the "
        "number of batches. For 10^6 cards the jobs grow in proportion to the cards (reason: "
        f"{res['stages']['reason']['model']['jobs']} distinct prompts per {n} cards; a larger archive "
        "repeats prompts more often, so its reason figures are an upper bound):",
        "",
        f"| stage | workers | wall s, {n} cards | cards/s, {n} cards | wall h, 10^6 cards | cards/s, 10^6 cards |",
        "|---|---|---|---|---|---|",
    ]
    for stage, s in res["stages"].items():
        for small, big in zip(s["prediction_measured_cards"], s["prediction_archive"]):
            used = f" (uses {small['workers_used']})" if small["workers_used"] < small["workers"] else ""
            lines.append(
                f"| {stage} | {small['workers']}{used} | {small['wall_s']:.0f} | {small['cards_per_s']:.1f} "
                f"| {big['wall_s'] / 3600:.2f} | {big['cards_per_s']:.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
