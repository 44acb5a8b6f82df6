"""Jetson subcommands: ``report`` (compare bench/send results) and ``device`` (what this machine is)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from splitbits.runtime.cli import CliError, Command, output_file

REPORT_DESCRIPTION = """\
Compare results of `splitbits bench` and `splitbits send` side by side: devices, backends,
precisions and inputs (clean, corruption, adversarial). Writes report.md, report.html and plots
(latency.png: p50 per stage; bytes.png; link.png: transmit time vs link rate) to --out, or prints
the Markdown when --out is not given.

  splitbits report results/*.json --out results/report
"""


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", help="result JSON files or directories of them")
    p.add_argument("--out", help="directory for report.md, report.html and the plots")
    p.add_argument("--format", default="md,html", help="comma-separated: md, html")
    p.add_argument("--no-plots", action="store_true", help="tables only")


def run_report(args: argparse.Namespace) -> int:
    from splitbits.jetson.report import load_results, markdown, write_report

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("md", "html")]
    if bad:
        raise CliError(f"unknown report formats {bad}; use md and/or html")
    if not args.out:
        results = load_results(args.results)
        if not results:
            raise CliError("no splitbits bench/send results found in " + " ".join(args.results))
        print(markdown(results), end="")
        return 0
    try:
        res = write_report(args.results, args.out, formats, with_plots=not args.no_plots)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    print(f"{res['results']} results → " + ", ".join(res["files"]))
    return 0


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=output_file, metavar="FILE", help="also write it to FILE")


def run_device(args: argparse.Namespace) -> int:
    from splitbits.jetson.device import device_info

    info = device_info()
    text = json.dumps(info, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


COMMANDS = {
    "report": Command("compare bench/send results: Markdown/HTML tables and plots",
                      add_report_arguments, run_report, description=REPORT_DESCRIPTION),
    "device": Command("what this machine is: Jetson board, JetPack/L4T, CUDA, TensorRT, power mode, clocks",
                      add_device_arguments, run_device),
}
