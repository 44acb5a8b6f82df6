"""Threat models: L∞ PGD on the rate (PGD-E), on the accuracy (PGD-Acc), sign noise, adaptive attacks.

All attacks take a batch ``x ∈ [0, 1]`` (NCHW, on the model's device) and return an
:class:`AttackOutcome` whose ``x_adv`` satisfies ``‖x_adv − x‖∞ ≤ ε`` and ``0 ≤ x_adv ≤ 1``.

* ``pgd-e``: maximise the rate −Σlog₂p(ŷ) (terms ``y`` and/or ``z``), the expectation over the
  quantisation noise estimated with ``eot`` samples that run as one batched forward.
* ``pgd-acc``: maximise the cross-entropy of the whole split model (straight-through rounding).
* ``noise``: random ±ε sign noise (the control: same budget, no optimisation).
* ``pgd-e-lowfreq``: PGD-E whose steps and perturbation are restricted to the lowest ``band``
  fraction of the 2-D DCT (survives smoothing defences).
* ``pgd-e-region``: PGD-E on the rate weighted by ``1 − m`` (m: the defence's object mask of the
  current input), with the step masked the same way: it spends its budget where OATV smooths least.
* ``pgd-e-bpda``: PGD-E through the defence ``through`` (BPDA: identity backward; or ``unroll``).

Every attack records the surrogate it optimised (the EOT objective) before and after, per image.

PGD threats take a ``schedule``:

* ``auto`` (default): APGD-style (Croce & Hein 2020) — first step 2ε, momentum 0.75, the step halves at
  checkpoints where the iterate stopped improving (restarting from the best point), and each image
  keeps its best iterate scored by the *deployed* objective (rounded latents for the rate attacks,
  the real coded size up to the coder's overhead) rather than the noisy EOT surrogate.
* ``fixed``: Madry et al.'s PGD, step 2.5·ε/steps, random start (the schedule before ``auto``).
* ``reference`` (``pgd-e`` only): the procedure of Zhang et al.'s published code — objective the mean
  over y of −log₂p with y rounded as at inference and z through additive noise; each of ``steps``
  iterations takes ``eot`` copies, a signed gradient step of ``step_size`` (default 0.1, in [0, 1]
  pixel units) on each copy (each with its own noise), averages the stepped copies and projects onto
  the ε-ball and [0, 1]; no random start, the last iterate is the result.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from splitbits.attacks.defence import DefenceConfig, apply_defence, object_mask
from splitbits.attacks.model_ops import QUANT_MODES, RATE_TERMS, split_forward
from splitbits.runtime.corruptions import check_corruption
from splitbits.runtime.errors import SplitbitsError

SCHEDULES = ("auto", "fixed", "reference")
THREATS = ("clean", "pgd-e", "pgd-acc", "noise", "pgd-e-lowfreq", "pgd-e-region", "pgd-e-bpda")
ENTROPY_THREATS = ("pgd-e", "pgd-e-lowfreq", "pgd-e-region", "pgd-e-bpda")


class AttackConfigError(SplitbitsError, ValueError):
    """A threat name or parameter that is not valid (raised before any work starts)."""


def check_threat(name: str) -> None:
    if name not in THREATS:
        close = difflib.get_close_matches(str(name), THREATS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise AttackConfigError(f"unknown attack {name!r}{hint}; choose from {', '.join(THREATS)} "
                                "(natural corruptions: --attack corruption --corruption NAME)")


def check_eps(eps: float) -> float:
    """ε as a fraction of the [0, 1] pixel range; must be finite and within [0, 1]."""
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise AttackConfigError(f"ε must be a number, got {eps!r}") from None
    if not math.isfinite(e) or not 0.0 <= e <= 1.0:
        raise AttackConfigError(f"ε = {eps!r} is outside [0, 1] (pixel range); e.g. 8/255 = {8 / 255:.4f}")
    return e


def parse_eps(text: str | float | int, unit: str = "255") -> float:
    """``"8"`` (with unit 255) → 8/255; ``"8/255"`` → 8/255; ``"0.03"`` with unit ``unit`` → 0.03."""
    s = str(text).strip()
    try:
        if "/" in s:
            num, _, den = s.partition("/")
            value = float(num) / float(den)
        elif unit == "255":
            value = float(s) / 255.0
        elif unit == "unit":
            value = float(s)
        else:
            raise AttackConfigError(f"unknown ε unit {unit!r}; use 255 (ε given as k/255) or unit")
    except (ValueError, ZeroDivisionError):
        raise AttackConfigError(f"ε {text!r} is not a number (e.g. 8, 8/255 or 0.03)") from None
    if unit == "255" and "/" not in s and not 0.0 <= float(s) <= 255.0:
        raise AttackConfigError(f"ε = {s}/255 is outside [0, 1] (give 0..255 in units of 1/255)")
    return check_eps(value)


@dataclass(frozen=True)
class AttackConfig:
    """One threat and its parameters. ``step_size`` None → the schedule's own: 2ε (``auto``, the first
    step), 2.5·ε/steps (``fixed``, Madry et al.), 0.1 (``reference``)."""

    name: str = "pgd-e"
    eps: float = 8 / 255
    steps: int = 20
    step_size: float | None = None
    eot: int = 16
    random_start: bool = True
    terms: tuple[str, ...] = RATE_TERMS
    quant: str = "noise"
    band: float = 0.25
    through: str = "oatv"
    through_grad: str = "bpda"
    keep_best: bool = True
    defence: dict[str, Any] = field(default_factory=dict)
    schedule: str = "auto"

    def __post_init__(self) -> None:
        check_threat(self.name)
        check_eps(self.eps)
        if not isinstance(self.steps, int) or self.steps < 0:
            raise AttackConfigError(f"steps must be a non-negative integer, got {self.steps!r}")
        if not isinstance(self.eot, int) or self.eot < 1:
            raise AttackConfigError(f"eot must be an integer >= 1, got {self.eot!r}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            raise AttackConfigError(f"step_size must be > 0, got {self.step_size!r}")
        terms = tuple(self.terms)
        if not terms or any(t not in RATE_TERMS for t in terms):
            raise AttackConfigError(f"rate terms must be a non-empty subset of y, z; got {self.terms!r}")
        object.__setattr__(self, "terms", terms)
        if self.quant not in QUANT_MODES[:2]:
            raise AttackConfigError(f"gradient quantiser must be noise or ste, got {self.quant!r}")
        if not 0.0 < self.band <= 1.0:
            raise AttackConfigError(f"low-frequency band must lie in (0, 1], got {self.band!r}")
        if self.schedule not in SCHEDULES:
            raise AttackConfigError(f"unknown PGD schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.schedule == "reference" and self.name not in ("pgd-e", "clean", "noise"):
            raise AttackConfigError(f"schedule 'reference' is the paper's PGD-E procedure; {self.name} has no "
                                    "reference version (use auto or fixed)")
        if self.through_grad not in ("bpda", "unroll"):
            raise AttackConfigError(f"through_grad must be bpda or unroll, got {self.through_grad!r}")
        try:
            DefenceConfig.parse({"name": self.through, **self.defence})
        except ValueError as exc:
            raise AttackConfigError(f"attack through defence: {exc}") from None

    @property
    def alpha(self) -> float:
        if self.step_size is not None:
            return self.step_size
        if self.schedule == "reference":
            return 0.1
        if self.schedule == "auto":
            return 2.0 * self.eps
        return 2.5 * self.eps / max(1, self.steps)

    def through_defence(self) -> DefenceConfig:
        return DefenceConfig.parse({"name": self.through, **self.defence})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["terms"] = list(self.terms)
        d["step_size_used"] = self.alpha
        return d


@dataclass(frozen=True)
class ThreatPoint:
    """What happens to the images at one grid point: a threat at its ε, or a corruption at a severity
    (exactly one of ``attack`` and ``corruption``)."""

    attack: AttackConfig | None = None
    corruption: str | None = None
    severity: int | None = None

    def __post_init__(self) -> None:
        if (self.attack is None) == (self.corruption is None):
            raise AttackConfigError("a grid point is either an attack or a corruption")
        if self.corruption is not None:
            check_corruption(self.corruption, self.severity)  # type: ignore[arg-type]

    @property
    def threat(self) -> str:
        return self.attack.name if self.attack else "corruption"

    @property
    def eps(self) -> float | None:
        return self.attack.eps if self.attack else None

    @property
    def level(self) -> str:
        """``k/255`` (ε, 4 decimals), ``-`` for clean, ``NAME:SEVERITY`` for a corruption."""
        if self.attack is None:
            return f"{self.corruption}:{self.severity}"
        return "-" if self.attack.name == "clean" else f"{round(self.attack.eps * 255, 4):g}/255"

    def key(self) -> str:
        """Identity of the point including every parameter that changes its result."""
        if self.attack is None:
            return f"corruption|{self.corruption}|{self.severity}"
        d = self.attack.to_dict()
        h = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.attack.name}|{self.level}|{h}"


#: the unperturbed images (every comparison's baseline)
CLEAN = ThreatPoint(attack=AttackConfig(name="clean", eps=0.0))


@dataclass
class AttackOutcome:
    """The attacked batch and the surrogate the attack optimised (per image, before and after)."""

    x_adv: Tensor
    objective: str
    clean_objective: Tensor
    adv_objective: Tensor
    history: list[float] = field(default_factory=list)

    @property
    def loss_rose(self) -> bool:
        return bool(self.adv_objective.mean() > self.clean_objective.mean())


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Clip onto the L∞ ball of radius ε around x, intersected with [0, 1].

    Exact in floating point: the bounds ``x ± ε`` are rounded towards ``x`` (in float64 first), so
    ``‖x_adv − x‖∞ <= ε`` holds exactly, not up to a rounding error.
    """
    x64 = x.double()
    lo64, hi64 = x64 - eps, x64 + eps
    lo, hi = lo64.to(x.dtype), hi64.to(x.dtype)
    lo = torch.where(lo.double() < lo64, torch.nextafter(lo, x), lo)
    hi = torch.where(hi.double() > hi64, torch.nextafter(hi, x), hi)
    return torch.min(torch.max(x_adv, lo), hi).clamp(0.0, 1.0)


# -- DCT low-pass (orthonormal DCT-II as matrix products) ------------------------------------


def dct_matrix(n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(device=device, dtype=dtype)


def lowpass(x: Tensor, band: float) -> Tensor:
    """Keep the lowest ⌈band·H⌉ × ⌈band·W⌉ DCT coefficients of every channel."""
    if band >= 1.0:
        return x
    h, w = x.shape[-2:]
    dh, dw = dct_matrix(h, x.device, x.dtype), dct_matrix(w, x.device, x.dtype)
    c = dh @ x @ dw.T
    kh, kw = max(1, math.ceil(band * h)), max(1, math.ceil(band * w))
    mask = torch.zeros(h, w, device=x.device, dtype=x.dtype)
    mask[:kh, :kw] = 1.0
    return dh.T @ (c * mask) @ dw


# -- objectives ------------------------------------------------------------------------------

#: per-image surrogate (differentiable), or (surrogate, deployed score without gradient)
Objective = Callable[[Tensor], Tensor | tuple[Tensor, Tensor]]


def _split(out: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(surrogate, score): an objective without its own score is scored by its surrogate."""
    if isinstance(out, tuple):
        return out
    return out, out.detach()


def rate_objective(model: Any, cfg: AttackConfig) -> Objective:
    """EOT rate of ``cfg.terms`` and, as the score, their rounded (deployed) bits from the same pass."""

    def fn(x: Tensor) -> tuple[Tensor, Tensor]:
        reps = cfg.eot if cfg.quant == "noise" else 1
        out = split_forward(model, x, cfg.quant, samples=reps, deployed=True)
        assert out.deployed is not None
        score = torch.stack([out.deployed[t] for t in cfg.terms if t in out.deployed]).sum(0)
        return out.rate(cfg.terms).view(reps, x.shape[0]).mean(0), score

    return fn


def reference_objective(model: Any) -> Objective:
    """The paper's PGD-E loss per row: mean over y of −log₂p, y rounded as at inference, z with additive
    noise (one draw per row). FP has no z; there y takes the noise (rounding alone has no gradient)."""
    fp = model.family == "fp"

    def fn(x: Tensor) -> Tensor:
        out = split_forward(model, x, "noise", y_quant="noise" if fp else "round")
        return out.bits["y"] / out.y_elements

    return fn


def region_objective(model: Any, cfg: AttackConfig, floor: float, gamma: float = 1.0) -> Objective:
    """Rate of y weighted per position by (1 − m) at the latent resolution, plus z if selected."""

    def fn(x: Tensor) -> Tensor:
        w = 1.0 - object_mask(model, x.detach(), floor, gamma)  # [N,1,H,W]
        n = x.shape[0]
        reps = cfg.eot if cfg.quant == "noise" else 1
        out = split_forward(model, x, cfg.quant, samples=reps)
        wl = F.adaptive_avg_pool2d(w, out.y_bit_map.shape[-2:]).squeeze(1).repeat(reps, 1, 1)
        val = torch.zeros(reps * n, device=x.device, dtype=x.dtype)
        if "y" in cfg.terms:
            val = val + (wl * out.y_bit_map).flatten(1).sum(1)
        if "z" in cfg.terms and "z" in out.bits:
            val = val + out.bits["z"]
        return val.view(reps, n).mean(0)

    return fn


def accuracy_objective(model: Any, labels: Tensor, cfg: AttackConfig) -> Objective:
    quant = "ste" if cfg.quant == "ste" or cfg.eot == 1 else "noise"

    def fn(x: Tensor) -> Tensor:
        reps = cfg.eot if quant == "noise" else 1
        n = x.shape[0]
        logits = split_forward(model, x, quant, logits=True, samples=reps).logits
        assert logits is not None
        return F.cross_entropy(logits, labels.repeat(reps), reduction="none").view(reps, n).mean(0)

    return fn


# -- PGD ---------------------------------------------------------------------------------------


PGDResult = tuple[Tensor, Tensor, Tensor, list[float]]


def _start(x: Tensor, eps: float, random_start: bool, generator: torch.Generator | None,
           delta_map: Callable[[Tensor], Tensor] | None) -> Tensor:
    if not random_start:
        return x.clone()
    noise = torch.rand(x.shape, generator=generator, device=generator.device if generator else "cpu")
    delta = (noise.to(x) * 2 - 1) * eps
    if delta_map is not None:
        delta = delta_map(delta)
    return project(x + delta, x, eps)


def _grad(objective: Objective, x: Tensor, grad_map: Callable[[Tensor, Tensor], Tensor] | None
          ) -> tuple[Tensor, Tensor, Tensor]:
    """(surrogate, score, gradient of the surrogate, mapped) at ``x``."""
    xg = x.detach().requires_grad_(True)
    f, score = _split(objective(xg))
    (g,) = torch.autograd.grad(f.sum(), xg)
    if grad_map is not None:
        g = grad_map(g, x.detach())
    return f.detach(), score.detach(), g


def _step(x: Tensor, x_cur: Tensor, direction: Tensor, eps: float,
          delta_map: Callable[[Tensor], Tensor] | None) -> Tensor:
    delta = x_cur + direction - x
    if delta_map is not None:
        delta = delta_map(delta)
    return project(x + delta, x, eps)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.ndim - 1)))


def pgd(x: Tensor, objective: Objective, eps: float, steps: int, alpha: float, *, random_start: bool = True,
        generator: torch.Generator | None = None, grad_map: Callable[[Tensor, Tensor], Tensor] | None = None,
        step_fn: Callable[[Tensor], Tensor] | None = None, delta_map: Callable[[Tensor], Tensor] | None = None,
        keep_best: bool = True) -> PGDResult:
    """Fixed-step PGD (schedule ``fixed``): maximise the surrogate (per image) over the L∞ ball; returns
    (x_adv, f(x), f(x_adv), mean f per step).

    ``grad_map(g, x_cur)`` reshapes the gradient, ``step_fn(g)`` turns it into a step direction
    (default sign), ``delta_map(δ)`` constrains the perturbation (e.g. low-pass) before projection.
    With ``keep_best`` each image keeps the iterate with the highest surrogate seen.
    """
    x = x.detach()
    with torch.no_grad():
        f_clean = _split(objective(x))[0].detach()
    if eps == 0 or steps == 0:
        return x.clone(), f_clean, f_clean.clone(), [float(f_clean.mean())]
    x_adv = _start(x, eps, random_start, generator, delta_map)
    best, best_f = x_adv.clone(), torch.full_like(f_clean, -math.inf)
    history: list[float] = []
    step_fn = step_fn or torch.sign
    for _ in range(steps):
        fd, _s, g = _grad(objective, x_adv, grad_map)
        with torch.no_grad():
            history.append(float(fd.mean()))
            better = fd > best_f
            best[better] = x_adv.detach()[better]
            best_f = torch.where(better, fd, best_f)
            x_adv = _step(x, x_adv.detach(), alpha * step_fn(g), eps, delta_map)
    with torch.no_grad():
        f_last = _split(objective(x_adv))[0].detach()
        history.append(float(f_last.mean()))
        if keep_best:
            better = f_last > best_f
            best[better] = x_adv[better]
            best_f = torch.where(better, f_last, best_f)
            return best.detach(), f_clean, best_f, history
    return x_adv.detach(), f_clean, f_last, history


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations at which APGD may halve its step: p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03,
    0.06), scaled by ``steps`` (Croce & Hein 2020)."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * steps - 1e-9) for q in p[1:] if q <= 1.0} - {0})


def apgd(x: Tensor, objective: Objective, eps: float, steps: int, eta: float, *, random_start: bool = False,
         generator: torch.Generator | None = None, grad_map: Callable[[Tensor, Tensor], Tensor] | None = None,
         step_fn: Callable[[Tensor], Tensor] | None = None, delta_map: Callable[[Tensor], Tensor] | None = None,
         momentum: float = 0.75, rho: float = 0.75) -> PGDResult:
    """APGD (schedule ``auto``): step ``eta`` per image, momentum, halving at :func:`apgd_checkpoints` when
    fewer than ``rho`` of the steps since the last checkpoint raised the score or the best score has not
    moved (then the image restarts from its best point). Each image keeps its best-*scoring* iterate
    (ties, e.g. the same coded symbols, go to the higher surrogate).

    ``steps`` gradient evaluations (forward + backward) plus one forward of the last iterate; returns
    (x_best, f(x), f(x_best), mean best score per step).
    """
    x = x.detach()
    n = x.shape[0]
    with torch.no_grad():
        f_clean = _split(objective(x))[0].detach()
    if eps == 0 or steps == 0:
        return x.clone(), f_clean, f_clean.clone(), [float(f_clean.mean())]
    step_fn = step_fn or torch.sign
    x_cur = _start(x, eps, random_start, generator, delta_map)
    f, s, g = _grad(objective, x_cur, grad_map)
    best, best_f, best_s, best_g = x_cur.clone(), f.clone(), s.clone(), g.clone()
    x_prev, s_prev = x_cur.clone(), s.clone()
    etas = torch.full((n,), float(eta), device=x.device, dtype=x.dtype)
    checks, last = apgd_checkpoints(steps), 0
    ups = torch.zeros(n, device=x.device)
    mark_eta, mark_s = etas.clone(), best_s.clone()
    history = [float(best_s.mean())]
    for k in range(1, steps + 1):
        with torch.no_grad():
            z = _step(x, x_cur, _bcast(etas, x) * step_fn(g), eps, delta_map)
            if k > 1:
                z = _step(x, x_cur, momentum * (z - x_cur) + (1 - momentum) * (x_cur - x_prev), eps, delta_map)
            x_prev, x_cur = x_cur, z
        if k < steps:
            f, s, g = _grad(objective, x_cur, grad_map)
        else:
            with torch.no_grad():
                f, s = (t.detach() for t in _split(objective(x_cur)))
        with torch.no_grad():
            ups += (s > s_prev).float()
            s_prev = s
            better = (s > best_s) | ((s == best_s) & (f > best_f))  # ties (same symbols): the surrogate
            best[better], best_f[better], best_s[better] = x_cur[better], f[better], s[better]
            if k < steps:
                best_g[better] = g[better]
            history.append(float(best_s.mean()))
            if k in checks and k < steps:
                halve = (ups < rho * (k - last)) | ((mark_eta == etas) & (mark_s == best_s))
                etas = torch.where(halve, etas / 2, etas)
                x_cur[halve], g[halve] = best[halve], best_g[halve]
                x_prev[halve] = best[halve]
                mark_eta, mark_s, last = etas.clone(), best_s.clone(), k
                ups.zero_()
    return best.detach(), f_clean, best_f, history


def reference_pgd(x: Tensor, objective: Objective, eps: float, steps: int, step: float, copies: int,
                  chunk: int = 64) -> PGDResult:
    """The paper's procedure (schedule ``reference``): per iteration ``copies`` copies of each image, a
    signed gradient step of ``step`` on each (its own noise draw), the mean of the stepped copies
    projected onto the ε-ball and [0, 1]; no random start; the last iterate. ``objective`` is evaluated
    on ``copies``·N rows (copy-major), at most ``chunk`` rows per pass. Returns (x_adv, f(x), f(x_adv),
    mean f per step), f the objective averaged over the copies."""
    x = x.detach()
    n = x.shape[0]
    per = max(1, chunk // copies)

    def stepped(xa: Tensor) -> tuple[Tensor, Tensor]:
        outs, fs = [], []
        for i in range(0, n, per):
            xr = xa[i:i + per].repeat(copies, 1, 1, 1).requires_grad_(True)
            f = _split(objective(xr))[0]
            (g,) = torch.autograd.grad(f.sum(), xr)
            m = xr.shape[0] // copies
            outs.append((xr.detach() + step * g.sign()).view(copies, m, *x.shape[1:]).mean(0))
            fs.append(f.detach().view(copies, m).mean(0))
        return torch.cat(outs), torch.cat(fs)

    x_adv = x.clone()
    history: list[float] = []
    f_clean = None
    for _ in range(steps if eps > 0 else 0):
        mean_copy, f = stepped(x_adv)
        f_clean = f if f_clean is None else f_clean
        history.append(float(f.mean()))
        x_adv = project(mean_copy, x, eps)
    with torch.no_grad():
        f_last = torch.cat([_split(objective(x_adv[i:i + per].repeat(copies, 1, 1, 1)))[0].view(copies, -1).mean(0)
                            for i in range(0, n, per)])
    history.append(float(f_last.mean()))
    return x_adv.detach(), f_last if f_clean is None else f_clean, f_last, history


def _linf_normalised(g: Tensor) -> Tensor:
    return g / g.flatten(1).abs().max(1).values.clamp_min(1e-12).view(-1, *([1] * (g.ndim - 1)))


def run_attack(model: Any, x: Tensor, cfg: AttackConfig, labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> AttackOutcome:
    """Attack one batch (no chunking; see :func:`splitbits.attacks.runner.perturb`)."""
    name, eps = cfg.name, cfg.eps
    if name == "clean" or (eps == 0 and name != "clean"):
        with torch.no_grad():
            f = split_forward(model, x, "round").rate(cfg.terms)
        return AttackOutcome(x.detach().clone(), "rate_bits", f, f.clone())
    if name == "noise":
        r = torch.rand(x.shape, generator=generator, device=generator.device if generator else "cpu").to(x)
        x_adv = project(x + eps * torch.where(r < 0.5, -1.0, 1.0), x, eps)
        with torch.no_grad():
            f0 = split_forward(model, x, "round").rate(cfg.terms)
            f1 = split_forward(model, x_adv, "round").rate(cfg.terms)
        return AttackOutcome(x_adv, "rate_bits", f0, f1)
    if cfg.schedule == "reference":  # pgd-e only (AttackConfig checks)
        x_adv, f0, f1, hist = reference_pgd(x, reference_objective(model), eps, cfg.steps, cfg.alpha, cfg.eot)
        return AttackOutcome(x_adv, "reference_mean_y_bits", f0, f1, hist)
    kw: dict[str, Any] = {"random_start": cfg.random_start, "generator": generator}
    if name == "pgd-acc":
        if labels is None:
            raise AttackConfigError("pgd-acc needs the labels")
        obj, what = accuracy_objective(model, labels, cfg), "cross_entropy"
    elif name == "pgd-e":
        obj, what = rate_objective(model, cfg), "rate_bits_eot"
    elif name == "pgd-e-lowfreq":
        obj, what = rate_objective(model, cfg), "rate_bits_eot"
        kw.update(grad_map=lambda g, _x: lowpass(g, cfg.band), step_fn=_linf_normalised,
                  delta_map=lambda d: lowpass(d, cfg.band))
    elif name == "pgd-e-region":
        td = cfg.through_defence()
        floor, gamma = (td.mask_floor, td.mask_gamma) if td.name == "oatv" else (0.0, 1.0)
        obj, what = region_objective(model, cfg, floor, gamma), "object_weighted_rate_bits_eot"
        kw.update(grad_map=lambda g, xc: g * (1.0 - object_mask(model, xc, floor, gamma)))
    elif name == "pgd-e-bpda":
        dcfg = cfg.through_defence()
        base = rate_objective(model, cfg)

        def obj(xa: Tensor) -> Tensor | tuple[Tensor, Tensor]:
            return base(apply_defence(model, xa, dcfg, grad=cfg.through_grad))

        what = f"rate_bits_eot_through_{dcfg.label}_{cfg.through_grad}"
    else:  # pragma: no cover - check_threat guards
        raise AttackConfigError(name)
    if cfg.schedule == "fixed":
        x_adv, f0, f1, hist = pgd(x, obj, eps, cfg.steps, cfg.alpha, keep_best=cfg.keep_best, **kw)
    else:
        x_adv, f0, f1, hist = apgd(x, obj, eps, cfg.steps, cfg.alpha, **kw)
    return AttackOutcome(x_adv, what, f0, f1, hist)
