"""Entropy coders. ``get_coder(name_or_id)`` returns a shared instance; ``CODERS`` lists them."""

from __future__ import annotations

import importlib

from splitbits.runtime.codec.base import EntropyCoder, Part, StreamDecoder
from splitbits.runtime.codec.tables import CdfTables

# name -> (wire id, "module:Class")
CODERS: dict[str, tuple[int, str]] = {
    "constriction": (1, "splitbits.runtime.codec.constriction_coder:ConstrictionCoder"),
    "numba": (2, "splitbits.runtime.codec.numba_coder:NumbaCoder"),
}
DEFAULT_CODER = "numba"

_instances: dict[str, EntropyCoder] = {}


def coder_name(coder_id: int) -> str:
    for name, (cid, _) in CODERS.items():
        if cid == coder_id:
            return name
    raise KeyError(coder_id)


def get_coder(name: str | int | None = None) -> EntropyCoder:
    """A coder by name (``numba``, ``constriction``), wire id, or ``None`` for the default."""
    if name is None:
        name = DEFAULT_CODER
    if isinstance(name, int):
        name = coder_name(name)
    if name not in CODERS:
        raise ValueError(f"unknown coder {name!r}; available: {', '.join(CODERS)}")
    if name not in _instances:
        modname, clsname = CODERS[name][1].split(":")
        _instances[name] = getattr(importlib.import_module(modname), clsname)()
    return _instances[name]


__all__ = ["CODERS", "DEFAULT_CODER", "CdfTables", "EntropyCoder", "Part", "StreamDecoder", "coder_name", "get_coder"]
