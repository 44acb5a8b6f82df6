"""The on-device benchmark runner of ``splitbits bench BUNDLE`` (and, on a desktop, its emulation):
:func:`run_bench` verifies a backend against the bundle's ``golden/`` and, where it passes, measures
per-stage latency, bytes, accuracy, memory and power over an input set; ``splitbits.jetson.commands``
says what each figure means (``BENCH_BUNDLE_DESCRIPTION``).
"""

from __future__ import annotations

import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from splitbits.runtime.link import transmit_model_ms, transmit_seconds
from splitbits.runtime.report import summary

if TYPE_CHECKING:
    from splitbits.runtime.backends.base import Backend
    from splitbits.runtime.bundle import Bundle
    from splitbits.runtime.inputs import InputSet
    from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder

SCHEMA = "splitbits.bench/1"
STAGES = ("edge.preprocess", "edge.head", "edge.quantize", "edge.hyper", "edge.encode", "link.transmit",
          "server.decode", "server.hyper", "server.tail")


def rss_mb() -> float:
    """This process' resident memory now (MB)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:  # pragma: no cover - non-Linux
        return float("nan")


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@dataclass
class BenchOptions:
    """How :func:`run_bench` measures (the options of ``splitbits bench BUNDLE``)."""

    coder: str | None = None
    atol: float | None = None  # verification tolerances (None: per backend/precision)
    rtol: float | None = None
    warmup: int = 5  # untimed images first
    repeat: int = 1  # passes over the inputs
    link_mbps: float = 10.0  # link rate of the modelled transmit stage
    power: str = "auto"  # tegrastats: "auto" (where it exists), "on", "off"
    tegrastats_interval_ms: int = 100
    save_inputs: str | None = None  # also write the inputs measured here (after verification)
    progress: bool = True
    rss_start_mb: float | None = None  # the caller's RSS before loading anything (None: at the start)


@dataclass
class _Loop:
    """What the timed loop measured: per-stage and total ms per image, and per input (first pass)
    the packet bytes, the ideal bytes and top-1."""

    stages: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    totals: dict[str, list[float]] = field(
        default_factory=lambda: {"edge_total": [], "server_total": [], "end_to_end": []})
    sizes: list[int] = field(default_factory=list)
    ideal: list[float] = field(default_factory=list)
    headers: list[int] = field(default_factory=list)
    correct: int = 0
    labelled: int = 0
    t_edge: float = 0.0
    t_server: float = 0.0
    t_start: float = 0.0
    t_end: float = 0.0


def _stage_ms(e: dict[str, float], s: dict[str, float], tx: float) -> dict[str, float]:
    """The encoder's (``e``) and decoder's (``s``) timings as the report's stages."""
    return {
        "edge.preprocess": e.get("preprocess", 0.0), "edge.head": e.get("head", 0.0),
        "edge.quantize": e.get("quantize", 0.0), "edge.hyper": e.get("hyper", 0.0),
        "edge.encode": e.get("encode", 0.0) + e.get("packet", 0.0), "link.transmit": tx,
        "server.decode": s.get("parse", 0.0) + s.get("decode", 0.0),
        "server.hyper": s.get("hyper", 0.0), "server.tail": s.get("tail", 0.0),
    }


def _timed_loop(enc: EdgeEncoder, dec: ServerDecoder, inputs: InputSet, opts: BenchOptions) -> _Loop:
    """Every input ``opts.repeat`` times: edge encode, modelled transmit, server decode, each timed."""
    from splitbits.runtime.packet import parse
    from splitbits.runtime.progress import progress_bar

    loop = _Loop()
    with progress_bar(len(inputs) * opts.repeat, "bench", disabled=not opts.progress) as bar:
        loop.t_start = time.monotonic()
        for r in range(opts.repeat):
            for k in range(len(inputs)):
                t0 = time.perf_counter()
                res = enc.analyze(inputs.images[k])
                t1 = time.perf_counter()
                dres = dec.decode_full(res.packet)
                t2 = time.perf_counter()
                tx = transmit_seconds(len(res.packet), opts.link_mbps) * 1e3
                for key, v in _stage_ms(res.timings_ms, dres.timings_ms, tx).items():
                    loop.stages[key].append(v)
                loop.totals["edge_total"].append((t1 - t0) * 1e3)
                loop.totals["server_total"].append((t2 - t1) * 1e3)
                loop.totals["end_to_end"].append((t2 - t0) * 1e3 + tx)
                loop.t_edge += t1 - t0
                loop.t_server += t2 - t1
                if r == 0:
                    loop.sizes.append(res.bytes)
                    loop.ideal.append(sum(res.ideal_bits.values()) / 8)
                    loop.headers.append(res.bytes - parse(res.packet, dec.expect).payload_bytes)
                    label = int(inputs.labels[k])
                    if label >= 0:
                        loop.labelled += 1
                        loop.correct += int(int(np.argmax(dres.logits)) == label)
                bar.advance()
        loop.t_end = time.monotonic()
    return loop


def _figures(bundle: Bundle, loop: _Loop, opts: BenchOptions, n: int) -> dict[str, Any]:
    """The result's measurement keys (latency, throughput, bytes, link, accuracy) from ``loop``."""
    if bundle.family == "fp":
        for key in ("edge.hyper", "server.hyper"):
            loop.stages.pop(key)
    wall = loop.t_end - loop.t_start
    _, h, w = bundle.input_shape
    mean_bytes = float(np.mean(loop.sizes))
    head = np.maximum(np.asarray(loop.stages["edge.head"]), 1e-9)
    return {
        "latency_ms": {k: summary(v) for k, v in (loop.stages | loop.totals).items()},
        "throughput": {
            "edge_images_per_s": n / loop.t_edge if loop.t_edge else None,
            "server_images_per_s": n / loop.t_server if loop.t_server else None,
            "end_to_end_images_per_s": n / wall if wall else None,
            "wall_s": wall,
        },
        "bytes": {"packet": summary(loop.sizes), "ideal": summary(loop.ideal),
                  "header": summary(loop.headers),
                  "overhead_vs_ideal": summary(np.asarray(loop.sizes) - np.asarray(loop.ideal)),
                  "bits_per_pixel": mean_bytes * 8 / (h * w)},
        # the edge's work beyond the head network, per image: (edge total − head) / head
        "edge_overhead_vs_head": summary((np.asarray(loop.totals["edge_total"]) - head) / head) if len(head) else None,
        "link": {"mbps": opts.link_mbps,
                 "model_ms": transmit_model_ms(mean_bytes)},
        "accuracy": {"top1": loop.correct / loop.labelled if loop.labelled else None, "labelled": loop.labelled},
    }


def run_bench(bundle: Bundle, backend: Backend, inputs: InputSet, opts: BenchOptions) -> dict[str, Any]:
    """Verify ``backend`` against the bundle's golden/, then measure ``inputs`` (see the module doc).
    ``result["status"]`` is ``"refused"`` (only the verification, no numbers) or ``"ok"``."""
    from splitbits.jetson.device import device_info
    from splitbits.jetson.tegrastats import TegraStatsSampler, energy_summary
    from splitbits.runtime.inputs import save_inputs
    from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder
    from splitbits.runtime.verify import verify_backend

    rss0 = rss_mb() if opts.rss_start_mb is None else opts.rss_start_mb
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": ["splitbits", "bench", *sys.argv[2:]] if sys.argv[1:2] == ["bench"] else sys.argv,
        "bundle": {"path": str(bundle.path), "fingerprint": bundle.fingerprint, "family": bundle.family,
                   "arch": bundle.manifest.get("model", {}).get("arch"), "input_shape": list(bundle.input_shape)},
        "device": device_info(),
    }
    # 1. verification first: no numbers from a bundle that fails it
    enc = EdgeEncoder(bundle, backend, coder=opts.coder)
    dec = ServerDecoder(bundle, backend)
    rep = verify_backend(bundle, backend, coder=opts.coder, atol=opts.atol, rtol=opts.rtol)
    result.update(backend=backend.describe(), coder=enc.coder.name, verification=rep.to_dict())
    if not rep.ok:
        result.update(status="refused", reason="golden verification failed: " + "; ".join(rep.problems))
        return result
    # 2. inputs (read by the caller, before any model work)
    if opts.save_inputs:
        save_inputs(opts.save_inputs, inputs)
    result["inputs"] = {"name": inputs.name, "count": len(inputs), **inputs.meta}
    # 3. warm-up (untimed)
    enc.warmup()
    dec.warmup()
    for k in range(min(opts.warmup, len(inputs))):
        dec.decode_full(enc.analyze(inputs.images[k]).packet)
    # 4. timed loop, tegrastats sampling around it
    power_wanted = opts.power == "on" or (opts.power == "auto" and TegraStatsSampler.available())
    sampler = TegraStatsSampler(opts.tegrastats_interval_ms).start() if power_wanted else None
    try:
        loop = _timed_loop(enc, dec, inputs, opts)
    finally:
        samples = sampler.stop() if sampler is not None else []
    n = len(inputs) * opts.repeat
    result.update(status="ok", warmup=opts.warmup, repeat=opts.repeat, images=n, **_figures(bundle, loop, opts, n),
                  memory={"rss_start_mb": rss0, "rss_end_mb": rss_mb(), "peak_rss_mb": _peak_rss_mb()})
    if sampler is not None:
        result["power"] = energy_summary(samples, loop.t_start, loop.t_end, n)
        result["power"]["power_mode"] = (result["device"].get("jetson") or {}).get("power_mode")
    else:
        result["power"] = {"available": False,
                           "reason": "tegrastats not found (not a Jetson)" if opts.power == "auto" else "--power off"}
    return result


def print_summary(result: dict[str, Any]) -> None:
    """The measured result as a table of stages and one line of bytes, accuracy, throughput, memory, power."""
    from splitbits.runtime.report import rich_table

    lat = result["latency_ms"]
    rows = [[k, v["mean"], v["p50"], v["p90"], v["p99"]] for k, v in lat.items()]
    be = result["backend"]
    title = (f"{result['device']['name']} · {be.get('backend')} {be.get('precision', '')} · "
             f"{result['inputs']['name']} · {result['images']} images")
    rich_table(title, ["stage (ms)", "mean", "p50", "p90", "p99"], rows)
    acc = result["accuracy"]["top1"]
    pw = result["power"]
    b = result["bytes"]
    print(f"bytes/image {b['packet']['mean']:.1f} (ideal {b['ideal']['mean']:.1f}, "
          f"+{b['overhead_vs_ideal']['mean']:.1f} B of which header {b['header']['mean']:.0f})  "
          f"accuracy {'–' if acc is None else f'{acc:.3f}'}  "
          f"throughput {result['throughput']['end_to_end_images_per_s']:.1f} img/s  "
          f"peak RSS {result['memory']['peak_rss_mb']:.0f} MB  "
          + (f"power {pw['mean_power_w']:.2f} W, {pw['energy_per_image_mj']:.1f} mJ/image" if pw.get("available")
             else f"power: {pw.get('reason')}"))
    if platform.machine() == "x86_64" and result["backend"].get("backend") == "onnxruntime":
        print("(desktop emulation: ONNX Runtime CPU)")
