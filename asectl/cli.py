"""The ``asectl`` command: a thin click layer. Each command parses options, calls one library function,
and prints a rich summary (or JSON). Heavy libraries are imported inside commands so ``--help`` is fast."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from asectl import __version__, ui
from asectl.errors import AsectlError

# ``asectl --help`` lists the commands in the order a user runs them.
PIPELINE_ORDER = (
    "synth",
    "ocr",
    "describe",
    "reason",
    "align",
    "fuse-train",
    "calibrate",
    "predict",
    "report",
    "export",
    "models",
    "cache",
    "config",
)


class _Group(click.Group):
    """Turns AsectlError into one line on stderr and its exit code; --debug shows the traceback. Lists
    its commands in pipeline order."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(
            super().list_commands(ctx),
            key=lambda n: (PIPELINE_ORDER.index(n) if n in PIPELINE_ORDER else len(PIPELINE_ORDER), n),
        )

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
        ui.console.print(
            f"[{style}]{record.levelname.lower()}:[/] {record.getMessage()}", highlight=False, soft_wrap=True
        )


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="asectl")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="ASECTL_CACHE_DIR",
    show_envvar=True,
    show_default="the user cache folder",
    help="Artifact cache folder.",
)
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


def _register_stage_commands() -> None:
    """Each module in ``asectl.commands`` adds its subcommands (describe, reason, align, ...)."""
    import importlib
    import pkgutil

    import asectl.commands
    from asectl.commands.config import config_option, leaf_commands

    for info in sorted(pkgutil.iter_modules(asectl.commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):  # _shared: helpers, not commands
            importlib.import_module(f"asectl.commands.{info.name}").register(cli)
    for command in leaf_commands(cli).values():  # every command reads the settings layer (docs/config.md)
        config_option(command)


_register_stage_commands()


def main() -> None:
    cli(prog_name="asectl")


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["cli", "main"]
