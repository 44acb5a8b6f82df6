"""``splitbits send``: the edge client. Encodes images on the edge, sends the packets to a
``splitbits serve`` server over TCP or TLS (optionally paced by an emulated 1/10/100 Mbit/s link)
and collects the answers with per-stage timings.

``LinkClient`` is one TCP/TLS connection to ``splitbits serve``; ``HttpLinkClient`` one HTTP/1.1
keep-alive connection to ``splitbits serve --ray`` (Ray Serve; the packet is the body of a POST,
the answer the same JSON as the TCP server's). ``LinkClient``'s requests are pipelined (up to
``concurrency`` in flight) and matched to answers by request id; an answer for an unknown or
already answered id is counted in ``unexpected`` (the load tests assert it stays 0). Their
sockets count every byte the kernel takes from them and hands to them (``LinkStats``: TCP payload,
so TLS records, handshakes and HTTP headers included, TCP/IP headers not): what the transport adds
per packet is measured, never modelled. A connection the server refuses or closes (an ERROR with
request id 0, a TLS alert, an end of stream) records why in ``connection_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from splitbits.runtime import link
from splitbits.runtime.errors import SplitbitsError

#: longest server reason kept (a hostile server must not flood the terminal)
MAX_REASON_CHARS = 300


class LinkError(SplitbitsError):
    """The connection to the server failed or the server sent something unusable."""


class _CountingSocket(socket.socket):
    """A TCP socket that counts the bytes the kernel accepted from it and returned to it (the
    methods asyncio's socket transport calls)."""

    bytes_sent = 0
    bytes_received = 0

    def send(self, data: Any, *args: Any) -> int:
        n = super().send(data, *args)
        self.bytes_sent += n
        return n

    def sendmsg(self, buffers: Any, *args: Any) -> int:
        n = super().sendmsg(buffers, *args)
        self.bytes_sent += n
        return n

    def recv(self, n: int, *args: Any) -> bytes:
        data = super().recv(n, *args)
        self.bytes_received += len(data)
        return data

    def recv_into(self, buffer: Any, *args: Any) -> int:
        n = super().recv_into(buffer, *args)
        self.bytes_received += n
        return n


async def _open_counting_socket(host: str, port: int) -> _CountingSocket:
    """A connected, non-blocking counting socket (each resolved address in turn)."""
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for family, kind, proto, _, addr in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = _CountingSocket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, addr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    raise last or OSError(f"no address for {host}")


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "…"


def connection_reason(body: bytes) -> str:
    """The server's reason from an ERROR frame with request id 0, as one line."""
    try:
        obj = json.loads(body.decode("utf-8"))
        err, msg = str(obj.get("error")), str(obj.get("message"))
    except (UnicodeDecodeError, ValueError, AttributeError):
        return _one_line("server closed the connection: " + body[:MAX_REASON_CHARS].decode("utf-8", "replace"))
    what = "refused the connection" if err == "Busy" else "closed the connection"
    return _one_line(f"server {what}: {err}: {msg}")


def _tls_reason(exc: BaseException) -> str:
    text = link.tls_error_text(exc)
    if "alert" in text and ("certificate" in text or "unknown ca" in text):
        return _one_line(f"server refused the connection: TLS {text} (this device's certificate is missing "
                         "or not enrolled at the server)")
    return _one_line(f"TLS error: {text}")


@dataclass
class LinkStats:
    """What one connection put on and took off the wire (bytes counted at the TCP socket)."""

    transport: str  # "tcp" or "tls"
    connect_ms: float
    handshake_ms: float | None = None
    tls_version: str | None = None
    cipher: str | None = None
    #: socket bytes up to the end of the TLS handshake (0 on plain TCP)
    handshake_bytes_sent: int = 0
    handshake_bytes_received: int = 0
    #: socket bytes over the whole connection (handshake, requests, answers, close)
    bytes_sent: int = 0
    bytes_received: int = 0
    #: the link protocol's own bytes (frames, length prefixes included)
    frames_sent: int = 0
    frame_bytes_sent: int = 0
    frames_received: int = 0
    frame_bytes_received: int = 0


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
    """One connection to a server, plain TCP or TLS (``tls``: ``link.client_tls_context``);
    ``await request(packet)`` → :class:`Reply`."""

    def __init__(self, host: str, port: int, *, mbps: float | None = None, timeout_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> None:
        self.host, self.port = host, port
        self.bucket = link.TokenBucket(mbps, clock=clock) if mbps else None
        self.timeout_s = timeout_s
        self.tls = tls
        self.server_hostname = server_hostname
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future, float]] = {}
        self._send_lock: asyncio.Lock | None = None
        self._reader_task: asyncio.Task | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._sock: _CountingSocket | None = None
        self.unexpected = 0
        self.connection_error: str | None = None
        self.stats = LinkStats(transport="tls" if tls is not None else "tcp", connect_ms=0.0)

    async def connect(self) -> LinkClient:
        where = f"{self.host}:{self.port}"
        t0 = time.perf_counter()
        try:
            sock = await asyncio.wait_for(_open_counting_socket(self.host, self.port), self.timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            why = "timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc) or type(exc).__name__
            raise LinkError(f"cannot connect to {where}: {why}") from exc
        self._sock = sock
        t1 = time.perf_counter()
        self.stats.connect_ms = (t1 - t0) * 1e3
        tls_args: dict[str, Any] = {}
        if self.tls is not None:
            tls_args = {"ssl": self.tls, "server_hostname": self.server_hostname or self.host,
                        "ssl_handshake_timeout": self.timeout_s}
        try:
            self._reader, self._writer = await asyncio.open_connection(sock=sock, **tls_args)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise LinkError(f"TLS handshake with {where} failed: server certificate not trusted "
                            f"({link.tls_error_text(exc)})") from exc
        except ssl.SSLError as exc:
            sock.close()
            text = link.tls_error_text(exc)
            hint = " (is the server using TLS?)" if "wrong version" in text or "record" in text else ""
            raise LinkError(f"TLS handshake with {where} failed: {text}{hint}") from exc
        except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
            sock.close()
            why = "timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc) or type(exc).__name__
            raise LinkError(f"TLS handshake with {where} failed: {why}") from exc
        if self.tls is not None:
            st, obj = self.stats, self._writer.get_extra_info("ssl_object")
            st.handshake_ms = (time.perf_counter() - t1) * 1e3
            st.tls_version = obj.version() if obj is not None else None
            st.cipher = (obj.cipher() or (None,))[0] if obj is not None else None
            st.handshake_bytes_sent, st.handshake_bytes_received = sock.bytes_sent, sock.bytes_received
        self._send_lock = asyncio.Lock()
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())
        return self

    async def __aenter__(self) -> LinkClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def link_stats(self) -> LinkStats:
        """The byte counts so far (all of the connection once it is closed)."""
        if self._sock is not None:
            self.stats.bytes_sent, self.stats.bytes_received = self._sock.bytes_sent, self._sock.bytes_received
        return self.stats

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self._writer.wait_closed(), 5.0)
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        self._fail_all("connection closed")
        self.link_stats()

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
                    self.connection_error = self._closed_reason()
                    break
                now = time.perf_counter()
                self.stats.frames_received += 1
                self.stats.frame_bytes_received += link.HEADER_BYTES + len(frame.body)
                entry = self._pending.pop(frame.request_id, None)
                if entry is None:
                    if frame.request_id == 0 and frame.kind == link.KIND_ERROR:
                        self.connection_error = connection_reason(frame.body)
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
        except ssl.SSLError as exc:
            self.connection_error = _tls_reason(exc)
        except ConnectionResetError:
            self.connection_error = self._closed_reason()
        except (link.FrameError, ConnectionError, OSError) as exc:
            self.connection_error = _one_line(f"connection lost: {exc}")
        self._fail_all(self.connection_error or "connection lost")

    def _closed_reason(self) -> str:
        if self.stats.frames_received:
            return "server closed the connection"
        if self.tls is not None:
            # Python's TLS server drops a client whose certificate it rejects without a TLS alert
            return ("server refused the connection: it closed the TLS connection without answering, as a "
                    "mutual-TLS server does when it does not accept this device's certificate (or none was given)")
        return "server closed the connection before any answer"

    async def _write(self, data: bytes) -> float:
        assert self._writer is not None and self._send_lock is not None
        async with self._send_lock:
            spent = await link.paced_write(self._writer, data, self.bucket)
        self.stats.frames_sent += 1
        self.stats.frame_bytes_sent += len(data)
        return spent

    async def request(self, packet: bytes, want_logits: bool = False) -> Reply:
        if self._writer is None or self._send_lock is None:
            raise LinkError("not connected")
        if self.connection_error:
            raise LinkError(self.connection_error)
        rid = (next(self._ids) - 1) % 0xFFFFFFFF + 1  # 1 .. 2^32-1; 0 is the connection-level id
        frame = link.encode_frame(link.KIND_INFER, rid, packet, link.FLAG_LOGITS if want_logits else 0)
        fut = asyncio.get_running_loop().create_future()
        t0 = time.perf_counter()
        self._pending[rid] = (fut, t0)
        try:
            send_s = await self._write(frame)
        except (ConnectionError, OSError) as exc:
            self._pending.pop(rid, None)
            if self._reader_task is not None:  # the server may have said why before it closed
                await asyncio.wait({self._reader_task}, timeout=1.0)
            raise LinkError(self.connection_error or f"send failed: {exc}") from exc
        try:
            ok, body, rtt_ms = await asyncio.wait_for(fut, self.timeout_s)
        except asyncio.TimeoutError as exc:
            self._pending.pop(rid, None)
            raise LinkError(f"no answer to request {rid} within {self.timeout_s:g} s") from exc
        return Reply(rid, ok, body, send_s * 1e3, rtt_ms)


# --------------------------------------------------------------------------------------------
# HTTP: `splitbits serve --ray` (Ray Serve)
# --------------------------------------------------------------------------------------------

#: request headers of the HTTP link: the request id (echoed in the answer) and "send the logits"
HTTP_REQUEST_ID = "x-splitbits-request-id"
HTTP_LOGITS = "x-splitbits-logits"
#: longest header block of an answer
MAX_HTTP_HEADER_BYTES = 16 << 10


def parse_http_url(text: str) -> tuple[str, int, str]:
    """(host, port, path) of ``http://HOST:PORT[/PATH]`` (port 80 by default, path / by default)."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(text)
        port = u.port or 80
    except ValueError as exc:
        raise ValueError(f"bad server URL {text!r}: {exc}") from None
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"bad server URL {text!r}: expected http://HOST:PORT[/PATH] (https is not supported)")
    if u.query or u.fragment:
        raise ValueError(f"bad server URL {text!r}: no query or fragment")
    return u.hostname, port, u.path or "/"


class HttpLinkClient(LinkClient):
    """One HTTP/1.1 keep-alive connection to a Ray Serve deployment (``splitbits serve --ray``): a
    POST per packet, one at a time (HTTP/1.1 answers in order, so concurrency is more connections).
    The body is paced like ``LinkClient``'s frames; an answer carries the request id it answers
    (one that does not match is counted in ``unexpected``); a 4xx/5xx answer is the server's
    ``{"error", "message"}``, as an ERROR frame of the TCP server."""

    def __init__(self, host: str, port: int, path: str = "/", **kw: Any) -> None:
        super().__init__(host, port, **kw)
        self.path = path
        self.stats.transport = "http"

    async def connect(self) -> HttpLinkClient:
        where = f"{self.host}:{self.port}"
        t0 = time.perf_counter()
        try:
            sock = await asyncio.wait_for(_open_counting_socket(self.host, self.port), self.timeout_s)
            self._reader, self._writer = await asyncio.open_connection(sock=sock, limit=MAX_HTTP_HEADER_BYTES)
        except (OSError, asyncio.TimeoutError) as exc:
            why = "timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc) or type(exc).__name__
            raise LinkError(f"cannot connect to {where}: {why}") from exc
        self._sock = sock
        self.stats.connect_ms = (time.perf_counter() - t0) * 1e3
        self._send_lock = asyncio.Lock()
        return self

    async def request(self, packet: bytes, want_logits: bool = False) -> Reply:
        if self._writer is None or self._send_lock is None:
            raise LinkError("not connected")
        if self.connection_error:
            raise LinkError(self.connection_error)
        async with self._send_lock:
            rid = (next(self._ids) - 1) % 0xFFFFFFFF + 1
            head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                    f"Content-Type: application/octet-stream\r\nContent-Length: {len(packet)}\r\n"
                    f"{HTTP_REQUEST_ID}: {rid}\r\n" + (f"{HTTP_LOGITS}: 1\r\n" if want_logits else "") + "\r\n")
            data = head.encode("ascii") + packet
            t0 = time.perf_counter()
            try:
                send_s = await link.paced_write(self._writer, data, self.bucket)
                status, headers, body = await asyncio.wait_for(self._read_answer(), self.timeout_s)
            except asyncio.TimeoutError as exc:
                self.connection_error = f"no answer to request {rid} within {self.timeout_s:g} s"
                raise LinkError(self.connection_error) from exc
            except (ConnectionError, OSError, LinkError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError) as exc:
                self.connection_error = _one_line(f"connection lost: {exc or type(exc).__name__}")
                raise LinkError(self.connection_error) from exc
            rtt_ms = (time.perf_counter() - t0) * 1e3
        self.stats.frames_sent += 1
        self.stats.frame_bytes_sent += len(data)
        self.stats.frames_received += 1
        self.stats.frame_bytes_received += len(body)
        if headers.get(HTTP_REQUEST_ID) != str(rid):
            self.unexpected += 1
        try:
            obj = json.loads(body.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except (UnicodeDecodeError, ValueError):
            obj = {"error": "BadReply", "message": f"HTTP {status}: server answer is not a JSON object"}
        return Reply(rid, status == 200 and "error" not in obj, obj, send_s * 1e3, rtt_ms)

    async def _read_answer(self) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body) of one HTTP/1.1 answer (Content-Length or chunked)."""
        assert self._reader is not None
        lines = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise LinkError(f"not an HTTP answer: {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked()
        else:
            n = int(headers.get("content-length", "0"))
            if not 0 <= n <= link.MAX_RESPONSE_BYTES:
                raise LinkError(f"answer of {n} bytes is over the bound ({link.MAX_RESPONSE_BYTES})")
            body = await self._reader.readexactly(n)
        if headers.get("connection", "").lower() == "close":
            self.connection_error = "server closed the connection"
        return int(parts[1]), headers, body

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        out = bytearray()
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0].strip() or b"0", 16)
            if len(out) + size > link.MAX_RESPONSE_BYTES:
                raise LinkError(f"answer over the bound ({link.MAX_RESPONSE_BYTES} bytes)")
            out += (await self._reader.readexactly(size + 2))[:size]  # the chunk and its CRLF
            if size == 0:  # the last chunk (no trailers)
                return bytes(out)


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


@dataclass
class SendOutcome:
    """What ``send_images`` did: a record per image sent, the wall time, each connection's bytes
    and why connections ended early (refused, closed or lost; images not sent have no record)."""

    records: list[SendRecord]
    wall_s: float
    links: list[LinkStats]
    connection_errors: list[str]


async def send_images(encoder, host: str, port: int, images: np.ndarray, labels: Sequence[int], *,
                      mbps: float | None = None, concurrency: int = 1, connections: int = 1,
                      progress: Callable[[int], None] | None = None, tls: ssl.SSLContext | None = None,
                      server_hostname: str | None = None, timeout_s: float = 60.0,
                      http_path: str | None = None) -> SendOutcome:
    """Encode each image on this machine, send it, await its answer.

    ``connections`` clients each keep up to ``concurrency`` requests in flight; encoding runs in
    one worker thread (as on an edge device) so answers are read while the next image encodes. A
    connection the server refused or closed stops taking images (its reason is kept). With
    ``http_path`` the server is Ray Serve (``serve --ray``): POSTs to that path, each request in
    flight on its own keep-alive connection (``connections`` × ``concurrency`` of them).
    """
    if concurrency < 1 or connections < 1:
        raise ValueError("concurrency and connections must be at least 1")
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(1, thread_name_prefix="splitbits-edge")
    records: list[SendRecord | None] = [None] * len(images)
    next_index = itertools.count()
    t_start = time.perf_counter()

    async def worker(client: LinkClient) -> None:
        while not client.connection_error and (i := next(next_index)) < len(images):
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

    if http_path is not None:
        if tls is not None:
            raise ValueError("TLS is for the TCP server; the HTTP link is plain")
        clients: list[LinkClient] = [HttpLinkClient(host, port, http_path, mbps=mbps, timeout_s=timeout_s)
                                     for _ in range(connections * concurrency)]
        per_client = 1
    else:
        clients = [LinkClient(host, port, mbps=mbps, tls=tls, server_hostname=server_hostname, timeout_s=timeout_s)
                   for _ in range(connections)]
        per_client = concurrency
    try:
        for c in clients:
            await c.connect()
        await asyncio.gather(*(worker(c) for c in clients for _ in range(per_client)))
    finally:
        for c in clients:
            await c.close()
        pool.shutdown(wait=True)
    return SendOutcome([r for r in records if r is not None], time.perf_counter() - t_start,
                       [c.link_stats() for c in clients if c._sock is not None],
                       [c.connection_error for c in clients if c.connection_error])


def summarize_wire(links: Sequence[LinkStats]) -> dict[str, Any]:
    """Bytes measured at the TCP socket, in total and per request, beside the link protocol's own
    frame bytes: their difference is what the transport (TLS records, handshake) adds."""
    from splitbits.runtime.report import summary

    if not links:
        return {}
    n = sum(x.frames_sent for x in links)
    sent = sum(x.bytes_sent - x.handshake_bytes_sent for x in links)
    received = sum(x.bytes_received - x.handshake_bytes_received for x in links)
    f_sent = sum(x.frame_bytes_sent for x in links)
    f_received = sum(x.frame_bytes_received for x in links)
    tls = [x for x in links if x.transport == "tls"]
    out: dict[str, Any] = {
        "transport": links[0].transport,
        "measured_at": "TCP socket (bytes the kernel took/gave: TLS records included, TCP/IP headers not)",
        "requests": n,
        "bytes_sent": sum(x.bytes_sent for x in links),
        "bytes_received": sum(x.bytes_received for x in links),
        # after the handshake; includes per-connection TLS messages (session tickets, close alerts)
        "per_request": {
            "wire_sent": sent / n, "wire_received": received / n,
            "frame_sent": f_sent / n, "frame_received": f_received / n,
            "overhead_sent": (sent - f_sent) / n, "overhead_received": (received - f_received) / n,
        } if n else {},
        "connect_ms": summary([x.connect_ms for x in links]),
        "connections": [asdict(x) for x in links],
    }
    if tls:
        out["tls"] = {
            "version": sorted({x.tls_version for x in tls if x.tls_version}),
            "cipher": sorted({x.cipher for x in tls if x.cipher}),
            "handshake_ms": summary([x.handshake_ms for x in tls if x.handshake_ms is not None]),
            "handshake_bytes_sent": summary([x.handshake_bytes_sent for x in tls]),
            "handshake_bytes_received": summary([x.handshake_bytes_received for x in tls]),
        }
    return out


def summarize_send(records: list[SendRecord], wall_s: float, mbps: float | None,
                   links: Sequence[LinkStats] = ()) -> dict[str, Any]:
    """The ``send`` result: latency percentiles per stage, bytes (packets and, with ``links``, on
    the wire), link times, accuracy, errors."""
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
        "error_reasons": dict(Counter(r.error or "" for r in records if not r.ok).most_common(10)),
        "latency_ms": {k: summary(v) for k, v in sorted(stages.items())},
        "bytes": {"packet": summary(sizes), "ideal": summary([r.ideal_bytes for r in records])},
        "link": {
            "emulated_mbps": mbps,
            "model_ms": link.transmit_model_ms(mean_bytes) if sizes else {},
        },
        "wire": summarize_wire(links),
        "accuracy": {"top1": (sum(r.predicted == r.label for r in labelled) / len(labelled)) if labelled else None,
                     "labelled": len(labelled)},
        "batch_mean": float(np.mean([r.batch for r in ok])) if ok else 0.0,
        "throughput": {"images_per_s": len(ok) / wall_s if wall_s > 0 else 0.0, "wall_s": wall_s},
    }


def send_result(encoder, inputs, outcome: SendOutcome, server: str, *, mbps: float | None, concurrency: int,
                connections: int) -> dict[str, Any]:
    """The JSON result of ``splitbits send`` (schema ``splitbits.send/1``): where and what was sent,
    then :func:`summarize_send` of ``outcome``."""
    import sys

    from splitbits.runtime.machine import machine_info

    b = encoder.bundle
    return {
        "schema": "splitbits.send/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "bundle": {"path": str(b.path), "fingerprint": b.fingerprint, "family": b.family},
        "device": machine_info(),
        "backend": encoder.backend.describe(),
        "coder": encoder.coder.name,
        "server": server,
        "inputs": {"name": inputs.name, "count": len(inputs), **inputs.meta},
        "concurrency": concurrency,
        "connections": connections,
        "requested": len(inputs),
        **summarize_send(outcome.records, outcome.wall_s, mbps, outcome.links),
        "connection_errors": outcome.connection_errors,
    }


def print_send(result: dict[str, Any]) -> None:
    """A ``send`` result as a latency table, a line of bytes/accuracy/throughput and one of wire bytes."""
    from splitbits.runtime.report import rich_table

    rows = [[k, v["p50"], v["p90"], v["p99"]] for k, v in result["latency_ms"].items()]
    rich_table(f"send → {result['server']}  ({result['answered_ok']}/{result['requested']} answered)",
               ["stage (ms)", "p50", "p90", "p99"], rows)
    acc = result["accuracy"]["top1"]
    print(f"bytes/image {result['bytes']['packet']['mean']:.1f}  accuracy "
          f"{'–' if acc is None else f'{acc:.3f}'}  throughput {result['throughput']['images_per_s']:.1f} img/s  "
          "transmit model " + ", ".join(f"{k} Mbit/s {v:.2f} ms" for k, v in result["link"]["model_ms"].items()))
    wire = result["wire"]
    if wire.get("per_request"):
        pr, tls_info = wire["per_request"], wire.get("tls")
        mode = f"{'/'.join(tls_info['version'])} {'/'.join(tls_info['cipher'])}" if tls_info else "plain TCP"
        print(f"wire ({mode}):"
              f" {pr['wire_sent']:.1f} B sent, {pr['wire_received']:.1f} B received per request "
              f"(link frames {pr['frame_sent']:.1f} / {pr['frame_received']:.1f} B)"
              + (f"; handshake {tls_info['handshake_ms']['p50']:.2f} ms, "
                 f"{tls_info['handshake_bytes_sent']['mean']:.0f} B sent / "
                 f"{tls_info['handshake_bytes_received']['mean']:.0f} B received" if tls_info else ""))


def unanswered(result: dict[str, Any], outcome: SendOutcome) -> list[str]:
    """Why images of a ``send`` were not answered, one line each (none when all were)."""
    requested = result["requested"]
    if result["answered_ok"] == requested:
        return []
    reasons = dict(result["error_reasons"])
    if requested > len(outcome.records):
        reasons["not sent"] = requested - len(outcome.records)
    return [f"{requested - result['answered_ok']}/{requested} not answered: "
            + "; ".join(f"{n}× {why}" for why, n in reasons.items()),
            *(f"connection: {why}" for why in outcome.connection_errors)]
