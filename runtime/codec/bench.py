"""The coder benchmark of ``splitbits bench codec`` without torch: latent sets, timing, bytes, targets.

A :class:`LatentSet` is the symbols, indexes and tables of real packets' sections (one image = one
MSHP packet's z and y sections, or one FP packet's y section). :func:`bundle_set` makes one from an
exported bundle (its head on ONNX Runtime); ``splitbits.export.codec_reference`` adds the ResNet-50
sets and compressai's coders where torch is installed. :func:`run_codec_bench` times every coder on
every set (coders interleaved within each repeat so machine noise hits all alike; medians of the
process' CPU time with wall-clock beside), compares ``len()`` of the blobs with the ideal −Σlog₂p
under the tables, judges the targets (issue 3) and returns the JSON result; :func:`markdown_table`
is the README table. The runtime's coders are timed and measured on their stream API — one blob per
image holding all its sections, a version-2 packet's payload — and compressai's per section.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splitbits.runtime.codec import CdfTables, get_coder
from splitbits.runtime.codec.numba_coder import NumbaCoder
from splitbits.runtime.machine import busy_processes, machine_info, package_versions
from splitbits.runtime.quant import channel_index
from splitbits.runtime.report import md_table, write_json

if TYPE_CHECKING:
    from splitbits.runtime.bundle import Bundle

TARGETS = {"encode_msym_s": 80.0, "decode_msym_s": 40.0, "vs_compressai": 25.0, "vs_constriction": 3.0,
           "bytes_rel": 0.001, "bytes_abs": 16.0, "hyper_bytes_pct": 0.5, "hyper_top1_points": 0.2,
           "hyper_time_ratio": 1.2}
SLOW = ("compressai", "compressai_core")
SMALL_LATENT = 16384  # symbols per image below which speed is judged on the batch API
CLOCK_NOTE = ("encode_ms/decode_ms and M sym/s are process CPU time (time.process_time_ns) with torch, BLAS and "
              "ONNX Runtime on one thread, i.e. one core's work with preemption by other processes excluded; "
              "wall_* and best_wall_* beside")


@dataclass
class Section:
    """One packet section over the images: its tables, and per image the flat int32 symbols and indexes."""

    name: str
    tables: CdfTables
    symbols: list[np.ndarray]
    index: list[np.ndarray]


@dataclass
class LatentSet:
    """The sections of one model's packets over some images (``hyper``: int-vs-float hyper figures, MSHP)."""

    name: str
    family: str
    source: str
    sections: list[Section]
    hyper: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return len(self.sections[0].symbols)

    @property
    def symbols_per_image(self) -> int:
        return sum(int(s.symbols[0].size) for s in self.sections)


@dataclass
class BenchSettings:
    """The knobs of one run (``--repeats`` etc.); ``extra`` is recorded in the result's settings as is."""

    repeats: int = 31
    slow_repeats: int = 5
    lanes: list[int] = field(default_factory=lambda: [0, 1, 2])
    cold_start: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def flat(a: np.ndarray) -> np.ndarray:
    """``a`` as a contiguous flat int32 array (what the coders take)."""
    return np.ascontiguousarray(a, dtype=np.int32).reshape(-1)


def channel_section(name: str, tables: CdfTables, symbols: np.ndarray) -> Section:
    """A section whose table index is the channel (FP's y, MSHP's z) from symbols [N, C, H, W]."""
    idx = flat(channel_index(symbols.shape[1:]))
    return Section(name, tables, [flat(s) for s in symbols], [idx] * len(symbols))


# ---------------------------------------------------------------------------------------------
# machine and environment
# ---------------------------------------------------------------------------------------------


def blas_threads(n: int) -> bool:
    """Limit the OpenBLAS that numpy loaded to ``n`` threads (so "one core" holds); best effort."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    libs = {ln.split()[-1] for ln in maps if "openblas" in ln.lower() and ".so" in ln}
    for lib in sorted(libs):
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for sym in ("openblas_set_num_threads64_", "openblas_set_num_threads", "scipy_openblas_set_num_threads64_"):
            fn = getattr(handle, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                return True
    return False


def start_machine() -> tuple[dict[str, Any], bool]:
    """The machine before the run (with its busy processes), and whether BLAS is now on one thread."""
    machine = machine_info(versions=False)
    machine["busy_processes_start"] = busy_processes()
    return machine, blas_threads(1)


def cold_start_ms() -> dict[str, float]:
    """A fresh process: import, then the first packet with the on-disk JIT cache (what ``splitbits
    warmup`` loads ahead of time)."""
    code = ("import time; t=time.perf_counter()\n"
            "from splitbits.runtime.codec import get_coder\n"
            "c=get_coder('numba'); t1=time.perf_counter(); c.warmup(); t2=time.perf_counter()\n"
            "print((t1-t)*1e3, (t2-t1)*1e3)")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        imp, warm = (float(v) for v in out.stdout.split())
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}
    return {"import_ms": imp, "first_call_with_disk_cache_ms": warm}


def runtime_coders() -> tuple[dict[str, Any], list[str]]:
    """The runtime's coders (``numba``, and ``constriction`` where installed) and notes on what is missing."""
    coders: dict[str, Any] = {"numba": NumbaCoder()}
    notes: list[str] = []
    try:
        coders["constriction"] = get_coder("constriction")
    except ImportError as exc:
        notes.append(f"constriction unavailable: {exc}")
    return coders, notes


# ---------------------------------------------------------------------------------------------
# images and bundle latents
# ---------------------------------------------------------------------------------------------


def _textures(size: int, count: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(count):
        a, b, c = rng.random(3)
        base = np.stack([np.sin(6 * a * xx + 3 * b * yy), np.cos(5 * b * yy), np.sin(4 * c * (xx + yy))], -1)
        out.append(np.clip(127 + 80 * base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8))
    return np.stack(out)


def load_images(size: int, count: int, dataset: str) -> tuple[np.ndarray, np.ndarray | None, str]:
    """uint8 NHWC images (and labels) from ``dataset`` at ``size``; where the dataset cannot render
    that size, its largest workable size upsampled (bicubic); synthetic textures if it is
    unavailable. The returned description says which."""
    try:
        from splitbits.runtime.datasets import load_arrays
    except ImportError as exc:
        return _textures(size, count), None, f"synthetic textures at {size}px (datasets unavailable: {exc})"
    last: Exception | None = None
    for render in (size, 192, 160, 128, 96, 64):
        if render > size:
            continue
        try:
            arr, labels = load_arrays(dataset, "val", render, count)
        except Exception as exc:  # DatasetError: size too large for the source, or the source is missing
            last = exc
            continue
        if render == size:
            return arr, labels, f"{dataset} val[:{len(arr)}] at {size}px"
        from PIL import Image

        up = np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC)) for a in arr])
        return up, labels, f"{dataset} val[:{len(arr)}] rendered at {render}px, upsampled to {size}px"
    return _textures(size, count), None, f"synthetic textures at {size}px ({dataset} unavailable: {last})"


def hyper_times(int_hyper: Any, z_symbols: np.ndarray, make_float: Callable[[str], Callable], z_hat: np.ndarray,
                repeats: int, scale_table: np.ndarray | None = None, scale_bound: float = 0.11) -> dict[str, float]:
    """Median ms per image, interleaved: the integer path (``int_hyper.index_means``: its graph on ONNX
    Runtime, the scale indexes and means included) and the float hyper graph alone (``make_float(tmpdir)``
    returns it, run on ``z_hat``); with ``scale_table``, also the float path as an edge would use it (the
    graph, then its scale indexes by ``searchsorted``). Each sample times a block of calls lasting ≥ ~5 ms."""
    from splitbits.runtime.quant import scale_indexes

    with tempfile.TemporaryDirectory() as d:
        run_float = make_float(d)
        calls = {"int": lambda: int_hyper.index_means(z_symbols), "float": lambda: run_float(z_hat)}
        if scale_table is not None:
            def float_path() -> np.ndarray:
                out = run_float(z_hat)
                scales = out["scales"] if isinstance(out, dict) else out[0]  # dict, or (scales, means)
                return scale_indexes(scales[0], scale_table, scale_bound)
            calls["float_path"] = float_path
        for f in [*calls.values()] * 3:  # warm (sessions, caches, the lookup's compiled code)
            f()
        c0, _ = _clocks()
        for f in calls.values():
            f()
        inner = max(1, min(200, int(5e6 / max(1, _clocks()[0] - c0))))
        cpu: dict[str, list[float]] = {k: [] for k in calls}
        wall: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(repeats):
            for k, f in calls.items():
                c0, w0 = _clocks()
                for _ in range(inner):
                    f()
                c1, w1 = _clocks()
                cpu[k].append(1e-6 * (c1 - c0) / inner)
                wall[k].append(1e3 * (w1 - w0) / inner)
    out = {"int_ms": float(np.median(cpu["int"])), "float_onnxruntime_ms": float(np.median(cpu["float"])),
           "wall_int_ms": float(np.median(wall["int"])), "wall_float_onnxruntime_ms": float(np.median(wall["float"])),
           "calls_per_sample": inner,
           "clock": "process CPU time, median over interleaved samples (wall time beside); ONNX Runtime on 1 thread"}
    out["int_vs_float"] = out["int_ms"] / out["float_onnxruntime_ms"]
    if "float_path" in cpu:  # the float path with its own indexes: what the int path replaces on an edge
        out["float_path_with_indexes_ms"] = float(np.median(cpu["float_path"]))
        out["int_vs_float_path_with_indexes"] = out["int_ms"] / out["float_path_with_indexes_ms"]
    return out


def bundle_set(path: str, count: int, accuracy_images: int, dataset: str, hyper_repeats: int) -> LatentSet:
    """An exported bundle's latents (its head on ONNX Runtime) over validation images."""
    from splitbits.runtime.bundle import load_bundle
    from splitbits.runtime.pipeline import EdgeEncoder, has_int_hyper

    bundle = load_bundle(path)
    size = bundle.input_shape[1]
    n = max(count, accuracy_images if bundle.family == "mshp" else 0)
    images, labels, source = load_images(size, n, dataset)
    enc = EdgeEncoder(bundle, "onnxruntime")
    res = enc.analyze_batch(images[:count])
    c = bundle.codec
    if bundle.family == "fp":
        secs = [channel_section("y", c.y_tables, np.stack([r.symbols["y"] for r in res]))]
    else:
        secs = [channel_section("z", c.z_tables, np.stack([r.symbols["z"] for r in res])),
                Section("y", c.y_tables, [flat(r.symbols["y"]) for r in res], [flat(r.idx) for r in res])]
    arch = bundle.manifest.get("model", {}).get("arch", "model")
    name = f"{arch}_{bundle.family}_{size}:{Path(path).name}"
    hyper = enc.hyper.name if enc.hyper is not None else "-"
    ls = LatentSet(name, bundle.family, f"bundle {path} (hyper path {hyper}); {source}", secs)
    if bundle.family == "mshp" and has_int_hyper(bundle):
        ls.hyper = _bundle_hyper_costs(bundle, images, labels, hyper_repeats)
    return ls


def _bundle_hyper_costs(bundle: Bundle, images: np.ndarray, labels: np.ndarray | None, repeats: int) -> dict[str, Any]:
    """Bytes, top-1 and time of the int hyper path against the float one, on ONNX Runtime."""
    from splitbits.runtime.backends import get_backend
    from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder, make_hyper
    from splitbits.runtime.quant import channel_means, dequantize

    out: dict[str, Any] = {"images": len(images)}
    top1: dict[str, np.ndarray] = {}
    sizes: dict[str, list[int]] = {}
    idxs: dict[str, list[np.ndarray]] = {}
    dec = ServerDecoder(bundle, "onnxruntime")
    for mode in ("float", "int"):
        enc = EdgeEncoder(bundle, "onnxruntime", hyper=mode)
        preds, sizes[mode], idxs[mode] = [], [], []
        for start in range(0, len(images), 64):
            for r in enc.analyze_batch(images[start:start + 64]):
                sizes[mode].append(r.bytes)
                idxs[mode].append(r.idx)
                preds.append(int(dec.decode(r.packet).argmax()))
        top1[mode] = np.asarray(preds)
    out["bytes_float"] = float(np.mean(sizes["float"]))
    out["bytes_int"] = float(np.mean(sizes["int"]))
    out["bytes_note"] = "whole packets (header included), mean over the images"
    out["idx_agreement"] = float(np.mean([np.mean(a == b) for a, b in zip(idxs["int"], idxs["float"])]))
    out["top1_agreement_int_vs_float"] = float((top1["int"] == top1["float"]).mean())
    if labels is not None:
        out["top1_float"] = 100.0 * float((top1["float"] == labels).mean())
        out["top1_int"] = 100.0 * float((top1["int"] == labels).mean())
    sz = EdgeEncoder(bundle, "onnxruntime", hyper="int").analyze(images[0]).symbols["z"]
    one_thread = get_backend("onnxruntime", threads=1)
    int_hyper = make_hyper(bundle, one_thread, "int")
    float_hyper = make_hyper(bundle, one_thread, "float")
    z_hat = dequantize(sz, channel_means(bundle.codec.z_medians))[None]
    out.update(hyper_times(int_hyper, sz, lambda _d: float_hyper, z_hat, repeats, bundle.codec.scale_table,
                           bundle.codec.scale_bound))
    return out


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


@dataclass
class CoderRun:
    """Per-image seconds: process CPU time (what one core spends; preemption by other processes on a
    shared machine excluded) and wall time."""

    enc_cpu: list[float] = field(default_factory=list)
    dec_cpu: list[float] = field(default_factory=list)
    enc_wall: list[float] = field(default_factory=list)
    dec_wall: list[float] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)
    roundtrip_ok: bool = True

    def add(self, c0: int, c1: int, c2: int, w0: float, w1: float, w2: float, per: int = 1) -> None:
        self.enc_cpu.append((c1 - c0) * 1e-9 / per)
        self.dec_cpu.append((c2 - c1) * 1e-9 / per)
        self.enc_wall.append((w1 - w0) / per)
        self.dec_wall.append((w2 - w1) / per)


def _clocks() -> tuple[int, float]:
    # process CPU time: every thread of this process counts (torch, BLAS and ONNX Runtime are set to
    # one thread, so this is one core's work), other processes' preemption does not
    return time.process_time_ns(), time.perf_counter()


def _stream_roundtrip(coder: Any, ls: LatentSet, i: int) -> tuple[list[bytes], list[np.ndarray], tuple]:
    """Image ``i``'s sections as one stream (the runtime's coders; a version-2 packet's payload)."""
    c0, w0 = _clocks()
    blob = coder.encode_stream([(s.symbols[i], s.index[i], s.tables) for s in ls.sections])
    c1, w1 = _clocks()
    stream = coder.decode_stream(blob)
    outs = [stream.next(s.index[i], s.tables) for s in ls.sections]
    stream.finish()
    c2, w2 = _clocks()
    return [blob], outs, (c0, c1, c2, w0, w1, w2)


def _sections_roundtrip(coder: Any, ls: LatentSet, i: int) -> tuple[list[bytes], list[np.ndarray], tuple]:
    """Image ``i``'s sections one blob each (compressai's coders)."""
    c0, w0 = _clocks()
    blobs = [coder.encode(s.symbols[i], s.index[i], s.tables) for s in ls.sections]
    c1, w1 = _clocks()
    outs = [coder.decode(b, s.index[i], s.tables) for b, s in zip(blobs, ls.sections)]
    c2, w2 = _clocks()
    return blobs, outs, (c0, c1, c2, w0, w1, w2)


def _per_image(coder: Any, ls: LatentSet, run: CoderRun, check: bool) -> None:
    roundtrip = _stream_roundtrip if hasattr(coder, "encode_stream") else _sections_roundtrip
    for i in range(ls.images):
        blobs, outs, (c0, c1, c2, w0, w1, w2) = roundtrip(coder, ls, i)
        run.add(c0, c1, c2, w0, w1, w2)
        if check:
            run.bytes.append(sum(len(b) for b in blobs))
            run.roundtrip_ok &= all(np.array_equal(o, s.symbols[i]) for o, s in zip(outs, ls.sections))


def _batched(coder: NumbaCoder, ls: LatentSet, run: CoderRun, check: bool) -> None:
    c0, w0 = _clocks()
    blobs = [coder.encode_batch(s.symbols, s.index, s.tables) for s in ls.sections]
    c1, w1 = _clocks()
    outs = [coder.decode_batch(b, s.index, s.tables) for b, s in zip(blobs, ls.sections)]
    c2, w2 = _clocks()
    run.add(c0, c1, c2, w0, w1, w2, per=ls.images)
    if check:
        run.roundtrip_ok &= all(np.array_equal(o, v) for out, s in zip(outs, ls.sections)
                                for o, v in zip(out, s.symbols))


def _rotate(items: list, k: int) -> Iterator:
    k %= max(1, len(items))
    yield from items[k:] + items[:k]


def time_coders(ls: LatentSet, coders: dict[str, Any], repeats: int, slow_repeats: int,
                lanes: list[int]) -> dict[str, CoderRun]:
    """Every coder on ``ls`` (per latent; numba also batched and with ``2**k`` interleaved states for
    each ``k`` in ``lanes``), rotated within each repeat; compressai's coders only ``slow_repeats``
    times. Bytes and the round trip are checked on the first repeat."""
    variants: dict[str, tuple[Any, Callable]] = {name: (c, _per_image) for name, c in coders.items()}
    variants["numba_batch"] = (coders["numba"], _batched)
    for k in lanes:
        if k:
            variants[f"numba_lanes{1 << k}"] = (NumbaCoder(lanes_log2=k), _per_image)
    runs = {name: CoderRun() for name in variants}
    for r in range(repeats):
        for name in _rotate(list(variants), r):
            if name in SLOW and r >= slow_repeats:
                continue
            coder, fn = variants[name]
            fn(coder, ls, runs[name], check=(r == 0))
    return runs


# ---------------------------------------------------------------------------------------------
# figures and judging
# ---------------------------------------------------------------------------------------------


def coder_figures(run: CoderRun, nsym: int, ideal: np.ndarray) -> dict[str, Any]:
    """One coder's JSON block: median times and M sym/s (CPU and wall), bytes against ``ideal``."""
    te, td = float(np.median(run.enc_cpu)), float(np.median(run.dec_cpu))
    we, wd = float(np.median(run.enc_wall)), float(np.median(run.dec_wall))
    block: dict[str, Any] = {"encode_ms": 1e3 * te, "decode_ms": 1e3 * td,
                             "encode_msym_s": nsym / te / 1e6, "decode_msym_s": nsym / td / 1e6,
                             "wall_encode_ms": 1e3 * we, "wall_decode_ms": 1e3 * wd,
                             "wall_encode_msym_s": nsym / we / 1e6, "wall_decode_msym_s": nsym / wd / 1e6,
                             "best_wall_encode_ms": 1e3 * min(run.enc_wall),
                             "best_wall_decode_ms": 1e3 * min(run.dec_wall),
                             "samples": len(run.enc_cpu), "roundtrip_ok": run.roundtrip_ok}
    if run.bytes:
        excess = np.asarray(run.bytes, np.float64) - ideal
        allowed = ideal * TARGETS["bytes_rel"] + TARGETS["bytes_abs"]
        block.update(bytes_per_image=float(np.mean(run.bytes)), excess_bytes_mean=float(excess.mean()),
                     excess_bytes_max=float(excess.max()), excess_pct_mean=float(100 * excess.sum() / ideal.sum()),
                     within_0p1pct_16B_all=bool((excess <= allowed).all()))
    return block


def judged_ratios(s: dict[str, Any]) -> dict[str, float]:
    """The speed ratios a set is judged on, keyed ``numba_vs_X``: per latent for large latents, batched
    for small ones (a tiny model's few thousand symbols, where the ~10 µs per-call overhead dominates)."""
    if s["speed_judged_on"] == "batched":
        return {k.replace("numba_batch_vs", "numba_vs"): v for k, v in s["ratios_batched_encode_plus_decode"].items()}
    return s["ratios_encode_plus_decode"]


def judge(out: dict[str, Any], hyper: dict[str, Any]) -> dict[str, bool]:
    """The targets of one set's block ``out`` (ratios and ``speed_judged_on`` filled in); adds
    ``int_hyper`` to ``out`` where ``hyper`` holds the int-vs-float figures."""
    cn = out["coders"]
    api = out["speed_judged_on"]
    sp = cn["numba"] if api == "per latent" else cn["numba_batch"]
    t = {
        f"numba encode >= 80 M sym/s ({api})": sp["encode_msym_s"] >= TARGETS["encode_msym_s"],
        f"numba decode >= 40 M sym/s ({api})": sp["decode_msym_s"] >= TARGETS["decode_msym_s"],
        "numba bytes <= ideal + 0.1% + 16 B (every image)": cn["numba"]["within_0p1pct_16B_all"],
        "lossless (every coder)": all(b["roundtrip_ok"] for b in cn.values()),
    }
    ratios = judged_ratios(out)
    if "numba_vs_compressai" in ratios:
        t[">= 25x compressai (enc+dec)"] = ratios["numba_vs_compressai"] >= TARGETS["vs_compressai"]
    if "numba_vs_constriction" in ratios:
        t[">= 3x constriction (enc+dec)"] = ratios["numba_vs_constriction"] >= TARGETS["vs_constriction"]
    if hyper:
        h = dict(hyper)
        h["bytes_int_vs_float_pct"] = 100.0 * (h["bytes_int"] / h["bytes_float"] - 1.0)
        t["int hyper: bytes < +0.5 % vs float"] = h["bytes_int_vs_float_pct"] < TARGETS["hyper_bytes_pct"]
        if "top1_int" in h:
            h["top1_int_minus_float_points"] = h["top1_int"] - h["top1_float"]
            t["int hyper: top-1 loss < 0.2 points"] = -h["top1_int_minus_float_points"] < TARGETS["hyper_top1_points"]
        if "int_vs_float" in h:
            ok = h["int_vs_float"] <= TARGETS["hyper_time_ratio"]
            t["int hyper <= 1.2x the float hyper graph (ORT, 1 thread)"] = ok
        out["int_hyper"] = h
    return t


def bench_set(ls: LatentSet, coders: dict[str, Any], repeats: int, slow_repeats: int,
              lanes: list[int]) -> dict[str, Any]:
    """Every coder on ``ls``; returns the set's JSON block (figures, ratios, targets)."""
    nsym = ls.symbols_per_image
    ideal = np.asarray([sum(s.tables.ideal_bits(s.symbols[i], s.index[i]) for s in ls.sections) / 8
                        for i in range(ls.images)])
    runs = time_coders(ls, coders, repeats, slow_repeats, lanes)
    out: dict[str, Any] = {"images": ls.images, "symbols_per_image": nsym, "source": ls.source,
                           "sections": {s.name: int(s.symbols[0].size) for s in ls.sections},
                           "ideal_bytes_per_image": float(ideal.mean()),
                           "coders": {name: coder_figures(run, nsym, ideal) for name, run in runs.items()}}
    cn = out["coders"]
    both = {k: cn[k]["encode_ms"] + cn[k]["decode_ms"] for k in cn}
    others = [k for k in ("compressai", "compressai_core", "constriction") if k in both]
    out["ratios_encode_plus_decode"] = {f"numba_vs_{k}": both[k] / both["numba"] for k in others}
    out["ratios_batched_encode_plus_decode"] = {f"numba_batch_vs_{k}": both[k] / both["numba_batch"] for k in others}
    out["speed_judged_on"] = "per latent" if nsym >= SMALL_LATENT else "batched"
    out["stream_bytes"] = {name: {k: cn[name][k] for k in ("bytes_per_image", "excess_bytes_mean", "excess_bytes_max")}
                           for name in coders if hasattr(coders[name], "encode_stream")}
    out["stream_bytes"]["note"] = ("len() of one stream per image (all its sections: a version-2 packet's payload, "
                                   "without its 6 (FP) or 9 (MSHP) frame bytes) vs the ideal −Σlog₂p")
    out["targets"] = judge(out, ls.hyper)
    return out


# ---------------------------------------------------------------------------------------------
# the run and its report
# ---------------------------------------------------------------------------------------------


def run_codec_bench(sets: list[LatentSet], coders: dict[str, Any], settings: BenchSettings,
                    machine: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Every coder on every set: the JSON result (figures, targets, machine, versions, ``markdown``).
    ``machine`` is :func:`start_machine`'s."""
    for c in coders.values():
        if hasattr(c, "warmup"):
            c.warmup()
    for ls in sets:  # slot tables built before timing (a one-off per bundle, ~ms)
        for s in ls.sections:
            coders["numba"].encode(s.symbols[0], s.index[0], s.tables)
        coders["numba"].encode_stream([(s.symbols[0], s.index[0], s.tables) for s in ls.sections])
    result: dict[str, Any] = {
        "command": "splitbits bench codec " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "codec"] else []),
        "machine": machine, "versions": package_versions(),
        "settings": {**settings.extra, "repeats": settings.repeats, "slow_repeats": settings.slow_repeats,
                     "lanes": settings.lanes,
                     "threads": "every coder single-threaded; figures are per image, medians over repeats × images",
                     "clock": CLOCK_NOTE},
        "targets": TARGETS, "notes": notes, "sets": {},
    }
    for ls in sets:
        result["sets"][ls.name] = bench_set(ls, coders, settings.repeats, settings.slow_repeats, settings.lanes)
    if settings.cold_start:
        result["numba_cold_start"] = cold_start_ms()
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["machine"]["busy_processes_end"] = busy_processes()
    result["all_targets_met"] = all(all(s["targets"].values()) for s in result["sets"].values())
    result["markdown"] = markdown_table(result)
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """The README tables: speed and bytes per set, then the int-vs-float hyper path of MSHP sets."""
    rows = []
    for name, s in result["sets"].items():
        cn = s["coders"]
        r = judged_ratios(s)
        tag = " (batched)" if s.get("speed_judged_on") == "batched" else ""
        nb, nbb = cn["numba"], cn["numba_batch"]
        rows.append([
            name, s["symbols_per_image"],
            f"{nb['encode_msym_s']:.0f} ({1e3 * nb['encode_ms']:.0f} µs)",
            f"{nb['decode_msym_s']:.0f} ({1e3 * nb['decode_ms']:.0f} µs)",
            f"{nbb['encode_msym_s']:.0f} / {nbb['decode_msym_s']:.0f}",
            (f"{r['numba_vs_compressai']:.0f}× (bare C++ coder {r['numba_vs_compressai_core']:.1f}×){tag}"
             if "numba_vs_compressai" in r else "–"),
            f"{r['numba_vs_constriction']:.1f}×{tag}" if "numba_vs_constriction" in r else "–",
            f"{nb['bytes_per_image']:.0f} vs {s['ideal_bytes_per_image']:.0f} (+{nb['excess_bytes_mean']:.1f} B, "
            f"{nb['excess_pct_mean']:+.3f} %)",
        ])
    text = md_table(["latent set", "symbols/img", "numba encode M sym/s (per image)",
                     "numba decode M sym/s (per image)", "batched enc / dec M sym/s", "× compressai (enc+dec)",
                     "× constriction (enc+dec)", "bytes vs ideal −Σlog₂p"], rows)
    hrows = []
    for name, s in result["sets"].items():
        h = s.get("int_hyper")
        if not h:
            continue
        top1 = (f"{h['top1_float']:.2f} → {h['top1_int']:.2f} % ({h['top1_int_minus_float_points']:+.2f} pt)"
                if "top1_int" in h else f"argmax agreement {100 * h['top1_agreement_int_vs_float']:.1f} %")
        hrows.append([name, f"{h['bytes_float']:.0f} → {h['bytes_int']:.0f} ({h['bytes_int_vs_float_pct']:+.3f} %)",
                      f"{100 * h['idx_agreement']:.3f} %", top1,
                      f"{h['int_ms']:.3f} vs {h['float_onnxruntime_ms']:.3f} "
                      f"({h['int_ms'] / h['float_onnxruntime_ms']:.2f}×)"])
    if hrows:
        text += "\n\n" + md_table(["MSHP set", "bytes float → int hyper", "idx = float path's", "top-1 float → int",
                                   "hyper ms: int vs float ORT (1 thread)"], hrows)
    return text


def write_report(result: dict[str, Any], json_path: str | None, markdown_path: str | None) -> None:
    """Write the JSON and the Markdown (where asked), print the table, the notes and the targets not met."""
    if json_path:
        write_json(json_path, result)
    if markdown_path:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_path).write_text(result["markdown"] + "\n")
    print(result["markdown"])
    for note in result["notes"]:
        print(f"note: {note}")
    machine = result["machine"]
    failed = [f"{n}: {k}" for n, s in result["sets"].items() for k, ok in s["targets"].items() if not ok]
    print(f"\nload average {machine['loadavg_1_5_15'][0]:.2f} → {machine['loadavg_end'][0]:.2f} on "
          f"{machine['cpu_count']} CPUs; targets not met: {failed or 'none'}")
