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

Deadlines, so that idle or slow peers cannot hold the connection slots: a frame must be complete
within ``frame_timeout_s`` of its first byte (however its bytes trickle in), an answer must be
written within ``frame_timeout_s``, a TLS handshake must finish within ``frame_timeout_s`` of the
connection, and a connection with no frame started and nothing in flight for ``idle_timeout_s`` is
closed. A connection refused (at the limit) or closed on a deadline first gets an ERROR frame with
request id 0 whose JSON says why. With ``tls`` set (``link.server_tls_context``) every connection
is upgraded to TLS after it takes its slot; a failed handshake is counted and closes that
connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from splitbits.runtime import link
from splitbits.runtime.errors import SplitbitsError, VerificationError
from splitbits.runtime.pipeline import ServerDecoder

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
    #: a frame (header and body) must be complete this long after its first byte; also bounds a
    #: TLS handshake and the writing of one answer
    frame_timeout_s: float = 10.0
    #: close a connection with no frame started and nothing in flight for this long
    idle_timeout_s: float = 60.0
    #: TLS for every connection (``link.server_tls_context``); None: plain TCP
    tls: ssl.SSLContext | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("max_batch", "queue_size", "max_inflight", "max_connections", "decode_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        for name in ("frame_timeout_s", "idle_timeout_s", "drain_timeout_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        if self.tls is not None and not isinstance(self.tls, ssl.SSLContext):
            raise ValueError("tls must be an ssl.SSLContext (see link.server_tls_context)")


@dataclass
class ServerStats:
    connections_total: int = 0
    connections_open: int = 0
    connections_refused: int = 0
    #: refused without an answer: more TLS refusals in their handshake than ``max_connections``
    connections_dropped: int = 0
    #: closed on a deadline; ``timeouts`` says which (frame, idle, handshake, write)
    connections_timed_out: int = 0
    timeouts: Counter = field(default_factory=Counter)
    tls_handshakes: int = 0
    tls_handshake_failures: int = 0
    tls_failures: Counter = field(default_factory=Counter)
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
        d["timeouts"] = dict(self.timeouts)
        d["tls_failures"] = dict(self.tls_failures)
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


@dataclass(eq=False)
class _Conn:
    """One served connection: its streams, the requests in flight and when it was last busy."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    slots: _Slots
    last_active: float
    pending: set[asyncio.Task] = field(default_factory=set)
    wlock: asyncio.Lock = field(default_factory=asyncio.Lock)


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

    #: after an ERROR with request id 0, how long the server reads (and drops) what the peer still
    #: sends before closing, so that its close does not reset the connection before the peer has
    #: read the reason
    LINGER_S = 1.0

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
        self._conns: dict[asyncio.Task, _Conn] = {}  # connections holding a slot
        self._tasks: set[asyncio.Task] = set()  # every connection handler, slot or not
        self._refusing = 0  # TLS refusals in their handshake
        self._lingering = 0  # closes after an ERROR with request id 0, still reading what the peer sends
        self._closing = False
        self.address: tuple[str, int] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        self._batcher = TailBatcher(self.decoder.tail_logits, self.config, self.stats, self._tail_pool)
        self._batcher.start()
        self._server = await asyncio.start_server(self._accept, self.config.host, self.config.port,
                                                  limit=1 << 16)
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        log.info("serving %s on %s:%d (%s)", self.decoder.bundle.path, *self.address,
                 "TLS" if self.config.tls is not None else "plain TCP")
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
        inflight = [t for c in self._conns.values() for t in c.pending]
        if inflight:
            await asyncio.wait(inflight, timeout=self.config.drain_timeout_s)
        handlers = list(self._tasks)
        for t in handlers:
            t.cancel()
        if handlers:
            await asyncio.gather(*handlers, return_exceptions=True)
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

    def buffered_bytes(self) -> list[int]:
        """Bytes received but not yet consumed, per open connection (diagnostics: reads the
        StreamReader's buffer)."""
        return [len(getattr(c.reader, "_buffer", b"")) for c in self._conns.values()]

    # -- per connection -------------------------------------------------------------------------
    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Called as the connection is made, before its first byte is read: with TLS, reading is
        paused until the handshake starts, so the ClientHello reaches TLS and not the stream."""
        if self.config.tls is not None:
            writer.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._closing or len(self._conns) >= self.config.max_connections:
            await self._refuse(reader, writer)
            return
        conn = _Conn(reader, writer, _Slots(self.config.max_inflight), asyncio.get_running_loop().time())
        self._conns[task] = conn
        self.stats.connections_total += 1
        self.stats.connections_open += 1
        why: dict[str, str] | None = None
        try:
            if self.config.tls is not None:
                tls_writer = await self._handshake(reader, writer)
                if tls_writer is None:
                    return
                conn.writer = tls_writer
                conn.last_active = asyncio.get_running_loop().time()  # the idle clock starts after the handshake
            why = await self._serve_frames(conn)
            if conn.pending:
                await asyncio.wait(set(conn.pending), timeout=self.config.drain_timeout_s)
        except asyncio.CancelledError:
            why = None
        finally:
            for t in list(conn.pending):
                t.cancel()
            self._conns.pop(task, None)  # the slot is free from here on
            self.stats.connections_open -= 1
            try:
                await self._close(reader, conn.writer, why)
            except asyncio.CancelledError:  # stopping: no goodbyes
                conn.writer.transport.abort()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer a connection over the limit with Busy, then close it. Over TLS the answer needs a
        handshake: beyond ``max_connections`` such handshakes at once, close without an answer."""
        self.stats.connections_refused += 1
        why = ("server is stopping" if self._closing
               else f"server is at its connection limit ({self.config.max_connections} connections)")
        try:
            if self.config.tls is not None:
                if self._refusing >= self.config.max_connections:
                    self.stats.connections_dropped += 1
                    writer.transport.abort()
                    return
                self._refusing += 1
                try:
                    tls_writer = await self._handshake(reader, writer)
                finally:
                    self._refusing -= 1
                if tls_writer is None:
                    return
                writer = tls_writer
            await self._close(reader, writer, {"error": "Busy", "message": why})
        except asyncio.CancelledError:
            writer.transport.abort()

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                         ) -> asyncio.StreamWriter | None:
        """Upgrade the connection to TLS within ``frame_timeout_s``; None (connection closed) if it fails."""
        assert self.config.tls is not None
        limit = self.config.frame_timeout_s
        try:
            tls_writer = await asyncio.wait_for(_start_tls(reader, writer, self.config.tls, limit + 1.0), limit)
        except asyncio.TimeoutError:
            self._timed_out("handshake")
            reason = f"no TLS handshake within {limit:g} s"
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            reason = link.tls_error_text(exc)
        else:
            self.stats.tls_handshakes += 1
            return tls_writer
        self.stats.tls_handshake_failures += 1
        self.stats.tls_failures[reason] += 1
        log.debug("TLS handshake with %s failed: %s", writer.get_extra_info("peername"), reason)
        writer.transport.abort()
        return None

    async def _next_frame_start(self, conn: _Conn) -> bytes:
        """The first byte of the next frame (b"" at the end of the stream); ``asyncio.TimeoutError``
        once the connection has been idle (nothing in flight, no frame started) for ``idle_timeout_s``."""
        loop = asyncio.get_running_loop()
        while True:
            if conn.pending:  # answers still to come: not idle; look again later
                wait = self.config.idle_timeout_s
            else:
                wait = conn.last_active + self.config.idle_timeout_s - loop.time()
                if wait <= 0:
                    raise asyncio.TimeoutError
            with contextlib.suppress(asyncio.TimeoutError):
                return await asyncio.wait_for(conn.reader.read(1), wait)

    async def _serve_frames(self, conn: _Conn) -> dict[str, str] | None:
        """Read and dispatch frames until the stream ends or must be closed; returns the reason
        to send (ERROR, request id 0) before closing, or None."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        while True:
            try:
                head = await self._next_frame_start(conn)
            except asyncio.TimeoutError:
                self._timed_out("idle")
                return {"error": "IdleTimeout",
                        "message": f"no request for {cfg.idle_timeout_s:g} s; closing this connection"}
            except (ConnectionError, OSError):
                return None
            if not head:
                return None
            try:  # one deadline for the whole frame, from its first byte: trickling does not extend it
                frame = await asyncio.wait_for(link.read_frame(conn.reader, self.max_frame, head),
                                               cfg.frame_timeout_s)
            except asyncio.TimeoutError:
                self._timed_out("frame")
                return {"error": "FrameTimeout", "message": f"frame not complete within {cfg.frame_timeout_s:g} s "
                                                           "of its first byte; closing this connection"}
            except link.FrameError as exc:
                self.stats.frame_errors += 1
                self.stats.errors_by_type["FrameError"] += 1
                return {"error": "FrameError", "message": f"{exc}; closing this connection"}
            except (ConnectionError, OSError):
                return None
            if frame is None:
                return None
            conn.last_active = loop.time()
            self.stats.requests += 1
            if frame.kind != link.KIND_INFER:
                self._count_error("FrameError")
                await self._send(conn, link.encode_json(
                    link.KIND_ERROR, frame.request_id,
                    {"error": "FrameError", "message": f"frame kind {frame.kind} is not a request"}))
                continue
            if self._closing:
                self._count_error("Busy")
                await self._send(conn, link.encode_json(
                    link.KIND_ERROR, frame.request_id, {"error": "Busy", "message": "server is stopping"}))
                continue
            await conn.slots.acquire()
            t = loop.create_task(self._serve_one(frame, conn))
            conn.pending.add(t)
            self.stats.max_inflight_seen = max(self.stats.max_inflight_seen, conn.slots.taken)
            t.add_done_callback(conn.pending.discard)

    def _timed_out(self, kind: str) -> None:
        self.stats.connections_timed_out += 1
        self.stats.timeouts[kind] += 1

    async def _close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     why: dict[str, str] | None) -> None:
        """Close a connection; with ``why``, first send it (ERROR, request id 0) and linger briefly
        (at most ``max_connections`` connections linger at once; the others close at once)."""
        if why is not None and not writer.is_closing():
            sent = await self._write(writer, link.encode_json(link.KIND_ERROR, 0, why))
            if sent and not self._closing and self._lingering < self.config.max_connections:
                self._lingering += 1
                try:
                    await self._linger(reader, writer)
                finally:
                    self._lingering -= 1
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), self.LINGER_S)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            writer.transport.abort()

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close where the transport can (TCP), then drop what the peer sends until it closes
        or ``LINGER_S`` has passed (at most one frame bound of bytes)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.LINGER_S
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
        dropped = 0
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError):
            while dropped <= self.max_frame and (left := end - loop.time()) > 0:
                data = await asyncio.wait_for(reader.read(1 << 16), left)
                if not data:
                    return
                dropped += len(data)

    def _count_error(self, name: str) -> None:
        self.stats.answered_error += 1
        self.stats.errors_by_type[name] += 1

    async def _serve_one(self, frame: link.Frame, conn: _Conn) -> None:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            assert self._batcher is not None
            y_hat, dec_ms = await loop.run_in_executor(self._decode_pool, self.decoder.decode_timed, frame.body)
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
            conn.slots.release()
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
            conn.slots.release()
            raise
        try:
            await self._send(conn, out)
        finally:
            conn.last_active = loop.time()
            conn.slots.release()  # held until answered: a client that does not read stops being read

    async def _send(self, conn: _Conn, data: bytes) -> bool:
        async with conn.wlock:
            return await self._write(conn.writer, data)

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> bool:
        """Write and drain within ``frame_timeout_s``; a peer that does not read is cut off (aborted)."""
        try:
            writer.write(data)
            await asyncio.wait_for(writer.drain(), self.config.frame_timeout_s)
            return True
        except asyncio.TimeoutError:
            self._timed_out("write")
            writer.transport.abort()
        except (ConnectionError, OSError, RuntimeError):
            pass  # the client went away; nothing to answer
        return False


async def _start_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: ssl.SSLContext,
                     handshake_timeout: float) -> asyncio.StreamWriter:
    """Upgrade a server-side stream to TLS (``StreamWriter.start_tls`` where Python has it, 3.11+)."""
    if hasattr(writer, "start_tls"):
        await writer.start_tls(ctx, ssl_handshake_timeout=handshake_timeout)
        return writer
    loop = asyncio.get_running_loop()  # Python 3.10
    protocol = writer.transport.get_protocol()
    transport = await loop.start_tls(writer.transport, protocol, ctx, server_side=True,
                                     ssl_handshake_timeout=handshake_timeout)
    return asyncio.StreamWriter(transport, protocol, reader, loop)


def verify_server_backend(decoder: ServerDecoder) -> Any:
    """Verify the decoder's backend against the bundle's ``golden/`` (``runtime.verify``, as
    ``splitbits bench`` does); raises ``VerificationError`` naming the problems if it fails."""
    from splitbits.runtime.verify import verify_backend

    report = verify_backend(decoder.bundle, decoder.backend)
    if not report.ok:
        raise VerificationError(f"backend {report.backend} fails golden verification of {decoder.bundle.path}: "
                                + "; ".join(report.problems))
    log.info("golden verification passed: backend %s, %d images", report.backend, report.images)
    return report


async def run_server(bundle, backend: str = "auto", config: ServerConfig | None = None, *,
                     stop: asyncio.Event | None = None, ready=None, verify: bool = True,
                     **backend_options: Any) -> ServerStats:
    """Serve until ``stop`` is set (or SIGINT/SIGTERM when ``stop`` is None); returns the stats.

    With ``verify`` (the default) the backend is first checked against the bundle's ``golden/``;
    a bundle that fails raises ``VerificationError`` before anything listens."""
    import signal

    decoder = ServerDecoder(bundle, backend, **backend_options)
    decoder.warmup()
    if verify:  # before listening: nothing is served from a bundle that fails
        verify_server_backend(decoder)
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
