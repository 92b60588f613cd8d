"""``asectl report``: evaluate a model on its test split and write the report."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.markup import escape

from asectl import ui
from asectl.commands._learning import LEARN_ENV, llm_model_option
from asectl.commands._shared import environment


@click.command(epilog=environment(*LEARN_ENV))
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    show_default="the latest model trained on DATASET in this cache",
    help="Model bundle or export folder (`asectl export`).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default="./asectl-report/<dataset folder name>",
    help="Report folder, outside the dataset.",
)
@llm_model_option
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json on stdout.")
@click.pass_obj
def report(cache, dataset, model, out, llm_model, as_json):
    """Evaluate a model on its own test split: the decision figures against their targets, each card's
    decision and its reason, then per-class F1, macro-F1 (5-class and binary), confusion matrices and the
    ML diagnostics (calibration, t-SNE, curves)."""
    from asectl.bundle import relocate_llm
    from asectl.domain.dataset import load_dataset
    from asectl.export import load_model
    from asectl.report import print_summary
    from asectl.stages.models import model_for_dataset
    from asectl.stages.report import default_report_dir, run_report

    if model is not None:
        bundle, which = load_model(model)
    else:
        bundle, which = model_for_dataset(cache, dataset)
        ui.info(f"using the latest {which}")
    bundle = relocate_llm(bundle, llm_model)
    summary = run_report(load_dataset(dataset), bundle, out or default_report_dir(dataset), cache, model_id=which)
    if as_json:
        click.echo(json.dumps(summary.metrics, default=str))
        return
    print_summary(summary, ui.console, quiet=ui.QUIET)
    ui.info(f"report written to {escape(str(summary.html.parent))} (report.html, report.md, metrics.json, PNGs)")


def register(cli: click.Group) -> None:
    cli.add_command(report)
