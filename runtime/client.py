"""``splitbits send``: the edge client. Encodes images on the edge, sends the packets to a
``splitbits serve`` server over TCP (optionally paced by an emulated 1/10/100 Mbit/s link) and
collects the answers with per-stage timings.

``LinkClient`` is one connection: requests are pipelined (up to ``concurrency`` in flight) and
matched to answers by request id; an answer for an unknown or already answered id is counted in
``unexpected`` (the load test asserts it stays 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splitbits.runtime import link
from splitbits.runtime.errors import SplitbitsError

MODEL_RATES_MBPS = (1.0, 10.0, 100.0)


class LinkError(SplitbitsError):
    """The connection to the server failed or the server sent something unusable."""


@dataclass
class Reply:
    request_id: int
    ok: bool
    body: dict[str, Any]
    send_ms: float
    rtt_ms: float

    @property
    def error(self) -> str | None:
        return None if self.ok else f"{self.body.get('error')}: {self.body.get('message')}"


class LinkClient:
    """One TCP connection to a server; ``await request(packet)`` → :class:`Reply`."""

    def __init__(self, host: str, port: int, *, mbps: float | None = None, timeout_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host, self.port = host, port
        self.bucket = link.TokenBucket(mbps, clock=clock) if mbps else None
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future, float]] = {}
        self._send_lock: asyncio.Lock | None = None
        self._reader_task: asyncio.Task | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.unexpected = 0
        self.connection_error: str | None = None

    async def connect(self) -> LinkClient:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            raise LinkError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self._send_lock = asyncio.Lock()
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())
        return self

    async def __aenter__(self) -> LinkClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        self._fail_all("connection closed")

    def _fail_all(self, why: str) -> None:
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(LinkError(why))
        self._pending.clear()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                frame = await link.read_frame(self._reader, link.MAX_RESPONSE_BYTES)
                if frame is None:
                    self.connection_error = "server closed the connection"
                    break
                now = time.perf_counter()
                entry = self._pending.pop(frame.request_id, None)
                if entry is None:
                    if frame.request_id == 0 and frame.kind == link.KIND_ERROR:
                        self.connection_error = frame.body.decode("utf-8", "replace")
                        break
                    self.unexpected += 1
                    continue
                fut, t0 = entry
                try:
                    body = frame.json()
                except (UnicodeDecodeError, ValueError):
                    body = {"error": "BadReply", "message": "server answer is not JSON"}
                if not fut.done():
                    fut.set_result((frame.kind == link.KIND_RESULT, body, (now - t0) * 1e3))
        except (link.FrameError, ConnectionError, OSError) as exc:
            self.connection_error = str(exc)
        self._fail_all(f"connection lost: {self.connection_error}")

    async def send_raw(self, data: bytes) -> float:
        """Write raw bytes (paced); for tests of hostile input. Returns seconds spent writing."""
        assert self._writer is not None and self._send_lock is not None
        async with self._send_lock:
            return await link.paced_write(self._writer, data, self.bucket)

    async def request(self, packet: bytes, want_logits: bool = False) -> Reply:
        if self._writer is None or self._send_lock is None:
            raise LinkError("not connected")
        if self.connection_error:
            raise LinkError(f"connection unusable: {self.connection_error}")
        rid = (next(self._ids) - 1) % 0xFFFFFFFF + 1  # 1 .. 2^32-1; 0 is the connection-level id
        frame = link.encode_frame(link.KIND_INFER, rid, packet, link.FLAG_LOGITS if want_logits else 0)
        fut = asyncio.get_running_loop().create_future()
        t0 = time.perf_counter()
        self._pending[rid] = (fut, t0)
        try:
            async with self._send_lock:
                send_s = await link.paced_write(self._writer, frame, self.bucket)
        except (ConnectionError, OSError) as exc:
            self._pending.pop(rid, None)
            raise LinkError(f"send failed: {exc}") from exc
        try:
            ok, body, rtt_ms = await asyncio.wait_for(fut, self.timeout_s)
        except asyncio.TimeoutError as exc:
            self._pending.pop(rid, None)
            raise LinkError(f"no answer to request {rid} within {self.timeout_s:g} s") from exc
        return Reply(rid, ok, body, send_s * 1e3, rtt_ms)


# --------------------------------------------------------------------------------------------
# the edge client over a dataset
# --------------------------------------------------------------------------------------------


@dataclass
class SendRecord:
    index: int
    label: int
    bytes: int
    ideal_bytes: float
    edge_ms: dict[str, float]
    send_ms: float
    rtt_ms: float
    ok: bool
    predicted: int | None = None
    server_ms: dict[str, float] = field(default_factory=dict)
    batch: int = 0
    error: str | None = None


async def send_images(encoder, host: str, port: int, images: np.ndarray, labels: Sequence[int], *,
                      mbps: float | None = None, concurrency: int = 1, connections: int = 1,
                      progress: Callable[[int], None] | None = None) -> tuple[list[SendRecord], float]:
    """Encode each image on this machine, send it, await its answer; returns (records, wall seconds).

    ``connections`` clients each keep up to ``concurrency`` requests in flight; encoding runs in
    one worker thread (as on an edge device) so answers are read while the next image encodes.
    """
    if concurrency < 1 or connections < 1:
        raise ValueError("concurrency and connections must be at least 1")
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(1, thread_name_prefix="splitbits-edge")
    records: list[SendRecord | None] = [None] * len(images)
    next_index = itertools.count()
    t_start = time.perf_counter()

    async def worker(client: LinkClient) -> None:
        while (i := next(next_index)) < len(images):
            res = await loop.run_in_executor(pool, encoder.analyze, images[i])
            edge = dict(res.timings_ms)
            try:
                rep = await client.request(res.packet)
            except LinkError as exc:
                records[i] = SendRecord(i, int(labels[i]), res.bytes, sum(res.ideal_bits.values()) / 8, edge,
                                        0.0, 0.0, False, error=f"LinkError: {exc}")
            else:
                rec = SendRecord(i, int(labels[i]), res.bytes, sum(res.ideal_bits.values()) / 8, edge,
                                 rep.send_ms, rep.rtt_ms, rep.ok, error=rep.error)
                if rep.ok:
                    rec.predicted = int(rep.body["class"])
                    rec.server_ms = dict(rep.body.get("timings_ms", {}))
                    rec.batch = int(rep.body.get("batch", 1))
                records[i] = rec
            if progress is not None:
                progress(1)

    clients = [LinkClient(host, port, mbps=mbps) for _ in range(connections)]
    try:
        for c in clients:
            await c.connect()
        await asyncio.gather(*(worker(c) for c in clients for _ in range(concurrency)))
    finally:
        for c in clients:
            await c.close()
        pool.shutdown(wait=True)
    return [r for r in records if r is not None], time.perf_counter() - t_start


def summarize_send(records: list[SendRecord], wall_s: float, mbps: float | None) -> dict[str, Any]:
    """The ``send`` result: latency percentiles per stage, bytes, link times, accuracy, errors."""
    from collections import Counter

    from splitbits.runtime.report import summary

    ok = [r for r in records if r.ok]
    stages: dict[str, list[float]] = {}
    for r in ok:
        edge_total = sum(r.edge_ms.values())
        parts = {f"edge.{k}": v for k, v in r.edge_ms.items()}
        parts.update({"edge_total": edge_total, "link.send": r.send_ms, "rtt": r.rtt_ms,
                      "end_to_end": edge_total + r.rtt_ms})
        parts.update({f"server.{k}": v for k, v in r.server_ms.items()})
        for k, v in parts.items():
            stages.setdefault(k, []).append(v)
    sizes = [r.bytes for r in records]
    labelled = [r for r in ok if r.label >= 0]
    mean_bytes = float(np.mean(sizes)) if sizes else float("nan")
    return {
        "images": len(records),
        "answered_ok": len(ok),
        "errors": dict(Counter((r.error or "").split(":")[0] for r in records if not r.ok)),
        "latency_ms": {k: summary(v) for k, v in sorted(stages.items())},
        "bytes": {"packet": summary(sizes), "ideal": summary([r.ideal_bytes for r in records])},
        "link": {
            "emulated_mbps": mbps,
            "model_ms": {f"{m:g}": link.transmit_seconds(round(mean_bytes), m) * 1e3
                         for m in MODEL_RATES_MBPS} if sizes else {},
        },
        "accuracy": {"top1": (sum(r.predicted == r.label for r in labelled) / len(labelled)) if labelled else None,
                     "labelled": len(labelled)},
        "batch_mean": float(np.mean([r.batch for r in ok])) if ok else 0.0,
        "throughput": {"images_per_s": len(ok) / wall_s if wall_s > 0 else 0.0, "wall_s": wall_s},
    }
