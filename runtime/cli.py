"""The ``splitbits`` command line.

Each subpackage owns a ``cli`` module with a ``COMMANDS`` mapping
``name -> Command(help, add_arguments, run)``. Those modules import only the standard library at
module level, so ``splitbits --help`` works on a device that has the runtime extra only; a command
imports its heavy dependencies when it runs and says which extra is missing if one is.

Errors: bad input is the user's to fix and gets one line and exit status 2, never a traceback:
argparse's usage error for a value that is wrong at parse time (the ``type=`` validators below:
ranges, ports, coders, paths), ``splitbits CMD: error: ...`` for a :class:`CliError`, any
:class:`~splitbits.runtime.errors.SplitbitsError` (raised where the problem is found: ``BundleError``,
``DatasetError``, ``InputError``, ...) and any ``OSError`` (a path, a socket, memory). Any other
exception is a bug: one ``internal error`` line and exit status 1; ``splitbits -v CMD`` prints the
traceback. ``main`` returns the status (argparse errors included); only ``--help`` raises SystemExit.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from splitbits.runtime.errors import SplitbitsError

# Modules that contribute subcommands, in the order they are listed in --help.
COMMAND_MODULES = (
    "splitbits.trainer.cli",
    "splitbits.export.cli",
    "splitbits.runtime.commands",
    "splitbits.runtime.link_cli",
    "splitbits.runtime.bench_cli",
    "splitbits.attacks.cli",
    "splitbits.jetson.cli",
)


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str | None = None


class CliError(Exception):
    """An error the CLI reports as one line (exit code 2) instead of a traceback."""


def missing_extra(exc: ImportError, extra: str) -> CliError:
    return CliError(
        f"this command needs the '{extra}' extra ({exc.name or exc} is not installed): "
        f"pip install 'splitbits[{extra}]'"
    )


# ------------------------------------------------------------------------------------------
# argparse ``type=`` validators: a bad value is argparse's own usage error (exit 2) at parse time
# ------------------------------------------------------------------------------------------


def _bounds_text(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in ({lo}, {hi}]" if lo_open else f"in {lo}..{hi}"
    if lo is not None:
        return f"greater than {lo}" if lo_open else f"at least {lo}"
    return f"at most {hi}"


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi]`` (either bound optional)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_bounds_text(lo, hi)}, got {value}")
        return value

    return parse


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False
                ) -> Callable[[str], float]:
    """An argparse type: a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if (not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo))
                or (hi is not None and value > hi)):
            raise argparse.ArgumentTypeError(f"must be {_bounds_text(lo, hi, lo_open)}, got {text}")
        return value

    return parse


positive_int = int_range(1)
nonneg_int = int_range(0)
port_number = int_range(0, 65535)
positive_float = float_range(0, lo_open=True)
nonneg_float = float_range(0)


def coder_name(text: str) -> str:
    """An argparse type: the name of an entropy coder of ``splitbits.runtime.codec``."""
    from splitbits.runtime.codec import CODERS  # numpy; imported only when the option is given

    if text not in CODERS:
        raise argparse.ArgumentTypeError(f"unknown coder {text!r}; choose from {', '.join(CODERS)}")
    return text


def backend_name(text: str) -> str:
    """An argparse type: ``auto`` or an inference backend of ``splitbits.runtime.backends`` that a
    command can build from a bundle (not ``torch``: the export's reference needs the model object)."""
    from splitbits.runtime.backends import BACKENDS

    if text == "torch":
        raise argparse.ArgumentTypeError("the torch backend is the export's in-process reference (it needs the model "
                                         "object); use onnxruntime, onnxruntime-cuda, onnxruntime-trt or tensorrt")
    if text != "auto" and text not in BACKENDS:
        choices = ", ".join(["auto", *(b for b in BACKENDS if b != "torch")])
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; choose from {choices}")
    return text


def existing_file(text: str) -> str:
    """An argparse type: a path to an existing regular file (or something readable like one)."""
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected a file")
    if not os.access(p, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} is not readable")
    return text


def existing_path(text: str) -> str:
    """An argparse type: a path that exists (a file or a directory)."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {text}")
    return text


def existing_dir(text: str) -> str:
    """An argparse type: a path to an existing directory."""
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"no such directory: {text}")
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    return text


def output_file(text: str) -> str:
    """An argparse type: a file we can create later (missing parent folders are created then);
    refuses a directory and a path under a non-directory, so a long run does not fail at the end."""
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected a file name")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: {parent} is not writable")
    return text


def attack_spec(text: str) -> str:
    """An argparse type: ``corruption:NAME:SEVERITY`` (name checked where the corruptions exist)."""
    from splitbits.runtime.errors import InputError
    from splitbits.runtime.inputs import check_attack

    try:
        check_attack(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--attack {text!r}: ")) from None
    return text


def add_input_arguments(group: argparse._ArgumentGroup | argparse.ArgumentParser, limit_help: str = "number of images"
                        ) -> None:
    """The ``--dataset/--split/--limit/--attack/--inputs/--seed`` options that
    ``splitbits.runtime.inputs.inputs_from_args`` reads (here, stdlib-only, for parser building)."""
    group.add_argument("--dataset", default="builtin", help="builtin, imagefolder:PATH, imagenet-c:PATH?...")
    group.add_argument("--split", default="val", help="dataset split")
    group.add_argument("--limit", type=positive_int, default=64, help=limit_help)
    group.add_argument("--attack", type=attack_spec, metavar="corruption:NAME:SEVERITY",
                       help="corrupt the inputs first (numpy)")
    group.add_argument("--inputs", type=existing_file, metavar="FILE.npz",
                       help="pre-generated (e.g. adversarial) inputs: images uint8 NHWC, labels")
    group.add_argument("--seed", type=int, default=0, help="seed of the corruption")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the line breaks of command descriptions."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitbits",
        description="Entropy-coded split DNNs on edge hardware: train, export, deploy and stress-test.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for modname in COMMAND_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue
            raise
        for name, cmd in getattr(mod, "COMMANDS", {}).items():
            p = sub.add_parser(
                name, help=cmd.help, description=cmd.description or cmd.help,
                formatter_class=_HelpFormatter,
            )
            cmd.add_arguments(p)
            p.set_defaults(_run=cmd.run)
    return parser


def _exit_status(exc: SystemExit) -> int:
    """An argparse usage error (exit 2) as main's return value; ``--help`` (exit 0) stays an exit."""
    if exc.code in (0, None):
        raise exc
    return exc.code if isinstance(exc.code, int) else 2


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; bad input is one line on stderr and exit status 2 (see the module doc)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return _exit_status(exc)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        rc = args._run(args)
    except (CliError, SplitbitsError) as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"splitbits {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # a target's own parser (``bench TARGET ...``)
        return _exit_status(exc)
    except OSError as exc:  # the system refused a path, a socket, memory: the user's to fix, not a bug
        if args.verbose:
            traceback.print_exc()
        print(f"splitbits {args.command}: error: {os_error_text(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: say so in one line, the traceback with -v
        return _internal_error(args, exc)
    return int(rc or 0)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (multi-line messages joined with ' | ')."""
    text = str(exc).strip() or type(exc).__name__
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def os_error_text(exc: OSError) -> str:
    """``PATH: reason`` for a file error, else the error's own text."""
    if exc.filename is None:
        return one_line(exc)
    where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    return f"{where}: {exc.strerror or one_line(exc)}"


def _internal_error(args: argparse.Namespace, exc: BaseException) -> int:
    """An exception nobody converted to a user error: a bug in splitbits, reported as one (exit 1)."""
    if args.verbose:
        traceback.print_exc()
    hint = "" if args.verbose else f" (a bug in splitbits; `splitbits -v {args.command} ...` shows the traceback)"
    print(f"splitbits {args.command}: internal error: {type(exc).__name__}: {one_line(exc)}{hint}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
