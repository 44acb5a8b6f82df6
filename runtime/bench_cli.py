"""``splitbits bench``: one command, several targets.

* ``splitbits bench codec ...``  — entropy coders (speed, bytes vs ideal, vs compressai/constriction)
* ``splitbits bench attack ...`` — batched vs per-image attack throughput
* ``splitbits bench BUNDLE ...`` — the on-device runner: per-stage latency, bytes, accuracy, power

Each target module exposes ``build_parser() -> argparse.ArgumentParser`` and ``main(args) -> int``;
``splitbits bench TARGET --help`` shows its options.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from splitbits.runtime.cli import CliError, Command

TARGETS = {
    "codec": "splitbits.export.codec_bench",
    "attack": "splitbits.attacks.bench",
}
BUNDLE_TARGET = "splitbits.jetson.bench"


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="codec | attack | a bundle directory")
    p.add_argument("options", nargs=argparse.REMAINDER, help="options of the target (see TARGET --help)")


def _run(args: argparse.Namespace) -> int:
    if args.target not in TARGETS and not Path(args.target).is_dir():
        what = "no such file or directory" if not Path(args.target).exists() else "not a directory"
        raise CliError(f"{args.target!r} is neither a bench target ({', '.join(TARGETS)}) nor a bundle directory "
                       f"({what})")
    modname = TARGETS.get(args.target, BUNDLE_TARGET)
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name == modname:
            raise CliError(f"bench target {args.target!r} is not available in this installation") from exc
        raise CliError(f"bench {args.target} needs a missing package: {exc.name}") from exc
    parser = mod.build_parser()
    argv = list(args.options) if args.target in TARGETS else [args.target, *args.options]
    return int(mod.main(parser.parse_args(argv)) or 0)


COMMANDS = {
    "bench": Command(
        "benchmarks that print JSON: 'bench codec', 'bench attack', or 'bench BUNDLE' (on-device runner)",
        _add, _run, description=__doc__,
    ),
}
