"""Does a model trained from a cache that other runs filled first equal the one a cold cache gives?

    python bench/reproducibility.py [--seed 0] [--subset 150] [--baseline CHECKOUT] [--scenarios A,B] [--name N]
        [--render]

One generated `field` dataset (seed --seed, the default 455 cards). Its OCR, descriptions and LLM answers
are computed once into a shared cache (they are text, and the same whatever the order). Then, each in a
fresh copy of that cache, the learned stages run as the quickstart runs them (`asectl align DATA`,
`asectl fuse-train DATA`, `asectl report DATA --json`):

* cold: nothing else first;
* cold again: the same, in a new process and a new copy of the cache;
* smaller folder first: `asectl align` on a folder of --subset cards of the same dataset (every third
  card, the same image files) before the whole folder, as a user who tried the tool on a few cards first;
  their features are then cached from other encoder calls than in the cold run;
* one thread everywhere: cold, with OMP/MKL/OpenBLAS limited to one thread (a machine with fewer cores);
* AVX2 kernels only: cold, with torch, oneDNN, MKL and OpenBLAS told to use no instruction set above AVX2,
  as on a machine without AVX-512 (on such a machine the same as cold). The LLM (llama.cpp, compiled for
  the machine it was installed on) is not covered: its answers are in the shared cache;
* AVX2 and MKL reproducible: the same, and MKL's conditional numerical reproducibility on its AVX2 branch
  (``MKL_CBWR=AVX2``), MKL's own switch for the same results on different CPUs.

Each scenario's model (the checksums of all its files), test macro-F1, per-card test predictions and
decisions are compared with the cold run's (--scenarios: the cold run and these alone; --name: the
results file and docs section, so another machine's run keeps its own). With --baseline CHECKOUT, the
same scenarios run with that checkout's code too (PYTHONPATH), on copies of the same shared cache.
Results: bench/results/reproducibility.json and the ``reproducibility`` section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import OUT, ROOT, dataset, load, measured_line, save, update_section
from asectl.environment import INSTRUCTION_SET_SWITCHES, cpu_name
from predict_speed import code_folder

SCENARIOS = (
    "cold",
    "cold again",
    "smaller folder first",
    "one thread everywhere",
    "AVX2 kernels only",
    "AVX2 and MKL reproducible",
)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
DECISIONS = ("pass", "defect", "defective", "review")
# Each library's own switch for the instruction set its CPU kernels may use (the ones a model records,
# asectl.environment): AVX2, below AVX-512 on a machine that has it, in each switch's own words.
AVX2_WORDS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}
AVX2_ONLY = {switch: AVX2_WORDS[switch] for switch in INSTRUCTION_SET_SWITCHES}
# ... and MKL's conditional numerical reproducibility on its AVX2 branch, which MKL documents as the same
# results on every CPU with AVX2 (its own dispatch otherwise depends on the CPU's maker and model).
MKL_REPRODUCIBLE = {**AVX2_ONLY, "MKL_CBWR": "AVX2"}
SCENARIO_ENV = {  # the variables a scenario sets over the code's environment
    "one thread everywhere": ONE_THREAD,
    "AVX2 kernels only": AVX2_ONLY,
    "AVX2 and MKL reproducible": MKL_REPRODUCIBLE,
}


def asectl(env: dict, *args: str) -> str:
    cmd = [sys.executable, "-m", "asectl", "-q", *args]
    done = subprocess.run(cmd, env=env, cwd=code_folder(env), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def commit_of(checkout: Path) -> str:
    """The checkout's commit, with ``-dirty`` when its tracked files differ from it."""
    git = ["git", "-C", str(checkout)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD"]).returncode != 0
    return head + ("-dirty" if dirty else "")


def subset_folder(data: Path, n: int, out: Path) -> Path:
    """Every third row of ``data``'s labels.csv (at most ``n``) with their image files, as a folder of its
    own: its cards are encoded in other company than in the whole folder's run."""
    rows = list(csv.DictReader((data / "labels.csv").open()))[1::3][:n]
    (out / "images").mkdir(parents=True, exist_ok=True)
    for r in rows:
        shutil.copy2(data / r["image"], out / r["image"])
    with (out / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def run_scenario(name: str, code_env: dict, shared: Path, data: Path, subset: int, work: Path) -> dict:
    cache = work / "cache"
    shutil.copytree(shared, cache, copy_function=os.link)  # entries are never rewritten in place
    env = {**code_env, "ASECTL_CACHE_DIR": str(cache), **SCENARIO_ENV.get(name, {})}
    start = time.perf_counter()
    if name == "smaller folder first":
        asectl(env, "align", str(subset_folder(data, subset, work / "subset")), "--stride", "0.2")
    asectl(env, "align", str(data), "--stride", "0.2")
    asectl(env, "fuse-train", str(data))
    metrics = json.loads(asectl(env, "report", str(data), "--out", str(work / "report"), "--json"))
    latest = json.loads(asectl(env, "models", "list", "--json"))[0]
    files = json.loads((Path(latest["path"]) / "bundle.json").read_text())["files"]
    return {
        # the model's content: the checksum of every file of it (the cache id names its inputs, not its bits)
        "model": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
        "macro_f1": metrics["multiclass"]["macro_f1"],
        "per_card": [[p["image"], p["pred"]] for p in metrics["predictions"]],
        "decisions": [p.get("decision") for p in metrics["predictions"]],
        "probs": [p.get("probs") for p in metrics["predictions"]],
        "seconds": round(time.perf_counter() - start, 1),
    }


def decision_counts(decisions: list) -> dict[str, int]:
    return {d: decisions.count(d) for d in DECISIONS}


def differences(run: dict, base: dict) -> dict:
    """How a run's test cards differ from ``base``'s (both with ``per_card``, ``decisions``, ``probs``)."""
    return {
        "cards_predicted_differently": sum(a != b for a, b in zip(run["per_card"], base["per_card"])),
        "cards_decided_differently": sum(a != b for a, b in zip(run["decisions"], base["decisions"])),
        "largest_probability_gap": max_gap(run["probs"], base["probs"]),
    }


def max_gap(probs: list, cold: list) -> float:
    """The largest difference of one class probability of one test card between two runs."""
    return max((abs(a - b) for pa, pb in zip(probs, cold) for a, b in zip(pa or [], pb or [])), default=0.0)


def summarise(rec: dict) -> dict:
    """Each run against its code's cold run (same model bits, test cards predicted differently, largest
    probability gap); the per-card output moves to ``raw`` (not committed). Returns raw."""
    raw = {}
    for code, runs in rec["codes"].items():
        cold = runs["cold"]
        raw[code] = {name: {k: r[k] for k in ("per_card", "probs", "decisions")} for name, r in runs.items()}
        for r in runs.values():
            r["decision_counts"] = decision_counts(r["decisions"])
            r["vs_cold"] = {"same_model": r["model"] == cold["model"], **differences(r, cold)}
        for r in runs.values():
            del r["per_card"], r["probs"], r["decisions"]
    return raw


def render(rec: dict) -> str:
    lines = [
        "### Reproducibility: a model from a cache other runs filled first, against a cold one"
        + (f" ({rec['cpu']})" if rec.get("cpu") else ""),
        "",
        f"Dataset: `field`, seed {rec['seed']}, {rec['cards']} cards; smaller folder: {rec['subset']} of them "
        "(every third card). Each scenario in a fresh copy of one cache holding the OCR, descriptions and LLM answers. "
        f"Code: this checkout at {rec.get('commit', '?')}"
        + (f", the baseline at {rec['baseline_commit']}" if rec.get("baseline_commit") else "")
        + ".",
        "",
        "| code | scenario | model | test macro-F1 | decisions (pass/defect/defective/review) | same model as "
        "cold | test cards predicted differently | decided differently | largest probability difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for code, runs in rec["codes"].items():
        for name in SCENARIOS:
            if name not in runs:  # a run from before the scenario existed
                continue
            r = runs[name]
            v = r["vs_cold"]
            counts = r.get("decision_counts")
            decided = "/".join(str(counts.get(d, 0)) for d in DECISIONS) if counts else "-"
            cells = (
                ["-", "-", "-", "-"]
                if name == "cold"
                else [
                    "yes" if v["same_model"] else "**no**",
                    str(v["cards_predicted_differently"]),
                    str(v.get("cards_decided_differently", "-")),
                    f"{v['largest_probability_gap']:.2g}",
                ]
            )
            f1 = f"{100 * r['macro_f1']:.2f}"
            lines.append(f"| {code} | {name} | `{r['model'][:12]}` | {f1} | {decided} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subset", type=int, default=150)
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout whose code also runs")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated; cold always runs")
    ap.add_argument("--name", default="reproducibility", help="results file and docs section")
    ap.add_argument("--render", action="store_true", help="write the docs section again from the saved results")
    args = ap.parse_args()
    section = args.name.replace("_", "-")
    if args.render:
        rec = load(args.name)
        update_section(section, render(rec), header=rec["measured"])
        return
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"--scenarios: unknown {sorted(unknown)}; choose among {', '.join(SCENARIOS)}")
    scenarios = [s for s in SCENARIOS if s == "cold" or s in args.scenarios.split(",")]
    started = time.perf_counter()
    data = dataset(args.seed)
    shared = OUT / f"repro-cache-seed{args.seed}"
    base_env = {k: v for k, v in os.environ.items() if k not in ONE_THREAD}
    env = {**base_env, "ASECTL_CACHE_DIR": str(shared)}
    for stage in ("ocr", "describe", "reason"):
        asectl(env, stage, str(data))
    codes = {"this": base_env}
    if args.baseline is not None:
        codes = {"baseline": {**base_env, "PYTHONPATH": str(args.baseline.resolve())}, **codes}
    rec = {"seed": args.seed, "subset": args.subset, "cards": sum(1 for _ in (data / "images").glob("*.png"))}
    rec["codes"] = {}
    rec["commit"] = commit_of(ROOT)
    rec["cpu"] = cpu_name()
    if args.baseline is not None:
        rec["baseline"] = str(args.baseline)
        rec["baseline_commit"] = commit_of(args.baseline)
    for code, code_env in codes.items():
        rec["codes"][code] = {}
        for name in scenarios:
            with tempfile.TemporaryDirectory(dir=OUT) as work:
                rec["codes"][code][name] = run_scenario(name, code_env, shared, data, args.subset, Path(work))
            r = rec["codes"][code][name]
            print(f"{code:8s} {name:24s} {r['model'][:12]} {100 * r['macro_f1']:.2f} ({r['seconds']} s)", flush=True)
    raw = summarise(rec)
    rec["seconds"] = round(time.perf_counter() - started, 1)
    rec["measured"] = measured_line()
    save(args.name, rec, raw=raw)
    if not args.no_docs:
        update_section(section, render(rec))


if __name__ == "__main__":
    main()
