"""Hostile peers on the link: idle and trickling connections, the connection limit, (mutual) TLS,
wire bytes measured at the socket, and a server that refuses a bundle failing its golden check."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from splitbits.runtime import link
from splitbits.runtime.client import LinkClient, LinkError, send_images, summarize_send
from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder
from splitbits.runtime.server import ServerConfig, SplitServer


@pytest.fixture(scope="module")
def dec_packets(tiny_bundles):
    """A server decoder of the tiny MSHP bundle and a few real packets of it."""
    from support import textured_images

    enc = EdgeEncoder(tiny_bundles["mshp"], "onnxruntime")
    images = textured_images(4, seed=5)
    return ServerDecoder(tiny_bundles["mshp"], "onnxruntime"), enc, images, [enc.encode(im) for im in images]


def _run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def _reason(reader: asyncio.StreamReader, timeout: float = 10.0) -> dict | None:
    """The JSON of the connection-level ERROR (request id 0) the server sends before closing."""
    frame = await asyncio.wait_for(link.read_frame(reader, link.MAX_RESPONSE_BYTES), timeout)
    if frame is None or frame.request_id != 0 or frame.kind != link.KIND_ERROR:
        return None
    return frame.json()


# --------------------------------------------------------------------------------------------
# deadlines and the connection limit
# --------------------------------------------------------------------------------------------


def test_idle_and_slow_connections_time_out_and_free_their_slots(dec_packets):
    """2× max_connections hostile connections (idle, half a frame, half a prefix, trickling): the
    extra ones are refused with the reason, the slot holders are closed at their deadline with the
    reason, and a well-formed client is answered within 1 s of the deadline."""
    dec, _, _, packets = dec_packets
    cfg = ServerConfig(port=0, max_connections=8, frame_timeout_s=1.0, idle_timeout_s=0.6)
    deadline = max(cfg.frame_timeout_s, cfg.idle_timeout_s)
    announced = 2000  # a frame length within the bound

    async def hostile(addr, kind):
        reader, writer = await asyncio.open_connection(*addr)
        trickler = None
        if kind == "half-frame":
            writer.write(struct.pack("!I", announced) + b"\x01" * (announced // 2))
        elif kind == "half-prefix":
            writer.write(b"\x00\x00")
        elif kind == "trickle":
            async def trickle():
                writer.write(struct.pack("!I", announced))
                with pytest.raises((ConnectionError, OSError)):
                    while True:
                        await asyncio.sleep(0.2)
                        writer.write(b"\x01")
                        await writer.drain()
            trickler = asyncio.ensure_future(trickle())
        return reader, writer, trickler

    async def go():
        loop = asyncio.get_running_loop()
        async with SplitServer(dec, cfg) as srv:
            rss0 = _rss_mb()
            kinds = ["idle", "half-frame", "half-prefix", "trickle"] * 2
            held = [await hostile(srv.address, k) for k in kinds]
            while srv.stats.connections_open < cfg.max_connections:
                await asyncio.sleep(0.005)
            t_held = loop.time()
            extra = [await hostile(srv.address, "idle") for _ in range(cfg.max_connections)]
            refused = [await _reason(r) for r, _, _ in extra]
            # a well-formed client is refused while the slots are held, and told why
            c = await LinkClient(*srv.address).connect()
            with pytest.raises(LinkError, match="refused the connection: Busy"):
                await c.request(packets[0])
            await c.close()
            max_buffered, served_at, reply = 0, None, None
            while served_at is None and loop.time() < t_held + deadline + 3.0:
                max_buffered = max([max_buffered, *srv.buffered_bytes()])
                c = await LinkClient(*srv.address, timeout_s=10).connect()
                try:
                    reply = await c.request(packets[0])
                    served_at = loop.time()
                except LinkError:
                    await asyncio.sleep(0.05)
                finally:
                    await c.close()
            closed_with = [await _reason(r) for r, _, _ in held]
            for _, w, t in held + extra:
                if t is not None:
                    await asyncio.wait_for(t, 5)
                w.close()
            for _ in range(200):
                if srv.stats.connections_open == 0:
                    break
                await asyncio.sleep(0.01)
            print(f"\nRSS delta with {len(held) + len(extra)} hostile connections: {_rss_mb() - rss0:+.1f} MB; "
                  f"largest receive buffer {max_buffered} B (frame bound {srv.max_frame} B); "
                  f"served {served_at - t_held if served_at else float('nan'):.2f} s after the slots were taken")
            return refused, closed_with, served_at, t_held, reply, max_buffered, srv

    refused, closed_with, served_at, t_held, reply, max_buffered, srv = _run(go())
    assert all(r is not None and r["error"] == "Busy" and "connection limit" in r["message"] for r in refused)
    assert served_at is not None, "a well-formed client was never served: the slots stayed held"
    assert served_at - t_held <= max(cfg.frame_timeout_s, cfg.idle_timeout_s) + 1.0
    assert reply.ok and reply.body["class"] == int(np.argmax(dec.decode(packets[0])))
    expect = {"idle": "IdleTimeout", "half-frame": "FrameTimeout", "half-prefix": "FrameTimeout",
              "trickle": "FrameTimeout"}
    assert [r and r["error"] for r in closed_with] == [expect[k] for k in ["idle", "half-frame", "half-prefix",
                                                                            "trickle"] * 2]
    s = srv.stats
    assert s.connections_timed_out == 8 and dict(s.timeouts) == {"idle": 2, "frame": 6}
    assert s.connections_refused >= cfg.max_connections + 1
    assert s.connections_open == 0
    assert max_buffered <= srv.max_frame


def test_trickling_client_does_not_extend_the_frame_deadline(dec_packets):
    """One byte every 0.2 s would satisfy any per-read timeout; the frame deadline counts from the
    frame's first byte, so the connection is closed about frame_timeout_s after it."""
    dec, *_ = dec_packets
    cfg = ServerConfig(port=0, frame_timeout_s=1.0, idle_timeout_s=30.0)

    async def go():
        loop = asyncio.get_running_loop()
        async with SplitServer(dec, cfg) as srv:
            reader, writer = await asyncio.open_connection(*srv.address)
            t0 = loop.time()
            writer.write(struct.pack("!I", 4000))
            sent = 4

            async def trickle():
                nonlocal sent
                while True:
                    await asyncio.sleep(0.2)
                    writer.write(b"\x01")
                    sent += 1
                    await writer.drain()

            t = asyncio.ensure_future(trickle())
            reason = await _reason(reader, timeout=10.0)
            closed_after = loop.time() - t0
            t.cancel()
            writer.close()
            return reason, closed_after, sent, srv.stats

    reason, closed_after, sent, stats = _run(go())
    assert reason is not None and reason["error"] == "FrameTimeout"
    assert cfg.frame_timeout_s * 0.9 <= closed_after <= cfg.frame_timeout_s + 1.0
    assert 4 < sent < 4000  # it kept trickling and never finished the frame
    assert stats.timeouts["frame"] == 1


def test_idle_timeout_spares_a_connection_with_a_request_in_flight(dec_packets):
    """Requests held in the batcher longer than the idle timeout keep the connection open (a second
    request sent meanwhile is read and answered); the idle clock starts once nothing is in flight."""
    dec, _, _, packets = dec_packets
    cfg = ServerConfig(port=0, idle_timeout_s=0.3, max_batch=64, max_wait_ms=700.0)

    async def go():
        loop = asyncio.get_running_loop()
        async with SplitServer(dec, cfg) as srv:
            c = await LinkClient(*srv.address).connect()
            first = asyncio.ensure_future(c.request(packets[0]))  # waits ~0.7 s in the batcher
            await asyncio.sleep(0.5)  # longer than the idle timeout, with the first request in flight
            second = await c.request(packets[1])
            first = await first
            t_answered = loop.time()
            while not c.connection_error and loop.time() < t_answered + 5:
                await asyncio.sleep(0.005)
            idle_after = loop.time() - t_answered
            await c.close()
            return first, second, c.connection_error, idle_after, srv.stats

    first, second, error, idle_after, stats = _run(go())
    assert first.ok and second.ok and first.body["timings_ms"]["queue"] >= 0.5 * cfg.max_wait_ms
    assert error is not None and "IdleTimeout" in error
    assert idle_after >= 0.9 * cfg.idle_timeout_s  # counted from the last answer, not from the last request
    assert stats.timeouts == {"idle": 1}


def test_server_config_rejects_bad_deadlines():
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="frame_timeout_s"):
            ServerConfig(frame_timeout_s=bad)
        with pytest.raises(ValueError, match="idle_timeout_s"):
            ServerConfig(idle_timeout_s=bad)
    with pytest.raises(ValueError, match="tls"):
        ServerConfig(tls="cert.pem")  # type: ignore[arg-type]


class ThreadServer:
    """A SplitServer on loopback in its own thread and event loop (for commands run by ``main``)."""

    def __init__(self, dec: ServerDecoder, config: ServerConfig) -> None:
        self.dec, self.config = dec, config
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.srv = SplitServer(self.dec, self.config)
        await self.srv.start()
        self._ready.set()
        await self._stop.wait()
        await self.srv.stop()

    def __enter__(self) -> ThreadServer:
        self._thread.start()
        assert self._ready.wait(30), "server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    @property
    def where(self) -> str:
        return "{}:{}".format(*self.srv.address)


@pytest.fixture()
def npz(tmp_path, dec_packets):
    path = tmp_path / "in.npz"
    np.savez(path, images=dec_packets[2], labels=np.arange(len(dec_packets[2])))
    return path


def _send_cli(capsys, bundle, where: str, npz: Path, *extra: str) -> tuple[int, str, str]:
    from splitbits.runtime.cli import main

    rc = main(["send", str(bundle), "--server", where, "--inputs", str(npz), "--backend", "onnxruntime",
               "--no-progress", *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def test_busy_client_learns_why_and_send_exits_nonzero_in_one_line(dec_packets, tiny_bundles, npz, capsys):
    import socket

    dec, *_ = dec_packets
    with ThreadServer(dec, ServerConfig(port=0, max_connections=1, idle_timeout_s=60.0)) as ts, \
            socket.create_connection(ts.srv.address) as holder:
        for _ in range(500):
            if ts.srv.stats.connections_open == 1:
                break
            threading.Event().wait(0.01)
        rc, _, err = _send_cli(capsys, tiny_bundles["mshp"], ts.where, npz)
        holder.close()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("splitbits send: error: server refused the connection: Busy: ")
    assert "connection limit" in lines[0]


# --------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Certificates made here (trustme): a CA that enrols devices and signs the server's
    certificate, an enrolled device, and a device of another CA."""
    trustme = pytest.importorskip("trustme")
    root = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    files = {}

    def save(name: str, blob) -> Path:
        path = root / name
        blob.write_to_path(str(path))
        files[name] = path
        return path

    save("ca.pem", ca.cert_pem)
    save("other-ca.pem", other.cert_pem)
    server = ca.issue_cert("localhost", "127.0.0.1")
    save("server.pem", server.cert_chain_pems[0])
    save("server.key", server.private_key_pem)
    device = ca.issue_cert("device-1.fleet")
    save("device.pem", device.cert_chain_pems[0])
    save("device.key", device.private_key_pem)
    stranger = other.issue_cert("stranger.fleet")
    save("stranger.pem", stranger.cert_chain_pems[0])
    save("stranger.key", stranger.private_key_pem)
    return files


def _mtls_server_config(pki, **kw) -> ServerConfig:
    ctx = link.server_tls_context(pki["server.pem"], pki["server.key"], client_ca=pki["ca.pem"])
    return ServerConfig(port=0, tls=ctx, **kw)


def _device_ctx(pki, who: str | None = "device", ca: str = "ca.pem"):
    if who is None:
        return link.client_tls_context(pki[ca])
    return link.client_tls_context(pki[ca], pki[f"{who}.pem"], pki[f"{who}.key"])


def test_mtls_serves_the_enrolled_device_and_refuses_unenrolled_ones(dec_packets, pki):
    dec, _, _, packets = dec_packets
    expected = int(np.argmax(dec.decode(packets[0])))

    async def attempt(addr, ctx):
        c = LinkClient(*addr, tls=ctx, timeout_s=10)
        try:
            await c.connect()
            return await c.request(packets[0])
        except LinkError as exc:
            return exc
        finally:
            await c.close()

    async def go():
        async with SplitServer(dec, _mtls_server_config(pki)) as srv:
            first = await attempt(srv.address, _device_ctx(pki))
            no_cert = await attempt(srv.address, _device_ctx(pki, None))
            stranger = await attempt(srv.address, _device_ctx(pki, "stranger"))
            again = await attempt(srv.address, _device_ctx(pki))
            return first, no_cert, stranger, again, srv.stats

    first, no_cert, stranger, again, stats = _run(go())
    for rep in (first, again):
        assert not isinstance(rep, Exception), rep
        assert rep.ok and rep.body["class"] == expected
    for exc in (no_cert, stranger):
        assert isinstance(exc, LinkError) and "\n" not in str(exc)
        assert "refused the connection" in str(exc) and "TLS" in str(exc) and "certificate" in str(exc), exc
    assert stats.tls_handshakes == 2 and stats.tls_handshake_failures == 2
    assert stats.answered_ok == 2 and stats.requests == 2  # nothing of the unenrolled was read as a request


def test_plain_client_to_a_tls_server_fails_cleanly_and_others_are_served(dec_packets, pki):
    dec, _, _, packets = dec_packets

    async def go():
        async with SplitServer(dec, _mtls_server_config(pki)) as srv:
            plain = LinkClient(*srv.address, timeout_s=10)
            await plain.connect()
            with pytest.raises(LinkError) as info:
                await plain.request(packets[0])
            await plain.close()
            async with LinkClient(*srv.address, tls=_device_ctx(pki), timeout_s=10) as c:
                ok = await c.request(packets[0])
            return str(info.value), ok, srv.stats

    err, ok, stats = _run(go())
    assert "closed the connection" in err or "lost" in err, err
    assert ok.ok
    assert stats.tls_handshake_failures == 1 and stats.requests == 1


def test_tls_client_refuses_a_plain_server_and_an_untrusted_certificate(dec_packets, pki):
    dec, *_ = dec_packets

    async def go():
        async with SplitServer(dec, ServerConfig(port=0)) as plain_srv:
            with pytest.raises(LinkError, match=r"TLS handshake .* failed") as to_plain:
                await LinkClient(*plain_srv.address, tls=_device_ctx(pki), timeout_s=10).connect()
        async with SplitServer(dec, _mtls_server_config(pki)) as srv:
            with pytest.raises(LinkError, match="server certificate not trusted") as untrusted:
                await LinkClient(*srv.address, tls=_device_ctx(pki, "device", ca="other-ca.pem"),
                                 timeout_s=10).connect()
            with pytest.raises(LinkError, match="not trusted"):  # the certificate does not name this host
                await LinkClient(*srv.address, tls=_device_ctx(pki), server_hostname="elsewhere.example",
                                 timeout_s=10).connect()
        return str(to_plain.value), str(untrusted.value)

    to_plain, untrusted = _run(go())
    assert "\n" not in to_plain and "\n" not in untrusted


def test_stalled_tls_handshake_is_bounded_by_the_frame_deadline(dec_packets, pki):
    """A peer that connects and never finishes its handshake holds its slot for frame_timeout_s,
    then the slot serves an enrolled device."""
    dec, _, _, packets = dec_packets
    cfg = _mtls_server_config(pki, max_connections=1, frame_timeout_s=0.5, idle_timeout_s=30.0)

    async def go():
        loop = asyncio.get_running_loop()
        async with SplitServer(dec, cfg) as srv:
            reader, writer = await asyncio.open_connection(*srv.address)
            writer.write(b"\x16\x03\x01")  # the start of a TLS record, then nothing
            t0 = loop.time()
            eof = await asyncio.wait_for(reader.read(), 10)
            closed_after = loop.time() - t0
            writer.close()
            async with LinkClient(*srv.address, tls=_device_ctx(pki), timeout_s=10) as c:
                ok = await c.request(packets[0])
            return eof, closed_after, ok, srv.stats

    eof, closed_after, ok, stats = _run(go())
    assert eof == b"" and closed_after <= cfg.frame_timeout_s + 1.0
    assert stats.timeouts["handshake"] == 1 and stats.tls_handshake_failures == 1
    assert ok.ok


def test_wire_bytes_are_measured_for_plain_and_tls(dec_packets, pki):
    """The socket's own counts: plain TCP carries exactly the link frames; TLS adds its records
    and a handshake, reported with the version, cipher and handshake time."""
    dec, enc, images, packets = dec_packets
    labels = [0] * len(images)

    async def go(cfg, ctx):
        async with SplitServer(dec, cfg) as srv:
            out = await send_images(enc, *srv.address, images, labels, tls=ctx, concurrency=2)
            return summarize_send(out.records, out.wall_s, None, out.links)["wire"]

    plain = _run(go(ServerConfig(port=0), None))
    tls = _run(go(_mtls_server_config(pki), _device_ctx(pki)))
    frames = sum(len(p) + link.HEADER_BYTES for p in packets) / len(packets)
    assert plain["per_request"]["wire_sent"] == pytest.approx(frames) and plain["per_request"]["overhead_sent"] == 0
    assert tls["per_request"]["frame_sent"] == pytest.approx(frames)
    # TLS 1.3 AEAD records: at least a 5-byte header, the content type and a 16-byte tag per record
    assert tls["per_request"]["overhead_sent"] >= 22 and tls["per_request"]["overhead_received"] >= 22
    t = tls["tls"]
    assert t["version"] == ["TLSv1.3"] and t["cipher"] and t["handshake_ms"]["p50"] > 0
    assert t["handshake_bytes_sent"]["mean"] > 500 and t["handshake_bytes_received"]["mean"] > 500  # certs both ways
    c = tls["connections"][0]
    assert c["bytes_sent"] == c["handshake_bytes_sent"] + round(tls["per_request"]["wire_sent"] * tls["requests"])
    pp, tp = plain["per_request"], tls["per_request"]
    print(f"\nper request: plain {pp['wire_sent']:.0f}/{pp['wire_received']:.0f} B, "
          f"TLS {tp['wire_sent']:.0f}/{tp['wire_received']:.0f} B sent/received; "
          f"handshake {t['handshake_bytes_sent']['mean']:.0f}/{t['handshake_bytes_received']['mean']:.0f} B, "
          f"{t['handshake_ms']['p50']:.1f} ms")


def test_send_over_mutual_tls_from_the_command_line(dec_packets, tiny_bundles, pki, npz, tmp_path, capsys):
    dec, *_ = dec_packets
    out_json = tmp_path / "send.json"
    tls_opts = ["--tls-ca", str(pki["ca.pem"]), "--tls-server-name", "localhost"]
    with ThreadServer(dec, _mtls_server_config(pki)) as ts:
        rc, out, err = _send_cli(capsys, tiny_bundles["mshp"], ts.where, npz, *tls_opts, "--tls-cert",
                                 str(pki["device.pem"]), "--tls-key", str(pki["device.key"]), "--json", str(out_json))
        rc_stranger, _, err_stranger = _send_cli(capsys, tiny_bundles["mshp"], ts.where, npz, *tls_opts, "--tls-cert",
                                                 str(pki["stranger.pem"]), "--tls-key", str(pki["stranger.key"]))
        failures = ts.srv.stats.tls_handshake_failures
    assert rc == 0, err
    res = json.loads(out_json.read_text())
    assert res["answered_ok"] == len(dec_packets[3]) and res["wire"]["tls"]["version"] == ["TLSv1.3"]
    assert "wire (TLSv1.3" in out
    lines = err_stranger.strip().splitlines()
    assert rc_stranger == 2 and len(lines) == 1 and "TLS" in lines[0], err_stranger
    assert failures == 1


@pytest.mark.parametrize("case", ["garbage-ca", "key-mismatch", "key-without-ca"])
def test_bad_tls_files_are_one_line_errors(tiny_bundles, pki, npz, tmp_path, capsys, case):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    bundle = tiny_bundles["mshp"]
    args = {"garbage-ca": ["--tls-ca", str(junk)],
            "key-mismatch": ["--tls-ca", str(pki["ca.pem"]), "--tls-cert", str(pki["device.pem"]),
                             "--tls-key", str(pki["stranger.key"])],
            "key-without-ca": ["--tls-key", str(pki["device.key"])]}[case]
    rc, _, err = _send_cli(capsys, bundle, "127.0.0.1:9", npz, *args)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert {"garbage-ca": "not usable", "key-mismatch": "not usable", "key-without-ca": "need --tls-ca"}[case] in err
    from splitbits.runtime.cli import main

    rc = main(["serve", str(bundle), "--port", "0", "--backend", "onnxruntime", "--tls-cert", str(pki["server.pem"]),
               "--tls-key", str(pki["device.key"])])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "not usable" in err, err


# --------------------------------------------------------------------------------------------
# a bundle that fails its golden check is not served
# --------------------------------------------------------------------------------------------


def test_serve_refuses_a_bundle_that_fails_its_golden_check(bundle_copy):
    """tail.onnx altered and the manifest's hashes and fingerprint recomputed: the bundle loads
    (only the golden check can tell), and ``serve`` refuses it with exit 3 without listening."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from splitbits.runtime.bundle import fingerprint_of, load_bundle, sha256_file

    bundle = bundle_copy("mshp")
    tail = bundle / "tail.onnx"
    model = onnx.load(str(tail))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the largest weight
    w = numpy_helper.to_array(init).copy()
    init.CopyFrom(numpy_helper.from_array((w * 1.5 + 0.05).astype(w.dtype), init.name))
    onnx.save(model, str(tail))
    mp = bundle / "manifest.json"
    m = json.loads(mp.read_text())
    m["files"]["tail.onnx"] = {"sha256": sha256_file(tail), "bytes": tail.stat().st_size}
    m["fingerprint"] = fingerprint_of(m["files"])
    mp.write_text(json.dumps(m, indent=2))
    load_bundle(bundle)  # the manifest checks pass

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        out = subprocess.run([sys.executable, "-m", "splitbits.runtime.cli", "serve", str(bundle), "--port", "0",
                              "--backend", "onnxruntime"], capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"serve kept running on a bundle that fails its golden check: {exc.stdout!r}")
    assert out.returncode == 3, out.stderr
    assert "listening" not in out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "golden verification" in lines[0] and "tail.logits" in lines[0], out.stderr
