"""``asectl describe``: vision-language descriptions of cards."""

from __future__ import annotations

import click

from asectl import ui
from asectl.backends.vlm import MODEL_ENV
from asectl.commands._shared import (
    EXECUTOR_ENV,
    OFFLINE_ENV,
    VLM_ENV,
    emit_records,
    environment,
    finish,
    per_image_options,
)
from asectl.stages.describe import DEFAULT_BATCH_SIZE, DescribeSettings

_DEFAULT = DescribeSettings()


@click.command(epilog=environment(*VLM_ENV, *OFFLINE_ENV, *EXECUTOR_ENV))
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--vlm",
    "vlm_name",
    default=None,
    show_default="instructblip when a model is configured, else builtin",
    help="Backend: instructblip or builtin.",
)
@click.option(
    "--vlm-model",
    "vlm_model",
    default=None,
    help=f"InstructBLIP model folder (or a Hugging Face id already in the local cache); env {MODEL_ENV}.",
)
@click.option("--prompt", default=_DEFAULT.prompt, show_default=True, help="Question asked about each card.")
@click.option(
    "--batch-size",
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images per generate call (lower it after a CUDA out-of-memory error).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cuda", "cpu"]),
    default=_DEFAULT.device,
    show_default=True,
    help="Where the VLM runs (auto: CUDA when available).",
)
@click.option(
    "--max-new-tokens", type=click.IntRange(min=1), default=None, show_default="256", help="Longest answer in tokens."
)
@click.option("--num-beams", type=click.IntRange(min=1), default=None, show_default="5", help="Beam search width.")
@click.option("--load-8bit", is_flag=True, help="Load the weights in 8 bits (CUDA; needs bitsandbytes, accelerate).")
@click.option(
    "--allow-download",
    is_flag=True,
    help="Let a Hugging Face model id be downloaded (without it: local folders and the local cache only).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    show_default="one per core for the built-in describer, else 1",
    help="Processes describing cards, each with its own describer; the records do not depend on it.",
)
@per_image_options
@click.pass_obj
def describe(
    cache,
    inputs,
    vlm_name,
    vlm_model,
    prompt,
    batch_size,
    device,
    max_new_tokens,
    num_beams,
    load_8bit,
    allow_download,
    workers,
    out,
    as_json,
    force,
    strict,
    executor,
):
    """Describe the dot distribution and shape of cards with a vision-language model (a dataset folder,
    image files or globs). The settings are remembered for the later stages on a dataset folder. See
    docs/describe.md."""
    from asectl.domain.dataset import load_inputs
    from asectl.stages.describe import run_describe

    generation = {k: v for k, v in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams)) if v is not None}
    settings = DescribeSettings(
        vlm=vlm_name,
        model=vlm_model,
        prompt=prompt,
        generation=generation or None,
        device=device,
        load_8bit=load_8bit,
        allow_download=allow_download or None,
    )
    result = run_describe(
        load_inputs(inputs),
        settings,
        batch_size=batch_size,
        workers=workers,
        cache=cache,
        force=force,
        strict=strict,
        executor=executor,
    )
    emit_records(result.records, out, as_json)
    if not as_json and out is None and result.ok:
        first = result.ok[0]
        ui.info(f"[dim]{first['image']}:[/] {first['text']}", soft_wrap=True)
    finish(result, cache)


def register(cli: click.Group) -> None:
    cli.add_command(describe)
