"""``asectl describe``: vision-language descriptions of cards."""

from __future__ import annotations


import click

from asectl import ui
from asectl.cli import per_image_options
from asectl.backends.vlm import DEFAULT_PROMPT, MODEL_ENV
from asectl.stages.describe import DEFAULT_BATCH_SIZE


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--vlm", "vlm_name", default=None,
              help="Backend: instructblip or builtin (default: instructblip when a model is configured, "
                   "else builtin).")
@click.option("--vlm-model", "vlm_model", default=None,
              help=f"InstructBLIP model folder (or a Hugging Face id already in the local cache); env {MODEL_ENV}.")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="Question asked about each card.")
@click.option("--batch-size", default=DEFAULT_BATCH_SIZE, show_default=True, type=click.IntRange(min=1),
              help="Images per generate call (lower it after a CUDA out-of-memory error).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Longest answer in tokens (default 256).")
@click.option("--num-beams", type=click.IntRange(min=1), default=None, help="Beam search width (default 5).")
@click.option("--load-8bit", is_flag=True, help="Load the weights in 8 bits (CUDA; needs bitsandbytes, accelerate).")
@click.option("--allow-download", is_flag=True,
              help="Let a Hugging Face model id be downloaded (default: local folders and the local cache only).")
@per_image_options
@click.pass_obj
def describe(cache, inputs, vlm_name, vlm_model, prompt, batch_size, device, max_new_tokens, num_beams,
             load_8bit, allow_download, out, as_json, force, strict):
    """Describe the dot distribution and shape of cards with a vision-language model (a dataset folder,
    image files or globs). See docs/describe.md."""
    from asectl.backends.vlm import make_vlm
    from asectl.cli import emit_records, finish
    from asectl.dataset import load_inputs
    from asectl.stages.describe import remembered_settings, run_describe

    dataset = load_inputs(inputs)
    generation = {k: v for k, v in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams)) if v is not None}
    vlm = make_vlm(vlm_name, vlm_model, device=device, generation=generation or None, load_8bit=load_8bit,
                   allow_download=allow_download or None)
    result = run_describe(dataset, vlm=vlm, prompt=prompt, batch_size=batch_size, cache=cache, force=force,
                          strict=strict)
    if dataset.root is not None:
        from asectl.pipeline import remember

        # Later stages on this dataset (align, fuse-train) reuse these descriptions without the options.
        remember(cache, dataset, "describe", remembered_settings(vlm, prompt, generation, device, load_8bit))
    emit_records(result.records, out, as_json)
    if not as_json and out is None and result.ok:
        first = result.ok[0]
        ui.console.print(f"[dim]{first['image']}:[/] {first['text']}", highlight=False, soft_wrap=True)
    finish(result, cache)


def register(cli: click.Group) -> None:
    cli.add_command(describe)
