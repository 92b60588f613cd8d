"""``asectl fuse-train``: fusion and classifier training, calibration and the decision rule."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.markup import escape

from asectl import ui
from asectl.commands._learning import LEARN_ENV, branches_option, decision_summary, training_data, training_options
from asectl.commands._shared import environment
from asectl.commands.config import SettingOption, profile_overrides, recorded_sources
from asectl.models.calibration import DEFAULT_CALIBRATION_FOLDS, DEFAULT_MAX_DEFECT_ERROR, DEFAULT_MAX_MISS_RATE


@click.command("fuse-train", epilog=environment(*LEARN_ENV))
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--fusion",
    cls=SettingOption,
    setting="fusion.variant",
    type=click.Choice(["cmaf", "cmaf-nosigmoid", "concat"]),
    default=None,
    show_default="the profile's",
    help="Fusion module (quick profile: concat of its four branches, chosen on the training split; "
    "paper: cmaf; cmaf-nosigmoid and concat are the paper's Table 5 ablations).",
)
@click.option(
    "--task",
    cls=SettingOption,
    setting="fusion.task",
    type=click.Choice(["multiclass", "binary"]),
    default=None,
    show_default="multiclass",
    help="multiclass (every class) or binary (normal against defective).",
)
@click.option(
    "--attention",
    cls=SettingOption,
    setting="fusion.attention",
    type=click.Choice(["tokens", "chunks"]),
    default=None,
    show_default="the profile's",
    help="What CMAF attends over: one token per branch (across modalities), or chunks of the VLM, "
    "LLM and image vectors (the earlier tables; those three branches only).",
)
@click.option(
    "--heads",
    "projections",
    cls=SettingOption,
    setting="fusion.projections",
    type=click.Choice(["frozen", "end-to-end"]),
    default=None,
    show_default="the profile's",
    help="The PFA projection heads: frozen as align left them, or trained end to end with the fusion "
    "through two adapters on the text branches (paper section 3.2; docs/fuse-train.md).",
)
@click.option(
    "--classifier",
    cls=SettingOption,
    setting="fusion.classifier",
    type=click.Choice(["mlp", "logistic"]),
    default=None,
    show_default="the profile's",
    help="The classifier on the fused vector: the MLP trained with the fusion, or an L2 logistic "
    "regression fitted exactly on the concatenated aligned features (concat fusion, frozen heads; "
    "docs/fuse-train.md).",
)
@branches_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Also export the bundle here.")
@click.option(
    "--max-miss-rate",
    type=float,
    default=DEFAULT_MAX_MISS_RATE,
    show_default=True,
    help="Decision rule target: at most this share of defective held-out training cards passed as normal.",
)
@click.option(
    "--max-defect-error",
    type=float,
    default=DEFAULT_MAX_DEFECT_ERROR,
    show_default=True,
    help="Decision rule target: at most this share of held-out cards decided 'defect' of another class.",
)
@click.option(
    "--max-defective-error",
    type=float,
    default=None,
    show_default="--max-defect-error's",
    help="Decision rule target for 'defective' (type to confirm): at most this share of held-out cards "
    "decided 'defective' is normal.",
)
@click.option(
    "--defective/--no-defective",
    "defective_decision",
    default=True,
    show_default=True,
    help="--no-defective: no 'defective' decision; cards the pass and defect thresholds leave go to "
    "review (for a line that needs the defect type before it acts).",
)
@click.option(
    "--defect-confidence",
    type=float,
    default=None,
    help="Grant 'defect' only where the exact upper bound of the held-out defect error, at this "
    "confidence (e.g. 0.9), meets --max-defect-error. Needs many labelled cards: with a few "
    "hundred, 0.8 grants almost no 'defect' decision and 0.9 none.",
    show_default="none: the held-out error itself meets the target",
)
@click.option(
    "--calibration-folds",
    type=int,
    default=DEFAULT_CALIBRATION_FOLDS,
    show_default=True,
    help="Cross-validation folds on the training split for calibration and the decision rule.",
)
@training_options
@click.pass_obj
def fuse_train(
    cache,
    dataset,
    fusion,
    task,
    attention,
    projections,
    classifier,
    branches,
    out,
    max_miss_rate,
    max_defect_error,
    max_defective_error,
    defective_decision,
    defect_confidence,
    calibration_folds,
    profile,
    sets,
    seed,
    split_seed,
    augmented,
    force,
    as_json,
):
    """Train cross-modality attention fusion (CMAF) and the classifier, calibrate its confidence and
    choose the pass/defect/defective/review rule on held-out training cards; store a model bundle."""
    from asectl.bundle import export_bundle, heads_training
    from asectl.stages.fuse import remembered_split_seed, run_fuse_train
    from asectl.stages.split import split_summary

    ds = training_data(
        dataset, remembered_split_seed(cache, dataset) if split_seed is None else split_seed, split_seed is not None
    )
    res = run_fuse_train(
        ds,
        cache,
        fusion=fusion,
        task=task,
        attention=attention,
        projections=projections,
        augmented=augmented,
        profile=profile,
        overrides=profile_overrides(sets),
        settings_sources=recorded_sources(sets),
        seed=seed,
        force=force,
        max_miss_rate=max_miss_rate,
        max_defect_error=max_defect_error,
        calibration_folds=calibration_folds,
        defect_confidence=defect_confidence,
        max_defective_error=max_defective_error,
        defective_decision=defective_decision,
    )
    cfg = res.bundle.config
    if out is not None:
        export_bundle(res.bundle, out)
    summary = {
        "model": res.key,
        "from_cache": res.from_cache,
        "bundle": str(out or res.bundle.path),
        "classes": cfg["classes"],
        "variant": cfg["variant"],
        "attention": cfg.get("attention"),
        "heads": heads_training(cfg),
        "branches": cfg.get("branches"),
        "task": cfg["task"],
        "n_train": cfg["training"]["n_train"],
        "trained_on": cfg["training"]["dataset"],
        "split": split_summary(cfg["split"]),
        "metrics": cfg["metrics"],
        "calibration": {k: v for k, v in cfg["calibration"].items() if k != "held_out"},
        "decision": cfg["decision"],
        "settings_sources": cfg.get("settings_sources", {}),
    }
    if as_json:
        click.echo(json.dumps(summary, default=str))
        return
    ui.info(
        f"fuse-train: model {res.key[:12]} ({'from cache' if res.from_cache else 'trained'} on "
        f"{escape(cfg['training']['dataset'])}, split {split_summary(cfg['split'])}), "
        f"{cfg['variant']} / {cfg['task']}, {heads_training(cfg)} heads, on {cfg['training']['n_train']} training "
        "cards, the average of "
        f"{cfg['fusion_members']} fold models; last-epoch train accuracy "
        f"{cfg['metrics']['train_accuracy_last_epoch']:.3f} (their mean)" + (f"; exported to {out}" if out else "")
    )
    ui.info(decision_summary(cfg))


def register(cli: click.Group) -> None:
    cli.add_command(fuse_train)
