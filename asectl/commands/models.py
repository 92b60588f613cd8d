"""``asectl models``: the trained models of the cache."""

from __future__ import annotations

import json

import click
from rich.markup import escape

from asectl import ui
from asectl.commands._shared import environment


@click.group("models")
def models_group():
    """See the trained models of the cache."""


@models_group.command("list", epilog=environment())
@click.option("--json", "as_json", is_flag=True, help="Print the models as one JSON list on stdout.")
@click.pass_obj
def models_list(cache, as_json):
    """Each trained model, newest first: id, the dataset it was trained on (and the line its thresholds were
    re-set on, by `asectl calibrate`), date, classes, decision targets and the test macro-F1 of its latest
    report."""
    from asectl.stages.models import list_models

    models = list_models(cache)
    if as_json:
        click.echo(json.dumps(models))
        return
    from rich.table import Table

    table = Table(title=f"models in {cache.root}", title_justify="left")
    for col in ("id", "trained on", "date", "classes", "targets (miss / defect error)", "test macro-F1"):
        table.add_column(col)
    for m in models:
        t = m["targets"]
        f1 = "-" if m["test_macro_f1"] is None else f"{100 * m['test_macro_f1']:.2f} % on {m['reported_on']}"
        table.add_row(
            m["id"][:12],
            escape(str(m["dataset"]))
            + ("" if not m["thresholds_set_on"] else f" (thresholds set on {escape(m['thresholds_set_on'])})"),
            str(m["created"]),
            ", ".join(m["classes"] or []),
            f"{100 * t['max_miss_rate']:g} % / {100 * t['max_defect_error']:g} %"
            + (
                " / defective off"
                if not t["defective_decision"]
                else ""
                if t["max_defective_error"] is None
                else f" / defective {100 * t['max_defective_error']:g} %"
            ),
            escape(f1),
        )
    ui.info(table)
    if not models:
        ui.info(f"no trained model in {cache.root}; train one with asectl fuse-train DATASET")


def register(cli: click.Group) -> None:
    cli.add_command(models_group)
