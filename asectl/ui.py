"""Terminal output shared by the CLI and the library.

On a terminal: rich output, progress bars. In a pipe or a log file (shell scripts chaining commands):
no progress bars (they would leave blank lines), and no wrapping at 80 columns. ``-q``: only warnings
and errors. Commands print informational lines with :func:`info`, problems with ``console.print``."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
QUIET = False
# Wide enough that no line of a table or message wraps when nobody reads it on a screen.
_UNWRAPPED_WIDTH = 10_000


def configure(quiet: bool = False) -> None:
    """Set up the console for where stderr goes (called once per CLI invocation)."""
    global console, QUIET
    QUIET = quiet
    if sys.stderr.isatty():
        console = Console(stderr=True)
    else:
        console = Console(stderr=True, width=_UNWRAPPED_WIDTH, soft_wrap=True)


def info(*objects: Any, **kwargs: Any) -> None:
    """An informational line: shown unless ``-q``."""
    if not QUIET:
        kwargs.setdefault("highlight", False)
        console.print(*objects, **kwargs)


@contextlib.contextmanager
def progress(total: int, description: str) -> Iterator[Callable[..., None]]:
    """Yields ``advance(n=1, **fields)``; ``fields`` may carry a status text (e.g. tokens/s). A bar only
    on a terminal and without ``-q``."""
    if QUIET or total <= 0 or not console.is_terminal:
        yield lambda n=1, **_: None
        return
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            bar.update(task, advance=n, **({"status": status} if status is not None else {}))

        yield advance
