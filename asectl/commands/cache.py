"""``asectl cache``: see and manage the artifact cache."""

from __future__ import annotations

import json
import sys

import click

from asectl import ui
from asectl.commands._shared import environment


@click.group("cache")
def cache_group():
    """See and manage the artifact cache."""


@cache_group.command("info", epilog=environment())
@click.option("--json", "as_json", is_flag=True, help="Print the information as JSON on stdout.")
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
    ui.info(table)


@cache_group.command("clear", epilog=environment())
@click.option("--stage", default=None, show_default="every stage", help="Only this stage's entries.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def cache_clear(cache, stage, yes):
    """Delete cached entries (all, or one stage's)."""
    if not yes and sys.stdin.isatty():
        click.confirm(f"Delete {'all' if stage is None else stage} entries in {cache.root}?", abort=True)
    n = cache.clear(stage)
    ui.info(f"removed {n} entries from {cache.root}")


def register(cli: click.Group) -> None:
    cli.add_command(cache_group)
