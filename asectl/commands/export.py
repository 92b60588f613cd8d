"""``asectl export``: a trained model as a folder that predicts without torch (docs/export.md)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from asectl import ui
from asectl.commands._learning import llm_model_option
from asectl.commands._shared import OFFLINE_ENV, environment


@click.command("export", epilog=environment(*OFFLINE_ENV))
@click.option(
    "--model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    show_default="the latest model trained in this cache",
    help="Model bundle folder.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder to write the export into (must not exist, or be empty).",
)
@click.option(
    "--copy-llm",
    is_flag=True,
    help="Copy the LLM's GGUF file into the export, so the folder is all a station needs; without it, "
    "its path is stored and its hash checked when predicting.",
)
@llm_model_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.pass_obj
def export(cache, model, out, copy_llm, llm_model, as_json):
    """Write a trained model as ONNX graphs (encoders, projections, fold models) with its calibration,
    decision rule and replay settings: `asectl predict --model DIR` then needs neither torch nor
    transformers."""
    from asectl.bundle import latest_bundle, load_bundle, relocate_llm
    from asectl.stages.export import run_export

    if model is not None:
        bundle = load_bundle(model)
    else:
        bundle, which = latest_bundle(cache)
        ui.info(f"exporting the latest trained {which}")
    res = run_export(relocate_llm(bundle, llm_model), out, copy_llm=copy_llm)
    if as_json:
        click.echo(
            json.dumps(
                {"export": str(res.path), "graphs": res.graphs, "ocr": res.ocr, "llm": res.llm, "parity": res.parity},
                default=str,
            )
        )
        return
    ocr = res.ocr["engine"] + (
        ""
        if res.ocr["engine"] == res.ocr["trained_engine"]
        else f" (trained with {res.ocr['trained_engine']}; {res.ocr['why']})"
    )
    llm = (
        res.llm["not_needed"]
        if res.llm.get("not_needed")
        else "copied in"
        if res.llm["copied"]
        else f"read from {res.llm['file']}, checked by hash"
    )
    ui.info(
        f"exported to {res.path}: {res.graphs} ONNX graphs; OCR {ocr}; LLM {llm}; largest probability "
        f"difference from the bundle on {res.parity['cases']} generated cases {res.parity['probabilities']:.1e}"
    )


def register(cli: click.Group) -> None:
    cli.add_command(export)
