"""Verification of a backend (and coder) against a bundle's ``golden/`` reference.

Checks, stage by stage so one error does not hide behind another:

* tensors (head latents, hyper scales/means, tail logits) within ``atol + rtol·|ref|``;
* integer symbols and scale indexes **identical**. The only tolerated difference is a genuine
  tie: the reference value lies within the tensor's measured error of a rounding boundary (a .5
  for symbols, a scale-table entry for indexes) and the symbol moved by one. Ties are counted and
  reported, never hidden;
* golden packets decode to exactly the golden symbols, and the end-to-end pipeline on this backend
  gives the golden top-1;
* MSHP with the integer hyper path: its graph on this device's ONNX Runtime equals the numpy integer
  reference, and the scale indexes and means it computes here from the golden ẑ symbols are
  bit-identical to the ones computed at export (the cross-device guarantee, checked).

With ``exact_symbols=False`` (INT8 engines: quantised activations move symbols by design) symbol
and index differences are counted in ``symbol_mismatches`` instead of failing, and the end-to-end
top-1 must agree on at least ``min_top1`` of the golden images. They are reported, never hidden.

A failure raises ``VerificationError`` naming the tensor and the error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from splitbits.runtime.backends import Backend, get_backend
from splitbits.runtime.bundle import Bundle, load_bundle
from splitbits.runtime.errors import BundleError, VerificationError
from splitbits.runtime.quant import channel_means, dequantize, quantize, scale_indexes

GOLDEN = "golden/golden.npz"


@dataclass
class Tolerance:
    atol: float = 1e-4
    rtol: float = 1e-3


@dataclass
class VerifyReport:
    backend: str
    images: int
    max_abs_err: dict[str, float] = field(default_factory=dict)
    symbol_ties: dict[str, int] = field(default_factory=dict)
    top1_agree: int = 0
    packets_ok: int = 0
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    exact_symbols: bool = True
    symbol_mismatches: dict[str, int] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_golden(bundle: Bundle) -> dict[str, np.ndarray]:
    path = bundle.path / GOLDEN
    if not path.is_file():
        raise BundleError(f"{bundle.path}: no {GOLDEN}")
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def golden_packets(g: dict[str, np.ndarray]) -> list[bytes]:
    data, offs = g["packets"], g["packet_offsets"]
    return [data[offs[i]:offs[i + 1]].tobytes() for i in range(len(offs) - 1)]


def _ties(ref_float: np.ndarray, ref_sym: np.ndarray, got_sym: np.ndarray, err: float) -> tuple[int, int]:
    """(mismatches, of which ties): a tie is a ±1 move of a value within ``err`` of a .5 boundary."""
    diff = got_sym.astype(np.int64) - ref_sym
    bad = diff != 0
    if not bad.any():
        return 0, 0
    frac = np.abs(ref_float[bad] - np.floor(ref_float[bad]) - 0.5)
    tie = (np.abs(diff[bad]) == 1) & (frac <= 2 * err + 1e-6)
    return int(bad.sum()), int(tie.sum())


class _Checker:
    def __init__(self, report: VerifyReport, tol: Tolerance) -> None:
        self.report, self.tol = report, tol

    def tensor(self, name: str, got: np.ndarray, ref: np.ndarray) -> float:
        if got.shape != ref.shape:
            self.report.problems.append(f"{name}: shape {got.shape} != golden {ref.shape}")
            return float("inf")
        err = np.abs(got.astype(np.float64) - ref)
        worst = float(err.max()) if err.size else 0.0
        self.report.max_abs_err[name] = worst
        excess = err - (self.tol.atol + self.tol.rtol * np.abs(ref))
        if (excess > 0).any():
            self.report.problems.append(
                f"{name}: max |error| {worst:.3g} exceeds atol {self.tol.atol:g} + rtol {self.tol.rtol:g}·|ref|"
            )
        return worst

    def symbols(self, name: str, ref_float: np.ndarray, ref: np.ndarray, got: np.ndarray, err: float) -> None:
        bad, ties = _ties(ref_float, ref, got, err)
        self.report.symbol_ties[name] = ties
        if bad > ties:
            self.mismatch(name, bad - ties, f"{name}: {bad - ties} integer symbols differ from golden (not ties)")

    def mismatch(self, name: str, count: int, message: str) -> None:
        if self.report.exact_symbols:
            self.report.problems.append(message)
        else:
            self.report.symbol_mismatches[name] = count


def _check_int_hyper(bundle: Bundle, g: dict[str, np.ndarray], report: VerifyReport) -> None:
    """The integer hyper path must reproduce the export's idx and means bit for bit, and its graph on
    this device's ONNX Runtime must equal the numpy integer reference (exactness, checked here)."""
    from splitbits.runtime.pipeline import make_hyper

    hyper = make_hyper(bundle, None, "int")
    bad = inexact = 0
    for i, z in enumerate(g["packet_z_symbols"]):
        want = np.concatenate(hyper.params.reference(z))
        inexact += int(not np.array_equal(hyper.session.outputs(z).view(np.uint32), want.view(np.uint32)))
        idx, means = hyper.index_means(z)
        bad += int(not (np.array_equal(idx, g["packet_idx"][i])
                        and np.array_equal(means.view(np.uint32), g["packet_means"][i].view(np.uint32))))
    report.symbol_ties["idx_int"] = 0
    if inexact:
        report.problems.append(f"integer hyper graph: ONNX Runtime here differs from the integer reference on "
                               f"{inexact} images")
    if bad:
        report.problems.append(f"integer hyper path: idx/means differ bit-wise from the export on {bad} images")


def backend_tolerance(backend: Backend, atol: float | None = None, rtol: float | None = None
                      ) -> tuple[Tolerance, bool]:
    """(tolerance, whether symbols must be exact) for checking ``backend`` against ``golden/``:
    TensorRT engines by their worst precision, ONNX Runtime's GPU providers as FP32 engines,
    ONNX Runtime CPU the defaults; ``atol``/``rtol`` override."""
    from splitbits.runtime.backends.tensorrt import TOLERANCES

    name = getattr(backend, "name", "")
    if name == "tensorrt":
        chosen = list(getattr(backend, "chosen", {}).values()) or [getattr(backend, "precision", None) or "fp16"]
        worst = max(chosen, key=["fp32", "fp16", "int8"].index)
        base, exact = Tolerance(*TOLERANCES[worst]), worst != "int8"
    elif name.startswith("onnxruntime-") and name != "onnxruntime-prepared":
        base, exact = Tolerance(*TOLERANCES["fp32"]), True
    else:
        base, exact = Tolerance(), True
    return Tolerance(base.atol if atol is None else atol, base.rtol if rtol is None else rtol), exact


def verify_backend(bundle: Bundle | str | Path, backend: Backend | str = "onnxruntime", *, coder: str | None = None,
                   atol: float | None = None, rtol: float | None = None, **backend_options: Any) -> VerifyReport:
    """:func:`verify_bundle` with the tolerances of :func:`backend_tolerance`: the one rule that
    ``verify``, ``bench`` and ``serve`` apply before trusting a backend (never raises on a mismatch)."""
    from splitbits.runtime.backends.tensorrt import INT8_MIN_TOP1

    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    be = backend if isinstance(backend, Backend) else get_backend(backend, bundle=bundle, **backend_options)
    tol, exact = backend_tolerance(be, atol, rtol)
    return verify_bundle(bundle, be, coder=coder, tol=tol, raise_on_fail=False, exact_symbols=exact,
                         min_top1=INT8_MIN_TOP1)


def verify_bundle(bundle: Bundle | str | Path, backend: Backend | str = "onnxruntime", *,
                  coder: str | None = None, tol: Tolerance | None = None, raise_on_fail: bool = True,
                  exact_symbols: bool = True, min_top1: float = 0.5, **backend_options: Any) -> VerifyReport:
    """Run ``backend`` on the golden inputs and compare everything (see module docstring)."""
    from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder

    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    be = backend if isinstance(backend, Backend) else get_backend(backend, bundle=bundle, **backend_options)
    g = load_golden(bundle)
    x = g["x"]
    tol = tol or Tolerance()
    report = VerifyReport(backend=be.name, images=int(x.shape[0]), exact_symbols=exact_symbols,
                          tolerance={"atol": tol.atol, "rtol": tol.rtol})
    chk = _Checker(report, tol)
    c = bundle.codec

    head = be.load(bundle, "head").run({"x": x})
    ey = chk.tensor("head.y", head["y"], g["y"])
    if bundle.family == "fp":
        med = channel_means(c.y_medians)
        chk.symbols("y_symbols", g["y"] - med, g["y_symbols"], quantize(head["y"], med), ey)
    else:
        ez = chk.tensor("head.z", head["z"], g["z"])
        zmed = channel_means(c.z_medians)
        chk.symbols("z_symbols", g["z"] - zmed, g["z_symbols"], quantize(head["z"], zmed), ez)
        hyper = be.load(bundle, "hyper").run({"z_hat": dequantize(g["z_symbols"], zmed)})
        es = chk.tensor("hyper.scales", hyper["scales"], g["scales"])
        em = chk.tensor("hyper.means", hyper["means"], g["means"])
        # an index tie: the reference scale sits within the error of a table boundary
        idx = scale_indexes(hyper["scales"], c.scale_table, c.scale_bound)
        moved = idx != g["idx"]
        if moved.any():
            gs = np.maximum(g["scales"][moved], c.scale_bound)
            near = np.min(np.abs(gs[:, None] - c.scale_table[None, :-1]), axis=1) <= 2 * es + 1e-6
            report.symbol_ties["idx"] = int(near.sum())
            if not near.all():
                chk.mismatch("idx", int((~near).sum()),
                             f"idx: {int((~near).sum())} scale indexes differ from golden (not ties)")
        chk.symbols("y_symbols", g["y"] - g["means"], g["y_symbols"], quantize(head["y"], g["means"]),
                    max(ey, em))
    tail = be.load(bundle, "tail").run({"y_hat": g["y_hat"]})
    chk.tensor("tail.logits", tail["logits"], g["logits"])

    if "packet_idx" in g and (bundle.path / "hyper_int.npz").is_file():
        _check_int_hyper(bundle, g, report)

    # golden packets decode to exactly the golden symbols on this backend
    dec = ServerDecoder(bundle, be)
    for i, p in enumerate(golden_packets(g)):
        try:
            _, syms, _ = dec.decode_latent(p)
        except Exception as exc:  # report every failure mode, typed or not
            report.problems.append(f"golden packet {i}: {type(exc).__name__}: {exc}")
            continue
        same = all(np.array_equal(syms[k], g.get(f"packet_{k}_symbols", g[f"{k}_symbols"])[i]) for k in syms)
        report.packets_ok += int(same)
        if not same:
            report.problems.append(f"golden packet {i}: decoded symbols differ from golden")

    # end to end on this backend
    enc = EdgeEncoder(bundle, be, coder=coder)
    ref_top1 = g.get("logits_packet", g["logits_reference"]).argmax(1)
    any_tie = sum(report.symbol_ties.values()) > 0
    for i in range(x.shape[0]):
        logits = dec.decode(enc.encode(x[i]))
        report.top1_agree += int(logits.argmax() == ref_top1[i])
    if exact_symbols:
        if report.top1_agree < x.shape[0] and not any_tie:
            report.problems.append(f"top-1 agrees on {report.top1_agree}/{x.shape[0]} golden images")
    elif report.top1_agree < min_top1 * x.shape[0]:
        report.problems.append(f"top-1 agrees on {report.top1_agree}/{x.shape[0]} golden images "
                               f"(below {min_top1:.0%})")

    report.ok = not report.problems
    if raise_on_fail and not report.ok:
        raise VerificationError(f"backend {be.name} fails golden verification: " + "; ".join(report.problems))
    return report
