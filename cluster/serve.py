"""``splitbits serve BUNDLE --ray``: the server half as a Ray Serve deployment.

Each replica is a :class:`SplitReplica`: the runtime's ``ServerDecoder`` (verified against the
bundle's ``golden/`` before it serves), one decode thread that parses and entropy-decodes each
packet as hostile bytes, and the tail behind ``@serve.batch``, which stacks the latents of
concurrent requests (up to ``max_batch``, waiting at most ``max_wait_ms``) into one run. Ray
Serve's proxy spreads requests over the replicas.

The wire: ``POST /`` with the packet as the body (at most the bundle's packet bound); the header
``x-splitbits-logits: 1`` asks for the logits and ``x-splitbits-request-id`` is echoed. The answer
is the TCP server's RESULT JSON (class, label, batch, timings_ms, logits) with status 200, or its
ERROR JSON ``{"error", "message"}``: 400 for a packet the runtime refuses, 413 for an oversized
body (unread; that connection is closed, as the TCP server closes one with an impossible frame),
500 for a bug (logged). No exception leaves a request handler, so a bad packet never takes
a replica down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from splitbits.cluster.connect import ClusterError, connect
from splitbits.runtime.client import HTTP_LOGITS, HTTP_REQUEST_ID
from splitbits.runtime.errors import SplitbitsError
from splitbits.runtime.pipeline import ServerDecoder
from splitbits.runtime.server import verify_server_backend

log = logging.getLogger(__name__)

APP_NAME = "splitbits"


@serve.deployment(max_ongoing_requests=64)
class SplitReplica:
    """One replica: decode (a thread) → batched tail (``@serve.batch``) → the TCP server's JSON."""

    def __init__(self, bundle: str, backend: str, options: dict[str, Any], max_batch: int, max_wait_ms: float,
                 verify: bool = True) -> None:
        self.decoder = ServerDecoder(bundle, backend, **options)
        self.decoder.warmup()
        if verify:
            verify_server_backend(self.decoder)
        self.max_body = self.decoder.expect.max_bytes
        self.class_names = self.decoder.bundle.class_names
        self._decode_pool = ThreadPoolExecutor(1, thread_name_prefix="splitbits-decode")
        self._tail_pool = ThreadPoolExecutor(1, thread_name_prefix="splitbits-tail")
        self.tail.set_max_batch_size(max_batch)
        self.tail.set_batch_wait_timeout_s(max_wait_ms / 1e3)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def tail(self, items: list[tuple[np.ndarray, float]]) -> list[tuple[np.ndarray, dict[str, float]]]:
        """Latents of concurrent requests → one tail run; each gets its logits row and timings."""
        t0 = time.perf_counter()
        logits = await asyncio.get_running_loop().run_in_executor(
            self._tail_pool, self.decoder.tail_logits, np.stack([y for y, _ in items]))
        tail_ms = (time.perf_counter() - t0) * 1e3
        return [(logits[i], {"queue": (t0 - t_in) * 1e3, "tail": tail_ms, "batch": float(len(items))})
                for i, (_, t_in) in enumerate(items)]

    async def __call__(self, request: Request) -> JSONResponse:
        rid = request.headers.get(HTTP_REQUEST_ID, "")
        headers = {HTTP_REQUEST_ID: rid} if rid.isdigit() and len(rid) <= 10 else {}
        try:
            status, body = await self._answer(request)
        except Exception as exc:  # a bug must not take the replica down: answer and log it
            log.exception("request %s failed", rid)
            status, body = 500, {"error": "InternalError", "message": f"{type(exc).__name__}: {exc}"}
        if status == 413:  # its body was not read: the connection cannot carry another request
            headers["connection"] = "close"
        return JSONResponse(body, status_code=status, headers=headers)

    async def _answer(self, request: Request) -> tuple[int, dict[str, Any]]:
        t0 = time.perf_counter()
        if request.method != "POST":
            return 405, {"error": "FrameError", "message": "POST the packet as the request body"}
        payload = await self._body(request)
        if payload is None:
            return 413, {"error": "FrameError", "message": f"body over the packet bound ({self.max_body} bytes)"}
        loop = asyncio.get_running_loop()
        try:
            y_hat, dec_ms = await loop.run_in_executor(self._decode_pool, self.decoder.decode_timed, payload)
        except SplitbitsError as exc:
            return 400, {"error": type(exc).__name__, "message": str(exc)}
        logits, tail_info = await self.tail((y_hat, time.perf_counter()))
        cls = int(np.argmax(logits))
        timings = {"decode": dec_ms.get("parse", 0.0) + dec_ms.get("decode", 0.0), "hyper": dec_ms.get("hyper", 0.0),
                   "queue": tail_info["queue"], "tail": tail_info["tail"], "server": (time.perf_counter() - t0) * 1e3}
        body: dict[str, Any] = {"class": cls, "batch": int(tail_info["batch"]), "timings_ms": timings}
        if self.class_names and 0 <= cls < len(self.class_names):
            body["label"] = self.class_names[cls]
        if request.headers.get(HTTP_LOGITS) == "1":
            body["logits"] = [float(v) for v in np.asarray(logits, dtype=np.float32)]
        return 200, body

    async def _body(self, request: Request) -> bytes | None:
        """The request body, or None once it is over the packet bound (read no further)."""
        with contextlib.suppress(ValueError):
            if int(request.headers.get("content-length", "0")) > self.max_body:
                return None
        out = bytearray()
        async for part in request.stream():
            out += part
            if len(out) > self.max_body:
                return None
        return bytes(out)


def start_serve_ray(bundle: str, backend: str = "auto", options: dict[str, Any] | None = None, *,
                    host: str = "127.0.0.1", port: int = 8000, replicas: int = 2, max_batch: int = 8,
                    max_wait_ms: float = 2.0, replica_cpus: float = 1.0, replica_gpus: float = 0.0,
                    verify: bool = True) -> tuple[str, Any]:
    """Deploy the replicas on the Ray this process is connected to and serve HTTP on host:port;
    returns (URL, handle). With ``verify`` the bundle is checked against its ``golden/`` here first
    (``VerificationError`` before anything is deployed), then by each replica on its own node."""
    from ray.serve.config import HTTPOptions

    if verify:
        here = ServerDecoder(bundle, backend, **dict(options or {}))
        here.warmup()
        verify_server_backend(here)
    serve.start(http_options=HTTPOptions(host=host, port=port))
    app = SplitReplica.options(num_replicas=replicas, ray_actor_options={
        "num_cpus": replica_cpus, "num_gpus": replica_gpus}).bind(
        str(bundle), backend, dict(options or {}), max_batch, max_wait_ms, verify)
    try:
        handle = serve.run(app, name=APP_NAME, route_prefix="/")
    except (RuntimeError, ray.exceptions.RayError) as exc:  # a replica that did not start (its node's backend)
        lines = [ln for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        raise ClusterError(f"deploying {bundle} on Ray Serve failed: {lines[-1].strip()}") from exc
    return f"http://{host}:{port}/", handle


def run_serve_ray(bundle: str, backend: str = "auto", options: dict[str, Any] | None = None, *,
                  host: str = "127.0.0.1", port: int = 8000, replicas: int = 2, max_batch: int = 8,
                  max_wait_ms: float = 2.0, replica_cpus: float = 1.0, replica_gpus: float = 0.0,
                  address: str | None = None, ready: Callable[[str], None] | None = None,
                  stop: threading.Event | None = None) -> dict[str, Any]:
    """``splitbits serve --ray``: start (or join, ``address``) Ray, deploy, serve until ``stop`` is
    set (or SIGINT/SIGTERM), then tear the application down; returns what was served."""
    started = connect(address)
    restore: dict[int, Any] = {}
    if stop is None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            restore[sig] = signal.signal(sig, lambda *_: stop.set())
    t0 = time.monotonic()
    try:
        url, _ = start_serve_ray(bundle, backend, options, host=host, port=port, replicas=replicas,
                                 max_batch=max_batch, max_wait_ms=max_wait_ms, replica_cpus=replica_cpus,
                                 replica_gpus=replica_gpus)
        if ready is not None:
            ready(url)
        while not stop.wait(0.5):
            pass
        return {"url": url, "replicas": replicas, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
                "uptime_s": time.monotonic() - t0, "ray": ray.__version__}
    finally:
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
            serve.shutdown()
        if started:
            ray.shutdown()
        for sig, handler in restore.items():
            signal.signal(sig, handler)
