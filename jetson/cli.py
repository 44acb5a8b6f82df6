"""Jetson subcommands: ``report`` (compare bench/send results) and ``device`` (what this machine is)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from splitbits.runtime.cli import CliError, Command, existing_path, output_file

REPORT_DESCRIPTION = """\
Compare results of `splitbits bench` and `splitbits send` side by side: devices, backends,
precisions and inputs (clean, corruption, adversarial). Writes report.md, report.html and plots
(latency.png: p50 per stage; bytes.png; link.png: transmit time vs link rate) to --out, or prints
the Markdown when --out is not given.

  splitbits report results/*.json --out results/report
"""


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", type=existing_path, help="result JSON files or directories of them")
    p.add_argument("--out", help="directory for report.md, report.html and the plots")
    p.add_argument("--format", default="md,html", help="comma-separated: md, html")
    p.add_argument("--no-plots", action="store_true", help="tables only")


_OBJECTS = ("device", "backend", "inputs", "bundle", "link", "latency_ms", "throughput", "power", "accuracy")


def check_result(r: dict[str, Any]) -> None:
    """The keys the report reads, with their types: a result file is input like any other, so a
    malformed one is a :class:`CliError` naming the file and the key, not a crash in a table."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CliError(f"{r.get('_file', '?')}: not a valid bench/send result: {what}")

    def number(v: Any) -> bool:
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))

    for key in _OBJECTS:
        need(isinstance(r.get(key) or {}, dict), f"{key} must be an object")
    lat = r.get("latency_ms") or {}
    need(all(isinstance(v, dict) and all(map(number, v.values())) for v in lat.values()),
         "latency_ms must map stages to {p50, p99, ...} numbers")
    for key in ("throughput", "accuracy"):
        need(all(map(number, (r.get(key) or {}).values())), f"{key} values must be numbers")
    power = r.get("power") or {}
    need(number(power.get("mean_power_w")) and number(power.get("energy_per_image_mj"))
         and isinstance(power.get("power_mode") or {}, dict), "power must hold numbers and a power_mode object")
    model_ms = (r.get("link") or {}).get("model_ms", {})
    need(isinstance(model_ms, dict) and all(map(number, model_ms.values())), "link.model_ms must map rates to ms")
    if "bytes" in r:
        b = r["bytes"]
        mean = b.get("packet", {}).get("mean") if isinstance(b, dict) and isinstance(b.get("packet"), dict) else None
        need(mean is not None and number(mean), "bytes.packet.mean must be a number")


def run_report(args: argparse.Namespace) -> int:
    from splitbits.jetson.report import load_results, markdown, write_report

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("md", "html")]
    if bad:
        raise CliError(f"unknown report formats {bad}; use md and/or html")
    results = load_results(args.results)
    if not results:
        raise CliError("no splitbits bench/send results found in " + " ".join(args.results))
    for r in results:
        check_result(r)
    if not args.out:
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
