"""Progress bars for long runs: rich on a terminal, silent otherwise (CI logs stay clean).

The one helper of the project::

    with Bars(enabled) as bars:                      # several bars (epochs, campaign units, ...)
        task = bars.add("stage 1 1/8", total=steps)
        bars.advance(task, info="loss 0.31")       # one step, with a live note beside the bar
        bars.remove(task)

    with progress_bar(total, "send", disabled=...) as bar:   # one bar
        bar.advance()
"""

from __future__ import annotations

import sys
from typing import Any


class Bars:
    """Any number of progress bars on stderr; a no-op when disabled or stderr is not a terminal."""

    def __init__(self, enabled: bool = True, unit: str = "") -> None:
        self._p: Any = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(),
                               TextColumn("{task.fields[info]}"), console=Console(stderr=True), transient=True)

    def __enter__(self) -> Bars:
        if self._p is not None:
            self._p.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)

    def add(self, description: str, total: int) -> Any:
        """A new bar; returns its handle (None when silent)."""
        return None if self._p is None else self._p.add_task(description, total=total, info="")

    def advance(self, task: Any, n: int = 1, info: str | None = None) -> None:
        if self._p is not None and task is not None:
            self._p.update(task, advance=n, **({} if info is None else {"info": info}))

    def remove(self, task: Any) -> None:
        if self._p is not None and task is not None:
            self._p.remove_task(task)


class _OneBar:
    """One bar of a :class:`Bars`: ``with progress_bar(total, label) as bar: bar.advance()``."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self._bars = Bars(enabled)
        self._total, self._label, self._task = total, label, None

    def __enter__(self) -> _OneBar:
        self._bars.__enter__()
        self._task = self._bars.add(self._label, self._total)
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.__exit__(*exc)

    def advance(self, n: int = 1) -> None:
        self._bars.advance(self._task, n)


def progress_bar(total: int, label: str, disabled: bool = False) -> _OneBar:
    """A single bar (rich on a terminal unless ``disabled``; silent otherwise)."""
    return _OneBar(total, label, not disabled)
