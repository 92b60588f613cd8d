"""What the learning commands (align, fuse-train, predict, report) share: the environment they read, the training
options, the training data and the lines on a model's calibration and decision rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from asectl import ui
from asectl.commands._shared import OFFLINE_ENV, VLM_ENV
from asectl.commands.config import ProfileValue, SettingOption
from asectl.models.calibration import threshold_text

# What the learning commands read: the encoders (offline switches) and, for cards not yet described, the VLM.
LEARN_ENV = (*VLM_ENV, *OFFLINE_ENV)


BRANCHES_HELP = (
    "Branches to align and fuse, comma-separated, two or more of image, vlm, llm, stats "
    "(the setting encoders.branches)."
)

# align and fuse-train: the same option, bound to the same profile key.
branches_option = click.option(
    "--branches",
    cls=SettingOption,
    setting="encoders.branches",
    type=ProfileValue("encoders.branches"),
    default=None,
    metavar="LIST",
    show_default="the profile's",
    help=BRANCHES_HELP,
)

_common = [
    click.option(
        "--profile",
        cls=SettingOption,
        setting="profile",
        type=click.Choice(["quick", "paper"]),
        default=None,
        show_default="quick",
        help="quick (CPU: frozen, cached features) or paper (GPU: fine-tuned encoders).",
    ),
    click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override one hyperparameter ([pfa], [fusion] and [encoders] keys of --config, e.g. pfa.lr=0.001).",
    ),
    click.option(
        "--seed", type=int, default=None, show_default="0; fuse-train: the one align last used", help="Training seed."
    ),
    click.option(
        "--split-seed",
        type=int,
        default=None,
        show_default="0; fuse-train: the one align last used",
        help="Seed of the stratified train/test split of a folder without labels.csv (README), apart "
        "from the training seed. The model keeps its split: report and predict use it.",
    ),
    click.option(
        "--augmented",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="Train on this TDA-augmented copy's training split (same test split).",
    ),
    click.option("--force", is_flag=True, help="Retrain even when cached."),
    click.option("--json", "as_json", is_flag=True, help="Print a JSON summary."),
]


def rule_target_options(how: str):
    """--max-miss-rate, --max-defect-error, --max-defective-error and --defective/--no-defective, each
    defaulting to the model's own: predict (a moved operating point) and calibrate (thresholds re-set on a
    line's cards) take the same four; ``how`` says what the first does with its target."""
    options = [
        click.option(
            "--max-miss-rate",
            type=float,
            default=None,
            show_default="the model's own rule",
            help=f"{how} for this miss-rate target.",
        ),
        click.option(
            "--max-defect-error",
            type=float,
            default=None,
            show_default="the model's own target",
            help="The same for the defect-error target.",
        ),
        click.option(
            "--max-defective-error",
            type=float,
            default=None,
            show_default="the model's own target",
            help="The same for the 'defective' decision's target (normal cards among 'defective' decisions).",
        ),
        click.option(
            "--defective/--no-defective",
            "defective_decision",
            default=None,
            show_default="the model's own rule",
            help="--no-defective: no 'defective' decision (type to confirm); those cards go to review, for a "
            "line that needs the defect type before it acts.",
        ),
    ]

    def decorate(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return decorate


def llm_model_option(f):
    """--llm-model for the commands that replay a trained model's stages or export it (predict, report,
    calibrate, export)."""
    return click.option(
        "--llm-model",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        show_default="the GGUF file recorded at training",
        help="Where the model's LLM is now, if its GGUF moved since training (the same file: its sha256 is checked).",
    )(f)


def training_options(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


def training_data(folder: Path, split_seed: int, given: bool):
    """The dataset split with ``split_seed``, the split printed ("44 train / 17 test, stratified, split
    seed 0")."""
    from asectl.domain.dataset import load_dataset

    ds = load_dataset(folder, split_seed=split_seed)
    if given and ds.split_seed is None:
        ui.console.print(
            f"[yellow]warning:[/] --split-seed ignored: {escape(str(folder))} names its split in labels.csv",
            highlight=False,
        )
    ui.info(f"split: {ds.split_text()}")
    return ds


def decision_summary(cfg: dict[str, Any]) -> str:
    """Two lines on the calibration and the decision rule, from what the bundle stores (held-out cards)."""
    from asectl.models.calibration import DecisionRule

    cal, dec = cfg["calibration"], cfg["decision"]
    return (
        f"calibration: temperature {cal['temperature']:.3f} from the fold models' held-out predictions "
        f"on {cal['n_held_out']} training cards (held-out ECE {cal['held_out_ece']['before']:.3f} -> "
        f"{cal['held_out_ece']['after']:.3f})\n"
        + operating_point_line(DecisionRule.from_dict(dec), dec["held_out"])
        + (
            "\nheld-out review share for other --max-miss-rate targets: "
            + ", ".join(f"{_share(r['max_miss_rate'])}: {_share(r['review_share'])}" for r in dec["tradeoff"])
            if dec.get("tradeoff")
            else ""
        )
    )


def _share(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def operating_point_line(rule, held: dict[str, Any], cards: str = "held out") -> str:
    """One line: a decision rule's thresholds and, on the cards ``held`` describes (by default the held-out
    training cards it was chosen on), its review share, miss rate and defect error against its targets."""
    return (
        f"decision: pass if normal with {threshold_text(rule.pass_threshold, 4, 'p >= ')}, defect if a "
        f"defect class with {threshold_text(rule.defect_threshold, 4, 'p >= ')}, "
        + (
            f"defective (type to confirm) with {threshold_text(rule.defective_threshold, 4, 'p(defective) >= ')}"
            if rule.defective_decision
            else "no defective decision (--no-defective)"
        )
        + f", else review; {cards}: review {_share(held['review_share'])}, miss rate "
        f"{_share(held['miss_rate'])} (target {_share(rule.max_miss_rate)}), defect error "
        f"{_share(held['defect_error'])} (target {_share(rule.max_defect_error)}"
        + (
            f", met by its upper bound at {100 * rule.defect_confidence:g}% confidence"
            if rule.defect_confidence is not None
            else ""
        )
        + ")"
        + (
            f", defective error {_share(held.get('defective_error'))} (target {_share(rule.defective_error_target)})"
            if rule.defective_decision and "defective_error" in held
            else ""
        )
    )
