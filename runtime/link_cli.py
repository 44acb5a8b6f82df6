"""``splitbits serve`` and ``splitbits send``: the edge→server link over TCP."""

from __future__ import annotations

import argparse
import json
import sys

from splitbits.runtime.cli import (
    CliError,
    Command,
    add_input_arguments,
    coder_name,
    nonneg_float,
    nonneg_int,
    output_file,
    port_number,
    positive_float,
    positive_int,
)

SERVE_DESCRIPTION = """\
Run the server half of the split: an asyncio TCP server that takes length-prefixed packets,
entropy-decodes them, runs the tail with dynamic batching across clients and answers each
request with its class and server timings. Bad packets get a per-request error while other
requests keep being served. Stops cleanly on Ctrl-C / SIGTERM (requests in flight are answered)
and prints its statistics as JSON.

  splitbits serve runs/demo/bundle --host 0.0.0.0 --port 5800 --max-batch 16 --max-wait-ms 2
"""

SEND_DESCRIPTION = """\
The edge client: encode images here (head + entropy coder), send the packets to a
`splitbits serve` server and report per-stage latency, bytes, round trip and accuracy.
--link-mbps paces the bytes through a token bucket so the numbers show what a 1, 10 or
100 Mbit/s link adds; the JSON also gives the modelled transmit time at 1/10/100 Mbit/s
for the measured packet sizes (so an attack's extra bytes read directly as extra time).

  splitbits send runs/demo/bundle --server 192.168.1.10:5800 --dataset builtin --limit 200 \\
      --link-mbps 10 --json results/send-clean.json
  splitbits send runs/demo/bundle --server 192.168.1.10:5800 --attack corruption:shot_noise:3 \\
      --link-mbps 10 --json results/send-shot3.json
"""


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    p.add_argument("--port", type=port_number, default=5800, help="TCP port (0 picks a free one)")
    p.add_argument("--backend", default="auto",
                   help="auto, onnxruntime, onnxruntime-cuda, onnxruntime-trt, tensorrt")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], help="TensorRT engines to use (tensorrt backend)")
    p.add_argument("--threads", type=nonneg_int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="largest tail batch")
    p.add_argument("--max-wait-ms", type=nonneg_float, default=2.0, help="how long a batch waits for more requests")
    p.add_argument("--queue-size", type=positive_int, default=64, help="decoded latents waiting for the tail (bound)")
    p.add_argument("--max-inflight", type=positive_int, default=32, help="unanswered requests per connection (bound)")
    p.add_argument("--max-connections", type=positive_int, default=256, help="concurrent connections (bound)")
    p.add_argument("--decode-threads", type=positive_int, default=1, help="threads that parse and entropy-decode")
    p.add_argument("--stats-json", type=output_file, metavar="FILE", help="write the server statistics here on exit")


def _backend_options(args: argparse.Namespace) -> dict:
    opts: dict = {}
    if getattr(args, "precision", None):
        if args.backend not in ("tensorrt", "auto"):
            raise CliError("--precision applies to the tensorrt backend")
        opts["precision"] = args.precision
    if getattr(args, "threads", 0):
        if args.backend not in ("onnxruntime", "onnxruntime-cuda", "onnxruntime-trt"):
            raise CliError("--threads applies to the onnxruntime backends")
        opts["threads"] = args.threads
    return opts


def run_serve(args: argparse.Namespace) -> int:
    import asyncio

    from splitbits.runtime.report import write_json
    from splitbits.runtime.server import ServerConfig, run_server

    try:
        config = ServerConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                              queue_size=args.queue_size, max_inflight=args.max_inflight,
                              max_connections=args.max_connections, decode_threads=args.decode_threads)
    except ValueError as exc:
        raise CliError(str(exc)) from exc

    def ready(addr: tuple[str, int]) -> None:
        print(f"listening on {addr[0]}:{addr[1]}", flush=True)

    try:
        stats = asyncio.run(run_server(args.bundle, args.backend, config, ready=ready, **_backend_options(args)))
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
    out = stats.to_dict()
    print(json.dumps(out, indent=2), flush=True)
    if args.stats_json:
        write_json(args.stats_json, out)
    return 0


def add_send_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory (the same model as the server's)")
    p.add_argument("--server", required=True, help="HOST:PORT of a `splitbits serve`")
    p.add_argument("--backend", default="auto",
                   help="auto, onnxruntime, onnxruntime-cuda, onnxruntime-trt, tensorrt")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], help="TensorRT engines to use (tensorrt backend)")
    p.add_argument("--threads", type=nonneg_int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--coder", type=coder_name, default=None, help="entropy coder (default: the runtime's default)")
    add_input_arguments(p.add_argument_group("inputs"))
    g = p.add_argument_group("link")
    g.add_argument("--link-mbps", type=positive_float, default=None, help="pace the bytes at this rate (token bucket)")
    g.add_argument("--concurrency", type=positive_int, default=1, help="requests in flight per connection")
    g.add_argument("--connections", type=positive_int, default=1, help="parallel connections")
    p.add_argument("--json", type=output_file, metavar="FILE", help="write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_send(args: argparse.Namespace) -> int:
    import asyncio
    import platform
    import time

    from splitbits.runtime.client import send_images, summarize_send
    from splitbits.runtime.inputs import inputs_from_args
    from splitbits.runtime.link import parse_hostport
    from splitbits.runtime.pipeline import EdgeEncoder
    from splitbits.runtime.progress import progress_bar
    from splitbits.runtime.report import rich_table, write_json

    if args.limit is not None and args.limit < 1:
        raise CliError("--limit must be at least 1")
    if args.link_mbps is not None and args.link_mbps <= 0:
        raise CliError("--link-mbps must be positive")
    try:
        host, port = parse_hostport(args.server)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    enc = EdgeEncoder(args.bundle, args.backend, coder=args.coder, **_backend_options(args))
    enc.warmup()
    inputs = inputs_from_args(enc.bundle.input_shape, args)
    progress = progress_bar(len(inputs), "send", disabled=args.no_progress)
    with progress as bar:
        records, wall = asyncio.run(send_images(
            enc, host, port, inputs.images, inputs.labels, mbps=args.link_mbps, concurrency=args.concurrency,
            connections=args.connections, progress=bar.advance))
    result = {
        "schema": "splitbits.send/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "bundle": {"path": str(enc.bundle.path), "fingerprint": enc.bundle.fingerprint, "family": enc.bundle.family},
        "device": {"hostname": platform.node(), "machine": platform.machine()},
        "backend": enc.backend.describe(),
        "coder": enc.coder.name,
        "server": f"{host}:{port}",
        "inputs": {"name": inputs.name, "count": len(inputs), **inputs.meta},
        "concurrency": args.concurrency,
        "connections": args.connections,
        **summarize_send(records, wall, args.link_mbps),
    }
    lat = result["latency_ms"]
    rows = [[k, v["p50"], v["p90"], v["p99"]] for k, v in lat.items()]
    rich_table(f"send → {host}:{port}  ({result['answered_ok']}/{len(records)} answered)",
               ["stage (ms)", "p50", "p90", "p99"], rows)
    acc = result["accuracy"]["top1"]
    print(f"bytes/image {result['bytes']['packet']['mean']:.1f}  accuracy "
          f"{'–' if acc is None else f'{acc:.3f}'}  throughput {result['throughput']['images_per_s']:.1f} img/s  "
          "transmit model " + ", ".join(f"{k} Mbit/s {v:.2f} ms" for k, v in result["link"]["model_ms"].items()))
    if args.json:
        write_json(args.json, result)
    return 0 if result["answered_ok"] == len(records) else 1


COMMANDS = {
    "serve": Command("server half of the split: TCP server, decode + tail with dynamic batching",
                     add_serve_arguments, run_serve, description=SERVE_DESCRIPTION),
    "send": Command("edge client: encode images, send packets to a server (optional link-rate emulation)",
                    add_send_arguments, run_send, description=SEND_DESCRIPTION),
}
