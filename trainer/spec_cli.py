"""The model spec of a checkpoint that carries none (sc2bench / torchdistill ``{"model": state_dict}``):
one set of CLI options (``--arch/--family/--num-classes/--input-size``) for every command that takes a
model, and one validator shared with campaign YAML (``arch:``, ``family:``, ``num_classes:``,
``input_size:`` of a model entry). Standard library at import; torch only when a spec is built."""

from __future__ import annotations

import argparse
from typing import Any

ARCHS = ("tiny", "resnet50", "resnet101", "regnety_064")
FAMILIES = ("fp", "mshp")
SPEC_KEYS = ("arch", "family", "num_classes", "input_size")
DEFAULT_NUM_CLASSES = 1000
DEFAULT_INPUT_SIZE = 224


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    """``--arch/--family/--num-classes/--input-size``, for checkpoints without an embedded spec."""
    g = p.add_argument_group(
        "sc2bench checkpoints (no embedded spec)",
        "A splitbits checkpoint and a bundle carry their model spec; an sc2bench/torchdistill checkpoint "
        "({'model': state_dict}) needs --arch and --family (and --num-classes/--input-size if not "
        f"{DEFAULT_NUM_CLASSES}/{DEFAULT_INPUT_SIZE}).")
    # SUPPRESS: absent options are absent (not "None" in --help); spec_from_args reads them with getattr
    g.add_argument("--arch", choices=ARCHS, default=argparse.SUPPRESS, help="backbone of the sc2bench student")
    g.add_argument("--family", choices=FAMILIES, default=argparse.SUPPRESS,
                   help="entropy model: fp (factorized prior) or mshp (mean-scale hyperprior)")
    g.add_argument("--num-classes", type=int, default=argparse.SUPPRESS, metavar="N",
                   help=f"classifier outputs (default {DEFAULT_NUM_CLASSES} with --arch)")
    g.add_argument("--input-size", type=int, default=argparse.SUPPRESS, metavar="PX",
                   help=f"square input side (default {DEFAULT_INPUT_SIZE} with --arch)")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def spec_options(arch: Any = None, family: Any = None, num_classes: Any = None, input_size: Any = None,
                 *, cli: bool = False) -> dict[str, Any] | None:
    """Check the options of a spec-less checkpoint; returns the ModelSpec fields, or None when none is
    given. Raises ValueError naming the option (as a flag with ``cli``) on a partial or bad set."""
    n = _flag if cli else str
    if arch is None and family is None:
        extra = [n(k) for k, v in (("num_classes", num_classes), ("input_size", input_size)) if v is not None]
        if extra:
            raise ValueError(f"{'/'.join(extra)} describe an sc2bench checkpoint: give {n('arch')} and "
                             f"{n('family')} too")
        return None
    if arch is None:
        raise ValueError(f"{n('family')} needs {n('arch')} (one of {', '.join(ARCHS)})")
    if family is None:
        raise ValueError(f"{n('arch')} needs {n('family')} (fp or mshp): sc2bench checkpoints are split students")
    if arch not in ARCHS:
        raise ValueError(f"unknown {n('arch')} {arch!r}; choose from {', '.join(ARCHS)}")
    if family not in FAMILIES:
        raise ValueError(f"unknown {n('family')} {family!r}; choose from fp, mshp")
    num_classes = DEFAULT_NUM_CLASSES if num_classes is None else num_classes
    input_size = DEFAULT_INPUT_SIZE if input_size is None else input_size
    for key, v, lo in (("num_classes", num_classes, 2), ("input_size", input_size, 16)):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= 8192:
            raise ValueError(f"{n(key)} must be an integer in {lo}..8192, got {v!r}")
    return {"arch": arch, "family": family, "num_classes": num_classes, "input_size": input_size}


def spec_from_args(args: argparse.Namespace) -> Any:
    """The ``ModelSpec`` of :func:`add_spec_arguments`' options, or None; a bad set is a CliError."""
    from splitbits.runtime.cli import CliError

    try:
        return build_spec(spec_options(*(getattr(args, k, None) for k in SPEC_KEYS), cli=True))
    except ValueError as exc:
        raise CliError(str(exc)) from None


def build_spec(fields: dict[str, Any] | None) -> Any:
    """``ModelSpec(**fields)`` (validated), or None."""
    if fields is None:
        return None
    from splitbits.trainer.models import ModelSpec

    spec = ModelSpec(**fields)
    spec.validate()
    return spec
