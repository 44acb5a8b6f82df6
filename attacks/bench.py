"""Throughput of the batched PGD-E against per-image loops with the same settings (``splitbits bench
attack``; what the three implementations are is in its ``--help``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from splitbits.attacks.model_ops import split_forward
from splitbits.attacks.runner import machine_info
from splitbits.attacks.threats import AttackConfig, project, run_attack


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def sequential_eot_pgd(model: Any, x: Tensor, cfg: AttackConfig, generator: torch.Generator) -> Tensor:
    """PGD-E on one image with one noise sample per forward/backward (gradients summed over EOT)."""
    noise = torch.rand(x.shape, generator=generator, device=generator.device).to(x)
    x_adv = project(x + (noise * 2 - 1) * cfg.eps, x, cfg.eps)
    for _ in range(cfg.steps):
        x_adv.requires_grad_(True)
        g = torch.zeros_like(x)
        for _ in range(cfg.eot):
            f = split_forward(model, x_adv, "noise").rate(cfg.terms).sum() / cfg.eot
            (gi,) = torch.autograd.grad(f, x_adv)
            g += gi
        x_adv = project(x_adv.detach() + cfg.alpha * g.sign(), x, cfg.eps)
    return x_adv.detach()


def _model(checkpoint: str | None, dev: torch.device, spec: Any = None) -> tuple[Any, str]:
    """The student of ``checkpoint`` — a checkpoint file (``spec`` for an sc2bench one) or a bundle
    directory (its checkpoint and spec) — else an untrained tiny MSHP model; frozen, on ``dev``; and
    its name."""
    if checkpoint:
        from pathlib import Path

        from splitbits.attacks.runner import TargetError, bundle_checkpoint
        from splitbits.trainer.checkpoint import load_model
        from splitbits.trainer.models import SplitClassifier

        path = Path(checkpoint).expanduser()
        if path.is_dir():
            path, bundle_spec = bundle_checkpoint(path)
            spec = spec if spec is not None else bundle_spec
        model, _ = load_model(path, spec)
        if not isinstance(model, SplitClassifier):
            raise TargetError(f"{path} is a plain classifier (teacher); the attack needs a split student")
        if model.bottleneck_layer.entropy_bottleneck.quantized_cdf.numel() == 0:
            model.update_entropy_tables(force=True)
        source = str(checkpoint)
    else:
        from splitbits.trainer.models import ModelSpec, build_model

        torch.manual_seed(0)
        model = build_model(ModelSpec(arch="tiny", family="mshp", num_classes=12, input_size=64))
        source = "untrained tiny MSHP"
    model = model.to(dev).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model, source


def run_bench(checkpoint: str | None, dev: torch.device, *, images: int = 64, loop_images: int = 8, batch: int = 32,
              steps: int = 20, eot: int = 16, eps: float = 8.0, sequential: bool = True,
              spec: Any = None) -> dict[str, Any]:
    """Images/s of ``batched`` (``images`` in batches of ``batch``), ``per_image`` and (``sequential``)
    ``per_image_sequential_eot`` (``loop_images`` each) on the same random images; ``eps`` in 1/255.
    ``checkpoint``: a checkpoint or a bundle (see :func:`_model`); ``spec`` for an sc2bench checkpoint."""
    model, source = _model(checkpoint, dev, spec)
    size = model.spec.input_size
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.rand(max(images, loop_images), 3, size, size, generator=gen, device=dev)
    cfg = AttackConfig(name="pgd-e", eps=eps / 255, steps=steps, eot=eot)
    run_attack(model, x[:2], AttackConfig(name="pgd-e", eps=cfg.eps, steps=2, eot=2), generator=gen)  # warm-up
    out: dict[str, Any] = {"settings": {"schedule": cfg.schedule, "steps": steps, "eot": eot, "eps": f"{eps:g}/255",
                                        "batch": batch, "images": images, "loop_images": loop_images,
                                        "input": [3, size, size], "model": source, "device": str(dev)}}

    def timed(name: str, n: int, attack: Callable[[], Tensor]) -> None:
        _sync(dev)
        t = time.perf_counter()
        adv = attack()
        _sync(dev)
        s = time.perf_counter() - t
        with torch.no_grad():
            rates = [float(split_forward(model, xx, "round").rate().mean()) for xx in (x[:n], adv)]
        out[name] = {"images": n, "seconds": s, "images_per_s": n / s, "rate_clean_bits": rates[0],
                     "rate_attacked_bits": rates[1]}

    timed("batched", images, lambda: torch.cat([run_attack(model, x[i:i + batch], cfg, generator=gen).x_adv
                                                for i in range(0, images, batch)]))
    timed("per_image", loop_images, lambda: torch.cat([run_attack(model, x[i:i + 1], cfg, generator=gen).x_adv
                                                       for i in range(loop_images)]))
    if sequential:
        timed("per_image_sequential_eot", loop_images,
              lambda: torch.cat([sequential_eot_pgd(model, x[i:i + 1], cfg, gen) for i in range(loop_images)]))
    b = out["batched"]["images_per_s"]
    out["speedup_vs_per_image"] = b / out["per_image"]["images_per_s"]
    if sequential:
        out["speedup_vs_per_image_sequential_eot"] = b / out["per_image_sequential_eot"]["images_per_s"]
    out["machine"] = machine_info()
    out["note"] = "all implementations attack the same random images; rates are −Σlog₂p in bits (rounded)"
    return out
