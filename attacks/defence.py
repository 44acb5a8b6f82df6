"""Input-side defences run on the edge before the head: object-aware TV denoising and baselines.

Object-aware total-variation denoising (the defence of Zhang et al., ECCV 2024)::

    x₀ = x′;   x ← clip₀¹( x − α · m ⊙ ((x − x′) + λ · ∇TV(x)) )   (``iterations`` times)

``x′`` is the received image, ``m`` the entropy model's per-position cost of ``x′`` (−Σ_c log₂p(ŷ)),
bilinearly upsampled to the input size, min–max scaled per image and inverted: expensive positions
(low likelihood: objects, edges) get ``m ≈ mask_floor`` and are smoothed less, cheap background
``m ≈ 1`` (``mask_gamma`` sharpens it). TV is the isotropic, δ-smoothed total variation
Σ√(∂ₓx² + ∂ᵧx² + δ²); δ = 0.1 (``tv_delta``) keeps the explicit iteration stable at the
reference step (α·λ·8/δ < 2) and makes gradients below δ (e.g. an 8/255 perturbation) diffuse
while object edges, well above δ, are kept.

Baselines: ``tv`` (the same iteration with ``m = 1``), ``jpeg`` (re-encode at ``quality``) and
``none``. Everything is batched on the model's device. ``grad`` picks how an adaptive attack sees the
defence: ``bpda`` (forward = defence, backward = identity), ``unroll`` (autograd through every
iteration; the mask is treated as a constant) or ``none`` (no graph).
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DEFENCES = ("none", "oatv", "tv", "jpeg")
DEFENCE_GRADS = ("none", "bpda", "unroll")


@dataclass(frozen=True)
class DefenceConfig:
    """A defence and its parameters (defaults: the reference's 100 iterations, λ = 0.1, α = 0.15)."""

    name: str = "oatv"
    iterations: int = 100
    lam: float = 0.1
    alpha: float = 0.15
    tv_delta: float = 0.1
    mask_floor: float = 0.0
    mask_gamma: float = 1.0
    quality: int = 75

    def __post_init__(self) -> None:
        if self.name not in DEFENCES:
            import difflib

            close = difflib.get_close_matches(str(self.name), DEFENCES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown defence {self.name!r}{hint}; choose from {', '.join(DEFENCES)}")
        if self.iterations < 0:
            raise ValueError(f"defence iterations must be >= 0, got {self.iterations}")
        if self.lam < 0 or self.alpha <= 0 or self.tv_delta <= 0:
            raise ValueError("defence needs lam >= 0, alpha > 0 and tv_delta > 0")
        if not 0.0 <= self.mask_floor <= 1.0:
            raise ValueError(f"mask_floor must lie in [0, 1], got {self.mask_floor}")
        if self.mask_gamma <= 0:
            raise ValueError(f"mask_gamma must be > 0, got {self.mask_gamma}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"JPEG quality must lie in 1..100, got {self.quality}")

    @property
    def label(self) -> str:
        """Short display name: ``oatv``, ``jpeg75``, or with non-default options ``oatv(lam=0.3,alpha=0.06)``."""
        if self.name == "jpeg":
            return f"jpeg{self.quality}"
        if self.name == "none":
            return "none"
        base = DefenceConfig(name=self.name)
        keys = ("iterations", "lam", "alpha", "tv_delta") + (("mask_floor", "mask_gamma") if self.name == "oatv"
                                                             else ())
        diff = [f"{k}={getattr(self, k):g}" for k in keys if getattr(self, k) != getattr(base, k)]
        return f"{self.name}({','.join(diff)})" if diff else self.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, spec: str | dict[str, Any] | DefenceConfig) -> DefenceConfig:
        """``"oatv"``, ``"jpeg:quality=50"``, ``"oatv:iterations=50,lam=0.2"`` or a mapping."""
        if isinstance(spec, DefenceConfig):
            return spec
        if isinstance(spec, dict):
            d = dict(spec)
        else:
            name, _, rest = str(spec).partition(":")
            d = {"name": name.strip()}
            for item in filter(None, (s.strip() for s in rest.split(","))):
                k, eq, v = item.partition("=")
                if not eq:
                    raise ValueError(f"defence option {item!r} is not KEY=VALUE (in {spec!r})")
                d[k.strip()] = float(v) if "." in v or "e" in v.lower() else int(v)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            import difflib

            bad = sorted(unknown)[0]
            close = difflib.get_close_matches(bad, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown defence option {bad!r}{hint}; valid: {', '.join(sorted(known))}")
        for k in ("iterations", "quality"):
            if k in d:
                d[k] = int(d[k])
        for k in ("lam", "alpha", "tv_delta", "mask_floor", "mask_gamma"):
            if k in d:
                d[k] = float(d[k])
        return cls(**d)


def _diffs(x: Tensor) -> tuple[Tensor, Tensor]:
    """Forward differences along W and H, zero at the last column/row (Neumann boundary)."""
    dx = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1))
    dy = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    return dx, dy


def total_variation(x: Tensor, delta: float = 0.0) -> Tensor:
    """Isotropic TV per image: Σ√(∂ₓ² + ∂ᵧ² + δ²) over channels and pixels → shape [N]."""
    dx, dy = _diffs(x)
    return torch.sqrt(dx * dx + dy * dy + delta * delta).flatten(1).sum(1)


def tv_gradient(x: Tensor, delta: float = 0.1) -> Tensor:
    """∂TV/∂x of the δ-smoothed isotropic TV (analytic, differentiable, same shape as x)."""
    dx, dy = _diffs(x)
    n = torch.rsqrt(dx * dx + dy * dy + delta * delta)
    px, py = dx * n, dy * n
    return F.pad(px[..., :, :-1], (1, 0)) - px + F.pad(py[..., :-1, :], (0, 0, 1, 0)) - py


@torch.no_grad()
def _tv_gradient_(x: Tensor, delta: float) -> Tensor:
    """:func:`tv_gradient` with in-place arithmetic (no graph; ~4× faster on CPU)."""
    dx, dy = torch.empty_like(x), torch.empty_like(x)
    torch.sub(x[..., :, 1:], x[..., :, :-1], out=dx[..., :, :-1])
    dx[..., :, -1] = 0
    torch.sub(x[..., 1:, :], x[..., :-1, :], out=dy[..., :-1, :])
    dy[..., -1, :] = 0
    n = torch.mul(dx, dx).addcmul_(dy, dy).add_(delta * delta).rsqrt_()
    dx.mul_(n)
    dy.mul_(n)
    g = torch.neg(dx).sub_(dy)
    g[..., :, 1:] += dx[..., :, :-1]
    g[..., 1:, :] += dy[..., :-1, :]
    return g


def object_mask(model: Any, x: Tensor, floor: float = 0.0, gamma: float = 1.0) -> Tensor:
    """m = floor + (1 − floor)·(1 − cost)^γ ∈ [floor, 1], [N,1,H,W]; cost = the scaled bit map of x′.

    ≈ floor where the entropy model finds x′ expensive (objects). γ > 1 sharpens the mask: since the
    iteration's fixed point does not depend on m, only positions with α·m·iterations ≲ 1 stay
    noticeably less smoothed.
    """
    from splitbits.attacks.model_ops import likelihood_mask

    cost = likelihood_mask(model, x)
    return floor + (1.0 - floor) * (1.0 - cost).pow(gamma)


def tv_denoise(x_recv: Tensor, mask: Tensor | float, iterations: int, lam: float, alpha: float,
               delta: float = 0.1) -> Tensor:
    """The masked TV iteration; differentiable in ``x_recv`` when autograd is on and it requires grad."""
    if torch.is_grad_enabled() and x_recv.requires_grad:
        x = x_recv
        for _ in range(iterations):
            x = (x - alpha * mask * ((x - x_recv) + lam * tv_gradient(x, delta))).clamp(0.0, 1.0)
        return x
    with torch.no_grad():
        am = alpha * mask
        x = x_recv.clone()
        for _ in range(iterations):
            g = _tv_gradient_(x, delta).mul_(lam).add_(x).sub_(x_recv).mul_(am)
            x.sub_(g).clamp_(0.0, 1.0)
        return x


def jpeg_reencode(x: Tensor, quality: int = 75) -> Tensor:
    """Round to uint8, JPEG encode/decode with Pillow at ``quality``, back to [0, 1] (no gradient)."""
    from PIL import Image

    arr = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(arr)
    for i, im in enumerate(arr):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as dec:
            out[i] = np.asarray(dec.convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255.0


def apply_defence(model: Any, x: Tensor, cfg: DefenceConfig | str, grad: str = "none") -> Tensor:
    """Defend a batch x ∈ [0,1] (NCHW). ``grad``: none | bpda | unroll (see the module docstring)."""
    cfg = DefenceConfig.parse(cfg)
    if grad not in DEFENCE_GRADS:
        raise ValueError(f"unknown defence gradient mode {grad!r}; choose from {', '.join(DEFENCE_GRADS)}")
    if cfg.name == "none":
        return x
    if cfg.name == "jpeg":
        if grad == "unroll":
            raise ValueError("JPEG re-encoding is not differentiable; use grad='bpda'")
        y = jpeg_reencode(x, cfg.quality)
        return x + (y - x).detach() if grad == "bpda" else y
    mask: Tensor | float = 1.0
    if cfg.name == "oatv":
        mask = object_mask(model, x.detach(), cfg.mask_floor, cfg.mask_gamma)
    if grad == "unroll":
        return tv_denoise(x, mask, cfg.iterations, cfg.lam, cfg.alpha, cfg.tv_delta)
    with torch.no_grad():
        y = tv_denoise(x.detach(), mask, cfg.iterations, cfg.lam, cfg.alpha, cfg.tv_delta)
    return x + (y - x).detach() if grad == "bpda" else y


def defend_timed(model: Any, x: Tensor, cfg: DefenceConfig, batch: int = 64) -> tuple[Tensor, float]:
    """Defended images (no graph) and the defence's wall time per image in ms (batched)."""
    if cfg.name == "none":
        return x, 0.0
    t = time.perf_counter()
    out = torch.cat([apply_defence(model, x[i:i + batch], cfg) for i in range(0, x.shape[0], batch)])
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return out, (time.perf_counter() - t) * 1e3 / max(1, x.shape[0])
