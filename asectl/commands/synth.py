"""``asectl synth``: write an ASE-like dataset, or augment one with TDA."""

from __future__ import annotations

import json
from pathlib import Path

import click

from asectl import ui
from asectl.commands._shared import OFFLINE_ENV, environment


@click.command(epilog=environment(*OFFLINE_ENV))
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write the dataset into.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the generated cards (or of TDA).")
@click.option("--counts", default=None, show_default="225,92,44,50,44", help="Cards per class normal,type1..type4.")
@click.option("--test-size", default=None, type=int, show_default="130 of 455, the same share", help="Test cards.")
@click.option(
    "--difficulty",
    type=click.Choice(["field", "clean"]),
    default="field",
    show_default=True,
    help="field: severities, label disagreement, acquisition variation (docs/dataset.md); clean: ideal cards.",
)
@click.option(
    "--augment",
    "augment_src",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Instead of generating: apply TDA to this dataset's training split.",
)
@click.option("--factor", default=2.0, show_default=True, type=float, help="TDA: training split grows x factor.")
@click.option(
    "--stats",
    "stats_source",
    type=click.Choice(["ocr", "printed"]),
    default="ocr",
    show_default=True,
    help="TDA: per-card stats from the OCR stage, or from truth.jsonl of a generated dataset.",
)
@click.option(
    "--engine",
    default=None,
    show_default="the one last used on the dataset, else cnocr",
    help="TDA with --stats ocr: OCR engine.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    show_default="one per core from 64 cards",
    help="Processes rendering the cards; the cards do not depend on it.",
)
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_obj
def synth(
    cache, out, seed, counts, test_size, difficulty, augment_src, factor, stats_source, engine, workers, force, as_json
):
    """Write an ASE-like dataset (cards, labels.csv, truth.jsonl), or augment one with TDA."""
    from asectl.stages.synth import run_augment, run_generate

    if augment_src is None:
        summary = run_generate(
            out, seed=seed, counts=counts, test_size=test_size, force=force, difficulty=difficulty, workers=workers
        )
        msg = f"wrote {summary['cards']} cards ({summary['train']} train / {summary['test']} test) to {out}"
    else:
        summary = run_augment(
            augment_src,
            out,
            factor=factor,
            seed=seed,
            stats_source=stats_source,
            engine=engine,
            cache=cache,
            force=force,
            workers=workers,
        )
        summary.pop("fits", None)
        msg = (
            f"TDA added {summary['added']} training cards: {summary['train']} train / "
            f"{summary['test']} test (test split copied untouched) in {out}"
        )
    click.echo(json.dumps(summary)) if as_json else ui.info(msg)


def register(cli: click.Group) -> None:
    cli.add_command(synth)
