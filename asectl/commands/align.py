"""``asectl align``: progressive feature alignment (PFA)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from asectl import ui
from asectl.commands._learning import LEARN_ENV, branches_option, training_data, training_options
from asectl.commands._shared import environment
from asectl.commands.config import ProfileValue, SettingOption, profile_overrides, recorded_sources


@click.command(epilog=environment(*LEARN_ENV))
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--stride",
    cls=SettingOption,
    setting="pfa.strides",
    type=ProfileValue("pfa.strides"),
    default=None,
    metavar="FRACTIONS",
    show_default="the profile's",
    help="PFA stride: 0.2 (0.2/0.4/.../1) or a list like 0.2/0.6/1 (or 0.2,0.6,1).",
)
@click.option(
    "--mode",
    cls=SettingOption,
    setting="pfa.mode",
    type=click.Choice(["progressive", "direct", "none"]),
    default=None,
    show_default="the profile's",
    help="progressive (PFA), direct (every training card at once) or none (random projections): the paper's ablations.",
)
@branches_option
@training_options
@click.pass_obj
def align(cache, dataset, stride, mode, branches, profile, sets, seed, split_seed, augmented, force, as_json):
    """Progressive feature alignment (PFA) of image, VLM-text and LLM-text features (and the OCR'd numbers)."""
    from asectl.stages.align import run_align, stage_labels

    ds = training_data(dataset, 0 if split_seed is None else split_seed, split_seed is not None)
    out = run_align(
        ds,
        cache,
        profile=profile or "quick",
        overrides=profile_overrides(sets),
        settings_sources=recorded_sources(sets),
        seed=seed or 0,
        augmented=augmented,
        force=force,
    )
    pfa = out.summary["pfa"]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "key": out.key,
                    "from_cache": out.from_cache,
                    "split": ds.split_text(),
                    "pfa": {k: v for k, v in pfa.items() if k != "stages"},
                    "stages": [{k: v for k, v in s.items() if k != "curve"} for s in pfa["stages"]],
                },
                default=str,
            )
        )
        return
    from rich.table import Table

    table = Table(title=f"align {out.key[:12]} ({'from cache' if out.from_cache else 'trained'})")
    for col in ("stage", "train pairs", "D_pend", "final ITC loss", "D_pend loss", "tau"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for name, s in zip(stage_labels(out), pfa["stages"]):
        table.add_row(
            name, str(s["n_train"]), str(s["n_pend"]), _f(s["final_loss"]), _f(s["val_loss"]), f"{s['tau']:.4f}"
        )
    ui.info(table)
    if out.summary["dropped"]:
        ui.console.print(
            f"[yellow]warning:[/] {len(out.summary['dropped'])} card(s) left out (missing a modality)", highlight=False
        )


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


def register(cli: click.Group) -> None:
    cli.add_command(align)
