"""The ``asectl`` command: a thin click layer. Each command parses options, calls one library function,
and prints a rich summary (or JSON). Heavy libraries are imported inside commands so ``--help`` is fast."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from asectl import __version__, ui
from asectl.errors import AsectlError


class _Group(click.Group):
    """Turns AsectlError into one line on stderr and its exit code; --debug shows the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AsectlError as exc:
            if ctx.meta.get("asectl.debug"):
                raise
            from rich.markup import escape  # a message may hold brackets: pip extras, paths

            ui.console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            ui.console.print("[red]interrupted[/]; finished results are cached, rerun to resume")
            ctx.exit(130)
        except MemoryError:
            if ctx.meta.get("asectl.debug"):
                raise
            ui.console.print("[bold red]error:[/] out of memory; lower --batch-size or use fewer images")
            ctx.exit(2)


class _Logging(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        style = "yellow" if record.levelno >= logging.WARNING else "dim"
        ui.console.print(f"[{style}]{record.levelname.lower()}:[/] {record.getMessage()}", highlight=False,
                         soft_wrap=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="asectl")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="ASECTL_CACHE_DIR",
              help="Artifact cache folder (default: the user cache dir; env ASECTL_CACHE_DIR).")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-q", "--quiet", is_flag=True, help="Print only warnings and errors (no progress bars).")
@click.pass_context
def cli(ctx: click.Context, cache_dir: Path | None, debug: bool, quiet: bool) -> None:
    """Defect classification of AOI drill-position cards (OCR + VLM + LLM + PFA + CMAF), offline."""
    from asectl.cache import Cache

    ctx.meta["asectl.debug"] = debug
    ui.configure(quiet=quiet)
    log = logging.getLogger("asectl")
    if not any(isinstance(h, _Logging) for h in log.handlers):
        log.addHandler(_Logging())
    log.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    ctx.obj = Cache(cache_dir)


# --- synth -------------------------------------------------------------------------------------------
@cli.command()
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the dataset into.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--counts", default=None, help="Cards per class normal,type1..type4 (default 225,92,44,50,44).")
@click.option("--test-size", default=None, type=int, help="Test cards (default 130 of 455, same share).")
@click.option("--difficulty", type=click.Choice(["field", "clean"]), default="field", show_default=True,
              help="field: severities, label disagreement, acquisition variation (docs/dataset.md); "
                   "clean: ideal cards.")
@click.option("--augment", "augment_src", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Instead of generating: apply TDA to this dataset's training split.")
@click.option("--factor", default=2.0, show_default=True, type=float, help="TDA: training split grows x factor.")
@click.option("--stats", "stats_source", type=click.Choice(["ocr", "printed"]), default="ocr", show_default=True,
              help="TDA: per-card stats from the OCR stage, or from truth.jsonl of a generated dataset.")
@click.option("--engine", default=None,
              help="TDA with --stats ocr: OCR engine (default: the one last used on the dataset, else cnocr).")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_obj
def synth(cache, out, seed, counts, test_size, difficulty, augment_src, factor, stats_source, engine, force,
          as_json):
    """Write an ASE-like dataset (cards, labels.csv, truth.jsonl), or augment one with TDA."""
    from asectl.stages.synth import run_augment, run_generate

    if augment_src is None:
        summary = run_generate(out, seed=seed, counts=counts, test_size=test_size, force=force,
                               difficulty=difficulty)
        msg = f"wrote {summary['cards']} cards ({summary['train']} train / {summary['test']} test) to {out}"
    else:
        summary = run_augment(augment_src, out, factor=factor, seed=seed, stats_source=stats_source,
                              engine=engine, cache=cache, force=force)
        summary.pop("fits", None)
        msg = (f"TDA added {summary['added']} training cards: {summary['train']} train / "
               f"{summary['test']} test (test split copied untouched) in {out}")
    click.echo(json.dumps(summary)) if as_json else ui.info(msg)


# --- cache -------------------------------------------------------------------------------------------
@cli.group("cache", cls=_Group)
def cache_group():
    """See and manage the artifact cache."""


@cache_group.command("info")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def cache_info(cache, as_json):
    """Where the cache is and what it holds per stage."""
    info = cache.info()
    if as_json:
        click.echo(json.dumps(info))
        return
    from rich.table import Table

    table = Table(title=f"cache: {info['root']}")
    table.add_column("stage")
    table.add_column("entries", justify="right")
    table.add_column("MB", justify="right")
    for stage, row in info["stages"].items():
        table.add_row(stage, str(row["entries"]), f"{row['bytes'] / 1e6:.1f}")
    ui.console.print(table)


@cache_group.command("clear")
@click.option("--stage", default=None, help="Only this stage's entries.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def cache_clear(cache, stage, yes):
    """Delete cached entries (all, or one stage's)."""
    if not yes and sys.stdin.isatty():
        click.confirm(f"Delete {'all' if stage is None else stage} entries in {cache.root}?", abort=True)
    n = cache.clear(stage)
    ui.info(f"removed {n} entries from {cache.root}")


def _register_stage_commands() -> None:
    """Each module in ``asectl.commands`` adds its subcommands (describe, reason, align, ...)."""
    import importlib
    import pkgutil

    import asectl.commands

    for info in sorted(pkgutil.iter_modules(asectl.commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):   # _shared: helpers, not commands
            importlib.import_module(f"asectl.commands.{info.name}").register(cli)


_register_stage_commands()


def main() -> None:
    cli(prog_name="asectl")


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["cli", "main"]
