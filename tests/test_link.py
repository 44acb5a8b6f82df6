"""The edge→server link: protocol, token bucket (fake clock), server/client on loopback, load test."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from splitbits.runtime import link
from splitbits.runtime.client import LinkClient, connection_reason, send_images, summarize_send
from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder
from splitbits.runtime.server import ServerConfig, SplitServer

# --------------------------------------------------------------------------------------------
# pure logic
# --------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_serialises_at_the_link_rate():
    clk = FakeClock()
    b = link.TokenBucket(1.0, clock=clk)  # 1 Mbit/s = 125 000 B/s, no burst
    assert b.reserve(125_000) == pytest.approx(1.0)
    clk.t += 1.0  # the sender slept the delay: the debt is paid
    assert b.reserve(12_500) == pytest.approx(0.1)
    clk.t += 0.1
    # an idle link does not bank time (burst 0): the next packet takes its own serialisation time
    clk.t += 5.0
    assert b.reserve(1250) == pytest.approx(0.01)


def test_token_bucket_accumulates_debt_for_back_to_back_reservations():
    clk = FakeClock()
    b = link.TokenBucket(10.0, clock=clk)  # 1.25 MB/s
    waits = [b.reserve(1250) for _ in range(4)]  # nobody slept: each waits for all before it
    assert waits == pytest.approx([0.001, 0.002, 0.003, 0.004])
    clk.t += 0.004
    assert b.available() == pytest.approx(0.0)


def test_token_bucket_burst_lets_the_first_bytes_through():
    clk = FakeClock()
    b = link.TokenBucket(100.0, burst_bytes=12_500, clock=clk)
    assert b.reserve(12_500) == 0.0
    assert b.reserve(12_500) == pytest.approx(0.001)
    clk.t += 10.0
    assert b.available() == pytest.approx(12_500)  # refills up to the burst only
    with pytest.raises(ValueError):
        link.TokenBucket(0.0)
    with pytest.raises(ValueError):
        b.reserve(-1)


def test_transmit_model():
    assert link.transmit_seconds(125_000, 1.0) == pytest.approx(1.0)
    assert link.transmit_seconds(1000, 100.0) == pytest.approx(8e-5)


def test_frames_roundtrip_and_bounds():
    data = link.encode_frame(link.KIND_INFER, 7, b"abc", link.FLAG_LOGITS)
    n = link.frame_length(data[:4], 100)
    f = link.decode_frame(data[4:4 + n])
    assert (f.kind, f.flags, f.request_id, f.body) == (link.KIND_INFER, link.FLAG_LOGITS, 7, b"abc")
    with pytest.raises(link.FrameError):
        link.frame_length(data[:4], 5)  # longer than allowed
    with pytest.raises(link.FrameError):
        link.frame_length((2).to_bytes(4, "big"), 100)  # shorter than a header
    with pytest.raises(link.FrameError):
        link.decode_frame(bytes([9, 0, 0, 0, 0, 1]))
    with pytest.raises(ValueError):
        link.encode_frame(link.KIND_INFER, 1 << 32, b"")
    assert json.loads(link.decode_frame(link.encode_json(link.KIND_RESULT, 1, {"a": 1})[4:]).body) == {"a": 1}


@pytest.mark.parametrize("text,expect", [("10.0.0.2:5800", ("10.0.0.2", 5800)), ("host", ("host", 5800)),
                                         ("[::1]:9", ("::1", 9)), (":7", ("127.0.0.1", 7))])
def test_parse_hostport(text, expect):
    assert link.parse_hostport(text) == expect


def test_parse_hostport_rejects_bad_ports():
    with pytest.raises(ValueError):
        link.parse_hostport("h:99999")


# --------------------------------------------------------------------------------------------
# loopback
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mshp(tiny_bundles):
    """Decoder, encoder, images, their packets and reference logits — logits pairwise distinct
    (by > 1e-4, far above batching noise) so that a mixed-up answer cannot pass."""
    from support import textured_images as _images

    dec = ServerDecoder(tiny_bundles["mshp"], "onnxruntime")
    enc = EdgeEncoder(tiny_bundles["mshp"], "onnxruntime")
    keep_img, keep_pk, keep_ref = [], [], []
    for im in _images(16, seed=11):
        p = enc.encode(im)
        r = dec.decode(p)
        if all(np.abs(r - q).max() > 1e-4 for q in keep_ref):
            keep_img.append(im)
            keep_pk.append(p)
            keep_ref.append(r)
        if len(keep_ref) == 6:
            break
    assert len(keep_ref) >= 4
    return dec, enc, np.stack(keep_img), keep_pk, np.stack(keep_ref)


def _run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_serve_answers_good_packets_and_errors_bad_ones_on_the_same_connection(mshp):
    dec, _, _, packets, ref = mshp

    async def go():
        async with SplitServer(dec, ServerConfig(port=0)) as srv, LinkClient(*srv.address) as c:
            good = await c.request(packets[0], want_logits=True)
            bad = await c.request(b"\x00" * 40)
            tampered = bytearray(packets[1])
            tampered[30] ^= 0xFF
            bad2 = await c.request(bytes(tampered))
            wrong_bundle = bytearray(packets[2])
            other = bytes([wrong_bundle[1] ^ 0x11]) + bytes(31)  # another bundle's fingerprint, with a valid CRC
            wrong_bundle[1] = other[0]
            wrong_bundle[-4:] = zlib.crc32(other + bytes(wrong_bundle[:-4])).to_bytes(4, "little")
            bad3 = await c.request(bytes(wrong_bundle))
            again = await c.request(packets[1], want_logits=True)
            return good, bad, bad2, bad3, again, srv.stats

    good, bad, bad2, bad3, again, stats = _run(go())
    assert good.ok and good.body["class"] == int(ref[0].argmax())
    np.testing.assert_allclose(good.body["logits"], ref[0], rtol=0, atol=2e-6)
    assert set(good.body["timings_ms"]) >= {"decode", "hyper", "queue", "tail", "server"}
    assert not bad.ok and bad.body["error"] == "PacketError"
    assert not bad2.ok and bad2.body["error"] == "PacketError" and "checksum" in bad2.body["message"]
    assert not bad3.ok and bad3.body["error"] == "WrongBundleError"
    assert again.ok and np.allclose(again.body["logits"], ref[1], rtol=0, atol=2e-6)
    assert stats.answered_error == 3 and stats.answered_ok == 2


def test_impossible_frame_length_closes_only_that_connection(mshp):
    dec, _, _, packets, ref = mshp

    async def go():
        async with SplitServer(dec, ServerConfig(port=0)) as srv:
            other = await LinkClient(*srv.address).connect()
            reader, writer = await asyncio.open_connection(*srv.address)  # a raw, hostile peer
            writer.write((1 << 30).to_bytes(4, "big") + b"x" * 16)  # 1 GiB announced
            await writer.drain()
            frame = await asyncio.wait_for(link.read_frame(reader, link.MAX_RESPONSE_BYTES), 5)
            closed = await asyncio.wait_for(reader.read(), 5) == b""
            reply = await other.request(packets[0])
            await other.close()
            writer.close()
            return frame, closed, reply, srv.stats

    frame, closed, reply, stats = _run(go())
    assert frame.request_id == 0 and frame.kind == link.KIND_ERROR and closed
    assert "FrameError" in connection_reason(frame.body)
    assert reply.ok and reply.body["class"] == int(ref[0].argmax())
    assert stats.frame_errors == 1


def test_dynamic_batching_groups_concurrent_requests_up_to_max_batch(mshp):
    dec, _, _, packets, ref = mshp
    cfg = ServerConfig(port=0, max_batch=4, max_wait_ms=200.0)

    async def go():
        async with SplitServer(dec, cfg) as srv, LinkClient(*srv.address, timeout_s=30) as c:
            reps = await asyncio.gather(*(c.request(packets[i % len(packets)], want_logits=True) for i in range(12)))
            return reps, srv.stats

    reps, stats = _run(go())
    assert all(r.ok for r in reps)
    assert max(int(k) for k in stats.batch_sizes) == 4  # batches formed, never above max_batch
    assert sum(int(k) * v for k, v in stats.batch_sizes.items()) == 12
    for i, r in enumerate(reps):
        np.testing.assert_allclose(r.body["logits"], ref[i % len(packets)], rtol=0, atol=2e-6)
        assert 1 <= r.body["batch"] <= 4


def test_batcher_does_not_wait_past_max_wait(mshp):
    dec, _, _, packets, _ = mshp

    async def go():
        async with SplitServer(dec, ServerConfig(port=0, max_batch=64, max_wait_ms=1.0)) as srv, \
                LinkClient(*srv.address) as c:
            return await c.request(packets[0])

    rep = _run(go(), timeout=20)
    assert rep.ok and rep.body["batch"] == 1  # alone: dispatched after max_wait, not held for 63 more


def test_load_many_clients_each_request_answered_exactly_once_with_its_logits(mshp):
    dec, _, _, packets, ref = mshp
    clients, per_client = 16, 8
    cfg = ServerConfig(port=0, max_batch=8, max_wait_ms=2.0, queue_size=16, max_inflight=4)

    async def one_client(addr, k):
        out = []
        async with LinkClient(*addr, timeout_s=60) as c:
            pending = []
            for j in range(per_client):
                idx = (k + j) % len(packets)
                pending.append((idx, asyncio.ensure_future(c.request(packets[idx], want_logits=True))))
                if len(pending) >= 3:  # a few in flight per client
                    i0, f0 = pending.pop(0)
                    out.append((i0, await f0))
            for i0, f0 in pending:
                out.append((i0, await f0))
            assert c.unexpected == 0
        return out

    async def go():
        async with SplitServer(dec, cfg) as srv:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(one_client(srv.address, k) for k in range(clients)))
            wall = time.perf_counter() - t0
            return results, wall, srv.stats

    results, wall, stats = _run(go(), timeout=120)
    replies = [r for res in results for r in res]
    assert len(replies) == clients * per_client
    for idx, rep in replies:
        assert rep.ok, rep.body
        assert rep.body["class"] == int(ref[idx].argmax())
        np.testing.assert_allclose(rep.body["logits"], ref[idx], rtol=0, atol=2e-6)
    ids = [(id(res), rep.request_id) for res in results for _, rep in res]
    assert len(set(ids)) == len(ids)
    assert stats.answered_ok == clients * per_client and stats.answered_error == 0
    assert stats.max_queue_depth <= cfg.queue_size and stats.max_inflight_seen <= cfg.max_inflight
    assert sum(stats.batch_sizes.values()) == stats.batches and max(int(k) for k in stats.batch_sizes) <= 8
    print(f"\nload test: {clients}x{per_client} requests in {wall:.2f} s = {len(replies) / wall:.0f} req/s, "
          f"mean batch {stats.to_dict()['mean_batch']:.2f}, max queue {stats.max_queue_depth}")


def test_flooding_client_is_held_by_back_pressure_and_still_answered(mshp):
    dec, _, _, packets, _ = mshp
    cfg = ServerConfig(port=0, max_inflight=4, queue_size=8)
    n = 120

    async def go():
        async with SplitServer(dec, cfg) as srv:
            reader, writer = await asyncio.open_connection(*srv.address)
            writer.write(b"".join(link.encode_frame(link.KIND_INFER, i + 1, packets[i % len(packets)])
                                  for i in range(n)))
            await writer.drain()
            got = {}
            while len(got) < n:
                f = await link.read_frame(reader, link.MAX_RESPONSE_BYTES)
                assert f is not None and f.request_id not in got
                got[f.request_id] = f
            writer.close()
            return got, srv.stats

    got, stats = _run(go())
    assert sorted(got) == list(range(1, n + 1))
    assert all(f.kind == link.KIND_RESULT for f in got.values())
    assert stats.max_inflight_seen <= cfg.max_inflight and stats.max_queue_depth <= cfg.queue_size


def test_stop_answers_in_flight_requests_then_closes(mshp):
    dec, _, _, packets, _ = mshp

    async def go():
        srv = SplitServer(dec, ServerConfig(port=0, max_batch=8, max_wait_ms=50.0))
        await srv.start()
        c = await LinkClient(*srv.address).connect()
        futs = [asyncio.ensure_future(c.request(p)) for p in packets]
        while srv.stats.requests < len(packets):  # every request read by the server: now they are in flight
            await asyncio.sleep(0.002)
        await srv.stop()
        reps = await asyncio.gather(*futs, return_exceptions=True)
        await c.close()
        with pytest.raises(OSError):
            await asyncio.open_connection(*srv.address)
        return reps, srv.stats

    reps, stats = _run(go())
    assert all(not isinstance(r, Exception) and r.ok for r in reps)
    assert stats.connections_open == 0


def test_send_images_with_link_emulation_reports_times_and_accuracy(mshp):
    dec, enc, images, packets, ref = mshp
    labels = [int(r.argmax()) for r in ref]

    async def go():
        async with SplitServer(dec, ServerConfig(port=0)) as srv:
            return await send_images(enc, *srv.address, images, labels, mbps=50.0, concurrency=2)

    outcome = _run(go())
    records, wall = outcome.records, outcome.wall_s
    assert [r.index for r in records] == list(range(len(images)))
    assert all(r.ok for r in records)
    assert [r.bytes for r in records] == [len(p) for p in packets]
    out = summarize_send(records, wall, 50.0, outcome.links)
    assert out["accuracy"]["top1"] == 1.0 and out["answered_ok"] == len(images)
    # plain TCP: the socket carried exactly the link's frames, measured (not computed from the packets)
    wire = out["wire"]
    assert wire["transport"] == "tcp" and wire["requests"] == len(images) and "tls" not in wire
    assert wire["bytes_sent"] == sum(len(p) + link.HEADER_BYTES for p in packets)
    assert wire["per_request"]["overhead_sent"] == 0 and wire["per_request"]["overhead_received"] == 0
    assert out["link"]["model_ms"]["1"] == pytest.approx(out["bytes"]["packet"]["mean"] * 8 / 1e3, rel=0.01)
    # paced sends take at least their serialisation time (never assert an upper wall-clock bound)
    for r in records:
        assert r.send_ms >= (r.bytes + link.HEADER_BYTES) * 8 / 50e6 * 1e3 * 0.9
    assert {"edge.head", "link.send", "rtt", "server.tail", "end_to_end"} <= set(out["latency_ms"])


def test_serve_and_send_commands_end_to_end(tiny_bundles, tmp_path):
    from support import stop_server

    bundle = str(tiny_bundles["fp"])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    srv = subprocess.Popen([sys.executable, "-m", "splitbits.runtime.cli", "serve", bundle, "--port", "0",
                            "--backend", "onnxruntime", "--stats-json", str(tmp_path / "stats.json")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = srv.stdout.readline()
        m = re.search(r"listening on ([\d.]+):(\d+)", line)
        assert m, line + srv.stderr.read()
        npz = tmp_path / "in.npz"
        from support import textured_images as _images

        np.savez(npz, images=_images(5, seed=3), labels=np.arange(5))
        out = subprocess.run([sys.executable, "-m", "splitbits.runtime.cli", "send", bundle, "--server",
                              f"{m.group(1)}:{m.group(2)}", "--inputs", str(npz), "--backend", "onnxruntime",
                              "--link-mbps", "100", "--json", str(tmp_path / "send.json"), "--no-progress"],
                             capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        res = json.loads((tmp_path / "send.json").read_text())
        assert res["schema"] == "splitbits.send/1" and res["answered_ok"] == 5 and res["images"] == 5
        assert res["link"]["emulated_mbps"] == 100.0
    finally:
        stop_server(srv)
    assert srv.returncode == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["answered_ok"] == 5 and stats["connections_open"] == 0
