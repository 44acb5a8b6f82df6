"""Differentiable split forward passes for attacks: rate (−Σlog₂p) and logits under a chosen quantiser.

``compressai``'s eval path rounds (zero gradient), its training path adds uniform noise. Attacks need
both, plus a straight-through rounding that matches the deployed coder in the forward pass:

* ``noise``: ŷ = y + U(−½, ½) — one sample of the quantisation noise (EOT averages several);
* ``ste``:   ŷ = round(y − μ) + μ forward, identity backward (straight-through estimator);
* ``round``: ŷ = round(y − μ) + μ, no gradient through the rounding (what the runtime codes).

μ is the channel median (FP, MSHP's z) or the hyper-decoder mean (MSHP's y), as in the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from splitbits.trainer.models import FPBottleneck, MSHPBottleneck, SplitClassifier

QUANT_MODES = ("noise", "ste", "round")
RATE_TERMS = ("y", "z")


@dataclass
class SplitOutput:
    """Per-image rate terms (bits, shape [N]), the y bit map [N, h, w] and optionally logits."""

    bits: dict[str, Tensor]
    y_bit_map: Tensor
    logits: Tensor | None = None
    deployed: dict[str, Tensor] | None = None  # rounded bits per term, [N] (``deployed=True``)
    y_elements: int = 1  # elements of one image's y (C·h·w)

    def rate(self, terms: tuple[str, ...] = RATE_TERMS) -> Tensor:
        """Σ of the selected terms (missing terms, e.g. z of FP, are skipped); shape [N]."""
        parts = [self.bits[t] for t in terms if t in self.bits]
        if not parts:
            raise ValueError(f"none of the rate terms {terms} exist here (have {sorted(self.bits)})")
        return torch.stack(parts).sum(0)


def _quantize(v: Tensor, means: Tensor, mode: str) -> Tensor:
    if mode == "noise":
        return v + torch.empty_like(v).uniform_(-0.5, 0.5)
    r = torch.round(v - means) + means
    if mode == "ste":
        return v + (r - v).detach()
    if mode == "round":
        return r
    raise ValueError(f"unknown quantiser {mode!r}; choose from {', '.join(QUANT_MODES)}")


def _eb_likelihood(eb, v_hat: Tensor) -> Tensor:
    """EntropyBottleneck likelihood of an NCHW tensor (compressai works channel-first)."""
    c = v_hat.shape[1]
    vals = v_hat.transpose(0, 1).reshape(c, 1, -1)
    lik, _, _ = eb._likelihood(vals)
    if eb.use_likelihood_bound:
        lik = eb.likelihood_lower_bound(lik)
    return lik.reshape(c, v_hat.shape[0], *v_hat.shape[2:]).transpose(0, 1)


def _eb_medians(eb, like: Tensor) -> Tensor:
    return eb.quantiles[:, 0, 1].reshape(1, -1, 1, 1).to(like)


def _bits(lik: Tensor) -> Tensor:
    return -torch.log2(lik)


def _repeat(t: Tensor, samples: int) -> Tensor:
    if samples == 1:
        return t
    return t.unsqueeze(0).expand(samples, *t.shape).reshape(samples * t.shape[0], *t.shape[1:])


def split_forward(model: SplitClassifier, x: Tensor, quant: str = "noise", logits: bool = False,
                  samples: int = 1, y_quant: str | None = None, deployed: bool = False) -> SplitOutput:
    """x in [0, 1] (NCHW) → per-image bits of y (and z), the y bit map and optionally the logits.

    ``y_quant`` (default ``quant``) quantises MSHP's y differently from z: the paper's reference attack
    rounds y as at inference (its gradient flows only through the hyperprior's scales and means) while
    z gets the additive noise. ``deployed`` also returns the rounded (coded) bits of each image in
    ``out.deployed`` from the same analysis pass, without gradients (what attacks keep the best of).

    ``samples`` > 1 (noise only) draws that many quantisation-noise samples per image while running the
    deterministic analysis transforms (g_a, h_a) once: outputs have ``samples·N`` rows, sample-major
    (row ``s·N + i`` is sample ``s`` of image ``i``). Same expectation and gradient as repeating x.
    """
    if quant not in QUANT_MODES:
        raise ValueError(f"unknown quantiser {quant!r}; choose from {', '.join(QUANT_MODES)}")
    if samples < 1 or (samples > 1 and quant != "noise"):
        raise ValueError("several samples need quant='noise' (the other quantisers are deterministic)")
    y_quant = y_quant or quant
    if y_quant not in QUANT_MODES:
        raise ValueError(f"unknown quantiser {y_quant!r}; choose from {', '.join(QUANT_MODES)}")
    bl = model.bottleneck_layer
    h = model.normalize(x)
    if isinstance(bl, MSHPBottleneck):
        y0 = bl.g_a(h)
        z0 = bl.h_a(y0)
    elif isinstance(bl, FPBottleneck):
        y0, z0 = bl.encoder(h), None
    else:  # pragma: no cover - only two families exist
        raise TypeError(f"unsupported bottleneck {type(bl).__name__}")
    bits, y_bits, y_hat = _entropy_terms(bl, _repeat(y0, samples), None if z0 is None else _repeat(z0, samples),
                                         quant, y_quant)
    out = SplitOutput(bits, y_bits.sum(1), y_elements=y_bits[0].numel())
    if deployed:
        with torch.no_grad():
            out.deployed = _entropy_terms(bl, y0.detach(), None if z0 is None else z0.detach(), "round", "round")[0]
    if logits:
        out.logits = model.backbone_rest(bl.synthesis()(y_hat))
    return out


def _entropy_terms(bl: FPBottleneck | MSHPBottleneck, y: Tensor, z: Tensor | None, quant: str,
                   y_quant: str) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Per-image bits of each term, the per-element bits of y and ŷ, for latents already computed."""
    eb = bl.entropy_bottleneck
    if isinstance(bl, MSHPBottleneck):
        assert z is not None
        z_hat = _quantize(z, _eb_medians(eb, z), quant)
        z_bits = _bits(_eb_likelihood(eb, z_hat))
        scales, means = bl.hyper(z_hat)
        y_hat = _quantize(y, means, y_quant)
        gc = bl.gaussian_conditional
        y_lik = gc._likelihood(y_hat, scales, means)
        if gc.use_likelihood_bound:
            y_lik = gc.likelihood_lower_bound(y_lik)
        y_bits = _bits(y_lik)
        return {"y": y_bits.flatten(1).sum(1), "z": z_bits.flatten(1).sum(1)}, y_bits, y_hat
    y_hat = _quantize(y, _eb_medians(eb, y), y_quant)
    y_bits = _bits(_eb_likelihood(eb, y_hat))
    return {"y": y_bits.flatten(1).sum(1)}, y_bits, y_hat


def eot_rate(model: SplitClassifier, x: Tensor, terms: tuple[str, ...] = RATE_TERMS, samples: int = 1,
             quant: str = "noise") -> Tensor:
    """Expected rate over ``samples`` quantisation-noise draws (EOT), batched over images and samples.

    The analysis transforms run once per image; only the entropy model sees N·samples rows. Returns
    shape [N]. With ``quant`` other than ``noise`` the samples are identical, so one is used.
    """
    if samples < 1:
        raise ValueError("EOT needs at least one sample")
    if quant != "noise" or samples == 1:
        return split_forward(model, x, quant).rate(terms)
    return split_forward(model, x, quant, samples=samples).rate(terms).view(samples, x.shape[0]).mean(0)


@torch.no_grad()
def rate_and_logits(model: SplitClassifier, x: Tensor, batch: int = 256) -> tuple[Tensor, Tensor]:
    """Rounded (deployed) rate in bits [N] and the logits, in batches, without gradients."""
    rates, logits = [], []
    for i in range(0, x.shape[0], batch):
        o = split_forward(model, x[i:i + batch], "round", logits=True)
        rates.append(o.rate())
        assert o.logits is not None
        logits.append(o.logits)
    return torch.cat(rates), torch.cat(logits)


def likelihood_mask(model: SplitClassifier, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """The entropy model's per-position bits of y (rounded), upsampled to ``size`` and scaled to [0, 1].

    High values = low likelihood = expensive content (objects, edges, adversarial texture). [N,1,H,W].
    """
    with torch.no_grad():
        bmap = split_forward(model, x, "round").y_bit_map.unsqueeze(1)
        size = size or (x.shape[-2], x.shape[-1])
        up = F.interpolate(bmap, size=size, mode="bilinear", align_corners=False)
        lo = up.flatten(1).min(1).values.view(-1, 1, 1, 1)
        hi = up.flatten(1).max(1).values.view(-1, 1, 1, 1)
        return (up - lo) / (hi - lo).clamp_min(1e-12)
