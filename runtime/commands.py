"""Runtime subcommands: ``warmup``, ``verify``, ``encode``/``decode`` of single images."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from splitbits.runtime.cli import Command, backend_name, coder_name, output_file


def add_warmup_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", nargs="?", help="also load and run this bundle once")
    p.add_argument("--backend", type=backend_name, default="auto", help="auto, onnxruntime, tensorrt")
    p.add_argument("--coder", type=coder_name, default=None, help="coder to warm (default: all available)")


def run_warmup(args: argparse.Namespace) -> int:
    from splitbits.runtime.codec import CODERS, get_coder

    report = {}
    for name in [args.coder] if args.coder else list(CODERS):
        t = time.perf_counter()
        try:
            get_coder(name).warmup()
        except ImportError as exc:
            report[name] = f"unavailable: {exc}"
            continue
        report[name] = f"{(time.perf_counter() - t) * 1e3:.0f} ms"
        cache_info = getattr(get_coder(name), "cache_info", None)
        if cache_info is not None:  # the numba coder: JIT cache on disk (misses = compiled now)
            report[f"{name}_jit_cache"] = cache_info()
    if args.bundle:
        from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder

        t = time.perf_counter()
        enc = EdgeEncoder(args.bundle, args.backend, coder=args.coder)
        dec = ServerDecoder(args.bundle, args.backend)
        enc.warmup()
        dec.decode(enc.encode(__import__("numpy").zeros(enc.bundle.input_shape, "float32")))
        report["bundle"] = f"{(time.perf_counter() - t) * 1e3:.0f} ms"
    print(json.dumps(report, indent=2))
    return 0


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--backend", type=backend_name, default="onnxruntime",
                   help="backend to verify against golden/")
    p.add_argument("--coder", type=coder_name, default=None, help="coder for the end-to-end check")
    p.add_argument("--json", type=output_file, metavar="FILE", help="write the report as JSON")


def run_verify(args: argparse.Namespace) -> int:
    from splitbits.runtime.verify import verify_backend

    rep = verify_backend(args.bundle, args.backend, coder=args.coder)
    text = json.dumps(rep.to_dict(), indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0 if rep.ok else 1


COMMANDS = {
    "warmup": Command("compile/load the coders (and optionally a bundle) so the first packet is not late",
                      add_warmup_arguments, run_warmup),
    "verify": Command("check a backend against a bundle's golden/ reference (hashes, tensors, exact symbols)",
                      add_verify_arguments, run_verify),
}
