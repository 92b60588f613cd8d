"""The learning commands: align (PFA), fuse-train (CMAF), predict, report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from asectl import ui
from asectl.commands._shared import executor_options, print_errors
from asectl.errors import ConfigError
from asectl.models.calibration import (DEFAULT_CALIBRATION_FOLDS, DEFAULT_MAX_DEFECT_ERROR, DEFAULT_MAX_MISS_RATE,
                                       threshold_text)


def _overrides(config_file: Path | None, sets: tuple[str, ...], **named: Any) -> dict[str, Any]:
    """TOML config file, then --set key=value pairs, then named options (highest precedence)."""
    out: dict[str, Any] = {}
    if config_file is not None:
        import tomllib

        try:
            out.update(tomllib.loads(config_file.read_text()))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{config_file}: not a readable TOML config ({exc})") from None
        out.pop("profile", None)
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: use KEY=VALUE, e.g. --set pfa.lr=0.001")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except ValueError:
            out[k.strip()] = v
    out.update({k: v for k, v in named.items() if v is not None})
    return out


def _profile_name(profile: str | None, config_file: Path | None) -> str | None:
    if profile or config_file is None:
        return profile
    import tomllib

    try:
        return tomllib.loads(config_file.read_text()).get("profile")
    except Exception:  # reported properly by _overrides
        return None


BRANCHES_HELP = ("Branches to align and fuse, comma-separated, two or more of image, vlm, llm, stats "
                 "(default: the profile's encoders.branches).")

_common = [
    click.option("--profile", type=click.Choice(["quick", "paper"]), default=None,
                 help="quick (CPU: frozen, cached features; default) or paper (GPU: fine-tuned encoders)."),
    click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="TOML file of hyperparameters ([pfa], [fusion], [encoders] tables)."),
    click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one hyperparameter."),
    click.option("--seed", type=int, default=None, help="Training seed (default 0)."),
    click.option("--augmented", type=click.Path(exists=True, file_okay=False, path_type=Path),
                 help="Train on this TDA-augmented copy's training split (same test split)."),
    click.option("--force", is_flag=True, help="Retrain even when cached."),
    click.option("--json", "as_json", is_flag=True, help="Print a JSON summary."),
]


def _with_common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


@click.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--stride", default=None, help="PFA stride: 0.2 (0.2/0.4/.../1) or a list like 0.2/0.6/1.")
@click.option("--mode", type=click.Choice(["progressive", "direct", "none"]), default=None)
@click.option("--branches", default=None, metavar="LIST", help=BRANCHES_HELP)
@_with_common
@click.pass_obj
def align(cache, dataset, stride, mode, branches, profile, config_file, sets, seed, augmented, force, as_json):
    """Progressive feature alignment (PFA) of image, VLM-text and LLM-text features (and the OCR'd numbers)."""
    from asectl.dataset import load_dataset
    from asectl.stages.align import run_align, stage_labels

    over = _overrides(config_file, sets, **{"pfa.stride": stride, "pfa.mode": mode, "encoders.branches": branches})
    ds = load_dataset(dataset, seed=seed or 0)
    out = run_align(ds, cache, profile=_profile_name(profile, config_file) or "quick", overrides=over,
                    seed=seed or 0, augmented=augmented, force=force)
    pfa = out.summary["pfa"]
    if as_json:
        click.echo(json.dumps({"key": out.key, "from_cache": out.from_cache, "pfa": {
            k: v for k, v in pfa.items() if k != "stages"}, "stages": [
            {k: v for k, v in s.items() if k != "curve"} for s in pfa["stages"]]}, default=str))
        return
    from rich.table import Table

    table = Table(title=f"align {out.key[:12]} ({'from cache' if out.from_cache else 'trained'})")
    for col in ("stage", "train pairs", "D_pend", "final ITC loss", "D_pend loss", "tau"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for name, s in zip(stage_labels(out), pfa["stages"]):
        table.add_row(name, str(s["n_train"]), str(s["n_pend"]), _f(s["final_loss"]), _f(s["val_loss"]),
                      f"{s['tau']:.4f}")
    ui.console.print(table)
    if out.summary["dropped"]:
        ui.console.print(f"[yellow]{len(out.summary['dropped'])} card(s) left out[/] (missing a modality)")


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


@click.command("fuse-train")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--fusion", type=click.Choice(["cmaf", "cmaf-nosigmoid", "concat"]), default=None,
              help="Fusion module (default: the profile's; quick: concat of its four branches, chosen on the "
                   "training split; paper: cmaf; cmaf-nosigmoid and concat are the paper's Table 5 ablations).")
@click.option("--task", type=click.Choice(["multiclass", "binary"]), default=None)
@click.option("--attention", type=click.Choice(["tokens", "chunks"]), default=None,
              help="What CMAF attends over: one token per branch (across modalities), or chunks of the VLM, "
                   "LLM and image vectors (the earlier tables; those three branches only). Default: the profile's.")
@click.option("--branches", default=None, metavar="LIST", help=BRANCHES_HELP)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Also export the bundle here.")
@click.option("--max-miss-rate", type=float, default=DEFAULT_MAX_MISS_RATE, show_default=True,
              help="Decision rule target: at most this share of defective held-out training cards passed as "
                   "normal.")
@click.option("--max-defect-error", type=float, default=DEFAULT_MAX_DEFECT_ERROR, show_default=True,
              help="Decision rule target: at most this share of held-out cards decided 'defect' of another class.")
@click.option("--defect-confidence", type=float, default=None,
              help="Grant 'defect' only where the exact upper bound of the held-out defect error, at this "
                   "confidence (e.g. 0.9), meets --max-defect-error. Needs many labelled cards: with a few "
                   "hundred, 0.8 grants almost no 'defect' decision and 0.9 none. Default: the error itself.")
@click.option("--calibration-folds", type=int, default=DEFAULT_CALIBRATION_FOLDS, show_default=True,
              help="Cross-validation folds on the training split for calibration and the decision rule.")
@_with_common
@click.pass_obj
def fuse_train(cache, dataset, fusion, task, attention, branches, out, max_miss_rate, max_defect_error, defect_confidence,
               calibration_folds, profile, config_file, sets, seed, augmented, force, as_json):
    """Train cross-modality attention fusion (CMAF) and the classifier, calibrate its confidence and
    choose the pass/defect/review rule on held-out training cards; store a model bundle."""
    from asectl.bundle import export_bundle
    from asectl.dataset import load_dataset
    from asectl.stages.fuse import run_fuse_train

    ds = load_dataset(dataset, seed=seed or 0)
    res = run_fuse_train(ds, cache, fusion=fusion, task=task, attention=attention, augmented=augmented,
                         profile=_profile_name(profile, config_file),
                         overrides=_overrides(config_file, sets, **{"encoders.branches": branches}),
                         seed=seed, force=force, max_miss_rate=max_miss_rate, max_defect_error=max_defect_error,
                         calibration_folds=calibration_folds, defect_confidence=defect_confidence)
    cfg = res.bundle.config
    if out is not None:
        export_bundle(res.bundle, out)
    summary = {"model": res.key, "from_cache": res.from_cache, "bundle": str(out or res.bundle.path),
               "classes": cfg["classes"], "variant": cfg["variant"], "attention": cfg.get("attention"),
               "branches": cfg.get("branches"), "task": cfg["task"],
               "n_train": cfg["training"]["n_train"], "metrics": cfg["metrics"],
               "calibration": {k: v for k, v in cfg["calibration"].items() if k != "held_out"},
               "decision": cfg["decision"]}
    if as_json:
        click.echo(json.dumps(summary, default=str))
        return
    ui.console.print(
        f"fuse-train: model {res.key[:12]} ({'from cache' if res.from_cache else 'trained'}), "
        f"{cfg['variant']} / {cfg['task']} on {cfg['training']['n_train']} training cards, the average of "
        f"{cfg['fusion_members']} fold models; last-epoch train accuracy "
        f"{cfg['metrics']['train_accuracy_last_epoch']:.3f} (their mean)"
        + (f"; exported to {out}" if out else ""), highlight=False)
    ui.console.print(decision_summary(cfg), highlight=False)


def decision_summary(cfg: dict[str, Any]) -> str:
    """Two lines on the calibration and the decision rule, from what the bundle stores (held-out cards)."""
    cal, dec = cfg["calibration"], cfg["decision"]
    held = dec["held_out"]

    def share(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    def thr(v: float | None) -> str:
        return threshold_text(v, 4, "p >= ")

    return (f"calibration: temperature {cal['temperature']:.3f} from the fold models' held-out predictions "
            f"on {cal['n_held_out']} training cards (held-out ECE {cal['held_out_ece']['before']:.3f} -> "
            f"{cal['held_out_ece']['after']:.3f})\n"
            f"decision: pass if normal with {thr(dec['pass_threshold'])}, defect if a defect class with "
            f"{thr(dec['defect_threshold'])}, else review; held out: review {share(held['review_share'])}, "
            f"miss rate {share(held['miss_rate'])} (target {share(dec['max_miss_rate'])}), defect error "
            f"{share(held['defect_error'])} (target {share(dec['max_defect_error'])}"
            + (f", met by its upper bound at {100 * dec['defect_confidence']:g}% confidence"
               if dec.get("defect_confidence") is not None else "") + ")"
            + ("\nheld-out review share for other --max-miss-rate targets: "
               + ", ".join(f"{share(r['max_miss_rate'])}: {share(r['review_share'])}" for r in dec["tradeoff"])
               if dec.get("tradeoff") else ""))


DECISION_STYLE = {"pass": "[green]pass[/]", "defect": "[red]defect[/]", "review": "[yellow]review[/]"}


def _bundle(cache, model: Path | None):
    from asectl.bundle import latest_bundle, load_bundle

    if model is not None:
        return load_bundle(model), f"model {model}"
    bundle, which = latest_bundle(cache)
    ui.console.print(f"using the latest trained {which}", highlight=False)
    return bundle, which


@click.command()
@click.argument("images", nargs=-1)
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model bundle folder (default: the latest model trained in this cache).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Export predictions as JSON lines (with --watch: append one line per card).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout.")
@click.option("--force", is_flag=True, help="Recompute the per-image stages.")
@click.option("--watch", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Keep the models loaded and classify each new image that appears in this folder, until "
                   "Ctrl-C or SIGTERM (needs --out).")
@click.option("--poll", type=float, default=None,
              help="With --watch: seconds between looks at the folder (default 0.25).")
@executor_options
@click.pass_obj
def predict(cache, images, model, out, as_json, force, watch, poll, executor):
    """Classify card images (files, folders or globs) with a trained model: class, calibrated
    probabilities and a decision (pass, defect or review). With --executor ray, the per-image stages of
    a batch run on a Ray cluster (docs/scale.md)."""
    from asectl.commands._shared import emit_records
    from asectl.dataset import load_inputs
    from asectl.stages.predict import run_predict

    if watch is not None:
        if images or out is None:
            raise ConfigError("--watch DIR takes no image arguments and needs --out FILE.jsonl for the results")
        if executor.distributed:
            raise ConfigError("--watch classifies each card on this machine as it arrives; use --executor local "
                              "(the Ray executor is for batches)")
        _watch(cache, model, watch, out, as_json, force, poll)
        return
    if poll is not None:
        raise ConfigError("--poll applies to --watch only")
    if not images:
        raise ConfigError("give card images (files, folders or globs), or --watch DIR --out FILE.jsonl")
    bundle, _ = _bundle(cache, model)
    ds = load_inputs(images)
    result = run_predict(ds, bundle, cache, force=force)
    emit_records(result.records, out, as_json)
    if not as_json:
        from rich.table import Table

        table = Table()
        table.add_column("image")
        table.add_column("class")
        table.add_column("decision")
        for c in bundle.labels:
            table.add_column(c, justify="right")
        for r in result.records:
            if r.get("error"):
                table.add_row(escape(r["image"]), "[red]error[/]", "", *[""] * len(bundle.labels))
            else:
                table.add_row(escape(r["image"]), escape(r["label"]), DECISION_STYLE[r["decision"]],
                              *[f"{r['probabilities'][c]:.3f}" for c in bundle.labels])
        ui.console.print(table)
        print_errors(result.errors)
    if result.errors:
        sys.exit(1)


def _watch(cache, model: Path | None, folder: Path, out: Path, as_json: bool, force: bool,
           poll: float | None) -> None:
    """predict --watch: one warm Predictor, signals turned into a clean stop after the current cards."""
    import signal
    import threading
    import time

    from asectl.backends.warm import keep_loaded
    from asectl.stages.predict import Predictor
    from asectl.stages.watch import DEFAULT_POLL, done_names, watch_folder

    bundle, _ = _bundle(cache, model)
    stop = threading.Event()
    reason: list[str] = []

    def request_stop(signum, _frame):
        if stop.is_set():            # a second request: stop now
            raise KeyboardInterrupt
        reason.append(signal.Signals(signum).name)
        stop.set()

    def show(rec: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps(rec, default=str))
        elif rec.get("error"):
            print_errors([rec], indent="")
        else:
            ui.info(f"{escape(rec['image'])}: {escape(rec['label'])} ({rec['probability']:.3f}) "
                    f"{DECISION_STYLE[rec['decision']]}")

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with keep_loaded():
            started = time.perf_counter()
            predictor = Predictor(bundle, cache, force)
            predictor.warm_up()
            ui.info(f"models loaded in {time.perf_counter() - started:.1f} s; watching {folder} "
                    f"({len(done_names(out))} card(s) already in {out}); Ctrl-C or SIGTERM stops")
            summary = watch_folder(folder, out, lambda ds: predictor.run(ds).records, should_stop=stop.is_set,
                                   poll=poll or DEFAULT_POLL, on_record=show, sleep=stop.wait)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    ui.info(f"stopped{' by ' + reason[0] if reason else ''}: {summary.classified} card(s) classified this run "
            f"({summary.errors} error(s)), {summary.skipped} already in {out}")


@click.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model bundle folder (default: the latest model trained in this cache).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder (default: DATASET/report).")
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json on stdout.")
@click.pass_obj
def report(cache, dataset, model, out, as_json):
    """Per-class F1, macro-F1 (5-class and binary), confusion matrices, t-SNE and curves on the test split."""
    from asectl.dataset import load_dataset
    from asectl.report import print_summary
    from asectl.stages.report import run_report

    bundle, which = _bundle(cache, model)
    ds = load_dataset(dataset)
    summary = run_report(ds, bundle, out or Path(dataset) / "report", cache, model_id=which)
    if as_json:
        click.echo(json.dumps(summary.metrics, default=str))
        return
    print_summary(summary, ui.console)
    ui.console.print(f"report written to {summary.html.parent} (report.html, report.md, metrics.json, PNGs)",
                     highlight=False)


def register(cli: click.Group) -> None:
    for cmd in (align, fuse_train, predict, report):
        cli.add_command(cmd)
