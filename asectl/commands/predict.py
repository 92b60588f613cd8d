"""``asectl predict``: classify card images, once or as they arrive (``--watch``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from asectl import ui
from asectl.commands._learning import LEARN_ENV, llm_model_option, operating_point_line, rule_target_options
from asectl.commands._shared import EXECUTOR_ENV, environment, executor_options, print_errors
from asectl.errors import ConfigError

DECISION_STYLE = {
    "pass": "[green]pass[/]",
    "defect": "[red]defect[/]",
    "defective": "[magenta]defective[/]",
    "review": "[yellow]review[/]",
}


def _bundle(cache, model: Path | None, llm_model: Path | None):
    """The model at ``model`` (a bundle or an export folder), else the latest trained; with its LLM read
    from ``llm_model`` when given (asectl.bundle.relocate_llm)."""
    from asectl.bundle import latest_bundle, relocate_llm
    from asectl.export import load_model

    if model is not None:
        bundle, which = load_model(model)
    else:
        bundle, which = latest_bundle(cache)
        ui.info(f"using the latest trained {which}")
    return relocate_llm(bundle, llm_model), which


@click.command(epilog=environment(*LEARN_ENV, *EXECUTOR_ENV))
@click.argument("images", nargs=-1)
@click.option(
    "--model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    show_default="the latest model trained in this cache",
    help="Model bundle or export folder (`asectl export`).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Export predictions as JSON lines (with --watch: append one line per card).",
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout.")
@click.option("--force", is_flag=True, help="Recompute the per-image stages.")
@click.option(
    "--watch",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Keep the models loaded and classify each new image that appears in this folder, until "
    "Ctrl-C or SIGTERM (needs --out).",
)
@click.option(
    "--poll", type=float, default=None, show_default="0.25", help="With --watch: seconds between looks at the folder."
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    show_default="0, everything in this process",
    help="With --watch: worker processes that read, describe and reason about the next cards while "
    "this one fuses the current ones (not yet reliable on SIGTERM: docs/predict.md).",
)
@rule_target_options(
    "Move the operating point without retraining: thresholds re-derived from the held-out scores stored with the model"
)
@llm_model_option
@executor_options
@click.pass_obj
def predict(
    cache,
    images,
    model,
    out,
    as_json,
    force,
    watch,
    poll,
    workers,
    max_miss_rate,
    max_defect_error,
    max_defective_error,
    defective_decision,
    llm_model,
    executor,
):
    """Classify card images (files, folders or globs) with a trained model: class, calibrated
    probabilities and a decision (pass, defect, defective or review). With --executor ray, the per-image stages of
    a batch run on a Ray cluster (docs/scale.md)."""
    from asectl.commands._shared import emit_records
    from asectl.domain.dataset import load_inputs
    from asectl.stages.predict import run_predict

    targets = {
        "max_miss_rate": max_miss_rate,
        "max_defect_error": max_defect_error,
        "max_defective_error": max_defective_error,
        "defective_decision": defective_decision,
    }
    if watch is not None:
        if images or out is None:
            raise ConfigError("--watch DIR takes no image arguments and needs --out FILE.jsonl for the results")
        if executor.distributed:
            raise ConfigError(
                "--watch classifies each card on this machine as it arrives; use --executor local "
                "(the Ray executor is for batches)"
            )
        _watch(cache, model, watch, out, as_json, force, poll, targets, workers, llm_model)
        return
    if poll is not None or workers is not None:
        raise ConfigError(f"{'--poll' if poll is not None else '--workers'} applies to --watch only")
    if not images:
        raise ConfigError("give card images (files, folders or globs), or --watch DIR --out FILE.jsonl")
    bundle, _ = _bundle(cache, model, llm_model)
    rule = _operating_point(bundle, targets)
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
        splits = any("split" in r for r in result.records)  # the model's own cards: say which it trained on
        if splits:
            table.add_column("model's split")
        for c in bundle.labels:
            table.add_column(c, justify="right")
        for r in result.records:
            split = [r.get("split", "")] if splits else []
            if r.get("error"):
                table.add_row(escape(r["image"]), "[red]error[/]", "", "", *split, *[""] * len(bundle.labels))
            else:
                table.add_row(
                    escape(r["image"]),
                    escape(r["label"]),
                    DECISION_STYLE[r["decision"]],
                    escape(r["reason"]),
                    *split,
                    *[f"{r['probabilities'][c]:.3f}" for c in bundle.labels],
                )
        ui.info(table)
        print_errors(result.errors)
    if result.errors:
        sys.exit(1)


def _operating_point(bundle, targets: dict[str, Any]):
    """The decision rule predict applies: the bundle's own, or the one re-derived for the given targets
    (None: the model's own), announced with what it costs on the held-out cards."""
    rule, held = bundle.operating_point(**targets)
    if any(v is not None for v in targets.values()):
        ui.console.print(operating_point_line(rule, held), highlight=False)
    return rule


def _watch(
    cache,
    model: Path | None,
    folder: Path,
    out: Path,
    as_json: bool,
    force: bool,
    poll: float | None,
    targets: dict[str, Any] | None = None,
    workers: int | None = None,
    llm_model: Path | None = None,
) -> None:
    """predict --watch: one warm Predictor, signals turned into a clean stop after the current cards; with
    workers, the per-image stages of the next cards run in them while this process fuses (both cores)."""
    import signal
    import threading
    import time

    from asectl.backends.warm import keep_loaded
    from asectl.stages.predict import Predictor
    from asectl.stages.watch import DEFAULT_POLL, Preparers, done_names, watch_folder

    bundle, _ = _bundle(cache, model, llm_model)
    rule = _operating_point(bundle, targets or {})
    stop = threading.Event()
    reason: list[str] = []

    def request_stop(signum, _frame):
        if stop.is_set():  # a second request: stop now
            raise KeyboardInterrupt
        reason.append(signal.Signals(signum).name)
        stop.set()

    def show(rec: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps(rec, default=str))
        elif rec.get("error"):
            print_errors([rec], indent="")
        else:
            ui.info(
                f"{escape(rec['image'])}: {escape(rec['label'])} ({rec['probability']:.3f}) "
                f"{DECISION_STYLE[rec['decision']]} ({escape(rec['reason'])})"
            )

    workers = 0 if workers is None else workers  # worker processes are opt-in: docs/predict.md
    preparers = Preparers(bundle.config["replay"], cache.root, force, workers) if workers else None
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with keep_loaded():
            started = time.perf_counter()
            # With workers, they compute the per-image records (--force there); this process only fuses.
            predictor = Predictor(bundle, cache, force and not preparers, rule)
            if preparers:
                predictor.load_models()
                preparers.warm_up()
            else:
                predictor.warm_up()
            ui.info(
                f"models loaded in {time.perf_counter() - started:.1f} s"
                + (f" ({workers} worker(s))" if workers else "")
                + f"; watching {folder} "
                f"({len(done_names(out))} card(s) already in {out}); Ctrl-C or SIGTERM stops"
            )
            summary = watch_folder(
                folder,
                out,
                lambda ds: predictor.run(ds).records,
                should_stop=stop.is_set,
                poll=poll or DEFAULT_POLL,
                on_record=show,
                sleep=stop.wait,
                prepare=preparers.prepare if preparers else None,
            )
    finally:
        if preparers:
            preparers.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    ui.info(
        f"stopped{' by ' + reason[0] if reason else ''}: {summary.classified} card(s) classified this run "
        f"({summary.errors} error(s)), {summary.skipped} already in {out}"
    )


def register(cli: click.Group) -> None:
    cli.add_command(predict)
