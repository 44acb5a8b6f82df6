"""Evaluate one grid point: attack (or corrupt) images, optionally defend, and measure the real packets.

:func:`resolve_target` pairs a checkpoint (gradients) with a bundle (real bytes); :func:`evaluate_point`
perturbs a batch of images and measures it under every defence; :func:`attack_point` does that for
the clean images and one perturbed version (``splitbits attack``).

The numbers that matter come from the runtime: ``len(packet)`` from :class:`EdgeEncoder` and the
top-1 of :class:`ServerDecoder` on that packet (ONNX Runtime, CPU). The surrogate −Σlog₂p/8 of the
torch model on the *same* input is reported beside them.

Attacked images are delivered as uint8 (what a camera or file carries): the float PGD result is
rounded to the nearest uint8 level, never beyond ε (``to_uint8_within``). Defended images stay float
(the defence runs on the edge just before the head) and are fed to the runtime as float32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from splitbits.attacks.defence import DefenceConfig, defend_timed
from splitbits.attacks.model_ops import rate_and_logits
from splitbits.attacks.threats import CLEAN, ENTROPY_THREATS, AttackConfigError, ThreatPoint, run_attack
from splitbits.runtime.corruptions import corrupt
from splitbits.runtime.errors import SplitbitsError
from splitbits.runtime.progress import Bars

log = logging.getLogger(__name__)


class TargetError(SplitbitsError, ValueError):
    """A checkpoint/bundle pair that cannot be attacked (missing, mismatched, not a split model)."""


# --------------------------------------------------------------------------------------------
# Target: torch model (for gradients) + bundle (for real bytes)
# --------------------------------------------------------------------------------------------


@dataclass
class Target:
    model: Any
    bundle: Path
    checkpoint: Path | None
    family: str
    beta: float | None
    name: str

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "beta": self.beta, "bundle": str(self.bundle),
                "checkpoint": str(self.checkpoint) if self.checkpoint else None}


def _cache_root() -> Path:
    return Path(os.environ.get("SPLITBITS_CACHE", Path.home() / ".cache" / "splitbits")).expanduser()


def bundle_checkpoint(bundle_dir: Path, checkpoint: str | os.PathLike | None = None) -> tuple[Path, Any]:
    """The checkpoint of a bundle (``checkpoint``, else the one its manifest names) and the bundle's
    model spec (what an sc2bench checkpoint, which carries none, is rebuilt with).

    A checkpoint taken from the manifest must still be the exported file: its sha256, when the
    manifest records one, is checked."""
    from splitbits.runtime.bundle import MANIFEST, BundleError, load_manifest, sha256_file
    from splitbits.trainer.models import ModelSpec

    if not (bundle_dir / MANIFEST).is_file():
        raise TargetError(f"{bundle_dir} is a directory without {MANIFEST}: not a bundle")
    try:
        manifest = load_manifest(bundle_dir)
        spec = ModelSpec.from_dict(manifest.get("model") or {})
    except (BundleError, TypeError, ValueError) as exc:
        raise TargetError(f"bundle {bundle_dir}: {exc}") from None
    implicit = checkpoint is None
    if implicit:
        src = manifest.get("source")
        if not src:
            raise TargetError(f"bundle {bundle_dir} does not name its source checkpoint; pass --checkpoint")
        checkpoint = Path(src) if Path(src).is_absolute() or Path(src).exists() else bundle_dir.parent / Path(src).name
    ckpt = Path(checkpoint).expanduser()
    if not ckpt.is_file():
        raise TargetError(f"the checkpoint of bundle {bundle_dir} is not found ({ckpt}); pass --checkpoint")
    want = manifest.get("source_sha256")
    if implicit and want and sha256_file(ckpt) != want:
        raise TargetError(f"{ckpt} is not the checkpoint bundle {bundle_dir} was exported from (sha256 differs); "
                          "re-export the bundle, or pass the checkpoint with --checkpoint")
    return ckpt, spec


def resolve_target(path: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                   bundle: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                   device: str | torch.device = "cpu", spec: Any = None) -> Target:
    """A bundle dir (its manifest's ``source`` or ``checkpoint`` gives the torch model) or a checkpoint
    (``bundle`` or an export cached under ``cache_dir``, default ``$SPLITBITS_CACHE/attack_bundles``).

    ``spec`` (a ``ModelSpec``) rebuilds an sc2bench checkpoint, which carries none; by default the
    bundle's manifest supplies it. The pair is checked: same model spec, and the bundle's head
    reproduces the torch head.
    """
    from splitbits.runtime.bundle import MANIFEST, sha256_file
    from splitbits.trainer.checkpoint import load_model
    from splitbits.trainer.models import SplitClassifier

    p = Path(path).expanduser()
    if not p.exists():
        raise TargetError(f"no such checkpoint or bundle: {p}")
    bundle_dir = p if p.is_dir() else (Path(bundle).expanduser() if bundle else None)
    if p.is_dir():
        ckpt, bundle_spec = bundle_checkpoint(p, checkpoint)
    else:
        ckpt = p
        bundle_spec = bundle_checkpoint(bundle_dir, ckpt)[1] if bundle_dir is not None and bundle_dir.is_dir() else None
    try:
        model, ck = load_model(ckpt, spec if spec is not None else bundle_spec)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise TargetError(f"cannot load {ckpt}: {exc}") from exc
    if not isinstance(model, SplitClassifier):
        raise TargetError(f"{ckpt} is a plain classifier (teacher); attacks need a split student")
    if not _has_tables(model):
        model.update_entropy_tables(force=True)
    if bundle_dir is None:
        root = Path(cache_dir).expanduser() if cache_dir else _cache_root() / "attack_bundles"
        key = sha256_file(ckpt)
        if ck.get("format") == "sc2bench":  # the same file rebuilt with another spec is another model
            key = hashlib.sha256((key + json.dumps(model.spec.to_dict(), sort_keys=True)).encode()).hexdigest()
        bundle_dir = root / key[:16]
        if not (bundle_dir / MANIFEST).is_file():
            from splitbits.export.bundle import export_bundle

            log.info("exporting %s to %s (cached for later attacks)", ckpt, bundle_dir)
            bundle_dir.parent.mkdir(parents=True, exist_ok=True)
            export_bundle(model, bundle_dir, overwrite=True, source=str(ckpt.resolve()))
    if not (bundle_dir / MANIFEST).is_file():
        raise TargetError(f"not a bundle: {bundle_dir}")
    _check_pair(model, bundle_dir)
    for prm in model.parameters():
        prm.requires_grad_(False)
    model = model.to(device).eval()
    beta = (ck.get("config") or {}).get("student", {}).get("beta")
    return Target(model, bundle_dir, ckpt, model.family, beta, ckpt.stem)


def _has_tables(model: Any) -> bool:
    eb = model.bottleneck_layer.entropy_bottleneck
    return eb.quantized_cdf.numel() > 0


def _check_pair(model: Any, bundle_dir: Path) -> None:
    from splitbits.runtime.backends import get_backend
    from splitbits.runtime.bundle import load_bundle

    b = load_bundle(bundle_dir)
    if b.manifest.get("model") != model.spec.to_dict():
        raise TargetError(f"bundle {bundle_dir} was exported from a different model spec than the checkpoint")
    head = get_backend("onnxruntime").load(b, "head")
    x = torch.rand(1, *b.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.cpu().run_head(x)[0].numpy()
    got = head.run({"x": x.numpy()})["y"]
    if not np.allclose(got, ref, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(ref).max()))):
        raise TargetError(f"bundle {bundle_dir} does not match the checkpoint (head outputs differ by "
                          f"{float(np.abs(got - ref).max()):.3g}); re-export it or pass the right --checkpoint")


# --------------------------------------------------------------------------------------------
# Real bytes and accuracy from the runtime
# --------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    bytes: np.ndarray  # int64 [N], len(packet)
    surrogate_bytes: np.ndarray  # float64 [N], −Σlog₂p / 8 (rounded latents, torch model)
    preds: np.ndarray  # int64 [N], server top-1 from the packet
    torch_preds: np.ndarray  # int64 [N], torch model top-1 (rounded latents)
    edge_ms: np.ndarray  # float64 [N], sum of the edge stages
    server_ms: np.ndarray  # float64 [N]
    defence_ms: float = 0.0

    def summary(self, labels: np.ndarray) -> dict[str, Any]:
        return {"n": int(self.bytes.size), "bytes_mean": float(self.bytes.mean()),
                "surrogate_bytes_mean": float(self.surrogate_bytes.mean()),
                "top1": float((self.preds == labels).mean()), "edge_ms_p50": float(np.median(self.edge_ms)),
                "server_ms_p50": float(np.median(self.server_ms)), "defence_ms": self.defence_ms}

    def to_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes.tolist(), "surrogate_bytes": np.round(self.surrogate_bytes, 3).tolist(),
                "preds": self.preds.tolist(), "torch_preds": self.torch_preds.tolist(),
                "edge_ms": np.round(self.edge_ms, 4).tolist(), "server_ms": np.round(self.server_ms, 4).tolist(),
                "defence_ms": self.defence_ms}


class RuntimeMeter:
    """EdgeEncoder → packet → ServerDecoder on ONNX Runtime, for a batch of inputs."""

    def __init__(self, bundle: str | os.PathLike, batch: int = 64) -> None:
        from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder

        self.encoder = EdgeEncoder(bundle, "onnxruntime")
        self.decoder = ServerDecoder(bundle, "onnxruntime")
        self.batch = batch
        self.encoder.warmup()

    def packets(self, images: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        pk, ms = [], []
        for i in range(0, len(images), self.batch):
            for r in self.encoder.analyze_batch(images[i:i + self.batch]):
                pk.append(r.packet)
                ms.append(sum(r.timings_ms.values()))
        return pk, np.asarray(ms, dtype=np.float64)

    def measure(self, images: np.ndarray, model: Any, x: Tensor) -> Measurement:
        """``images``: what the runtime gets (uint8 NHWC or float32 NCHW); ``x``: the same as a tensor."""
        pk, edge = self.packets(images)
        preds, server = [], []
        for p in pk:
            d = self.decoder.decode_full(p)
            preds.append(int(np.argmax(d.logits)))
            server.append(sum(d.timings_ms.values()))
        rate, logits = rate_and_logits(model, x)
        return Measurement(np.asarray([len(p) for p in pk], dtype=np.int64), rate.double().cpu().numpy() / 8,
                           np.asarray(preds, dtype=np.int64), logits.argmax(1).cpu().numpy().astype(np.int64),
                           edge, np.asarray(server, dtype=np.float64))


# --------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------


def to_tensor(images: np.ndarray, device: str | torch.device = "cpu") -> Tensor:
    """uint8 NHWC → float32 NCHW in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device).float() / 255.0


def to_uint8_within(x_adv: Tensor, clean: np.ndarray, eps: float) -> np.ndarray:
    """Round an attacked batch to uint8 NHWC, keeping every pixel within ⌊255·ε⌋ levels of ``clean``."""
    adv = np.rint(x_adv.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().double().numpy() * 255.0)
    k = math.floor(255.0 * eps + 1e-6)
    c = clean.astype(np.int64)
    return np.clip(adv.astype(np.int64), c - k, c + k).clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# One grid point
# --------------------------------------------------------------------------------------------


@dataclass
class PointResult:
    point: ThreatPoint
    labels: np.ndarray
    attack: dict[str, Any]
    defended: dict[str, Measurement] = field(default_factory=dict)
    inputs: np.ndarray | None = None  # the uint8 images the edge received


def perturb(target: Target, images: np.ndarray, labels: np.ndarray, point: ThreatPoint, *, seed: int = 0,
            indices: Sequence[int] | None = None, batch: int = 32, progress: Any = None) -> tuple[np.ndarray, dict]:
    """Attack or corrupt uint8 NHWC images in batches; returns (uint8 images, attack record)."""
    t0 = time.perf_counter()
    if point.corruption is not None:
        out = corrupt(images, point.corruption, int(point.severity), seed=seed, indices=indices)  # type: ignore[arg-type]
        rec = {"objective": None, "seconds": time.perf_counter() - t0}
        if progress is not None:
            progress(len(images))
        return out, rec
    cfg = point.attack
    assert cfg is not None
    model = target.model
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    torch.manual_seed(seed)
    outs, f0, f1, hists = [], [], [], []
    for i in range(0, len(images), batch):
        x = to_tensor(images[i:i + batch], dev)
        lab = torch.from_numpy(labels[i:i + batch]).to(dev)
        o = run_attack(model, x, cfg, labels=lab, generator=gen)
        outs.append(to_uint8_within(o.x_adv, images[i:i + batch], cfg.eps))
        f0.append(o.clean_objective.cpu())
        f1.append(o.adv_objective.cpu())
        hists.append(o.history)
        if progress is not None:
            progress(len(x))
    adv = np.concatenate(outs)
    c, a = torch.cat(f0), torch.cat(f1)
    hist = np.mean(np.asarray(hists, dtype=np.float64), axis=0).tolist() if hists and hists[0] else []
    rec = {"objective": o.objective, "clean_objective_mean": float(c.mean()), "adv_objective_mean": float(a.mean()),
           "loss_rose": bool(a.mean() > c.mean()) if cfg.name not in ("clean",) else None,
           "rose_fraction": float((a > c).double().mean()), "history": [round(h, 4) for h in hist],
           "seconds": time.perf_counter() - t0,
           "linf_levels": int(np.abs(adv.astype(np.int16) - images.astype(np.int16)).max()) if len(adv) else 0,
           "config": cfg.to_dict()}
    return adv, rec


def measure_defences(target: Target, meter: RuntimeMeter, images: np.ndarray,
                     defences: Sequence[DefenceConfig], batch: int = 64) -> dict[str, Measurement]:
    """Real bytes/top-1 of ``images`` (uint8 NHWC) under each defence (``none`` = as received)."""
    model = target.model
    dev = next(model.parameters()).device
    x = to_tensor(images, dev)
    out: dict[str, Measurement] = {}
    for d in defences:
        if d.name == "none":
            out[d.label] = meter.measure(images, model, x)
            continue
        xd, ms = defend_timed(model, x, d, batch)
        m = meter.measure(xd.cpu().numpy().astype(np.float32), model, xd)
        m.defence_ms = ms
        out[d.label] = m
    return out


def evaluate_point(target: Target, meter: RuntimeMeter, images: np.ndarray, labels: np.ndarray, point: ThreatPoint,
                   defences: Sequence[DefenceConfig], *, seed: int = 0, indices: Sequence[int] | None = None,
                   batch: int = 32, keep_inputs: bool = False, progress: Any = None) -> PointResult:
    """Perturb ``images`` then measure every defence on the result."""
    if len(images) == 0:
        raise AttackConfigError("no images to attack (empty dataset or limit)")
    adv, rec = perturb(target, images, labels, point, seed=seed, indices=indices, batch=batch, progress=progress)
    res = PointResult(point, labels, rec, measure_defences(target, meter, adv, defences))
    if keep_inputs:
        res.inputs = adv
    return res


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` as a torch device that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:  # torch cannot parse the name
        raise TargetError(f"--device {name}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TargetError(f"--device {name}: CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise TargetError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def machine_info() -> dict[str, Any]:
    """``runtime.machine.machine_info`` and torch's threads and GPU: every timing is reported with these."""
    from splitbits.runtime.machine import machine_info as base

    return {**base(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# --------------------------------------------------------------------------------------------
# One point against clean (``splitbits attack``)
# --------------------------------------------------------------------------------------------


def attack_point(target: Target, images: np.ndarray, labels: np.ndarray, point: ThreatPoint,
                 defences: Sequence[DefenceConfig], *, seed: int = 0, batch: int = 32,
                 progress: bool = True) -> tuple[dict[str, Any], np.ndarray]:
    """The clean images and their ``point`` version, each under every defence (``none`` first).

    Returns the report of ``splitbits attack`` (summaries per defence with Δ against clean without
    defence, per-image values, the attack's record and checks) and the perturbed uint8 images.
    """
    meter = RuntimeMeter(target.bundle)
    t0 = time.perf_counter()
    runs = []
    with Bars(progress, unit="images") as bars:
        for name, p in (("clean", CLEAN), (f"{point.threat} {point.level}", point)):
            task = bars.add(name, len(images))
            runs.append(evaluate_point(target, meter, images, labels, p, defences, seed=seed,
                                       indices=np.arange(len(images)), batch=batch, keep_inputs=True,
                                       progress=lambda n, _t=task: bars.advance(_t, n)))
    clean, res = runs
    results = _against_clean(clean, res)
    assert res.inputs is not None
    return {"target": target.describe(), "threat": point.threat, "level": point.level, "attack": dict(res.attack),
            "corruption": point.corruption, "severity": point.severity,
            "defences": [d.to_dict() for d in defences], "results": results,
            "checks": _attack_checks(point, res.attack, results), "labels": labels.tolist(),
            "wall_s": time.perf_counter() - t0, "seed": seed}, res.inputs


def _against_clean(clean: PointResult, res: PointResult) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"clean"|"attacked": {defence: summary}}``; Δ bytes (%) and Δ top-1 (points) against clean, no defence."""
    labels = clean.labels
    base = clean.defended["none"].summary(labels)
    results: dict[str, dict[str, dict[str, Any]]] = {"clean": {}, "attacked": {}}
    for which, r in (("clean", clean), ("attacked", res)):
        for label, m in r.defended.items():
            s = m.summary(labels)
            s["delta_bytes_pct"] = 100.0 * (s["bytes_mean"] / base["bytes_mean"] - 1.0)
            s["delta_top1_pt"] = 100.0 * (s["top1"] - base["top1"])
            results[which][label] = s | {"per_image": m.to_json()}
    return results


def _attack_checks(point: ThreatPoint, rec: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """Did the attack do its job: objective up, within ε, and (entropy attacks) the real bytes up."""
    if point.attack is None or point.attack.name == "clean":
        return {}
    checks = {"objective": rec["objective"], "objective_clean_mean": rec["clean_objective_mean"],
              "objective_attacked_mean": rec["adv_objective_mean"], "loss_rose": rec["loss_rose"],
              "linf_levels": rec["linf_levels"],
              "linf_within_eps": rec["linf_levels"] <= int(np.floor(point.attack.eps * 255 + 1e-6))}
    if point.attack.name in ENTROPY_THREATS:
        checks["real_bytes_rose"] = results["attacked"]["none"]["bytes_mean"] > results["clean"]["none"]["bytes_mean"]
    return checks
