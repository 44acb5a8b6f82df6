"""runtime.report: one JSON serialiser for files (write_json) and standard output (print_json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from splitbits.runtime.report import print_json, write_json

OBJ = {"n": np.int64(3), "x": np.float32(0.5), "a": np.arange(3), "p": Path("/tmp/x"), "s": "ok"}
PLAIN = {"n": 3, "x": 0.5, "a": [0, 1, 2], "p": "/tmp/x", "s": "ok"}


def test_print_json_writes_what_write_json_writes(tmp_path, capsys):
    """numpy scalars/arrays and paths converted the same way on stdout as in a file (a command's JSON
    is the same with and without --json)."""
    path = write_json(tmp_path / "sub" / "r.json", OBJ)
    print_json(OBJ)
    out = capsys.readouterr().out
    assert out == path.read_text() and json.loads(out) == PLAIN


def test_unserialisable_values_are_refused_on_both_paths(tmp_path):
    for emit in (lambda o: write_json(tmp_path / "r.json", o), print_json):
        with pytest.raises(TypeError, match="not JSON serialisable: object"):
            emit({"bad": object()})
