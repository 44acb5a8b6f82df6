"""The ``splitbits`` command line.

Each subpackage owns a ``cli`` module with a ``COMMANDS`` mapping
``name -> Command(help, add_arguments, run)``. Those modules import only the standard library at
module level, so ``splitbits --help`` works on a device that has the runtime extra only; a command
imports its heavy dependencies when it runs and says which extra is missing if one is.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

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


def add_input_arguments(group: argparse._ArgumentGroup | argparse.ArgumentParser, limit_help: str = "number of images"
                        ) -> None:
    """The ``--dataset/--split/--limit/--attack/--inputs/--seed`` options that
    ``splitbits.runtime.inputs.inputs_from_args`` reads (here, stdlib-only, for parser building)."""
    group.add_argument("--dataset", default="builtin", help="builtin, imagefolder:PATH, imagenet-c:PATH?...")
    group.add_argument("--split", default="val", help="dataset split")
    group.add_argument("--limit", type=int, default=64, help=limit_help)
    group.add_argument("--attack", metavar="corruption:NAME:SEVERITY", help="corrupt the inputs first (numpy)")
    group.add_argument("--inputs", metavar="FILE.npz",
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        rc = args._run(args)
    except (CliError, SplitbitsError) as exc:
        print(f"splitbits {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
