"""The edge→server wire protocol and link-rate emulation.

Frames (both directions, big-endian)::

    u32 length      bytes that follow (kind + flags + request id + body)
    u8  kind        1 = INFER (client → server), 2 = RESULT, 3 = ERROR (server → client)
    u8  flags       INFER: bit 0 = also send the logits back
    u32 request id  chosen by the client, echoed by the server
    ...  body       INFER: one packet (see ``splitbits.runtime.packet``); RESULT/ERROR: UTF-8 JSON

The server bounds ``length`` before reading the body; a frame whose length is out of bounds
cannot be skipped safely, so the server answers it with an ERROR (request id 0) and closes that
connection only. A well-framed request with a bad packet gets an ERROR with its own id and the
connection goes on. An ERROR with request id 0 is about the connection (refused at the connection
limit, a frame or idle deadline missed, an impossible frame): its JSON says why, then the server
closes.

The link runs over plain TCP or TLS (``server_tls_context`` / ``client_tls_context``: TLS 1.2 at
least, 1.3 when both ends have it; with a client CA the server requires a client certificate signed
by it, i.e. mutual TLS, so only enrolled devices are served).

``TokenBucket`` paces bytes at a link rate (Mbit/s) so a client can show how long a packet takes
on a 1, 10 or 100 Mbit/s link; its clock is injectable, so its arithmetic is tested without time.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitbits.runtime.errors import SplitbitsError

KIND_INFER = 1
KIND_RESULT = 2
KIND_ERROR = 3
KINDS = {KIND_INFER, KIND_RESULT, KIND_ERROR}
FLAG_LOGITS = 1

_LEN = struct.Struct("!I")
_HDR = struct.Struct("!BBI")
HEADER_BYTES = _LEN.size + _HDR.size
#: largest JSON answer a client accepts (logits of 1000 classes are ~20 kB)
MAX_RESPONSE_BYTES = 4 << 20
#: bytes per write when pacing (one Ethernet payload)
CHUNK_BYTES = 1460


class FrameError(ValueError):
    """A frame whose length or kind cannot be accepted (the stream cannot be trusted after it)."""


@dataclass(frozen=True)
class Frame:
    kind: int
    flags: int
    request_id: int
    body: bytes

    def json(self) -> dict[str, Any]:
        return json.loads(self.body.decode("utf-8"))


def encode_frame(kind: int, request_id: int, body: bytes, flags: int = 0) -> bytes:
    """One frame as bytes (length prefix included)."""
    if kind not in KINDS:
        raise ValueError(f"unknown frame kind {kind}")
    if not 0 <= request_id < 1 << 32:
        raise ValueError("request id must fit in 32 bits")
    return _LEN.pack(_HDR.size + len(body)) + _HDR.pack(kind, flags, request_id) + body


def encode_json(kind: int, request_id: int, obj: dict[str, Any]) -> bytes:
    return encode_frame(kind, request_id, json.dumps(obj, separators=(",", ":")).encode())


def frame_length(prefix: bytes, max_bytes: int) -> int:
    """The length announced by a 4-byte prefix, checked against ``[header, max_bytes]``."""
    (n,) = _LEN.unpack(prefix)
    if n < _HDR.size:
        raise FrameError(f"frame of {n} bytes is shorter than its header ({_HDR.size} bytes)")
    if n > max_bytes:
        raise FrameError(f"frame of {n} bytes exceeds the bound of {max_bytes} bytes")
    return n


def decode_frame(data: bytes) -> Frame:
    """Split the bytes after the length prefix into a :class:`Frame`."""
    if len(data) < _HDR.size:
        raise FrameError("truncated frame header")
    kind, flags, rid = _HDR.unpack_from(data, 0)
    if kind not in KINDS:
        raise FrameError(f"unknown frame kind {kind}")
    return Frame(kind, flags, rid, bytes(data[_HDR.size:]))


async def read_frame(reader, max_bytes: int, head: bytes = b"") -> Frame | None:
    """Read one frame from an ``asyncio.StreamReader``; ``None`` at a clean end of stream.

    ``head`` is the start of the length prefix when the caller already read it (the server reads
    a frame's first byte on its own to start the frame's deadline)."""
    try:
        prefix = head + await reader.readexactly(_LEN.size - len(head))
    except asyncio.IncompleteReadError as exc:
        if exc.partial or head:
            raise FrameError("connection closed inside a length prefix") from exc
        return None
    n = frame_length(prefix, max_bytes)
    try:
        data = await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        raise FrameError(f"connection closed after {len(exc.partial)} of {n} frame bytes") from exc
    return decode_frame(data)


def parse_hostport(text: str, default_port: int = 5800) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` or ``[v6]:PORT`` → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or str(default_port)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, str(default_port)
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host or "127.0.0.1", int(port)


# --------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------


class TLSConfigError(SplitbitsError):
    """A certificate, key or CA file that cannot be used (missing, unreadable, not PEM, mismatched)."""


def _no_password() -> bytes:
    raise TLSConfigError("the private key is encrypted; give an unencrypted key file (keep it readable by "
                         "this user only)")


def _load(what: str, path: str | Path, load: Callable[[], None]) -> None:
    if not Path(path).is_file():
        raise TLSConfigError(f"{what} {path}: no such file")
    try:
        load()
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{what} {path}: not usable ({exc.reason or exc})") from exc
    except OSError as exc:
        raise TLSConfigError(f"{what} {path}: {exc.strerror or exc}") from exc


def _chain(ctx: ssl.SSLContext, cert: str | Path, key: str | Path | None) -> None:
    if key is not None and not Path(key).is_file():
        raise TLSConfigError(f"key {key}: no such file")
    _load("certificate/key", cert, lambda: ctx.load_cert_chain(cert, key, password=_no_password))


def server_tls_context(cert: str | Path, key: str | Path | None = None,
                       client_ca: str | Path | None = None) -> ssl.SSLContext:
    """The server's TLS context: its certificate chain and key (``key`` None: in ``cert``); with
    ``client_ca`` every client must present a certificate signed by that CA (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.num_tickets = 0  # clients do not resume sessions: no TLS 1.3 session tickets on the wire
    _chain(ctx, cert, key)
    if client_ca is not None:
        _load("client CA", client_ca, lambda: ctx.load_verify_locations(cafile=str(client_ca)))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_tls_context(ca: str | Path, cert: str | Path | None = None,
                       key: str | Path | None = None) -> ssl.SSLContext:
    """The client's TLS context: trusts only ``ca`` for the server's certificate (host name checked);
    ``cert``/``key`` is this device's certificate for a server that requires one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load("CA", ca, lambda: ctx.load_verify_locations(cafile=str(ca)))
    if cert is not None:
        _chain(ctx, cert, key)
    elif key is not None:
        raise TLSConfigError("a key without a certificate: give the certificate too")
    return ctx


def tls_error_text(exc: BaseException) -> str:
    """One line for a TLS failure: OpenSSL's reason and, where there is one, the verification error."""
    verify = getattr(exc, "verify_message", None)
    reason = getattr(exc, "reason", None)
    if verify:
        return f"{reason or 'certificate verify failed'}: {verify}"
    if reason:
        return str(reason).replace("_", " ").lower()
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------------------------
# link-rate emulation
# --------------------------------------------------------------------------------------------


def mbps_to_bytes_per_s(mbps: float) -> float:
    if not mbps > 0:
        raise ValueError(f"link rate must be positive, got {mbps} Mbit/s")
    return mbps * 1e6 / 8.0


def transmit_seconds(nbytes: int, mbps: float) -> float:
    """Serialisation time of ``nbytes`` on a ``mbps`` Mbit/s link (no latency, no overhead)."""
    return nbytes / mbps_to_bytes_per_s(mbps)


#: link rates (Mbit/s) at which reports model the transmit time of the measured packets
MODEL_RATES_MBPS = (1.0, 10.0, 100.0)


def transmit_model_ms(mean_bytes: float) -> dict[str, float]:
    """The transmit time (ms) of a ``mean_bytes`` packet at each of ``MODEL_RATES_MBPS``, keyed ``"1"``, ``"10"``..."""
    return {f"{m:g}": transmit_seconds(round(mean_bytes), m) * 1e3 for m in MODEL_RATES_MBPS}


class TokenBucket:
    """A token bucket in bytes: ``reserve(n)`` says how long to wait before ``n`` bytes may go.

    Tokens accrue at the link rate up to ``burst_bytes``; a reservation may drive the bucket into
    debt, and the wait is the time to pay the debt back. Sleeping the returned delay before sending
    therefore moves bytes at the link rate, with at most ``burst_bytes`` ahead of it. With the
    default ``burst_bytes=0`` it is a plain serialisation model: ``n`` bytes on an idle link take
    exactly ``n / rate`` seconds. ``clock`` is injectable (tests use a fake one).
    """

    def __init__(self, mbps: float, burst_bytes: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst_bytes < 0:
            raise ValueError("burst must not be negative")
        self.mbps = float(mbps)
        self.rate = mbps_to_bytes_per_s(mbps)
        self.burst = float(burst_bytes)
        self.clock = clock
        self.tokens = float(burst_bytes)
        self.last = clock()

    def _refill(self) -> None:
        now = self.clock()
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now

    def reserve(self, nbytes: int) -> float:
        """Take ``nbytes`` worth of tokens; return the seconds to wait before sending them."""
        if nbytes < 0:
            raise ValueError("cannot reserve a negative number of bytes")
        self._refill()
        self.tokens -= nbytes
        return max(0.0, -self.tokens / self.rate)

    def available(self) -> float:
        """Tokens (bytes) available now; negative while in debt."""
        self._refill()
        return self.tokens


async def paced_write(writer, data: bytes, bucket: TokenBucket | None, chunk: int = CHUNK_BYTES) -> float:
    """Write ``data`` (paced by ``bucket`` when given) and drain; returns the seconds it took."""
    t0 = time.perf_counter()
    if bucket is None:
        writer.write(data)
        await writer.drain()
        return time.perf_counter() - t0
    mv = memoryview(data)
    for i in range(0, len(mv), chunk):
        part = mv[i:i + chunk]
        delay = bucket.reserve(len(part))
        if delay > 0:
            await _sleep_precise(delay)
        writer.write(part)
        await writer.drain()
    return time.perf_counter() - t0


async def _sleep_precise(delay: float, coarse: float = 0.002) -> None:
    """Sleep ``delay`` seconds to well under a millisecond: the event loop's timers round up to
    ~1 ms (epoll), so the last stretch yields to the loop in a loop instead (other tasks still run)."""
    deadline = time.monotonic() + delay
    if delay > coarse:
        await asyncio.sleep(delay - coarse)
    while time.monotonic() < deadline:
        await asyncio.sleep(0)
