"""``asectl ocr``: read the printed records of cards."""

from __future__ import annotations

from pathlib import Path

import click

from asectl.commands._shared import EXECUTOR_ENV, emit_records, environment, finish, per_image_options
from asectl.stages.ocr import DETECTORS, OcrSettings

_DEFAULT = OcrSettings()


@click.command(epilog=environment(*EXECUTOR_ENV))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--engine", default=_DEFAULT.engine, show_default=True, help="OCR engine: cnocr or rapidocr.")
@click.option(
    "--spec",
    type=click.Path(dir_okay=False, path_type=Path),
    show_default="docs/card-format.md",
    help="Card spec TOML for another record layout.",
)
@click.option(
    "--detector",
    type=click.Choice(DETECTORS),
    default=_DEFAULT.detector,
    show_default=True,
    metavar="MODE",
    help="auto: cut clean text lines directly, else the engine's text detector; model: always the detector; "
    "auto-checked: as auto, and a card whose cut lines miss a field is read again by the detector.",
)
@click.option(
    "--recogniser",
    type=click.Path(dir_okay=False, path_type=Path),
    show_default="the rapidocr wheel's PP-OCRv6 small",
    help="Another ONNX PP-OCR text recogniser (e.g. one fine-tuned on your cards' font), with --engine rapidocr.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    show_default="one per core",
    help="Processes reading cards; the records do not depend on it.",
)
@per_image_options
@click.pass_obj
def ocr(cache, inputs, engine, spec, detector, recogniser, workers, out, as_json, force, strict, executor):
    """Read the printed records of cards (a dataset folder, image files or globs). The settings are
    remembered for the later stages on a dataset folder."""
    from asectl.domain.dataset import load_inputs
    from asectl.stages.ocr import run_ocr

    settings = OcrSettings(
        engine=engine,
        spec=str(spec) if spec else None,
        detector=detector,
        recogniser=str(recogniser) if recogniser else None,
    )
    result = run_ocr(
        load_inputs(inputs), settings, cache=cache, force=force, strict=strict, workers=workers, executor=executor
    )
    emit_records(result.records, out, as_json)
    finish(result, cache)


def register(cli: click.Group) -> None:
    cli.add_command(ocr)
