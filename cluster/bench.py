"""``splitbits bench serve``: the asyncio TCP server and the Ray Serve deployment under the same
load, side by side in one run.

The same packets (the bundle's edge encoder over the builtin dataset) go to both servers from
``concurrency`` clients on this machine, each sending its next request when the last is answered;
every request asks for its logits. Each server is checked, not only timed: every request must be
answered exactly once (no error, no reply to an id it did not send) with the logits the
runtime's ``ServerDecoder`` gives that packet in this process (``max_abs_logit_diff``; batching
on ONNX Runtime moves them by float rounding only). The TCP server runs as ``splitbits serve`` in
its own process; Ray Serve's replicas run as Ray actors (in-process Ray, or the one this process
is connected to).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import numpy as np
import ray
from ray import serve

from splitbits.cluster.connect import connect
from splitbits.cluster.serve import APP_NAME, start_serve_ray
from splitbits.runtime.client import HttpLinkClient, LinkClient, LinkError
from splitbits.runtime.datasets import load_arrays
from splitbits.runtime.errors import SplitbitsError
from splitbits.runtime.machine import machine_info
from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder
from splitbits.runtime.report import summary

#: replies whose logits differ from the reference by more than this are counted as wrong
LOGIT_ATOL = 2e-6


def _packets(bundle: str, backend: str, n: int) -> tuple[list[bytes], np.ndarray]:
    enc, dec = EdgeEncoder(bundle, backend), ServerDecoder(bundle, backend)
    images, _ = load_arrays("builtin", "val", enc.bundle.input_shape[1], n)  # [C, H, W]
    packets = [enc.encode(im) for im in images]
    return packets, np.stack([dec.decode(p) for p in packets])


async def _load(clients: list[LinkClient], packets: list[bytes], ref: np.ndarray, requests: int) -> dict[str, Any]:
    """``requests`` requests (packets in turn) from every client, one in flight each; the checks and times."""
    replies: list[list[Any]] = [[] for _ in range(requests)]
    errors: list[str] = []
    order = itertools.count()

    async def worker(c: LinkClient) -> None:
        while (i := next(order)) < requests:
            try:
                replies[i].append(await c.request(packets[i % len(packets)], want_logits=True))
            except LinkError as exc:
                errors.append(str(exc))

    for c in clients:
        await c.connect()
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in clients))
    finally:
        wall = time.perf_counter() - t0
        for c in clients:
            await c.close()
    ok = [(i, r[0]) for i, r in enumerate(replies) if len(r) == 1 and r[0].ok]
    diff = max((float(np.abs(np.asarray(r.body["logits"]) - ref[i % len(ref)]).max()) for i, r in ok), default=0.0)
    unexpected = sum(c.unexpected for c in clients)
    errors += [r[0].error for r in replies if len(r) == 1 and not r[0].ok]
    return {
        "requests": requests, "answered_ok": len(ok), "unexpected": unexpected, "errors": errors[:5],
        "answered_exactly_once": len(ok) == requests and all(len(r) == 1 for r in replies) and unexpected == 0,
        "max_abs_logit_diff": diff, "logits_equal": len(ok) == requests and diff <= LOGIT_ATOL,
        "wall_s": wall, "images_per_s": len(ok) / wall if wall > 0 else 0.0,
        "rtt_ms": summary([r.rtt_ms for _, r in ok]),
        "batch_mean": float(np.mean([r.body.get("batch", 1) for _, r in ok])) if ok else 0.0,
    }


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tcp(bundle: str, backend: str, packets: list[bytes], ref: np.ndarray, *, requests: int, concurrency: int,
         max_batch: int, max_wait_ms: float, host: str) -> dict[str, Any]:
    """The load against ``splitbits serve`` (the asyncio TCP server) in its own process."""
    cmd = [sys.executable, "-m", "splitbits.runtime.cli", "serve", bundle, "--host", host, "--port", "0",
           "--backend", backend, "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = srv.stdout.readline() if srv.stdout else ""
        m = re.search(r"listening on ([^\s:]+):(\d+)", line)
        if not m:
            why = srv.stderr.read() if srv.stderr else ""
            raise SplitbitsError(f"splitbits serve did not start: {line.strip()} {why.strip()[-500:]}")
        port = int(m.group(2))

        def clients(n: int) -> list[LinkClient]:
            return [LinkClient(host, port) for _ in range(n)]

        asyncio.run(_load(clients(concurrency), packets, ref, concurrency))  # warm-up, untimed
        return asyncio.run(_load(clients(concurrency), packets, ref, requests)) | {"server": "splitbits serve (TCP)"}
    finally:
        srv.send_signal(signal.SIGINT)
        try:
            srv.wait(timeout=30)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()


def _ray_serve(bundle: str, backend: str, packets: list[bytes], ref: np.ndarray, *, requests: int,
               concurrency: int, max_batch: int, max_wait_ms: float, replicas: int, host: str) -> dict[str, Any]:
    """The load against the Ray Serve deployment (``replicas`` replicas, one CPU each)."""
    started = connect(num_cpus=replicas)
    port = _free_port(host)
    try:
        start_serve_ray(bundle, backend, {}, host=host, port=port, replicas=replicas, max_batch=max_batch,
                        max_wait_ms=max_wait_ms)

        def clients(n: int) -> list[LinkClient]:
            return [HttpLinkClient(host, port) for _ in range(n)]

        asyncio.run(_load(clients(concurrency), packets, ref, concurrency))  # warm-up, untimed
        out = asyncio.run(_load(clients(concurrency), packets, ref, requests))
        return out | {"server": f"splitbits serve --ray ({replicas} replicas)", "replicas": replicas}
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
        if started:
            ray.shutdown()


def bench_serve(bundle: str, *, requests: int = 256, concurrency: int = 8, replicas: int = 2, max_batch: int = 8,
                max_wait_ms: float = 2.0, images: int = 32, backend: str = "onnxruntime",
                host: str = "127.0.0.1") -> dict[str, Any]:
    """Both servers under the same load, one after the other; the JSON of ``bench serve``."""
    packets, ref = _packets(bundle, backend, images)
    kw = {"requests": requests, "concurrency": concurrency, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
          "host": host}
    tcp = _tcp(bundle, backend, packets, ref, **kw)
    rs = _ray_serve(bundle, backend, packets, ref, replicas=replicas, **kw)
    return {
        "schema": "splitbits.bench.serve/1", "bundle": str(bundle), "backend": backend,
        "settings": {**kw, "replicas": replicas, "distinct_packets": len(packets),
                     "packet_bytes": summary([len(p) for p in packets])},
        "tcp": tcp, "ray_serve": rs,
        "ray_vs_tcp_throughput": rs["images_per_s"] / tcp["images_per_s"] if tcp["images_per_s"] else None,
        "ray": ray.__version__, "machine": machine_info(),
    }
