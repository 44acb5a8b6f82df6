"""``splitbits bench BUNDLE``: the on-device benchmark runner (and, on a desktop, its emulation).

For each image: preprocess → head → quantise (→ hyper on the edge for MSHP) → entropy-encode →
packet, then the modelled transmit time at ``--link-mbps``, then server-side parse/decode (→ hyper)
→ tail, all in this process on the chosen backend. Reports per-stage latency (mean, p50/p90/p99
after ``--warmup`` images), throughput, bytes per image (``len()`` of the real packet, with the
likelihood estimate beside it), top-1 accuracy, peak memory, and on a Jetson the power mode,
clocks and energy per image from tegrastats sampled during the timed loop.

Before measuring it verifies the backend against the bundle's ``golden/`` (tolerances per
precision); a bundle that fails is refused: no numbers are reported, the JSON (if asked) holds
only the verification, and the exit status is 3.

Desktop emulation (what CI runs)::

    splitbits bench runs/demo/bundle --backend onnxruntime --limit 64 --json results/desktop.json

On a Jetson::

    splitbits bench runs/demo/bundle --backend tensorrt --precision fp16 --limit 500 \\
        --json results/orin-fp16.json
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from typing import Any

import numpy as np

from splitbits.runtime.backends import get_backend
from splitbits.runtime.cli import CliError, backend_options

SCHEMA = "splitbits.bench/1"
EXIT_REFUSED = 3
STAGES = ("edge.preprocess", "edge.head", "edge.quantize", "edge.hyper", "edge.encode", "link.transmit",
          "server.decode", "server.hyper", "server.tail")


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:  # pragma: no cover - non-Linux
        return float("nan")


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run_bench(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """Everything ``main`` does, returning (result dict, exit status)."""
    from splitbits.jetson.device import device_info
    from splitbits.jetson.tegrastats import TegraStatsSampler, energy_summary
    from splitbits.runtime.bundle import load_bundle
    from splitbits.runtime.inputs import inputs_from_args, save_inputs
    from splitbits.runtime.link import transmit_seconds
    from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder
    from splitbits.runtime.progress import progress_bar
    from splitbits.runtime.report import summary
    from splitbits.runtime.verify import verify_backend

    if args.limit is not None and args.limit < 1:
        raise CliError("--limit must be at least 1")
    if args.warmup < 0 or args.repeat < 1 or args.link_mbps <= 0:
        raise CliError("--warmup ≥ 0, --repeat ≥ 1 and --link-mbps > 0 please")
    if args.power == "on" and not TegraStatsSampler.available():
        raise CliError("--power on needs tegrastats (a Jetson), which is not on PATH here; use --power auto/off")
    rss0 = _rss_mb()
    bundle = load_bundle(args.bundle)
    inputs = inputs_from_args(bundle.input_shape, args)  # bad inputs fail before any model work
    be = get_backend(args.backend, bundle=bundle, **backend_options(args))
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": ["splitbits", "bench", *sys.argv[2:]] if sys.argv[1:2] == ["bench"] else sys.argv,
        "bundle": {"path": str(bundle.path), "fingerprint": bundle.fingerprint, "family": bundle.family,
                   "arch": bundle.manifest.get("model", {}).get("arch"), "input_shape": list(bundle.input_shape)},
        "device": device_info(),
    }

    # 1. verification first: no numbers from a bundle that fails it
    enc = EdgeEncoder(bundle, be, coder=args.coder)
    dec = ServerDecoder(bundle, be)
    rep = verify_backend(bundle, be, coder=args.coder, atol=args.atol, rtol=args.rtol)
    result["backend"] = be.describe()
    result["coder"] = enc.coder.name
    result["verification"] = rep.to_dict()
    if not rep.ok:
        result["status"] = "refused"
        result["reason"] = "golden verification failed: " + "; ".join(rep.problems)
        return result, EXIT_REFUSED

    # 2. inputs (read above)
    if args.save_inputs:
        save_inputs(args.save_inputs, inputs)
    result["inputs"] = {"name": inputs.name, "count": len(inputs), **inputs.meta}

    # 3. warm-up (untimed)
    enc.warmup()
    dec.warmup()
    for k in range(min(args.warmup, len(inputs))):
        dec.decode_full(enc.analyze(inputs.images[k]).packet)

    # 4. timed loop, tegrastats sampling around it
    power_wanted = args.power == "on" or (args.power == "auto" and TegraStatsSampler.available())
    sampler = TegraStatsSampler(args.tegrastats_interval_ms).start() if power_wanted else None
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    totals: dict[str, list[float]] = {"edge_total": [], "server_total": [], "end_to_end": []}
    sizes: list[int] = []
    ideal: list[float] = []
    correct = labelled = 0
    n = len(inputs) * args.repeat
    t_edge = t_server = 0.0
    try:
        with progress_bar(n, "bench", disabled=args.no_progress) as bar:
            t_start = time.monotonic()
            for r in range(args.repeat):
                for k in range(len(inputs)):
                    t0 = time.perf_counter()
                    res = enc.analyze(inputs.images[k])
                    t1 = time.perf_counter()
                    dres = dec.decode_full(res.packet)
                    t2 = time.perf_counter()
                    e, s = res.timings_ms, dres.timings_ms
                    tx = transmit_seconds(len(res.packet), args.link_mbps) * 1e3
                    vals = {
                        "edge.preprocess": e.get("preprocess", 0.0), "edge.head": e.get("head", 0.0),
                        "edge.quantize": e.get("quantize", 0.0), "edge.hyper": e.get("hyper", 0.0),
                        "edge.encode": e.get("encode", 0.0) + e.get("packet", 0.0), "link.transmit": tx,
                        "server.decode": s.get("parse", 0.0) + s.get("decode", 0.0),
                        "server.hyper": s.get("hyper", 0.0), "server.tail": s.get("tail", 0.0),
                    }
                    for key, v in vals.items():
                        stages[key].append(v)
                    totals["edge_total"].append((t1 - t0) * 1e3)
                    totals["server_total"].append((t2 - t1) * 1e3)
                    totals["end_to_end"].append((t2 - t0) * 1e3 + tx)
                    t_edge += t1 - t0
                    t_server += t2 - t1
                    if r == 0:
                        sizes.append(res.bytes)
                        ideal.append(sum(res.ideal_bits.values()) / 8)
                        label = int(inputs.labels[k])
                        if label >= 0:
                            labelled += 1
                            correct += int(int(np.argmax(dres.logits)) == label)
                    bar.advance()
            t_end = time.monotonic()
    finally:
        samples = sampler.stop() if sampler is not None else []

    if bundle.family == "fp":
        for key in ("edge.hyper", "server.hyper"):
            stages.pop(key)
    wall = t_end - t_start
    _, h, w = bundle.input_shape
    result.update({
        "status": "ok",
        "warmup": args.warmup,
        "repeat": args.repeat,
        "images": n,
        "latency_ms": {**{k: summary(v) for k, v in stages.items()}, **{k: summary(v) for k, v in totals.items()}},
        "throughput": {
            "edge_images_per_s": n / t_edge if t_edge else None,
            "server_images_per_s": n / t_server if t_server else None,
            "end_to_end_images_per_s": n / wall if wall else None,
            "wall_s": wall,
        },
        "bytes": {"packet": summary(sizes), "ideal": summary(ideal),
                  "bits_per_pixel": float(np.mean(sizes)) * 8 / (h * w)},
        "link": {"mbps": args.link_mbps,
                 "model_ms": {f"{m:g}": transmit_seconds(round(float(np.mean(sizes))), m) * 1e3
                              for m in (1.0, 10.0, 100.0)}},
        "accuracy": {"top1": correct / labelled if labelled else None, "labelled": labelled},
        "memory": {"rss_start_mb": rss0, "rss_end_mb": _rss_mb(), "peak_rss_mb": _peak_rss_mb()},
    })
    if sampler is not None:
        result["power"] = energy_summary(samples, t_start, t_end, n)
        jet = result["device"].get("jetson") or {}
        result["power"]["power_mode"] = jet.get("power_mode")
    else:
        result["power"] = {"available": False,
                           "reason": "tegrastats not found (not a Jetson)" if args.power == "auto" else "--power off"}
    return result, 0


def main(args: argparse.Namespace) -> int:
    from splitbits.runtime.report import rich_table, write_json

    result, status = run_bench(args)
    if args.json:
        write_json(args.json, result)
    if status == EXIT_REFUSED:
        print(f"splitbits bench: REFUSED — {result['reason']}", file=sys.stderr)
        print("no measurements reported from a bundle/backend that fails golden verification", file=sys.stderr)
        return status
    lat = result["latency_ms"]
    rows = [[k, v["mean"], v["p50"], v["p90"], v["p99"]] for k, v in lat.items()]
    be = result["backend"]
    title = (f"{result['device']['name']} · {be.get('backend')} {be.get('precision', '')} · "
             f"{result['inputs']['name']} · {result['images']} images")
    rich_table(title, ["stage (ms)", "mean", "p50", "p90", "p99"], rows)
    acc = result["accuracy"]["top1"]
    pw = result["power"]
    print(f"bytes/image {result['bytes']['packet']['mean']:.1f} (ideal {result['bytes']['ideal']['mean']:.1f})  "
          f"accuracy {'–' if acc is None else f'{acc:.3f}'}  "
          f"throughput {result['throughput']['end_to_end_images_per_s']:.1f} img/s  "
          f"peak RSS {result['memory']['peak_rss_mb']:.0f} MB  "
          + (f"power {pw['mean_power_w']:.2f} W, {pw['energy_per_image_mj']:.1f} mJ/image" if pw.get("available")
             else f"power: {pw.get('reason')}"))
    if platform.machine() == "x86_64" and result["backend"].get("backend") == "onnxruntime":
        print("(desktop emulation: ONNX Runtime CPU)")
    return 0
