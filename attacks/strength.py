"""How strong each PGD-E schedule is, per image class (``splitbits bench attack --strength``).

Every schedule attacks the same images with the same ε, steps and EOT/copies; the payload is the
real packet (``len()`` from the runtime's :class:`EdgeEncoder` on the bundle) of the uint8 image the
edge would receive. Image sets: ``builtin`` (the builtin validation split at the model's input size),
``photos`` (the builtin's background photographs — scikit-image's, 14 of them shipped with splitbits —
resized and centre-cropped like an imagefolder),
``noise`` (uniform random images, seeded) and ``imagefolder:PATH``.

The cost of each schedule is counted, not estimated: images through the analysis transform forward
and backward (hooks on g_a), and wall seconds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from splitbits.attacks.runner import RuntimeMeter, Target, machine_info, perturb
from splitbits.attacks.threats import SCHEDULES, AttackConfig, AttackConfigError, ThreatPoint
from splitbits.runtime.datasets import DatasetError, _load_image, load_arrays, photo_paths

SETS = ("builtin", "photos", "noise")


def photo_images(size: int, limit: int | None = None) -> np.ndarray:
    """The builtin dataset's background photographs (:func:`~splitbits.runtime.datasets.photo_paths`: 16
    with scikit-image installed, the 14 shipped ones without) as uint8 NHWC, shorter side to size·256/224
    then a centre crop."""
    paths = photo_paths()[:limit]
    if not paths:
        raise DatasetError("no background photographs found (reinstall splitbits)")
    return np.stack([_load_image(p, size) for p in paths])


def image_set(name: str, size: int, limit: int, seed: int = 0) -> np.ndarray:
    """uint8 NHWC images of one set (see the module docstring)."""
    if name == "photos":
        return photo_images(size, limit)
    if name == "noise":
        return np.random.default_rng(seed).integers(0, 256, (limit, size, size, 3), dtype=np.uint8)
    spec = name if name.startswith("imagefolder:") or name.startswith("builtin") else None
    if spec is None:
        raise AttackConfigError(f"unknown image set {name!r}; choose from {', '.join(SETS)} or imagefolder:PATH")
    return load_arrays(spec, "val", image_size=size, limit=limit)[0]


class PassCounter:
    """Images through a module forward (every call) and backward (gradients that reach its output)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.forward = self.backward = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, _m: torch.nn.Module, _inp: Any, out: Tensor) -> None:
        self.forward += out.shape[0]
        if out.requires_grad:
            n = out.shape[0]
            out.register_hook(lambda g, n=n: self._back(n))

    def _back(self, n: int) -> None:
        self.backward += n

    def close(self) -> None:
        self._handle.remove()


def _analysis(model: Any) -> torch.nn.Module:
    bl = model.bottleneck_layer
    return bl.g_a if hasattr(bl, "g_a") else bl.encoder


def run_schedule(target: Target, meter: RuntimeMeter, images: np.ndarray, cfg: AttackConfig, *, seed: int,
                 batch: int) -> dict[str, Any]:
    """Attack ``images`` with ``cfg``; per-image packet bytes, wall seconds and passes through g_a."""
    counter = PassCounter(_analysis(target.model))
    labels = np.zeros(len(images), dtype=np.int64)
    try:
        t0 = time.perf_counter()
        adv, rec = perturb(target, images, labels, ThreatPoint(attack=cfg), seed=seed, batch=batch)
        secs = time.perf_counter() - t0
    finally:
        counter.close()
    pk, _ = meter.packets(adv)
    n = len(images)
    return {"bytes": [len(p) for p in pk], "seconds": secs, "images_per_s": n / secs,
            "forward_images_per_image": counter.forward / n, "backward_images_per_image": counter.backward / n,
            "linf_levels": rec["linf_levels"], "config": cfg.to_dict()}


def _set_summary(clean: np.ndarray, runs: dict[str, dict[str, Any]], default: str) -> dict[str, Any]:
    out: dict[str, Any] = {"n": int(clean.size), "clean_bytes_mean": float(clean.mean()), "schedules": {}}
    for name, r in runs.items():
        b = np.asarray(r["bytes"], dtype=np.float64)
        out["schedules"][name] = {"bytes_mean": float(b.mean()),
                                  "increase_pct": 100.0 * (b.mean() / clean.mean() - 1.0),
                                  "per_image_increase_pct_mean": float(100.0 * (b / clean - 1.0).mean()),
                                  **{k: v for k, v in r.items() if k != "bytes"}, "bytes": r["bytes"]}
    others = [k for k in runs if k != default]
    if default in runs and others:
        d = np.asarray(runs[default]["bytes"])
        best_other = np.max([np.asarray(runs[k]["bytes"]) for k in others], axis=0)
        out[f"{default}_ge_best_other_share"] = float((d >= best_other).mean())
        for k in others:
            out[f"{default}_ge_{k}_share"] = float((d >= np.asarray(runs[k]["bytes"])).mean())
    out["clean_bytes"] = clean.astype(int).tolist()
    return out


def compare_schedules(target: Target, sets: Sequence[str], *, schedules: Sequence[str] = SCHEDULES,
                      default: str = "auto", eps: float = 8 / 255, steps: int = 20, eot: int = 16, limit: int = 32,
                      batch: int = 8, seed: int = 0, progress: Any = None) -> dict[str, Any]:
    """Every schedule on every image set; payload bytes, increase over clean and the share of images where
    ``default`` is at least the best of the others."""
    for s in schedules:
        if s not in SCHEDULES:
            raise AttackConfigError(f"unknown PGD schedule {s!r}; choose from {', '.join(SCHEDULES)}")
    size = target.model.spec.input_size
    meter = RuntimeMeter(target.bundle)
    res: dict[str, Any] = {"target": target.describe(), "input": [3, size, size],
                           "settings": {"eps": f"{round(eps * 255, 4):g}/255", "steps": steps, "eot": eot,
                                        "images_per_set": limit, "batch": batch, "seed": seed,
                                        "default": default, "schedules": list(schedules)}, "sets": {}}
    for name in sets:
        images = image_set(name, size, limit, seed)
        clean = np.asarray([len(p) for p in meter.packets(images)[0]], dtype=np.float64)
        runs = {}
        for s in schedules:
            cfg = AttackConfig(name="pgd-e", eps=eps, steps=steps, eot=eot, schedule=s)
            runs[s] = run_schedule(target, meter, images, cfg, seed=seed, batch=batch)
            if progress is not None:
                progress(name, s, runs[s])
        res["sets"][name] = _set_summary(clean, runs, default)
    res["machine"] = machine_info()
    res["note"] = ("bytes: len() of the runtime's packets (ONNX Runtime) of the uint8 images; increase_pct: "
                   "100·(mean attacked / mean clean − 1); *_per_image: images through g_a per attacked image")
    return res


def table(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (set, schedule): the figures of the report, without per-image lists."""
    rows = []
    default = res["settings"]["default"]
    for name, st in res["sets"].items():
        for s, r in st["schedules"].items():
            rows.append({"set": name, "n": st["n"], "schedule": s, "clean_bytes": round(st["clean_bytes_mean"], 1),
                         "attacked_bytes": round(r["bytes_mean"], 1), "increase_pct": round(r["increase_pct"], 1),
                         "images_per_s": round(r["images_per_s"], 3),
                         "g_a_fwd_per_image": r["forward_images_per_image"],
                         "g_a_bwd_per_image": r["backward_images_per_image"],
                         f"{default}_ge_best_other_share": st.get(f"{default}_ge_best_other_share")})
    return rows
