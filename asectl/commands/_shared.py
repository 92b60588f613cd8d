"""What the per-image stage commands share: their common options, record output and the end of a run."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click
from rich.markup import escape

from asectl import settings, ui
from asectl.commands.config import SettingOption, effective_settings
from asectl.commands.config import environment as environment  # the commands' help epilogs
from asectl.executors import ExecutorSettings

# Environment variables, listed in the help of each command that reads them.
EXECUTOR_ENV = tuple(env for _, env in ExecutorSettings.SOURCES.values()) + (settings.CONFIG_ENV,)
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # encoders and VLM: no model hub when set
VLM_ENV = (settings.ENVIRONMENT["describe.vlm_model"], settings.ENVIRONMENT["describe.allow_download"])


_PER_IMAGE_OPTIONS = [
    click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Export records as JSON lines."),
    click.option("--json", "as_json", is_flag=True, help="Print records as JSON lines on stdout."),
    click.option("--force", is_flag=True, help="Recompute even when cached."),
    click.option("--strict", is_flag=True, help="Stop at the first bad image."),
]


def per_image_options(f):
    """--out, --json, --force and --strict, and the executor options (``executor_options``): what every
    per-image stage command shares."""
    for opt in reversed(_PER_IMAGE_OPTIONS):
        f = opt(f)
    return executor_options(f)


# Where cache misses are computed (asectl/executors.py, docs/scale.md). Their settings live in the
# [executor] table of a config file, shared by every command that has them.
_EXECUTOR_OPTIONS = [
    click.option(
        "--executor",
        "executor_kind",
        cls=SettingOption,
        setting="executor.kind",
        type=click.Choice(["local", "ray"]),
        default=None,
        show_default="local",
        help="Where uncached cards are computed: local (this machine) or ray (a Ray cluster, "
        'needs pip install -e ".[ray]"; docs/scale.md). Env ASECTL_EXECUTOR.',
    ),
    click.option(
        "--ray-address",
        cls=SettingOption,
        setting="executor.address",
        default=None,
        metavar="ADDR",
        show_default="the cluster running, else a Ray instance on this machine",
        help="Ray cluster to join. Env ASECTL_RAY_ADDRESS.",
    ),
    click.option(
        "--ray-workers",
        cls=SettingOption,
        setting="executor.workers",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        show_default="one per CPU in the cluster, or per --num-gpus-per-worker GPUs",
        help="Ray workers, each loading the model once. Env ASECTL_RAY_WORKERS.",
    ),
    click.option(
        "--ray-batch-size",
        cls=SettingOption,
        setting="executor.batch_size",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        show_default="the stage's",
        help="Cards per Ray batch. Env ASECTL_RAY_BATCH_SIZE.",
    ),
    click.option(
        "--num-gpus-per-worker",
        cls=SettingOption,
        setting="executor.num_gpus_per_worker",
        type=click.FloatRange(min=0),
        default=None,
        metavar="G",
        show_default="0",
        help="GPUs each Ray worker reserves, for CUDA backends (InstructBLIP, reason --n-gpu-layers). "
        "Env ASECTL_NUM_GPUS_PER_WORKER.",
    ),
]


def executor_options(f):
    """--executor, --ray-address, --ray-workers, --ray-batch-size and --num-gpus-per-worker. The command
    gets one ``executor`` argument instead (asectl.executors), which is also the one every stage it calls
    uses, and which is closed when the command ends."""

    @functools.wraps(f)
    def with_executor(*args, executor_kind, ray_address, ray_workers, ray_batch_size, num_gpus_per_worker, **kwargs):
        from asectl.executors import make_executor, using

        values = {
            "kind": executor_kind,
            "address": ray_address,
            "workers": ray_workers,
            "batch_size": ray_batch_size,
            "num_gpus_per_worker": num_gpus_per_worker,
        }
        found = {
            s.key.partition(".")[2]: s.source
            for s in effective_settings(click.get_current_context())
            if s.key.startswith("executor.")
        }
        chosen = ExecutorSettings.from_values(
            {k: v for k, v in values.items() if v is not None},
            command_line={k for k, source in found.items() if source == settings.COMMAND_LINE},
            origins={source for source in found.values() if source not in (settings.COMMAND_LINE, settings.DEFAULT)},
        )
        with using(make_executor(chosen)) as executor:
            return f(*args, executor=executor, **kwargs)

    for opt in reversed(_EXECUTOR_OPTIONS):
        with_executor = opt(with_executor)
    return with_executor


def emit_records(records: list[dict], out: Path | None, as_json: bool) -> None:
    """Write records to ``out`` (JSON lines, atomically) and/or print them, one JSON object per line."""
    if out is not None:
        from asectl.stages.common import write_jsonl

        write_jsonl(out, records)
        ui.info(f"wrote {len(records)} records to {out}")
    if as_json:
        for r in records:
            click.echo(json.dumps(r, default=str))


def finish(result, cache, what: str = "images") -> None:
    """Common end of a per-image stage command: summary line, exit 1 if any image failed."""
    n_err = len(result.errors)
    line = f"{result.stage}: {len(result.records)} {what}, {cache.summary(result.stage)}"
    if n_err:
        ui.console.print(line + f", [red]{n_err} failed[/]", highlight=False)
    else:
        ui.info(line)
    print_errors(result.errors)
    if n_err:
        sys.exit(1)


MAX_ERRORS_SHOWN = 20


def print_errors(errors: list[dict], indent: str = "  ") -> None:
    """One line per error record (the first ``MAX_ERRORS_SHOWN``; the rest are in the records). Messages
    are escaped: a file name such as ``card[1].png`` is not rich markup."""
    for r in errors[:MAX_ERRORS_SHOWN]:
        ui.console.print(f"{indent}[red]error:[/] {escape(r['error'])}", highlight=False, soft_wrap=True)
    if len(errors) > MAX_ERRORS_SHOWN:
        ui.console.print(f"{indent}... and {len(errors) - MAX_ERRORS_SHOWN} more (see --out / --json records)")
