"""Checkpoint → bundle (DESIGN.md): ONNX graphs, entropy tables, golden I/O, manifest; verified.

The bundle is assembled in a temporary directory beside ``out`` and renamed into place only after
ONNX Runtime has reproduced the torch reference on the golden inputs, so a failed export never
leaves a half-written bundle behind.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from splitbits.runtime.bundle import (
    CODEC,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    fingerprint_of,
    load_bundle,
    runtime_version,
    sha256_file,
)
from splitbits.runtime.datasets import load_arrays
from splitbits.runtime.errors import VerificationError
from splitbits.runtime.machine import package_versions
from splitbits.runtime.report import write_json
from splitbits.runtime.verify import GOLDEN, Tolerance, VerifyReport, verify_bundle
from splitbits.trainer.models import ModelSpec, MSHPBottleneck, SplitClassifier

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17  # TensorRT 10.3 (JetPack 6) parses opsets up to 20


@dataclass
class ExportResult:
    path: Path
    manifest: dict[str, Any]
    verification: VerifyReport
    seconds: float

    def summary(self) -> dict[str, Any]:
        """What ``export --json`` writes: the bundle, its files' sizes, the verification, the time."""
        m = self.manifest
        return {"bundle": str(self.path), "family": m["family"], "fingerprint": m["fingerprint"],
                "files": {k: f["bytes"] for k, f in m["files"].items()}, "verification": self.verification.to_dict(),
                "seconds": round(self.seconds, 2)}

    def report_line(self) -> str:
        """What ``export`` prints: the bundle and its verification on ONNX Runtime."""
        v, m = self.verification, self.manifest
        return (f"bundle {self.path}  family={m['family']}  fingerprint={m['fingerprint'][:16]}  "
                f"verified on onnxruntime: top-1 {v.top1_agree}/{v.images}, packets {v.packets_ok}/{v.images}, "
                "max errors " + ", ".join(f"{k}={e:.2g}" for k, e in v.max_abs_err.items()))


class GraphModule(nn.Module):
    """One graph of the bundle as a module of its own: the split model's ``run_head``, ``run_hyper``
    or ``run_tail`` (what ``torch.onnx.export`` traces)."""

    def __init__(self, m: SplitClassifier, graph: str) -> None:
        super().__init__()
        self.m, self.graph = m, graph

    def forward(self, x: torch.Tensor):
        return getattr(self.m, f"run_{self.graph}")(x)


def _versions() -> dict[str, str]:
    found = package_versions(("torch", "compressai", "onnx", "onnxruntime", "numpy", "constriction", "numba"))
    return {"splitbits": runtime_version(), **{k: v for k, v in found.items() if v != "absent"}}


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, in_name: str,
                out_names: list[str], opset: int) -> None:
    """``module`` on ``example`` to ONNX at ``path`` (dynamic batch axis), checked by ``onnx.checker``."""
    dyn = {in_name: {0: "N"}, **{o: {0: "N"} for o in out_names}}
    module.eval()  # the exporter follows the wrapper's mode, not its children's
    with warnings.catch_warnings():  # the TorchScript exporter is the one that handles GDN here
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module, (example,), str(path), input_names=[in_name], output_names=out_names,
            dynamic_axes=dyn, opset_version=opset, dynamo=False, do_constant_folding=True,
        )
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))


def _tables(em) -> dict[str, np.ndarray]:
    return {
        "cdf": em.quantized_cdf.cpu().numpy().astype(np.int32),
        "cdf_length": em.cdf_length.cpu().numpy().astype(np.int32).reshape(-1),
        "offset": em.offset.cpu().numpy().astype(np.int32).reshape(-1),
    }


def _medians(eb) -> torch.Tensor:
    """An ``EntropyBottleneck``'s per-channel medians (its middle quantiles), shaped [1, C, 1, 1]."""
    return eb.quantiles[:, 0, 1].reshape(1, -1, 1, 1)


def codec_arrays(model: SplitClassifier) -> dict[str, np.ndarray]:
    """The entropy tables that compressai's ``update()`` built, in the runtime's npz layout."""
    bl = model.bottleneck_layer
    arrays: dict[str, np.ndarray] = {"precision": np.array(bl.entropy_bottleneck.entropy_coder_precision)}
    eb_prefix = "z" if isinstance(bl, MSHPBottleneck) else "y"
    for k, v in _tables(bl.entropy_bottleneck).items():
        arrays[f"{eb_prefix}_{k}"] = v
    medians = _medians(bl.entropy_bottleneck).detach().cpu().numpy()
    arrays[f"{eb_prefix}_medians"] = medians.astype(np.float32).reshape(-1)
    if isinstance(bl, MSHPBottleneck):
        gc = bl.gaussian_conditional
        for k, v in _tables(gc).items():
            arrays[f"y_{k}"] = v
        arrays["scale_table"] = gc.scale_table.cpu().numpy().astype(np.float32)
        arrays["scale_bound"] = np.array(float(gc.lower_bound_scale.bound), dtype=np.float32)
    return arrays


def _ensure_tables(model: SplitClassifier) -> None:
    eb = model.bottleneck_layer.entropy_bottleneck
    if eb.offset.numel() == 0:
        log.info("checkpoint has no entropy tables yet: running compressai update()")
        model.update_entropy_tables(force=True)


@torch.no_grad()
def _golden(model: SplitClassifier, x: np.ndarray, labels: np.ndarray | None) -> dict[str, np.ndarray]:
    """The torch/compressai reference on the golden inputs (independent of the runtime's code)."""
    bl = model.bottleneck_layer
    xt = torch.from_numpy(x)
    lat = model.run_head(xt)
    g: dict[str, np.ndarray] = {"x": x, "y": lat[0].numpy()}
    if isinstance(bl, MSHPBottleneck):
        z = lat[1]
        zmed = _medians(bl.entropy_bottleneck)
        zsym = bl.entropy_bottleneck.quantize(z, "symbols", zmed)
        z_hat = bl.entropy_bottleneck.dequantize(zsym, zmed)
        scales, means = bl.hyper(z_hat)
        idx = bl.gaussian_conditional.build_indexes(scales)
        ysym = bl.gaussian_conditional.quantize(lat[0], "symbols", means)
        y_hat = bl.gaussian_conditional.dequantize(ysym, means)
        g.update(z=z.numpy(), z_symbols=zsym.numpy().astype(np.int32), scales=scales.numpy(),
                 means=means.numpy(), idx=idx.numpy().astype(np.int32))
    else:
        med = _medians(bl.entropy_bottleneck)
        ysym = bl.entropy_bottleneck.quantize(lat[0], "symbols", med)
        y_hat = bl.entropy_bottleneck.dequantize(ysym, med)
    g["y_symbols"] = ysym.numpy().astype(np.int32)
    g["y_hat"] = y_hat.numpy().astype(np.float32)
    g["logits"] = model.run_tail(y_hat).numpy()
    ref = [model.decompress_reference(model.compress_reference(xt[i:i + 1])["strings"],
                                      tuple(lat[-1].shape[-2:])).numpy()[0] for i in range(x.shape[0])]
    g["logits_reference"] = np.stack(ref)
    if labels is not None:
        g["labels"] = labels.astype(np.int64)
    return g


@torch.no_grad()
def _golden_packet_arrays(model: SplitClassifier, enc, results) -> dict[str, np.ndarray]:
    """What the runtime coded into the golden packets (symbols, and for MSHP idx, means, logits)."""
    from splitbits.runtime.pipeline import hyper_index_means
    from splitbits.runtime.quant import dequantize

    g = {f"packet_{k}_symbols": np.stack([r.symbols[k] for r in results]) for k in results[0].symbols}
    if enc.hyper is not None:
        means = np.stack([hyper_index_means(enc.hyper, r.symbols["z"], enc.codec)[1] for r in results])
        g["packet_idx"] = np.stack([r.idx for r in results])
        g["packet_means"] = means
        y_hat = dequantize(g["packet_y_symbols"], means)
        g["logits_packet"] = model.run_tail(torch.from_numpy(y_hat)).numpy()
    return g


def _file_entries(root: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(root).as_posix()
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return files


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    manifest["files"] = _file_entries(root)
    manifest["fingerprint"] = fingerprint_of(manifest["files"])
    write_json(root / MANIFEST, manifest)


def _export_graphs(model: SplitClassifier, x: np.ndarray, root: Path, opset: int) -> tuple[dict[str, Any], dict]:
    """head/hyper/tail ONNX graphs into ``root``; their manifest entries and the latent shapes."""
    s = model.spec.input_size
    ex = torch.from_numpy(x[:1])
    lat = model.run_head(ex)
    names = list(model.bottleneck_layer.latent_names())
    latents = {n: list(t.shape[1:]) for n, t in zip(names, lat)}
    export_onnx(GraphModule(model, "head"), ex, root / "head.onnx", "x", names, opset)
    graphs: dict[str, Any] = {"head": {"file": "head.onnx", "inputs": {"x": [3, s, s]}, "outputs": latents}}
    y_shape = list(lat[0].shape[1:])
    if model.spec.family == "mshp":
        z = lat[1]
        export_onnx(GraphModule(model, "hyper"), torch.round(z), root / "hyper.onnx", "z_hat", ["scales", "means"],
                    opset)
        graphs["hyper"] = {"file": "hyper.onnx", "inputs": {"z_hat": list(z.shape[1:])},
                           "outputs": {"scales": y_shape, "means": y_shape}}
    logits = model.run_tail(lat[0])
    export_onnx(GraphModule(model, "tail"), lat[0], root / "tail.onnx", "y_hat", ["logits"], opset)
    graphs["tail"] = {"file": "tail.onnx", "inputs": {"y_hat": y_shape}, "outputs": {"logits": list(logits.shape[1:])}}
    return graphs, latents


def _manifest(spec: ModelSpec, graphs: dict[str, Any], latents: dict[str, list[int]], opset: int,
              source: str | None) -> dict[str, Any]:
    s = spec.input_size
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": spec.family,
        "model": spec.to_dict(),
        "source": source,  # the checkpoint (as given), and its sha256 (null when not a file)
        "source_sha256": sha256_file(Path(source)) if source and Path(source).is_file() else None,
        "input": {"shape": [3, s, s], "dtype": "float32", "range": [0.0, 1.0], "layout": "NCHW",
                  "normalisation": {"mean": list(spec.mean), "std": list(spec.std), "inside_head": True}},
        "latents": latents,
        "graphs": graphs,
        "opset": opset,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "platform": {"machine": platform.machine(), "system": platform.system(), "python": sys.version.split()[0]},
    }


def _write_golden(model: SplitClassifier, x: np.ndarray, labels: np.ndarray | None, root: Path) -> dict[str, Any]:
    """``golden/``: the torch/compressai reference, and the packets the runtime makes from the torch
    latents; returns the manifest's ``golden`` entry."""
    from splitbits.export.torch_backend import TorchBackend
    from splitbits.runtime.pipeline import EdgeEncoder

    g = _golden(model, x, labels)
    enc = EdgeEncoder(load_bundle(root), TorchBackend(model))
    results = [enc.analyze(x[i]) for i in range(x.shape[0])]
    packets = [r.packet for r in results]
    g.update(_golden_packet_arrays(model, enc, results))
    g["packets"] = np.frombuffer(b"".join(packets), dtype=np.uint8)
    g["packet_offsets"] = np.cumsum([0] + [len(p) for p in packets]).astype(np.int64)
    np.savez_compressed(root / GOLDEN, **g)
    return {"file": GOLDEN, "images": int(x.shape[0]), "coder": enc.coder.name,
            "hyper": enc.hyper.name if enc.hyper is not None else None}


def _assemble(model: SplitClassifier, x: np.ndarray, labels: np.ndarray | None, root: Path, opset: int,
              tol: Tolerance | None, source: str | None) -> tuple[dict[str, Any], VerifyReport]:
    """Every file of the bundle into ``root``, then its verification on ONNX Runtime (in the manifest)."""
    graphs, latents = _export_graphs(model, x, root, opset)
    codec = codec_arrays(model)
    np.savez_compressed(root / CODEC, **codec)
    if model.spec.family == "mshp":  # the deterministic integer hyper path, calibrated and checked on x
        from splitbits.export.hyper_int import write_hyper_int

        write_hyper_int(model, root, codec, x)
    manifest = _manifest(model.spec, graphs, latents, opset, source)
    _write_manifest(root, manifest)
    manifest["golden"] = _write_golden(model, x, labels, root)
    _write_manifest(root, manifest)
    report = verify_bundle(root, "onnxruntime", tol=tol, raise_on_fail=False)
    manifest["verification"] = {"onnxruntime": report.to_dict()}
    _write_manifest(root, manifest)
    return manifest, report


def export_bundle(
    model: SplitClassifier,
    out: str | os.PathLike,
    *,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    dataset: str = "builtin",
    golden_count: int = 8,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    tol: Tolerance | None = None,
    source: str | None = None,
) -> ExportResult:
    """Export ``model`` to the bundle directory ``out`` and verify it with ONNX Runtime.

    Golden inputs are ``images`` (uint8 NHWC) if given, else the first ``golden_count`` validation
    images of ``dataset`` at the model's input size.
    """
    t0 = time.perf_counter()
    if not isinstance(model, SplitClassifier):
        raise TypeError("only split students (with an entropy bottleneck) can be exported")
    if not 7 <= opset <= 20:
        raise ValueError(f"opset {opset} outside 7..20 (TensorRT 10.3 accepts at most 20)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--force) to replace it")
    model = model.eval().cpu().float()
    _ensure_tables(model)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "golden").mkdir(parents=True)
    try:
        if images is None:
            images, labels = load_arrays(dataset, "val", model.spec.input_size, golden_count)
        x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)
        s = model.spec.input_size
        if x.shape[1:] != (3, s, s):
            raise ValueError(f"golden images must be {s}x{s}x3, got {images.shape[1:]}")
        manifest, report = _assemble(model, x, labels, tmp, opset, tol, source)
        if not report.ok:
            raise VerificationError("export verification failed (ONNX Runtime vs torch): " + "; ".join(report.problems))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, manifest, report, time.perf_counter() - t0)
