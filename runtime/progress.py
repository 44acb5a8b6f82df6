"""Progress bars for long runs: rich on a terminal, silent otherwise (CI logs stay clean)."""

from __future__ import annotations

import sys
from typing import Any


class NoBar:
    """A progress bar that shows nothing."""

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self, n: int = 1) -> None:
        return None


class RichBar:
    """``with RichBar(total, label) as bar: bar.advance()``."""

    def __init__(self, total: int, label: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
        self._total = total
        self._task: Any = None

    def __enter__(self) -> RichBar:
        self._p.__enter__()
        self._task = self._p.add_task("", total=self._total)
        return self

    def __exit__(self, *exc: object) -> None:
        self._p.__exit__(*exc)

    def advance(self, n: int = 1) -> None:
        self._p.advance(self._task, n)


def progress_bar(total: int, label: str, disabled: bool = False) -> NoBar | RichBar:
    """A rich bar when stderr is a terminal and not ``disabled``; otherwise a silent stand-in."""
    if disabled or not sys.stderr.isatty():
        return NoBar()
    try:
        return RichBar(total, label)
    except ImportError:  # pragma: no cover - rich is a core dependency
        return NoBar()
