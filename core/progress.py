"""Progress bars on stderr (rich), quiet when stderr is not a terminal or when asked."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


def enabled() -> bool:
    return sys.stderr.isatty() and os.environ.get("KILN_NO_PROGRESS", "") in ("", "0")


@contextmanager
def progress_bar(description: str, total: int, show: bool | None = None):
    """Yield ``advance(n=1, note="")``; draws a bar only when ``show`` (default: a terminal)."""
    if not (enabled() if show is None else show):
        yield lambda n=1, note="": None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total, note="")

        def advance(n: int = 1, note: str = ""):
            bar.update(task, advance=n, note=note)

        yield advance
