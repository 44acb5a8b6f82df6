"""``splitbits serve``: the server half of the split, an asyncio TCP server.

Each connection sends length-prefixed INFER frames (``splitbits.runtime.link``); the server parses
and entropy-decodes every packet in a worker thread (treating the bytes as hostile), then queues
the decoded latent ŷ for the tail. A batcher takes up to ``max_batch`` latents from the queue,
waiting at most ``max_wait_ms`` after the first one, runs the tail once on the stack (dynamic
batching across clients) and answers every request with its class and timings.

Bounds: at most ``max_connections`` connections, ``max_inflight`` unanswered requests per
connection (reading stops until one is answered: TCP back-pressure), a tail queue of
``queue_size`` latents, and frames no larger than the bundle's packet bound. A bad packet is
answered with an ERROR frame naming the problem and the connection goes on; a frame with an
impossible length closes that connection only. ``stop()`` finishes the requests in flight, then
closes every connection and the worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from splitbits.runtime import link
from splitbits.runtime.errors import SplitbitsError
from splitbits.runtime.pipeline import ServerDecoder, Timer

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 5800
    max_batch: int = 8
    max_wait_ms: float = 2.0
    queue_size: int = 64
    max_inflight: int = 32
    max_connections: int = 256
    decode_threads: int = 1
    drain_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_batch", "queue_size", "max_inflight", "max_connections", "decode_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")


@dataclass
class ServerStats:
    connections_total: int = 0
    connections_open: int = 0
    connections_refused: int = 0
    requests: int = 0
    answered_ok: int = 0
    answered_error: int = 0
    frame_errors: int = 0
    errors_by_type: Counter = field(default_factory=Counter)
    batches: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    max_queue_depth: int = 0
    max_inflight_seen: int = 0
    tail_ms_total: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["errors_by_type"] = dict(self.errors_by_type)
        d["batch_sizes"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        d["mean_batch"] = (sum(k * v for k, v in self.batch_sizes.items()) / self.batches) if self.batches else 0.0
        d["uptime_s"] = time.monotonic() - d.pop("started")
        return d


class _Slots:
    """A semaphore that also says how many slots are taken (the in-flight count of a connection)."""

    def __init__(self, n: int) -> None:
        self._sem = asyncio.Semaphore(n)
        self.taken = 0

    async def acquire(self) -> None:
        await self._sem.acquire()
        self.taken += 1

    def release(self) -> None:
        self.taken -= 1
        self._sem.release()


class TailBatcher:
    """Collects decoded latents into batches (≤ ``max_batch``, ≤ ``max_wait_ms`` after the first)."""

    def __init__(self, run_tail, config: ServerConfig, stats: ServerStats, executor: ThreadPoolExecutor) -> None:
        self._run_tail = run_tail
        self.config = config
        self.stats = stats
        self._executor = executor
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=config.queue_size)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="splitbits-tail-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self.queue.empty():  # nobody waits on these any more, but never leave a future hanging
            _, fut, _ = self.queue.get_nowait()
            if not fut.done():
                fut.set_exception(SplitbitsError("server shutting down"))

    async def submit(self, y_hat: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """Queue one latent [C,H,W]; returns (logits row, timings) once its batch has run."""
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((y_hat, fut, time.perf_counter()))
        self.stats.max_queue_depth = max(self.stats.max_queue_depth, self.queue.qsize())
        return await fut

    async def _collect(self) -> list[tuple[np.ndarray, asyncio.Future, float]]:
        batch = [await self.queue.get()]
        deadline = time.perf_counter() + self.config.max_wait_ms / 1e3
        while len(batch) < self.config.max_batch:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [b for b in batch if not b[1].done()]
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                stacked = np.stack([b[0] for b in live])
                logits = await loop.run_in_executor(self._executor, self._run_tail, stacked)
            except Exception as exc:  # report to every waiter; the batcher keeps running
                for _, fut, _ in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            tail_ms = (time.perf_counter() - t0) * 1e3
            self.stats.batches += 1
            self.stats.batch_sizes[len(live)] += 1
            self.stats.tail_ms_total += tail_ms
            for i, (_, fut, t_enq) in enumerate(live):
                if not fut.done():
                    fut.set_result((logits[i], {"queue": (t0 - t_enq) * 1e3, "tail": tail_ms,
                                                "batch": float(len(live))}))


class SplitServer:
    """The asyncio server; ``await start()`` binds (port 0 picks a free port), ``await stop()`` ends it."""

    def __init__(self, decoder: ServerDecoder, config: ServerConfig | None = None) -> None:
        self.decoder = decoder
        self.config = config or ServerConfig()
        self.stats = ServerStats()
        self.max_frame = link.HEADER_BYTES + decoder.expect.max_bytes
        self.class_names = decoder.bundle.class_names
        self._decode_pool = ThreadPoolExecutor(self.config.decode_threads, thread_name_prefix="splitbits-decode")
        self._tail_pool = ThreadPoolExecutor(1, thread_name_prefix="splitbits-tail")
        self._server: asyncio.AbstractServer | None = None
        self._batcher: TailBatcher | None = None
        self._conns: dict[asyncio.Task, set[asyncio.Task]] = {}
        self._closing = False
        self.address: tuple[str, int] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        self._batcher = TailBatcher(self._run_tail, self.config, self.stats, self._tail_pool)
        self._batcher.start()
        self._server = await asyncio.start_server(self._handle, self.config.host, self.config.port,
                                                  limit=1 << 16)
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        log.info("serving %s on %s:%d", self.decoder.bundle.path, *self.address)
        return self.address

    async def serve_until(self, stop: asyncio.Event) -> None:
        await stop.wait()
        await self.stop()

    async def stop(self) -> None:
        """Stop accepting, answer what is in flight (bounded by ``drain_timeout_s``), close everything."""
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        inflight = [t for ts in self._conns.values() for t in ts]
        if inflight:
            await asyncio.wait(inflight, timeout=self.config.drain_timeout_s)
        for conn in list(self._conns):
            conn.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._batcher is not None:
            await self._batcher.stop()
        if self._server is not None:
            await self._server.wait_closed()
        self._decode_pool.shutdown(wait=True)
        self._tail_pool.shutdown(wait=True)

    async def __aenter__(self) -> SplitServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- work done in threads -------------------------------------------------------------------
    def _decode(self, payload: bytes) -> tuple[np.ndarray, dict[str, float]]:
        t = Timer()
        y_hat, _, _ = self.decoder.decode_latent(payload, t)
        return y_hat, t.ms

    def _run_tail(self, y_hat: np.ndarray) -> np.ndarray:
        return self.decoder.tail.run({"y_hat": y_hat})["logits"]

    # -- per connection -------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._closing or len(self._conns) >= self.config.max_connections:
            self.stats.connections_refused += 1
            await self._send(writer, None, link.encode_json(
                link.KIND_ERROR, 0, {"error": "Busy", "message": "server is at its connection limit or stopping"}))
            writer.close()
            return
        pending: set[asyncio.Task] = set()
        self._conns[task] = pending
        self.stats.connections_total += 1
        self.stats.connections_open += 1
        slots = _Slots(self.config.max_inflight)
        wlock = asyncio.Lock()
        try:
            while True:
                try:
                    frame = await link.read_frame(reader, self.max_frame)
                except link.FrameError as exc:
                    self.stats.frame_errors += 1
                    self.stats.errors_by_type["FrameError"] += 1
                    await self._send(writer, wlock, link.encode_json(
                        link.KIND_ERROR, 0, {"error": "FrameError", "message": f"{exc}; closing this connection"}))
                    break
                except (ConnectionError, OSError):
                    break
                if frame is None:
                    break
                self.stats.requests += 1
                if frame.kind != link.KIND_INFER:
                    self._count_error("FrameError")
                    await self._send(writer, wlock, link.encode_json(
                        link.KIND_ERROR, frame.request_id,
                        {"error": "FrameError", "message": f"frame kind {frame.kind} is not a request"}))
                    continue
                if self._closing:
                    self._count_error("Busy")
                    await self._send(writer, wlock, link.encode_json(
                        link.KIND_ERROR, frame.request_id, {"error": "Busy", "message": "server is stopping"}))
                    continue
                await slots.acquire()
                t = asyncio.get_running_loop().create_task(self._serve_one(frame, writer, wlock, slots))
                pending.add(t)
                self.stats.max_inflight_seen = max(self.stats.max_inflight_seen, slots.taken)
                t.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(set(pending), timeout=self.config.drain_timeout_s)
        except asyncio.CancelledError:
            pass
        finally:
            for t in list(pending):
                t.cancel()
            self._conns.pop(task, None)
            self.stats.connections_open -= 1
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await writer.wait_closed()

    def _count_error(self, name: str) -> None:
        self.stats.answered_error += 1
        self.stats.errors_by_type[name] += 1

    async def _serve_one(self, frame: link.Frame, writer: asyncio.StreamWriter, wlock: asyncio.Lock,
                         slots: _Slots) -> None:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            assert self._batcher is not None
            y_hat, dec_ms = await loop.run_in_executor(self._decode_pool, self._decode, frame.body)
            logits, tail_info = await self._batcher.submit(y_hat)
            cls = int(np.argmax(logits))
            timings = {"decode": dec_ms.get("parse", 0.0) + dec_ms.get("decode", 0.0),
                       "hyper": dec_ms.get("hyper", 0.0), "queue": tail_info["queue"], "tail": tail_info["tail"],
                       "server": (time.perf_counter() - t0) * 1e3}
            body: dict[str, Any] = {"class": cls, "batch": int(tail_info["batch"]), "timings_ms": timings}
            if self.class_names and 0 <= cls < len(self.class_names):
                body["label"] = self.class_names[cls]
            if frame.flags & link.FLAG_LOGITS:
                body["logits"] = [float(v) for v in np.asarray(logits, dtype=np.float32)]
            out = link.encode_json(link.KIND_RESULT, frame.request_id, body)
            self.stats.answered_ok += 1
        except asyncio.CancelledError:
            raise
        except SplitbitsError as exc:
            self._count_error(type(exc).__name__)
            out = link.encode_json(link.KIND_ERROR, frame.request_id,
                                   {"error": type(exc).__name__, "message": str(exc)})
        except Exception as exc:  # a bug must not take the server down: answer and log it
            log.exception("request %d failed", frame.request_id)
            self._count_error("InternalError")
            out = link.encode_json(link.KIND_ERROR, frame.request_id,
                                   {"error": "InternalError", "message": f"{type(exc).__name__}: {exc}"})
        except BaseException:
            slots.release()
            raise
        try:
            await self._send(writer, wlock, out)
        finally:
            slots.release()  # held until answered: a client that does not read stops being read

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, wlock: asyncio.Lock | None, data: bytes) -> None:
        try:
            if wlock is None:
                writer.write(data)
                await writer.drain()
                return
            async with wlock:
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client went away; nothing to answer


async def run_server(bundle, backend: str = "auto", config: ServerConfig | None = None, *,
                     stop: asyncio.Event | None = None, ready=None, **backend_options: Any) -> ServerStats:
    """Serve until ``stop`` is set (or SIGINT/SIGTERM when ``stop`` is None); returns the stats."""
    import signal

    decoder = ServerDecoder(bundle, backend, **backend_options)
    decoder.warmup()
    server = SplitServer(decoder, config)
    addr = await server.start()
    if ready is not None:
        ready(addr)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # non-Unix loops
                loop.add_signal_handler(sig, stop.set)
    await server.serve_until(stop)
    return server.stats
