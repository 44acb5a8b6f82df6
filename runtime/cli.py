"""The ``splitbits`` command line: the hub, and the options several commands share.

Every package registers its subcommands in its own ``commands.py``: a ``COMMANDS`` mapping
``name -> Command(help, add_arguments, run)``, each name also declared as an entry point of the
group ``splitbits.commands`` in pyproject.toml (so the hub names no package: a lower layer never
imports a higher one). A dotted name is a target of a group: ``bench.codec`` is ``splitbits bench
codec``; ``bench BUNDLE`` is the group's default target (``bench.bundle``). ``commands.py`` modules
import only the standard library and ``splitbits.runtime.cli`` at module level, so ``splitbits
--help`` works on a device that has the runtime extra only; a command imports its heavy
dependencies when it runs (``with needs_extra("train"): ...`` names the missing extra). A command
whose module fails to import is listed as unavailable with the reason, never hidden.

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
import contextlib
import importlib
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitbits.runtime.errors import SplitbitsError

#: entry-point group of the subcommands (see pyproject.toml)
ENTRY_POINT_GROUP = "splitbits.commands"
#: entry-point group of the implementations a higher layer gives a lower layer's option (``serve
#: --ray`` is ``splitbits.cluster``'s): ``name -> module:function`` (see :func:`extension`)
EXTENSION_GROUP = "splitbits.extensions"
#: --help lists the packages' commands in this order (then any other package's)
PACKAGE_ORDER = ("splitbits.trainer", "splitbits.export", "splitbits.runtime", "splitbits.attacks", "splitbits.jetson",
                 "splitbits.cluster")
#: command groups: name -> (help, default target for a first word that is not a target, whether the
#: group alone (or followed by options) also means its default target)
GROUPS = {
    "bench": ("benchmarks that print JSON: 'bench codec', 'bench attack', or 'bench BUNDLE' (the on-device runner); "
              "'splitbits bench TARGET --help' for each", "bundle", False),
    "device": ("this machine: 'device' (or 'device info') describes it; 'device check' runs the prepared check "
               "of a CUDA machine (training, attacks, coders; one JSON)", "info", True),
}


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` returns the exit status."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str | None = None


#: exit status of a command that refuses a backend failing the bundle's golden verification (bench, serve)
EXIT_REFUSED = 3


class CliError(Exception):
    """An error the CLI reports as one line (exit code 2) instead of a traceback."""


@contextlib.contextmanager
def needs_extra(extra: str) -> Iterator[None]:
    """``with needs_extra("train"): import torch ...``: an ImportError inside becomes one line naming
    the extra to install."""
    try:
        yield
    except ImportError as exc:
        raise CliError(f"this command needs the '{extra}' extra ({exc.name or exc} is not installed): "
                       f"pip install 'splitbits[{extra}]'") from exc


def extension(name: str, extra: str) -> Callable[..., Any]:
    """The function registered as ``name`` in the ``splitbits.extensions`` entry points, loaded now
    (so a command of a lower layer runs a higher layer's code without naming it); a missing
    dependency is a :class:`CliError` naming ``extra``."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=EXTENSION_GROUP) if ep.name == name]
    if not found:
        raise CliError(f"{name} is not part of this installation (reinstall splitbits with the '{extra}' extra)")
    with needs_extra(extra):
        return found[0].load()


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
    """An argparse type: ``auto`` or an inference backend of ``splitbits.runtime.backends``."""
    from splitbits.runtime.backends import BACKENDS

    if text == "torch":
        raise argparse.ArgumentTypeError("the torch backend is the export's in-process reference (it needs the model "
                                         "object); use onnxruntime, onnxruntime-cuda, onnxruntime-trt or tensorrt")
    if text != "auto" and text not in BACKENDS:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; choose from {', '.join(['auto', *BACKENDS])}")
    return text


def add_backend_arguments(group: argparse._ArgumentGroup | argparse.ArgumentParser, default: str = "auto") -> None:
    """``--backend/--precision/--cuda-graph/--threads``; :func:`backend_options` checks and reads them."""
    group.add_argument("--backend", type=backend_name, default=default,
                       help="auto (TensorRT where the bundle has engines for this device, else ONNX Runtime CPU), "
                            "onnxruntime, onnxruntime-cuda, onnxruntime-trt, tensorrt")
    group.add_argument("--precision", choices=["fp32", "fp16", "int8"], help="TensorRT engines to run (tensorrt, auto)")
    group.add_argument("--cuda-graph", action="store_true", help="TensorRT: replay CUDA graphs (tensorrt, auto)")
    group.add_argument("--threads", type=nonneg_int, default=0,
                       help="ONNX Runtime intra-op threads, 0: its default (onnxruntime*, auto)")


def backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """The backend options of :func:`add_backend_arguments` for ``get_backend(args.backend, **options)``;
    an option the chosen backend cannot take is a :class:`CliError` (``auto`` takes all of them)."""
    opts: dict[str, Any] = {}
    if args.precision or args.cuda_graph:
        if args.backend not in ("tensorrt", "auto"):
            raise CliError("--precision and --cuda-graph apply to the tensorrt backend (or auto)")
        opts.update({"precision": args.precision} if args.precision else {})
        opts.update({"cuda_graph": True} if args.cuda_graph else {})
    if args.threads:
        if args.backend == "tensorrt":
            raise CliError("--threads applies to the onnxruntime backends (or auto)")
        opts["threads"] = args.threads
    return opts


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


@dataclass(frozen=True)
class _Entry:
    name: str  # dotted: "bench.codec"
    module: str
    command: Command | None  # None: its module failed to import
    reason: str = ""


def discover_commands() -> list[_Entry]:
    """Every registered subcommand, in --help order; those whose module fails to import carry the reason."""
    from importlib.metadata import entry_points

    eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    modules: dict[str, Any] = {}
    out = []
    for ep in eps:
        if ep.module not in modules:
            try:
                modules[ep.module] = importlib.import_module(ep.module)
            except Exception as exc:
                modules[ep.module] = f"{type(exc).__name__}: {one_line(exc)}"
        mod = modules[ep.module]
        if isinstance(mod, str):
            out.append(_Entry(ep.name, ep.module, None, mod))
            continue
        cmd = getattr(mod, "COMMANDS", {}).get(ep.name)
        out.append(_Entry(ep.name, ep.module, cmd, "" if cmd else f"{ep.module} has no COMMANDS[{ep.name!r}]"))

    def position(e: _Entry) -> int:  # the order of the module's COMMANDS table
        names = list(getattr(modules[e.module], "COMMANDS", {})) if not isinstance(modules[e.module], str) else []
        return names.index(e.name) if e.name in names else len(names)

    return sorted(out, key=lambda e: (_package_rank(e.module), position(e)))


def _package_rank(module: str) -> int:
    return next((i for i, p in enumerate(PACKAGE_ORDER) if module.startswith(p + ".")), len(PACKAGE_ORDER))


def _unavailable(name: str, reason: str) -> Command:
    def run(args: argparse.Namespace) -> int:
        raise CliError(f"'{name}' is unavailable in this installation: {reason}")

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    return Command(f"(unavailable: {reason})", add, run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitbits",
        description="Entropy-coded split DNNs on edge hardware: train, export, deploy and stress-test.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for entry in discover_commands():
        path = entry.name.split(".")
        cmd = entry.command or _unavailable(" ".join(path), entry.reason)
        where = sub
        if len(path) == 2:
            if path[0] not in groups:
                ghelp = GROUPS.get(path[0], (f"{path[0]} commands", None, False))[0]
                gp = sub.add_parser(path[0], help=ghelp, description=ghelp)
                groups[path[0]] = gp.add_subparsers(dest="target", metavar="TARGET")
            where = groups[path[0]]
        p = where.add_parser(path[-1], help=cmd.help, description=cmd.description or cmd.help,
                             formatter_class=_HelpFormatter,
                             prog=f"splitbits {' '.join(path)}")
        cmd.add_arguments(p)
        default_target = len(path) == 2 and GROUPS.get(path[0], ("", None, False))[1] == path[1]
        p.set_defaults(_run=cmd.run, _name=path[0] if default_target else " ".join(path))
    return parser


def _with_default_targets(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``bench BUNDLE ...`` → ``bench bundle BUNDLE ...``, ``device`` → ``device info``: a group's first
    word that is not one of its targets goes to the group's default target (so does nothing, or an
    option, after a group marked for it)."""
    words = [i for i, a in enumerate(argv) if not a.startswith("-")]
    if not words or argv[words[0]] not in GROUPS:
        return argv
    nxt = words[0] + 1
    _, default, when_empty = GROUPS[argv[words[0]]]
    if nxt >= len(argv) or (argv[nxt].startswith("-") and argv[nxt] not in ("-h", "--help")):
        return [*argv[:nxt], default, *argv[nxt:]] if when_empty else argv
    if argv[nxt].startswith("-") or argv[nxt] in _targets(parser, argv[words[0]]):
        return argv
    return [*argv[:nxt], default, *argv[nxt:]]


def _group_parser(parser: argparse.ArgumentParser, group: str | None) -> argparse.ArgumentParser | None:
    for action in parser._subparsers._group_actions if parser._subparsers and group else []:  # type: ignore[attr-defined]
        if group in action.choices:
            return action.choices[group]
    return None


def _targets(parser: argparse.ArgumentParser, group: str) -> set[str]:
    gp = _group_parser(parser, group)
    if gp is None or gp._subparsers is None:
        return set()
    return {t for a in gp._subparsers._group_actions for t in a.choices}


def _exit_status(exc: SystemExit) -> int:
    """An argparse usage error (exit 2) as main's return value; ``--help`` (exit 0) stays an exit."""
    if exc.code in (0, None):
        raise exc
    return exc.code if isinstance(exc.code, int) else 2


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; bad input is one line on stderr and exit status 2 (see the module doc)."""
    parser = build_parser()
    argv = _with_default_targets(list(sys.argv[1:] if argv is None else argv), parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return _exit_status(exc)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "_run", None):  # no command, or a group without its target: its help
        (_group_parser(parser, args.command) or parser).print_help()
        return 2
    args.command = args._name
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
