"""The CLI of the cluster package: ``splitbits bench serve``. (``campaign --ray`` and ``serve
--ray`` are options of the attacks' and the runtime's commands, which reach this package's code
through the ``splitbits.extensions`` entry points.) Standard library and ``splitbits.runtime.cli``
only at import."""

from __future__ import annotations

import argparse
import sys

from splitbits.runtime.cli import Command, backend_name, needs_extra, nonneg_float, output_file, positive_int

BENCH_SERVE_DESCRIPTION = """\
The asyncio TCP server (`splitbits serve`) and the Ray Serve deployment (`splitbits serve --ray`)
under the same load, side by side in one run: --concurrency clients on this machine each send the
next of --requests packets (the bundle's encoder over the builtin dataset) when the last is
answered. For each: images/s, round trip, mean batch, and the checks — every request answered
exactly once, with the logits the runtime computes for that packet here. Prints JSON (or --json).

  splitbits bench serve runs/demo/bundle_mshp --replicas 2 --requests 512 --concurrency 16
"""


def _bench_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--requests", type=positive_int, default=256, help="timed requests per server")
    p.add_argument("--concurrency", type=positive_int, default=8, help="clients, one request in flight each")
    p.add_argument("--replicas", type=positive_int, default=2, help="Ray Serve replicas (one CPU each)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="largest tail batch (both servers)")
    p.add_argument("--max-wait-ms", type=nonneg_float, default=2.0, help="batching wait (both servers)")
    p.add_argument("--images", type=positive_int, default=32, help="distinct packets (builtin images)")
    p.add_argument("--backend", type=backend_name, default="onnxruntime", help="inference backend of both servers")
    p.add_argument("--json", type=output_file, default=None, metavar="FILE", help="write the result here")


def _bench_serve_run(args: argparse.Namespace) -> int:
    with needs_extra("cluster"):
        from splitbits.cluster.bench import bench_serve
        from splitbits.runtime.report import print_json, write_json

    res = bench_serve(args.bundle, requests=args.requests, concurrency=args.concurrency, replicas=args.replicas,
                      max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, images=args.images,
                      backend=args.backend)
    for k in ("tcp", "ray_serve"):
        r = res[k]
        print(f"{r['server']}: {r['images_per_s']:.1f} img/s, rtt p50 {r['rtt_ms']['p50']:.2f} ms, batch "
              f"{r['batch_mean']:.2f}, answered exactly once {r['answered_exactly_once']}, logits equal "
              f"{r['logits_equal']} (max diff {r['max_abs_logit_diff']:.2g})", file=sys.stderr)
    if args.json:
        write_json(args.json, res)
    else:
        print_json(res)
    ok = all(res[k]["answered_exactly_once"] and res[k]["logits_equal"] for k in ("tcp", "ray_serve"))
    return 0 if ok else 1


COMMANDS = {
    "bench.serve": Command("TCP server vs Ray Serve replicas under the same load: throughput and checks (JSON)",
                           _bench_serve_args, _bench_serve_run, description=BENCH_SERVE_DESCRIPTION),
}
