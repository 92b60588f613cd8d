"""The learning commands: align (PFA), fuse-train (CMAF), predict, report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from asectl import ui
from asectl.commands._shared import EXECUTOR_ENV, OFFLINE_ENV, VLM_ENV, environment, executor_options, print_errors
from asectl.commands.config import ProfileValue, SettingOption, profile_overrides
from asectl.errors import ConfigError
from asectl.models.calibration import (DEFAULT_CALIBRATION_FOLDS, DEFAULT_MAX_DEFECT_ERROR, DEFAULT_MAX_MISS_RATE,
                                       threshold_text)

# What the learning commands read: the encoders (offline switches) and, for cards not yet described, the VLM.
LEARN_ENV = (*VLM_ENV, *OFFLINE_ENV)


BRANCHES_HELP = ("Branches to align and fuse, comma-separated, two or more of image, vlm, llm, stats "
                 "(the setting encoders.branches).")

_common = [
    click.option("--profile", cls=SettingOption, setting="profile", type=click.Choice(["quick", "paper"]),
                 default=None, show_default="quick",
                 help="quick (CPU: frozen, cached features) or paper (GPU: fine-tuned encoders)."),
    click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                 help="Override one hyperparameter ([pfa], [fusion] and [encoders] keys of --config, e.g. "
                      "pfa.lr=0.001)."),
    click.option("--seed", type=int, default=None, show_default="0; fuse-train: the one align last used",
                 help="Training seed."),
    click.option("--split-seed", type=int, default=None, show_default="0; fuse-train: the one align last used",
                 help="Seed of the stratified train/test split of a folder without labels.csv (README), apart "
                      "from the training seed. The model keeps its split: report and predict use it."),
    click.option("--augmented", type=click.Path(exists=True, file_okay=False, path_type=Path),
                 help="Train on this TDA-augmented copy's training split (same test split)."),
    click.option("--force", is_flag=True, help="Retrain even when cached."),
    click.option("--json", "as_json", is_flag=True, help="Print a JSON summary."),
]


def _with_common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


@click.command(epilog=environment(*LEARN_ENV))
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--stride", cls=SettingOption, setting="pfa.strides", type=ProfileValue("pfa.strides"), default=None,
              metavar="FRACTIONS", show_default="the profile's",
              help="PFA stride: 0.2 (0.2/0.4/.../1) or a list like 0.2/0.6/1 (or 0.2,0.6,1).")
@click.option("--mode", cls=SettingOption, setting="pfa.mode", type=click.Choice(["progressive", "direct", "none"]),
              default=None,
              show_default="the profile's",
              help="progressive (PFA), direct (every training card at once) or none (random projections): the "
                   "paper's ablations.")
@click.option("--branches", cls=SettingOption, setting="encoders.branches", type=ProfileValue("encoders.branches"),
              default=None, metavar="LIST", show_default="the profile's", help=BRANCHES_HELP)
@_with_common
@click.pass_obj
def align(cache, dataset, stride, mode, branches, profile, sets, seed, split_seed, augmented, force, as_json):
    """Progressive feature alignment (PFA) of image, VLM-text and LLM-text features (and the OCR'd numbers)."""
    from asectl.stages.align import run_align, stage_labels

    ds = _training_data(dataset, 0 if split_seed is None else split_seed, split_seed is not None)
    out = run_align(ds, cache, profile=profile or "quick", overrides=profile_overrides(sets),
                    seed=seed or 0, augmented=augmented, force=force)
    pfa = out.summary["pfa"]
    if as_json:
        click.echo(json.dumps({"key": out.key, "from_cache": out.from_cache, "split": ds.split_text(), "pfa": {
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
    ui.info(table)
    if out.summary["dropped"]:
        ui.console.print(f"[yellow]warning:[/] {len(out.summary['dropped'])} card(s) left out (missing a modality)",
                         highlight=False)


def _training_data(folder: Path, split_seed: int, given: bool):
    """The dataset split with ``split_seed``, the split printed ("44 train / 17 test, stratified, split
    seed 0")."""
    from asectl.dataset import load_dataset

    ds = load_dataset(folder, split_seed=split_seed)
    if given and ds.split_seed is None:
        ui.console.print(f"[yellow]warning:[/] --split-seed ignored: {escape(str(folder))} names its split in "
                         "labels.csv", highlight=False)
    ui.info(f"split: {ds.split_text()}")
    return ds


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


@click.command("fuse-train", epilog=environment(*LEARN_ENV))
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--fusion", cls=SettingOption, setting="fusion.variant",
              type=click.Choice(["cmaf", "cmaf-nosigmoid", "concat"]), default=None,
              show_default="the profile's",
              help="Fusion module (quick profile: concat of its four branches, chosen on the training split; "
                   "paper: cmaf; cmaf-nosigmoid and concat are the paper's Table 5 ablations).")
@click.option("--task", cls=SettingOption, setting="fusion.task", type=click.Choice(["multiclass", "binary"]),
              default=None, show_default="multiclass",
              help="multiclass (every class) or binary (normal against defective).")
@click.option("--attention", cls=SettingOption, setting="fusion.attention", type=click.Choice(["tokens", "chunks"]),
              default=None, show_default="the profile's",
              help="What CMAF attends over: one token per branch (across modalities), or chunks of the VLM, "
                   "LLM and image vectors (the earlier tables; those three branches only).")
@click.option("--heads", "projections", cls=SettingOption, setting="fusion.projections",
              type=click.Choice(["frozen", "end-to-end"]), default=None, show_default="the profile's",
              help="The PFA projection heads: frozen as align left them, or trained end to end with the fusion "
                   "through two adapters on the text branches (paper section 3.2; docs/fuse-train.md).")
@click.option("--branches", cls=SettingOption, setting="encoders.branches", type=ProfileValue("encoders.branches"),
              default=None, metavar="LIST", show_default="the profile's", help=BRANCHES_HELP)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Also export the bundle here.")
@click.option("--max-miss-rate", type=float, default=DEFAULT_MAX_MISS_RATE, show_default=True,
              help="Decision rule target: at most this share of defective held-out training cards passed as "
                   "normal.")
@click.option("--max-defect-error", type=float, default=DEFAULT_MAX_DEFECT_ERROR, show_default=True,
              help="Decision rule target: at most this share of held-out cards decided 'defect' of another class.")
@click.option("--defect-confidence", type=float, default=None,
              help="Grant 'defect' only where the exact upper bound of the held-out defect error, at this "
                   "confidence (e.g. 0.9), meets --max-defect-error. Needs many labelled cards: with a few "
                   "hundred, 0.8 grants almost no 'defect' decision and 0.9 none.",
              show_default="none: the held-out error itself meets the target")
@click.option("--calibration-folds", type=int, default=DEFAULT_CALIBRATION_FOLDS, show_default=True,
              help="Cross-validation folds on the training split for calibration and the decision rule.")
@_with_common
@click.pass_obj
def fuse_train(cache, dataset, fusion, task, attention, projections, branches, out, max_miss_rate, max_defect_error,
               defect_confidence, calibration_folds, profile, sets, seed, split_seed, augmented, force, as_json):
    """Train cross-modality attention fusion (CMAF) and the classifier, calibrate its confidence and
    choose the pass/defect/review rule on held-out training cards; store a model bundle."""
    from asectl.bundle import export_bundle, heads_training
    from asectl.stages.fuse import remembered_split_seed, run_fuse_train
    from asectl.stages.split import split_summary

    ds = _training_data(dataset, remembered_split_seed(cache, dataset) if split_seed is None else split_seed,
                        split_seed is not None)
    res = run_fuse_train(ds, cache, fusion=fusion, task=task, attention=attention, projections=projections,
                         augmented=augmented, profile=profile, overrides=profile_overrides(sets),
                         seed=seed, force=force, max_miss_rate=max_miss_rate, max_defect_error=max_defect_error,
                         calibration_folds=calibration_folds, defect_confidence=defect_confidence)
    cfg = res.bundle.config
    if out is not None:
        export_bundle(res.bundle, out)
    summary = {"model": res.key, "from_cache": res.from_cache, "bundle": str(out or res.bundle.path),
               "classes": cfg["classes"], "variant": cfg["variant"], "attention": cfg.get("attention"),
               "heads": heads_training(cfg),
               "branches": cfg.get("branches"), "task": cfg["task"],
               "n_train": cfg["training"]["n_train"], "trained_on": cfg["training"]["dataset"],
               "split": split_summary(cfg["split"]), "metrics": cfg["metrics"],
               "calibration": {k: v for k, v in cfg["calibration"].items() if k != "held_out"},
               "decision": cfg["decision"]}
    if as_json:
        click.echo(json.dumps(summary, default=str))
        return
    ui.info(
        f"fuse-train: model {res.key[:12]} ({'from cache' if res.from_cache else 'trained'} on "
        f"{escape(cfg['training']['dataset'])}, split {split_summary(cfg['split'])}), "
        f"{cfg['variant']} / {cfg['task']}, {heads_training(cfg)} heads, on {cfg['training']['n_train']} training "
        "cards, the average of "
        f"{cfg['fusion_members']} fold models; last-epoch train accuracy "
        f"{cfg['metrics']['train_accuracy_last_epoch']:.3f} (their mean)"
        + (f"; exported to {out}" if out else ""))
    ui.info(decision_summary(cfg))


def decision_summary(cfg: dict[str, Any]) -> str:
    """Two lines on the calibration and the decision rule, from what the bundle stores (held-out cards)."""
    from asectl.models.calibration import DecisionRule

    cal, dec = cfg["calibration"], cfg["decision"]
    return (f"calibration: temperature {cal['temperature']:.3f} from the fold models' held-out predictions "
            f"on {cal['n_held_out']} training cards (held-out ECE {cal['held_out_ece']['before']:.3f} -> "
            f"{cal['held_out_ece']['after']:.3f})\n"
            + operating_point_line(DecisionRule.from_dict(dec), dec["held_out"])
            + ("\nheld-out review share for other --max-miss-rate targets: "
               + ", ".join(f"{_share(r['max_miss_rate'])}: {_share(r['review_share'])}" for r in dec["tradeoff"])
               if dec.get("tradeoff") else ""))


def _share(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def operating_point_line(rule, held: dict[str, Any]) -> str:
    """One line: a decision rule's thresholds and, on the held-out training cards it was chosen on, its
    review share, miss rate and defect error against its targets."""
    return (f"decision: pass if normal with {threshold_text(rule.pass_threshold, 4, 'p >= ')}, defect if a "
            f"defect class with {threshold_text(rule.defect_threshold, 4, 'p >= ')}, else review; held out: "
            f"review {_share(held['review_share'])}, miss rate {_share(held['miss_rate'])} (target "
            f"{_share(rule.max_miss_rate)}), defect error {_share(held['defect_error'])} (target "
            f"{_share(rule.max_defect_error)}"
            + (f", met by its upper bound at {100 * rule.defect_confidence:g}% confidence"
               if rule.defect_confidence is not None else "") + ")")


DECISION_STYLE = {"pass": "[green]pass[/]", "defect": "[red]defect[/]", "review": "[yellow]review[/]"}


def _bundle(cache, model: Path | None, exports: bool = False):
    """The model at ``model`` (a bundle, or with ``exports`` also an export folder), else the latest trained."""
    from asectl.bundle import latest_bundle, load_bundle
    from asectl.export import is_export, load_export

    if model is not None and exports and is_export(model):
        return load_export(model), f"exported model {model}"
    if model is not None:
        return load_bundle(model), f"model {model}"
    bundle, which = latest_bundle(cache)
    ui.info(f"using the latest trained {which}")
    return bundle, which


@click.command(epilog=environment(*LEARN_ENV, *EXECUTOR_ENV))
@click.argument("images", nargs=-1)
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              show_default="the latest model trained in this cache",
              help="Model bundle or export folder (`asectl export`).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Export predictions as JSON lines (with --watch: append one line per card).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout.")
@click.option("--force", is_flag=True, help="Recompute the per-image stages.")
@click.option("--watch", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Keep the models loaded and classify each new image that appears in this folder, until "
                   "Ctrl-C or SIGTERM (needs --out).")
@click.option("--poll", type=float, default=None, show_default="0.25",
              help="With --watch: seconds between looks at the folder.")
@click.option("--workers", type=click.IntRange(min=0), default=None, metavar="N",
              show_default="0, everything in this process",
              help="With --watch: worker processes that read, describe and reason about the next cards while "
                   "this one fuses the current ones (not yet reliable on SIGTERM: docs/predict.md).")
@click.option("--max-miss-rate", type=float, default=None, show_default="the model's own rule",
              help="Move the operating point without retraining: thresholds re-derived from the held-out "
                   "scores stored with the model for this miss-rate target.")
@click.option("--max-defect-error", type=float, default=None, show_default="the model's own target",
              help="The same for the defect-error target.")
@executor_options
@click.pass_obj
def predict(cache, images, model, out, as_json, force, watch, poll, workers, max_miss_rate, max_defect_error,
            executor):
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
        _watch(cache, model, watch, out, as_json, force, poll, (max_miss_rate, max_defect_error), workers)
        return
    if poll is not None or workers is not None:
        raise ConfigError(f"{'--poll' if poll is not None else '--workers'} applies to --watch only")
    if not images:
        raise ConfigError("give card images (files, folders or globs), or --watch DIR --out FILE.jsonl")
    bundle, _ = _bundle(cache, model, exports=True)
    rule = _operating_point(bundle, max_miss_rate, max_defect_error)
    ds = load_inputs(images)
    result = run_predict(ds, bundle, cache, force=force, rule=rule)
    emit_records(result.records, out, as_json)
    if not as_json:
        from rich.table import Table

        table = Table()
        table.add_column("image")
        table.add_column("class")
        table.add_column("decision")
        table.add_column("reason")
        splits = any("split" in r for r in result.records)   # the model's own cards: say which it trained on
        if splits:
            table.add_column("model's split")
        for c in bundle.labels:
            table.add_column(c, justify="right")
        for r in result.records:
            split = [r.get("split", "")] if splits else []
            if r.get("error"):
                table.add_row(escape(r["image"]), "[red]error[/]", "", "", *split, *[""] * len(bundle.labels))
            else:
                table.add_row(escape(r["image"]), escape(r["label"]), DECISION_STYLE[r["decision"]],
                              escape(r["reason"]), *split, *[f"{r['probabilities'][c]:.3f}" for c in bundle.labels])
        ui.info(table)
        print_errors(result.errors)
    if result.errors:
        sys.exit(1)


def _operating_point(bundle, max_miss_rate: float | None, max_defect_error: float | None):
    """The decision rule predict applies: the bundle's own, or the one re-derived for the given targets,
    announced with what it costs on the held-out cards."""
    rule, held = bundle.operating_point(max_miss_rate, max_defect_error)
    if max_miss_rate is not None or max_defect_error is not None:
        ui.console.print(operating_point_line(rule, held), highlight=False)
    return rule


def _watch(cache, model: Path | None, folder: Path, out: Path, as_json: bool, force: bool,
           poll: float | None, targets: tuple[float | None, float | None] = (None, None),
           workers: int | None = None) -> None:
    """predict --watch: one warm Predictor, signals turned into a clean stop after the current cards; with
    workers, the per-image stages of the next cards run in them while this process fuses (both cores)."""
    import signal
    import threading
    import time

    from asectl.backends.warm import keep_loaded
    from asectl.stages.predict import Predictor
    from asectl.stages.watch import DEFAULT_POLL, Preparers, done_names, watch_folder

    bundle, _ = _bundle(cache, model, exports=True)
    rule = _operating_point(bundle, *targets)
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
                    f"{DECISION_STYLE[rec['decision']]} ({escape(rec['reason'])})")

    workers = 0 if workers is None else workers     # worker processes are opt-in: docs/predict.md
    preparers = Preparers(bundle.path, cache.root, force, workers) if workers else None
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with keep_loaded():
            started = time.perf_counter()
            # With workers, they compute the per-image records (--force there); this process only fuses.
            predictor = Predictor(bundle, cache, force and not preparers, rule)
            if preparers:
                predictor.encoders()
                predictor.models()
                preparers.warm_up()
            else:
                predictor.warm_up()
            ui.info(f"models loaded in {time.perf_counter() - started:.1f} s"
                    + (f" ({workers} worker(s))" if workers else "") + f"; watching {folder} "
                    f"({len(done_names(out))} card(s) already in {out}); Ctrl-C or SIGTERM stops")
            summary = watch_folder(folder, out, lambda ds: predictor.run(ds).records, should_stop=stop.is_set,
                                   poll=poll or DEFAULT_POLL, on_record=show, sleep=stop.wait,
                                   prepare=preparers.prepare if preparers else None)
    finally:
        if preparers:
            preparers.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    ui.info(f"stopped{' by ' + reason[0] if reason else ''}: {summary.classified} card(s) classified this run "
            f"({summary.errors} error(s)), {summary.skipped} already in {out}")


@click.command(epilog=environment(*LEARN_ENV))
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              show_default="the latest model trained on DATASET in this cache", help="Model bundle folder.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              show_default="./asectl-report/<dataset folder name>", help="Report folder, outside the dataset.")
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json on stdout.")
@click.pass_obj
def report(cache, dataset, model, out, as_json):
    """Evaluate a model on its own test split: the decision figures against their targets, each card's
    decision and its reason, then per-class F1, macro-F1 (5-class and binary), confusion matrices and the
    ML diagnostics (calibration, t-SNE, curves)."""
    from asectl.bundle import load_bundle
    from asectl.dataset import load_dataset
    from asectl.report import print_summary
    from asectl.stages.models import model_for_dataset
    from asectl.stages.report import default_report_dir, run_report

    if model is not None:
        bundle, which = load_bundle(model), f"model {model}"
    else:
        bundle, which = model_for_dataset(cache, dataset)
        ui.info(f"using the latest {which}")
    summary = run_report(load_dataset(dataset), bundle, out or default_report_dir(dataset), cache, model_id=which)
    if as_json:
        click.echo(json.dumps(summary.metrics, default=str))
        return
    print_summary(summary, ui.console, quiet=ui.QUIET)
    ui.info(f"report written to {escape(str(summary.html.parent))} (report.html, report.md, metrics.json, PNGs)")


def register(cli: click.Group) -> None:
    for cmd in (align, fuse_train, predict, report):
        cli.add_command(cmd)
