"""What every command prints with: the two consoles (results to stdout, everything else to stderr), escaping
of user text, number formats, and a progress bar that appears only once work takes more than a second."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape as esc  # user text (paths, class names) must never be read as markup
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

out = Console(soft_wrap=True)  # results
err = Console(stderr=True, soft_wrap=True)  # progress, logs, errors

__all__ = ["LazyProgress", "err", "esc", "out", "pct", "warn"]


def pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def warn(text: str) -> None:
    """A yellow warning line on stderr (text already escaped)."""
    err.print(f"[yellow]warning:[/] {text}", highlight=False)


class LazyProgress:
    """A progress bar on stderr that shows only after `after` seconds of work (quick commands stay quiet),
    never when quiet. Use: with LazyProgress("predicting") as bar: bar.start(total); bar.advance(n)."""

    def __init__(self, what: str, quiet: bool = False, after: float = 1.0):
        self.what, self.quiet, self.after = what, quiet, after
        self.total, self.done, self.t0 = None, 0, time.monotonic()
        self.progress: Progress | None = None
        self.task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def start(self, total: int | None) -> None:
        self.total, self.t0 = total, time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.progress is None and not self.quiet and time.monotonic() - self.t0 >= self.after:
            self.progress = Progress(TextColumn(self.what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                     TimeRemainingColumn(), console=err, transient=True)
            self.task = self.progress.add_task(self.what, total=self.total)
            self.progress.start()
        if self.progress is not None:
            self.progress.update(self.task, completed=self.done)
