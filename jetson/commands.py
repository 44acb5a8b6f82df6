"""Jetson subcommands: ``report`` (compare bench/send results) and ``device`` (what this machine is)."""

from __future__ import annotations

import argparse
import json
import sys

from splitbits.runtime.cli import (
    EXIT_REFUSED,
    CliError,
    Command,
    add_backend_arguments,
    add_input_arguments,
    backend_options,
    coder_name,
    existing_path,
    nonneg_float,
    nonneg_int,
    output_file,
    positive_float,
    positive_int,
)

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


def run_report(args: argparse.Namespace) -> int:
    from splitbits.jetson.report import load_results, markdown, write_report

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("md", "html")]
    if bad:
        raise CliError(f"unknown report formats {bad}; use md and/or html")
    results = load_results(args.results)  # each checked: a malformed one is a ResultError naming file and key
    if not results:
        raise CliError("no splitbits bench/send results found in " + " ".join(args.results))
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
    from splitbits.runtime.report import write_json

    info = device_info()
    print(json.dumps(info, indent=2))
    if args.json:
        write_json(args.json, info)
    return 0


BENCH_BUNDLE_DESCRIPTION = """\
``splitbits bench BUNDLE``: the on-device benchmark runner (and, on a desktop, its emulation).

For each image: preprocess → head → quantise (→ hyper on the edge for MSHP) → entropy-encode →
packet, then the modelled transmit time at ``--link-mbps``, then server-side parse/decode (→ hyper)
→ tail, all in this process on the chosen backend. Reports per-stage latency (mean, p50/p90/p99
after ``--warmup`` images), throughput, bytes per image (``len()`` of the real packet, with the
likelihood estimate beside it), top-1 accuracy, peak memory, and on a Jetson the power mode,
clocks and energy per image from tegrastats sampled during the timed loop.

Before measuring it verifies the backend against the bundle's ``golden/`` (tolerances per
precision); a bundle that fails is refused: no numbers are reported, the JSON (if asked) holds
only the verification, and the exit status is 3.

Desktop emulation (what CI runs)::

    splitbits bench runs/demo/bundle --backend onnxruntime --limit 64 --json results/desktop.json

On a Jetson::

    splitbits bench runs/demo/bundle --backend tensorrt --precision fp16 --limit 500 \\
        --json results/orin-fp16.json
"""


def add_bench_bundle_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory")
    b = p.add_argument_group("backend")
    add_backend_arguments(b)
    b.add_argument("--coder", type=coder_name, default=None, help="entropy coder (default: the runtime's default)")
    b.add_argument("--atol", type=nonneg_float, default=None, help="verification atol (default: per backend/precision)")
    b.add_argument("--rtol", type=nonneg_float, default=None, help="verification rtol (default: per backend/precision)")
    i = p.add_argument_group("inputs")
    add_input_arguments(i, limit_help="number of images measured")
    i.add_argument("--save-inputs", type=output_file, metavar="FILE.npz",
                   help="also write the inputs used (to replay on a device)")
    m = p.add_argument_group("measurement")
    m.add_argument("--warmup", type=nonneg_int, default=5, help="untimed images first")
    m.add_argument("--repeat", type=positive_int, default=1, help="passes over the inputs")
    m.add_argument("--link-mbps", type=positive_float, default=10.0, help="link rate of the modelled transmit stage")
    m.add_argument("--power", choices=["auto", "on", "off"], default="auto",
                   help="sample tegrastats for power/energy (auto: where tegrastats exists)")
    m.add_argument("--tegrastats-interval-ms", type=positive_int, default=100, help="tegrastats sampling interval")
    p.add_argument("--json", type=output_file, metavar="FILE", help="write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_bench_bundle(args: argparse.Namespace) -> int:
    from splitbits.jetson.bench import BenchOptions, print_summary, rss_mb, run_bench
    from splitbits.jetson.tegrastats import TegraStatsSampler
    from splitbits.runtime.backends import get_backend
    from splitbits.runtime.bundle import load_bundle
    from splitbits.runtime.inputs import inputs_from_args
    from splitbits.runtime.report import write_json

    if args.power == "on" and not TegraStatsSampler.available():
        raise CliError("--power on needs tegrastats (a Jetson), which is not on PATH here; use --power auto/off")
    rss0 = rss_mb()
    bundle = load_bundle(args.bundle)
    inputs = inputs_from_args(bundle.input_shape, args)  # bad inputs fail before any model work
    backend = get_backend(args.backend, bundle=bundle, **backend_options(args))
    opts = BenchOptions(coder=args.coder, atol=args.atol, rtol=args.rtol, warmup=args.warmup, repeat=args.repeat,
                        link_mbps=args.link_mbps, power=args.power, tegrastats_interval_ms=args.tegrastats_interval_ms,
                        save_inputs=args.save_inputs, progress=not args.no_progress, rss_start_mb=rss0)
    result = run_bench(bundle, backend, inputs, opts)
    if args.json:
        write_json(args.json, result)
    if result["status"] == "refused":
        print(f"splitbits bench: REFUSED — {result['reason']}", file=sys.stderr)
        print("no measurements reported from a bundle/backend that fails golden verification", file=sys.stderr)
        return EXIT_REFUSED
    print_summary(result)
    return 0


COMMANDS = {
    "report": Command("compare bench/send results: Markdown/HTML tables and plots",
                      add_report_arguments, run_report, description=REPORT_DESCRIPTION),
    "device.info": Command("what this machine is: Jetson board, JetPack/L4T, CUDA, TensorRT, power mode, clocks",
                      add_device_arguments, run_device),
    "bench.bundle": Command("the on-device runner: per-stage latency, bytes, accuracy, memory, power ('bench BUNDLE')",
                    add_bench_bundle_arguments, run_bench_bundle, description=BENCH_BUNDLE_DESCRIPTION),
}
