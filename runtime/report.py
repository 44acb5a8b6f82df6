"""Small report helpers shared by the demo, the benchmark runner and the attack harness:
percentile summaries, Markdown tables and matplotlib figures written headless."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def summary(values: Iterable[float], pcts: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    """mean and percentiles (``p50`` ...) of a sample; empty → NaNs."""
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "mean": math.nan, **{f"p{p}": math.nan for p in pcts}}
    out = {"n": int(a.size), "mean": float(a.mean())}
    out.update({f"p{p}": float(np.percentile(a, p)) for p in pcts})
    return out


def fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path, obj: Any, *, atomic: bool = False) -> Path:
    """``obj`` as indented JSON at ``path`` (numpy scalars and arrays, paths converted; parent folders
    created). ``atomic``: written beside it and renamed over it, so no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _dumps(obj)
    if not atomic:
        path.write_text(text)
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def print_json(obj: Any) -> None:
    """``obj`` as the same JSON :func:`write_json` writes, on standard output (a command without ``--json``)."""
    sys.stdout.write(_dumps(obj))
    sys.stdout.flush()


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default) + "\n"


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def rich_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print a table with rich (falls back to Markdown text)."""
    rows = [list(r) for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(title)
        print(md_table(headers, rows))
        return
    t = Table(title=title)
    for h in headers:
        t.add_column(h, justify="right" if h != headers[0] else "left")
    for r in rows:
        t.add_row(*(fmt(c) for c in r))
    Console().print(t)
