"""Speed of prediction as a station sees it: a cold single-card `asectl predict` (a new process, a card
never seen), and a warm `asectl predict --watch` (throughput on a burst of cards, and the latency from a
card appearing in the folder to its JSON line).

    python bench/predict_speed.py [--cache-dir bench/out/cache] [--burst 40] [--trickle 20] [--model DIR]

The model is --model, else the seed-0 model of bench/calibration.py (trained here if it is not in the
cache: quick profile, default settings). Every card is new to the cache (generated with other seeds), so OCR, the
describer, the encoders and the fusion run for each; the LLM answer of a card whose prompt reads like an
earlier card's is shared (docs/reason.md), as it would be on a station whose cache holds the training
cards. Cards are put in the watched folder as a writer should: written under a hidden name, then renamed.
Results: bench/results/predict_speed.json and docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from _common import OUT, ROOT, SETTINGS, dataset, save, update_section


def trained_bundle(
    cache_dir: Path,
    out: Path,
    model: Path | None = None,
    engine: str = "cnocr",
    counts: str | None = None,
    overrides: dict | None = None,
) -> Path:
    """``model``, else the model last trained on the seed-0 dataset in this cache (bench/calibration.py's),
    else one trained here; exported to ``out``/bundle. With another OCR ``engine``: the seed-0 model
    trained (or found in the cache) with that engine, the other settings the benchmark's. ``counts``: a
    smaller seed-0 dataset (cards per class) to train on, for a quicker run. ``overrides``: settings the
    model is trained with (profile keys, e.g. ``encoders.branches``), always trained (or found) with them."""
    from asectl.bundle import export_bundle, load_bundle
    from asectl.cache import Cache
    from asectl.domain.dataset import load_dataset
    from asectl.stages.common import dataset_id

    cache = Cache(cache_dir)
    ds = load_dataset(dataset(0, counts))
    ptr = cache.get_pointer(f"model-{dataset_id(ds)}")
    entry = cache.get("model", ptr["key"]) if ptr else None
    if model is not None:
        bundle = load_bundle(model)
    elif entry is not None and engine == "cnocr" and not overrides:
        bundle = load_bundle(entry.path)
    else:
        from asectl.stages.align import run_align
        from asectl.stages.fuse import run_fuse_train

        run_align(ds, cache, profile="quick", seed=0, settings={**SETTINGS, "ocr": {"engine": engine}})
        bundle = run_fuse_train(ds, cache, profile="quick", seed=0, overrides=overrides or None).bundle
    if bundle.config["replay"]["ocr"].get("engine") != engine:
        raise SystemExit(f"the model's OCR engine is {bundle.config['replay']['ocr'].get('engine')}, not {engine}")
    target = out / "bundle"
    shutil.rmtree(target, ignore_errors=True)
    return export_bundle(bundle, target)


def new_cards(out: Path, seed: int, n: int) -> list[Path]:
    from asectl.domain.synth import generate

    folder = out / f"cards-seed{seed}"
    if not (folder / "labels.csv").exists():
        per = max(1, n // 5 + 1)
        generate(folder, seed=seed, counts=",".join([str(per)] * 5), force=True)
    return sorted((folder / "images").glob("*.png"))[:n]


def drop(card: Path, inbox: Path, name: str) -> float:
    """Put a card in the folder the way a writer should (hidden name, then rename); the time it appears."""
    tmp = inbox / f".{name}.tmp"
    shutil.copyfile(card, tmp)
    t = time.perf_counter()
    os.rename(tmp, inbox / name)
    return t


def lines(out: Path) -> set[str]:
    """Cards with a complete line in ``out`` (one being written is not yet one)."""
    text = out.read_text() if out.exists() else ""
    return {json.loads(x)["image"] for x in text[: text.rfind("\n") + 1].splitlines()}


def code_folder(env: dict) -> Path:
    """Where ``python -m asectl`` runs: it searches that folder for modules first, ahead of PYTHONPATH, so another
    checkout's code (a baseline, PYTHONPATH) runs from that checkout, this one's from the repository root."""
    return Path(env["PYTHONPATH"]) if env.get("PYTHONPATH") else ROOT


def cold_predict(exe: list[str], cards: list[Path], bundle: Path, env: dict) -> tuple[list[float], list[float]]:
    """Wall seconds and CPU seconds (user + system of the process and its children) of each cold run."""
    import resource

    times, cpu = [], []
    for card in cards:
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(
            [*exe, "predict", str(Path(card).resolve()), "--model", str(Path(bundle).resolve()), "--json"],
            env=env,
            cwd=code_folder(env),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    return times, cpu


def export_model(bundle: Path, out: Path, env: dict, exe: list[str]) -> Path:
    """The bundle as an export folder (``asectl export``), written once per run."""
    target = out / "export"
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(
        [*exe, "export", "--model", str(bundle), "--out", str(target)], env=env, check=True, stdout=subprocess.DEVNULL
    )
    return target


def stages_run(model: Path) -> tuple[str, ...]:
    """The per-card stages whose new cache entries show that a card was new: ocr, and reason unless the
    model skips it (a model without the llm branch)."""
    bundle_json = model / "bundle.json"
    if bundle_json.exists():
        config = json.loads(bundle_json.read_text())
    else:
        config = json.loads((model / "export.json").read_text())["model"]
    skipped = config["replay"].get("skipped_stages") or []
    return tuple(stage for stage in ("ocr", "reason") if stage not in skipped)


def measure(
    exe: list[str],
    model: Path,
    env: dict,
    cache_dir: Path,
    out: Path,
    card_seed: int,
    args: argparse.Namespace,
    workers: int,
) -> dict:
    """Cold single cards, then a warm watcher (start-up, a burst, a trickle) with ``model`` on cards of
    ``card_seed`` .. ``card_seed`` + 2, new to the cache."""
    from asectl.cache import Cache

    shutil.rmtree(out / "inbox", ignore_errors=True)
    (out / "inbox").mkdir(parents=True)

    stages = stages_run(model)

    def entries() -> tuple[int, ...]:
        return tuple(len(list(Cache(cache_dir).iter_entries(stage))) for stage in stages)

    before = entries()
    cold, cold_cpu = cold_predict(exe, new_cards(out, card_seed, args.cold), model, env) if args.cold else ([], [])
    # New to every stage, the LLM's included: a card read before by another engine keeps its LLM answer.
    if args.cold and any(after - was < args.cold for after, was in zip(entries(), before)):
        raise SystemExit(
            f"the cards of --card-seed {args.card_seed} were already (partly) in {cache_dir}; pass another"
        )

    inbox, results = out / "inbox", out / "decisions.jsonl"
    results.unlink(missing_ok=True)
    log = open(out / "watch.log", "w")
    t_start = time.perf_counter()
    proc = psutil.Popen(
        [
            sys.executable,
            "-m",
            "asectl",
            "predict",
            "--watch",
            str(inbox),
            "--out",
            str(results),
            "--model",
            str(model.resolve()),
            "--workers",
            str(workers),
        ],
        env=env,
        cwd=code_folder(env),
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    peak = 0.0
    try:
        while "watching" not in (out / "watch.log").read_text():
            if proc.poll() is not None:
                raise SystemExit(f"the watcher exited: {(out / 'watch.log').read_text()[-2000:]}")
            time.sleep(0.05)
        startup = time.perf_counter() - t_start

        # Throughput: a burst of cards at once. CPU seconds per card (the watcher's user + system time)
        # say what the cards cost apart from what other programs on the machine take from it.
        burst = new_cards(out, card_seed + 1, args.burst)
        cpu0 = sum(proc.cpu_times()[:2])
        t0 = min(drop(c, inbox, f"burst-{i:03d}.png") for i, c in enumerate(burst))
        while len(lines(results)) < len(burst):
            peak = max(peak, proc.memory_info().rss / 2**20)
            time.sleep(0.02)
        burst_seconds = time.perf_counter() - t0
        burst_cpu = (sum(proc.cpu_times()[:2]) - cpu0) / len(burst)

        # Latency: one card at a time, slower than the watcher's pace, so no card waits for another.
        latencies = []
        for i, c in enumerate(new_cards(out, card_seed + 2, args.trickle)):
            name = f"trickle-{i:03d}.png"
            t_drop = drop(c, inbox, name)
            while name not in lines(results):
                time.sleep(0.005)
            latencies.append(time.perf_counter() - t_drop)
            peak = max(peak, proc.memory_info().rss / 2**20)
            time.sleep(max(0.0, args.gap - latencies[-1]))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        log.close()

    lat_sorted = sorted(latencies)
    p95 = lat_sorted[min(len(lat_sorted) - 1, int(round(0.95 * (len(lat_sorted) - 1))))] if latencies else None
    return {
        "card_seed": card_seed,
        "cold_seconds": cold,
        "cold_cpu_seconds": cold_cpu,
        "watch_startup_seconds": startup,
        "burst_cards": len(burst),
        "burst_seconds": burst_seconds,
        "cards_per_second": len(burst) / burst_seconds,
        "burst_cpu_seconds_per_card": burst_cpu,
        "load_average_end": os.getloadavg()[0],
        "latencies": latencies,
        "latency_median": statistics.median(latencies) if latencies else None,
        "latency_p95": p95,
        "watch_peak_rss_mib": peak,
        "poll_seconds": 0.25,
        "workers": workers,
    }


def table(runs: dict[str, dict], args: argparse.Namespace) -> str:
    """One row per measure, one column per model path (bundle, export)."""

    def cell(fmt, key):
        return [fmt(r) if r.get(key) not in (None, []) else "-" for r in runs.values()]

    def cold(r):
        return f"**{statistics.median(r['cold_seconds']):.1f} s** ({', '.join(f'{t:.1f}' for t in r['cold_seconds'])})"

    export_cold = runs.get("export", {}).get("cold_seconds")
    cold_goal = (
        "at most 3 s"
        if not export_cold
        else f"at most 3 s from an export: {'met' if statistics.median(export_cold) <= 3 else 'not met'}"
    )
    throughput_goal = "at least 3"
    reference = next((r for name, r in runs.items() if name.startswith("reference")), None)
    if reference is not None:
        ratios = [r["cards_per_second"] / reference["cards_per_second"] for n, r in runs.items() if "export" in n]
        if ratios:
            throughput_goal += f", and 2 x the reference: {min(ratios):.1f}-{max(ratios):.1f} x"
    rows = [
        (
            f"cold `asectl predict CARD` (new process, new card), median of {args.cold}",
            cell(cold, "cold_seconds"),
            cold_goal,
        ),
        (
            "cold CPU time (user + system of that process)",
            cell(lambda r: f"{statistics.median(r['cold_cpu_seconds']):.1f} s", "cold_cpu_seconds"),
            "",
        ),
        (
            "`--watch` start-up (models loaded, one warm-up card)",
            cell(lambda r: f"{r['watch_startup_seconds']:.1f} s", "watch_startup_seconds"),
            "",
        ),
        (
            f"`--watch` throughput, {args.burst} cards dropped at once",
            cell(lambda r: f"**{r['cards_per_second']:.2f} cards/s** ({r['burst_seconds']:.1f} s)", "cards_per_second"),
            throughput_goal,
        ),
        (
            "`--watch` CPU time per card in that burst (user + system of the watcher)",
            cell(lambda r: f"{r['burst_cpu_seconds_per_card']:.2f} s", "burst_cpu_seconds_per_card"),
            "",
        ),
        (
            f"`--watch` latency, card appears -> its JSON line, {args.trickle} cards {args.gap:g} s apart",
            cell(
                lambda r: f"median **{r['latency_median']:.2f} s**, p95 **{r['latency_p95']:.2f} s**", "latency_median"
            ),
            "",
        ),
        ("`--watch` peak memory", cell(lambda r: f"{r['watch_peak_rss_mib']:.0f} MiB", "watch_peak_rss_mib"), ""),
    ]
    head = "| measure | " + " | ".join(runs) + " | goal |\n|---|" + "---|" * len(runs) + "---|\n"
    return head + "".join(f"| {name} | " + " | ".join(cells) + f" | {goal} |\n" for name, cells, goal in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", default=str(OUT / "cache"))
    ap.add_argument("--burst", type=int, default=40, help="cards dropped at once (throughput)")
    ap.add_argument("--trickle", type=int, default=20, help="cards dropped one at a time (latency)")
    ap.add_argument("--gap", type=float, default=1.5, help="seconds between trickled cards")
    ap.add_argument("--model", type=Path, default=None, help="a model bundle folder (default: see above)")
    ap.add_argument(
        "--engine",
        choices=["cnocr", "rapidocr"],
        default="cnocr",
        help="OCR engine of the model (default cnocr; rapidocr: a seed-0 model trained with it, "
        "results in their own section)",
    )
    ap.add_argument(
        "--counts",
        default=None,
        help="train on a smaller seed-0 dataset, cards per class normal,type1..type4 (default: the 455-card one)",
    )
    ap.add_argument(
        "--no-export",
        action="store_true",
        help="measure the bundle only (default: the bundle and its export, `asectl export`, in one run)",
    )
    ap.add_argument(
        "--no-bundle", action="store_true", help="measure the export only (with --baseline: the code change alone)"
    )
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another checkout of asectl: the export is measured with its code too (PYTHONPATH), the two "
        "alternating --rounds times, so a change of the code is measured within one run",
    )
    ap.add_argument("--rounds", type=int, default=1, help="with --baseline: export runs per code, alternating")
    ap.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="another model (e.g. today's station: the default bundle) watched first in the same run, with "
        "--reference-workers, so that a ratio to it is measured under the same load",
    )
    ap.add_argument("--reference-workers", type=int, default=0, help="the reference watcher's --workers")
    ap.add_argument("--cold", type=int, default=3, help="cold single-card runs (0: skip)")
    ap.add_argument("--workers", type=int, default=0, help="the watcher's --workers (default 0: one process)")
    ap.add_argument("--tag", default="", help="results and docs section of their own (default: from the options)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="train the model with this setting (e.g. encoders.branches=image,vlm,stats); results in a "
        "section of their own",
    )
    ap.add_argument(
        "--card-seed",
        type=int,
        default=500,
        help="generator seed of the new cards: the k-th column measured (from 0, in the order they run) "
        "gets seed+10k .. seed+10k+2; a rerun on the same cache needs another one, so that the cards are "
        "new to it",
    )
    args = ap.parse_args()
    if args.no_bundle and args.no_export:
        raise SystemExit("--no-bundle measures the export: leave out --no-export")
    if args.rounds > 1 and args.baseline is None:
        raise SystemExit("--rounds alternates the export's two codes: give --baseline")
    overrides = dict(item.split("=", 1) for item in args.set)
    suffix = (
        ("" if args.engine == "cnocr" else f"-{args.engine}")
        + ("" if args.no_export else "-export")
        + ("-" + "-".join(v.replace(",", "-") for v in overrides.values()) if overrides else "")
        + (f"-workers{args.workers}" if args.workers else "")
    )
    if args.tag:
        suffix = f"-{args.tag}"
    out = OUT / f"predict-speed{suffix}"
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir)
    bundle = trained_bundle(cache_dir, out, args.model, args.engine, args.counts, overrides)
    env = {**os.environ, "ASECTL_CACHE_DIR": str(cache_dir)}
    exe = [sys.executable, "-m", "asectl", "-q"]
    # (column, model, environment, the watcher's --workers) in the order they run; with --baseline the two
    # codes alternate.
    plan = []
    if args.reference is not None:
        name = f"reference: `{args.reference}`, --workers {args.reference_workers}"
        plan.append((name, args.reference, env, args.reference_workers))
    if not args.no_bundle:
        plan.append(("bundle", bundle, env, args.workers))
    if not args.no_export:
        export = export_model(bundle, out, env, exe)
        base_env = {**env, "PYTHONPATH": str(args.baseline.resolve())} if args.baseline else None
        for r in range(args.rounds):
            tag = f" #{r + 1}" if args.rounds > 1 else ""
            if base_env is not None:
                plan.append((f"export, baseline code{tag}", export, base_env, args.workers))
            plan.append((f"export{tag}", export, env, args.workers))
    runs = {
        name: measure(exe, model, run_env, cache_dir, out / "runs" / str(k), args.card_seed + 10 * k, args, workers)
        for k, (name, model, run_env, workers) in enumerate(plan)
    }
    data = {
        **runs.get("bundle", {}),
        "engine": args.engine,
        "model": str(args.model or "seed-0 bundle"),
        **({"baseline": str(args.baseline)} if args.baseline else {}),
        **({"reference": str(args.reference)} if args.reference else {}),
        **{name: run for name, run in runs.items() if name != "bundle"},
    }
    save("predict_speed" + suffix.replace("-", "_"), data)
    model_line = (
        f"the bundle `{args.model}`"
        if args.model
        else f"a seed-0 quick-profile bundle trained here on the {args.counts} cards per class of a smaller "
        "seed-0 field dataset, the benchmark's settings otherwise (the pipeline per card is the same "
        "as for the 455-card model)"
        + (f", trained with {', '.join(f'`{k}={v}`' for k, v in overrides.items())}" if overrides else "")
        if args.counts
        else "seed-0 quick-profile bundle of `bench/calibration.py`"
        if args.engine == "cnocr"
        else f"seed-0 quick-profile bundle trained with `--engine {args.engine}` OCR (otherwise the "
        "benchmark's settings)"
    )
    paths = (
        ""
        if args.no_export
        else f" Columns: {'' if args.no_bundle else 'the bundle, and '}the same model exported with `asectl export` "
        "(ONNX graphs, rapidocr for cnocr, no torch)"
        + (
            f", with this checkout's code and with the code of `{args.baseline}` (baseline), alternating"
            if args.baseline
            else ""
        )
        + (f"; first, the reference `{args.reference}`" if args.reference else "")
        + ", measured one after the other in this run, each on cards of its own."
    )
    md = f"""### Prediction speed: cold single card and a warm `--watch` station{
        f" (OCR engine {args.engine})" if args.engine != "cnocr" else ""
    }{"" if args.no_export else ", export" if args.no_bundle else ", bundle and export"}

Model: {model_line}. Every card is new to the cache.{paths} The watcher runs with `--workers {args.workers}`{
        " (the reference with its own, as its column says)" if args.reference else ""
    }. 2 cores, shared with whatever else runs (load
average at start above, {os.getloadavg()[0]:.2f} at the end).

{table(runs, args)}"""
    update_section("predict-speed" + suffix, md)
    print(md)


if __name__ == "__main__":
    main()
