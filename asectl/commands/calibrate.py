"""``asectl calibrate``: a trained model's decision thresholds re-set on a line's own labelled cards."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.markup import escape

from asectl import ui
from asectl.commands._learning import LEARN_ENV, llm_model_option, operating_point_line, rule_target_options
from asectl.commands._shared import environment


@click.command(epilog=environment(*LEARN_ENV))
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    show_default="the latest model trained in this cache",
    help="Model bundle or export folder to re-set (its fold models and temperature are kept); an export's "
    "new thresholds go to a new export folder (--out).",
)
@rule_target_options("Cut the thresholds on the line's training cards")
@click.option(
    "--split-seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the stratified train/test split of a folder without labels.csv; the model keeps the "
    "split, so report on the folder scores only the cards that did not set the thresholds.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="A bundle: also copy the new bundle here. An export: write the new export here (required).",
)
@llm_model_option
@click.option("--force", is_flag=True, help="Re-set even when cached.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.pass_obj
def calibrate(
    cache,
    dataset,
    model,
    max_miss_rate,
    max_defect_error,
    max_defective_error,
    defective_decision,
    split_seed,
    out,
    llm_model,
    force,
    as_json,
):
    """Re-set a trained model's decision thresholds on a line's own labelled cards (DATASET's training
    split), for the same targets, without retraining: for cards unlike those the model was trained on. The
    new model is stored in the cache and becomes the latest; `asectl report DATASET` then scores it on the
    line's test split (docs/calibrate.md). An exported model's new thresholds are written as a new export
    folder (--out), which `predict` and `report --model` take."""
    from asectl.bundle import Bundle, export_bundle, latest_bundle, relocate_llm
    from asectl.domain.dataset import load_dataset
    from asectl.export import load_model
    from asectl.stages.calibrate import run_calibrate
    from asectl.stages.split import split_summary

    if model is not None:
        parent, _ = load_model(model)
    else:
        parent, which = latest_bundle(cache)
        ui.info(f"re-setting the latest trained {which}")
    parent = relocate_llm(parent, llm_model)
    ds = load_dataset(dataset, split_seed=split_seed)
    res = run_calibrate(
        ds,
        parent,
        cache,
        max_miss_rate=max_miss_rate,
        max_defect_error=max_defect_error,
        max_defective_error=max_defective_error,
        defective_decision=defective_decision,
        force=force,
        out=out,
    )
    exported = not isinstance(parent, Bundle)
    if out is not None and not exported:
        export_bundle(res.bundle, out)
    recut = res.bundle.config["recalibration"]
    if as_json:
        summary = {
            "model": res.key,
            "from_cache": res.from_cache,
            "bundle": str(out or res.bundle.path),
            "parent": res.parent.digest,
            "line": recut["dataset"],
            "split": split_summary(recut["split"]),
            "n_cards": recut["n_cards"],
            "n_dropped": recut["n_dropped"],
            "class_counts": recut["class_counts"],
            "before": res.before,
            "decision": res.bundle.config["decision"],
        }
        click.echo(json.dumps(summary, default=str))
        return
    from asectl.models.calibration import DecisionRule

    what = f"exported model {escape(str(out))}" if exported else f"model {res.key[:12]}"
    ui.info(
        f"calibrate: {what} ({'from cache' if res.from_cache else 'thresholds re-set'} on "
        f"{recut['n_cards']} training cards of {escape(recut['dataset'])}, split {split_summary(recut['split'])})"
        + (f"; {recut['n_dropped']} card(s) could not be classified" if recut["n_dropped"] else "")
        + (f"; exported to {escape(str(out))}" if out and not exported else "")
    )
    parent_rule = DecisionRule.from_dict(res.parent.config["decision"])
    new_rule = DecisionRule.from_dict(res.bundle.config["decision"])
    ui.info("before: " + operating_point_line(parent_rule, res.before, "on the line's cards"))
    ui.info("now: " + operating_point_line(new_rule, res.after, "on the line's cards"))
    check = f"asectl report {escape(str(dataset))}" + (f" --model {escape(str(out))}" if exported else "")
    ui.info(f"check it on the line's test split: {check}")


def register(cli: click.Group) -> None:
    cli.add_command(calibrate)
