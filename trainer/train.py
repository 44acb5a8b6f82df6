"""Training: plain classifiers (teachers) and the two-stage Entropic Student recipe of sc2bench.

``train_teacher(config, out)`` trains a classifier with cross-entropy.

``train_student(config, teacher_ckpt, out)`` follows sc2bench's Entropic Student:

* **stage 1** trains ``student.bottleneck_layer`` only. Loss = Σ MSE_sum(student, teacher) over the
  split-point features (bottleneck output vs the teacher's layer1/s1) and, with
  ``stage1.distill: all`` as in sc2bench, every later stage computed through the student's frozen
  copy of the teacher's rest, plus β · (−Σ log₂ likelihoods of y and z, summed over the batch).
  CompressAI's auxiliary quantile loss trains ``*.quantiles`` on its own optimizer. The frozen rest
  stays in eval mode. At the end ``update(force=True)`` builds the CDF tables (after an exact
  quantile fit when ``stage1.update_quantiles``).
* **stage 2** freezes the encoder and the entropy model (MSHP: g_a, h_a, h_s, entropy_bottleneck,
  gaussian_conditional; FP: encoder, entropy_bottleneck) and fine-tunes the decoder and the rest with
  torchdistill's KDLoss: ``alpha·CE + (1−alpha)·T²·KL(student/T ‖ teacher/T)`` on rounded latents.

Checkpoints (:mod:`splitbits.trainer.checkpoint`) are written after every epoch with a
``train_state``; ``resume=True`` continues an unfinished run from ``out``. Under ``torchrun`` the
models are wrapped in DistributedDataParallel and rank 0 saves and prints.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from splitbits.runtime.datasets import mean_jpeg_bytes
from splitbits.runtime.errors import SplitbitsError
from splitbits.runtime.progress import Bars
from splitbits.trainer.checkpoint import (
    CheckpointError,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
    state_dict_of,
)
from splitbits.trainer.config import ConfigError, config_diff, validate_config
from splitbits.trainer.data import Loaders, build_loaders, dist_env, prepare_batch
from splitbits.trainer.models import (
    ModelSpec,
    SplitClassifier,
    TeacherClassifier,
    build_student,
)

log = logging.getLogger("splitbits.trainer")

# Config keys that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = {
    "description", "data.workers", "data.eval_batch_size", "data.jpeg_reference_images", "student.teacher",
    "train.limit_batches", "stage1.limit_batches", "stage2.limit_batches",
}
FROZEN_IN_STAGE2 = {
    "mshp": ("g_a", "h_a", "h_s", "entropy_bottleneck", "gaussian_conditional"),
    "fp": ("encoder", "entropy_bottleneck"),
}


class TrainError(SplitbitsError):
    """A training run that cannot start or continue (bad teacher, device, dataset, resume state)."""


# --------------------------------------------------------------------------------------------
# Run context: device, distributed, progress
# --------------------------------------------------------------------------------------------


@dataclass
class RunContext:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    progress: bool = False
    owns_process_group: bool = False
    channels_last: bool = False  # NHWC activations: ~1.6x faster convolutions on CPU (oneDNN)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_run(device: str | None = None, threads: int | None = None, progress: bool = True) -> RunContext:
    """Pick the device, honour ``threads`` and join the process group when launched by torchrun."""
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    rank, world, local = dist_env()
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError("device cuda requested but CUDA is not available (use --device cpu)")
    if want not in ("cpu", "cuda") and not want.startswith("cuda:"):
        raise TrainError(f"unknown device {want!r}; use cpu or cuda")
    if want.startswith("cuda"):
        idx = local if world > 1 else (torch.device(want).index or 0)
        dev = torch.device("cuda", idx)
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
    else:
        dev = torch.device("cpu")
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    show = bool(progress) and rank == 0 and sys.stderr.isatty()
    return RunContext(dev, rank, world, local, show, owns, channels_last=dev.type == "cpu")


def _teardown(ctx: RunContext) -> None:
    if ctx.owns_process_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Optimisation helpers
# --------------------------------------------------------------------------------------------


def make_optimizer(params: list[nn.Parameter], cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) / Adam / AdamW from a stage config section."""
    if not params:
        raise TrainError("nothing to optimise: every parameter is frozen")
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"],
                               nesterov=cfg["nesterov"] and cfg["momentum"] > 0, weight_decay=cfg["weight_decay"])
    cls = torch.optim.Adam if cfg["optimizer"] == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def lr_factor(cfg: dict[str, Any], steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step LR multiplier: linear warm-up, then constant / cosine / multistep (epochs)."""
    epochs, warm = max(cfg["epochs"], 1), cfg["warmup_epochs"]
    spe = max(steps_per_epoch, 1)

    def f(step: int) -> float:
        e = step / spe
        if warm > 0 and e < warm:
            return (step + 1) / (warm * spe)
        if cfg["schedule"] == "cosine":
            p = min(max((e - warm) / max(epochs - warm, 1e-9), 0.0), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * p))
        if cfg["schedule"] == "multistep":
            return cfg["gamma"] ** sum(1 for m in cfg["milestones"] if e >= m)
        return 1.0

    return f


def _steps_per_epoch(loaders: Loaders, cfg: dict[str, Any]) -> int:
    n = len(loaders.train)
    return min(n, cfg["limit_batches"]) if cfg["limit_batches"] else n


def _to_device(model: nn.Module, ctx: RunContext) -> nn.Module:
    model = model.to(ctx.device)
    return model.to(memory_format=torch.channels_last) if ctx.channels_last else model


def _optimizer_step(loss: Tensor, opt: torch.optim.Optimizer, sched: Any, params: Any,
                    grad_clip: float | None) -> None:
    """Backward ``loss``, clip the gradients of ``params`` (when ``grad_clip``), step ``opt`` and ``sched``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()


def _classifier_step(loss: Tensor, logits: Tensor, y: Tensor, opt: torch.optim.Optimizer, sched: Any,
                     params: Any, grad_clip: float | None, tot: list[float]) -> str:
    """One optimiser step on a classification loss; adds loss·n, correct and n to ``tot``; the bar's info."""
    _optimizer_step(loss, opt, sched, params, grad_clip)
    lv = loss.item()
    tot[0] += lv * len(y)
    tot[1] += (logits.detach().argmax(1) == y).sum().item()
    tot[2] += len(y)
    return f"loss {lv:.3f}"


def _classifier_stats(tot: list[float], opt: torch.optim.Optimizer) -> dict[str, float]:
    """An epoch's stats from the totals of :func:`_classifier_step` (all ranks)."""
    n = max(tot[2], 1.0)
    return {"loss": tot[0] / n, "train_top1": 100 * tot[1] / n, "lr": opt.param_groups[0]["lr"]}


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


def _ddp(module: nn.Module, ctx: RunContext, ignore: list[str] | None = None) -> nn.Module:
    if not ctx.distributed:
        return module
    if ignore:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignore)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def _all_reduce(values: list[float], ctx: RunContext) -> list[float]:
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def _rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (what a weights-only checkpoint may hold)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
             "python": random.getstate(), "generators": {k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)  # v1 checkpoints: an ndarray
    np.random.set_state((name, keys.astype(np.uint32), *rest))
    random.setstate(state["python"])
    for k, g in generators.items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float,
            alpha: float) -> Tensor:
    """torchdistill ``KDLoss`` (reduction batchmean): alpha·CE + (1−alpha)·T²·KL(teacher ‖ student)."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                    reduction="batchmean")
    if alpha == 0:
        return soft
    hard = F.cross_entropy(student_logits, targets)
    return alpha * hard + (1.0 - alpha) * t * t * soft


def total_bits(likelihoods: dict[str, Tensor]) -> Tensor:
    """−Σ log₂ p over every latent term and the whole batch."""
    return sum((-torch.log2(lik)).sum() for lik in likelihoods.values())  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, loaders: Loaders, ctx: RunContext, teacher: nn.Module | None = None,
             desc: str = "eval", bar: Bars | None = None) -> dict[str, float]:
    """Top-1 of ``model`` (and ``teacher``) on the val loader; for split models also the estimated
    bits per image (−Σ log₂ p of each latent term, eval mode, rounded latents)."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    if teacher is not None:
        teacher.eval()
    split = isinstance(model, SplitClassifier)
    names = list(model.bottleneck_layer.latent_names()) if split else []
    sums = [0.0] * (3 + len(names))  # n, correct, teacher correct, bits per term
    task = bar.add(desc, len(loaders.val)) if bar else None
    for x, y in loaders.val:
        x = prepare_batch(x, ctx.device, channels_last=ctx.channels_last)
        y = y.to(ctx.device)
        if split:
            out = model.forward_train(x, noise=False)
            logits = out["logits"]
            for k, name in enumerate(names):
                sums[3 + k] += float((-torch.log2(out["likelihoods"][name])).sum())
        else:
            logits = model(x)
        sums[0] += len(y)
        sums[1] += float((logits.argmax(1) == y).sum())
        if teacher is not None:
            sums[2] += float((teacher(x).argmax(1) == y).sum())
        if bar:
            bar.advance(task)
    if bar:
        bar.remove(task)
    sums = _all_reduce(sums, ctx)
    n = max(sums[0], 1.0)
    res: dict[str, float] = {"val_images": int(sums[0]), "top1": 100.0 * sums[1] / n}
    if teacher is not None:
        res["teacher_top1"] = 100.0 * sums[2] / n
    if split:
        per = {name: sums[3 + k] / n for k, name in enumerate(names)}
        bits = sum(per.values())
        res.update({f"est_bits_{k}": v for k, v in per.items()})
        res["est_bits_per_image"] = bits
        res["est_bytes_per_image"] = bits / 8.0
        res["est_bpp"] = bits / float(loaders.image_size**2)
    model.train(was_training)
    return res


def _jpeg_reference(loaders: Loaders, cfg: dict[str, Any]) -> dict[str, Any]:
    k = min(cfg["data"]["jpeg_reference_images"], len(loaders.val_set))
    if k <= 0:
        return {}
    return {"jpeg75_bytes_per_image": mean_jpeg_bytes(loaders.val_set, 75, k), "jpeg_reference_images": k}


# --------------------------------------------------------------------------------------------
# Checkpoint / resume plumbing
# --------------------------------------------------------------------------------------------


def _check_resume(out: Path, config: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The stored checkpoint dict when ``out`` holds a run of this config; None when nothing to resume."""
    if not out.is_file():
        log.info("resume: %s does not exist yet, starting from scratch", out)
        return None
    try:
        ck = read_checkpoint(out)
    except (OSError, ValueError) as exc:
        raise TrainError(f"resume: cannot read {out}: {exc}") from exc
    if ck.get("kind") != kind:
        raise TrainError(f"resume: {out} holds a {ck.get('kind')} checkpoint, not a {kind}")
    ts = ck.get("train_state")
    if not isinstance(ts, dict):
        raise TrainError(f"resume: {out} has no training state (it was not written by an interrupted run)")
    diff = [k for k in config_diff(ck.get("config", {}), config) if k not in RESUMABLE_CHANGES]
    if diff:
        raise TrainError(f"resume: the config differs from the one {out} was trained with in "
                         f"{', '.join(diff)}; use the same config (or another --out)")
    return ck


def _epoch_line(stage: str, epoch: int, total: int, stats: dict[str, float], secs: float) -> str:
    parts = " ".join(f"{k}={v:.4g}" for k, v in stats.items())
    return f"{stage} epoch {epoch}/{total} {parts} ({secs:.1f} s)"


def _resolve_dataset(config: dict[str, Any]) -> None:
    if not config["data"]["dataset"]:
        raise ConfigError("data.dataset is required for this config, e.g. "
                          "--set data.dataset=imagefolder:/data/imagenet")


def _iterate(loader: Any, limit: int | None) -> Iterator[Any]:
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        yield batch


# --------------------------------------------------------------------------------------------
# The epoch loop (teacher, student stage 1, student stage 2)
# --------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """What one training stage brings to :meth:`EpochLoop.run`."""

    name: str  # "teacher", "stage1" or "stage2": log lines, history rows, train_state["stage"]
    label: str  # the progress bar's description, e.g. "stage 1"
    epochs: int
    loaders: Loaders
    steps: int  # batches per epoch (train.limit_batches)
    sums: int  # how many running totals ``step`` adds to
    modes: Callable[[], Any]  # sets train/eval modes at the start of every epoch
    step: Callable[[Tensor, Tensor, list[float]], str]  # one batch (on the device) -> the bar's info text
    stats: Callable[[list[float]], dict[str, float]]  # the epoch's totals (all ranks) -> its stats
    optimizers: dict[str, Any]  # train_state key -> optimizer or LR scheduler
    epoch_offset: int = 0  # the sampler's epoch is epoch_offset + epoch (stage 2 follows stage 1's epochs)
    validate: Callable[[int], dict[str, float]] = lambda epoch: {}  # extra stats after an epoch
    extra_state: dict[str, Any] = field(default_factory=dict)  # more train_state keys

    def restore(self, ts: dict[str, Any]) -> None:
        """Load the optimizer and scheduler states of a checkpoint written during this stage."""
        if ts.get("stage") == self.name and ts.get("optimizer") is not None:
            for key, obj in self.optimizers.items():
                obj.load_state_dict(ts[key])


@dataclass
class EpochLoop:
    """The bookkeeping every stage shares: a bar per epoch, history, wall times, the epoch budget of
    this call (``max_epochs``) and a resumable checkpoint after every epoch but the stage's last."""

    ctx: RunContext
    bars: Bars
    gens: dict[str, torch.Generator]  # "sampler", "augment": their states go into every checkpoint
    write: Callable[[dict[str, Any]], None]  # saves a checkpoint with this train_state (rank 0 calls it)
    walls: dict[str, float]  # wall seconds per stage name
    history: list[dict[str, Any]]
    budget: float = math.inf
    one_stage: bool = False  # a teacher: history rows without "stage", wall_s a number

    def run(self, stage: Stage, epoch: int) -> int:
        """Train ``stage`` from ``epoch`` until it ends or the budget is spent; returns the epoch reached."""
        ctx = self.ctx
        while epoch < stage.epochs and self.budget > 0:
            t0 = time.perf_counter()
            stage.loaders.set_epoch(stage.epoch_offset + epoch)
            stage.modes()
            task = self.bars.add(f"{stage.label} {epoch + 1}/{stage.epochs}", stage.steps)
            tot = [0.0] * stage.sums
            for x, y in _iterate(stage.loaders.train, stage.steps):
                x = prepare_batch(x, ctx.device, stage.loaders.augment, self.gens["augment"], ctx.channels_last)
                self.bars.advance(task, info=stage.step(x, y.to(ctx.device), tot))
            self.bars.remove(task)
            stats = stage.stats(_all_reduce(tot, ctx))
            self.walls[stage.name] += time.perf_counter() - t0
            epoch += 1
            self.budget -= 1
            stats.update(stage.validate(epoch))
            self.history.append({"epoch": epoch, **stats} if self.one_stage
                                else {"stage": stage.name, "epoch": epoch, **stats})
            if ctx.main:
                log.info(_epoch_line(stage.name, epoch, stage.epochs, stats, time.perf_counter() - t0))
                if epoch < stage.epochs:
                    optimizers = {k: obj.state_dict() for k, obj in stage.optimizers.items()}
                    self.write(self.state(stage.name, epoch, optimizers, stage.extra_state))
        return epoch

    @property
    def wall_s(self) -> float | dict[str, float]:
        """The train_state's wall_s: seconds per stage (a student) or in all (a teacher)."""
        return next(iter(self.walls.values())) if self.one_stage else self.walls

    def state(self, stage: str, epoch: int, optimizers: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """A resumable train_state: the next stage and epoch, optimizer states, RNGs, wall times, history."""
        return {"stage": stage, "epoch": epoch, **optimizers, "rng": _rng_state(self.gens), "wall_s": self.wall_s,
                "history": self.history, **extra, "finished": False}

    def done_state(self, epochs: int) -> dict[str, Any]:
        """The train_state of a finished run."""
        return {"stage": "done", "epoch": epochs, "finished": True, "history": self.history, "wall_s": self.wall_s}


# --------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------


def train_teacher(config: dict[str, Any], out: str | os.PathLike, device: str | None = None,
                  resume: bool = False, progress: bool = True, threads: int | None = None,
                  max_epochs: int | None = None) -> dict[str, Any]:
    """Train a plain classifier; returns its metrics (``val_top1``, wall time, ...).

    ``max_epochs`` stops after that many epochs in this call, leaving a resumable checkpoint.
    """
    config = validate_config(config)
    if config["kind"] != "teacher":
        raise ConfigError(f"train_teacher needs a kind: teacher config, got {config['kind']}")
    _resolve_dataset(config)
    out = Path(out)
    ctx = setup_run(device, threads, progress)
    try:
        return _train_teacher(config, out, ctx, resume, max_epochs)
    finally:
        _teardown(ctx)


def _train_teacher(config: dict[str, Any], out: Path, ctx: RunContext, resume: bool,
                   max_epochs: int | None) -> dict[str, Any]:
    tcfg = config["train"]
    ck = _check_resume(out, config, "teacher") if resume else None
    if ck is not None and ck["train_state"].get("finished"):
        log.info("%s is already finished; nothing to do", out)
        return dict(ck.get("metrics", {}))
    seed = config["seed"]
    _seed_all(seed)
    loaders = build_loaders(config["data"], seed, ctx.rank, ctx.world, ctx.device.type == "cuda")
    spec = _teacher_spec(config, loaders)
    loaders = loaders.with_batch_size(tcfg["batch_size"])
    model = _to_device(TeacherClassifier(spec), ctx)
    aug_gen = torch.Generator().manual_seed(seed * 1000 + ctx.rank + 1)
    gens = {"sampler": _sampler_generator(loaders), "augment": aug_gen}

    def write(state: dict[str, Any]) -> None:
        save_checkpoint(out, model, spec, kind="teacher", config=config, metrics={"epoch": state["epoch"]},
                        train_state=state)

    loop = EpochLoop(ctx, Bars(ctx.progress), gens, write, {"teacher": 0.0}, [],
                     math.inf if max_epochs is None else max_epochs, one_stage=True)
    stage = _teacher_stage(model, loaders, tcfg, loop)
    epoch, epochs = 0, tcfg["epochs"]
    if ck is not None:
        model.load_state_dict(ck["model"])
        ts = ck["train_state"]
        stage.restore(ts)
        _set_rng_state(ts["rng"], gens)
        epoch, loop.walls["teacher"], loop.history = ts["epoch"], ts["wall_s"], list(ts["history"])
        log.info("resuming %s at epoch %d/%d", out, epoch, epochs)
    with loop.bars as bars:
        epoch = loop.run(stage, epoch)
        if epoch < epochs:
            return {"finished": False, "epoch": epoch, "wall_train_s": loop.walls["teacher"]}
        ev = evaluate(model, loaders, ctx, desc="eval", bar=bars)
    metrics: dict[str, Any] = {
        "kind": "teacher", "arch": spec.arch, "dataset": config["data"]["dataset"],
        "num_classes": spec.num_classes, "image_size": loaders.image_size, "epochs": epochs,
        "val_top1": ev["top1"], "val_images": ev["val_images"], "train_images": len(loaders.train_set),
        "wall_train_s": loop.walls["teacher"], "device": str(ctx.device), "world_size": ctx.world,
        "threads": torch.get_num_threads(), "finished": True,
    }
    if ctx.main:
        metrics.update(_jpeg_reference(loaders, config))
        save_checkpoint(out, model, spec, kind="teacher", config=config, metrics=metrics,
                        train_state=loop.done_state(epochs))
        log.info("teacher: val top-1 %.2f %% after %d epochs, %.1f s -> %s", ev["top1"], epochs,
                 loop.walls["teacher"], out)
    return metrics


def _teacher_spec(config: dict[str, Any], loaders: Loaders) -> ModelSpec:
    """The teacher's spec: the config's architecture, the dataset's classes and image size."""
    mcfg = config["model"]
    num_classes = len(loaders.classes)
    if mcfg["num_classes"] is not None and mcfg["num_classes"] != num_classes:
        raise ConfigError(f"model.num_classes is {mcfg['num_classes']} but {config['data']['dataset']} "
                          f"has {num_classes} classes")
    spec = ModelSpec(arch=mcfg["arch"], family=None, num_classes=num_classes,
                     input_size=loaders.image_size, class_names=loaders.class_names)
    if mcfg["tiny_widths"] is not None:
        spec.tiny_widths = tuple(mcfg["tiny_widths"])
    spec.validate()
    return spec


def _teacher_stage(model: TeacherClassifier, loaders: Loaders, tcfg: dict[str, Any], loop: EpochLoop) -> Stage:
    """Cross-entropy with label smoothing; ``train.eval_every`` adds the val top-1 to some epochs."""
    net = _ddp(model, loop.ctx)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], tcfg)
    spe = _steps_per_epoch(loaders, tcfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(tcfg, spe))

    def step(x: Tensor, y: Tensor, tot: list[float]) -> str:
        logits = net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=tcfg["label_smoothing"])
        return _classifier_step(loss, logits, y, opt, sched, model.parameters(), tcfg["grad_clip"], tot)

    def validate(epoch: int) -> dict[str, float]:
        every = tcfg["eval_every"]
        if every and epoch % every == 0 and epoch < tcfg["epochs"]:
            return {"val_top1": evaluate(model, loaders, loop.ctx, bar=loop.bars)["top1"]}
        return {}

    return Stage("teacher", "teacher", tcfg["epochs"], loaders, spe, 3, net.train, step,
                 lambda tot: _classifier_stats(tot, opt), {"optimizer": opt, "scheduler": sched},
                 validate=validate)


def _sampler_generator(loaders: Loaders) -> torch.Generator:
    g = getattr(loaders.train.sampler, "generator", None)
    return g if isinstance(g, torch.Generator) else torch.Generator()


# --------------------------------------------------------------------------------------------
# Student
# --------------------------------------------------------------------------------------------


def rest_stage_names(arch: str) -> list[str]:
    """Backbone stages after the split point, in order (the stage-1 distillation targets)."""
    if arch == "regnety_064":
        return ["s2", "s3", "s4"]
    return ["layer2", "layer3"] + (["layer4"] if arch != "tiny" else [])


def _teacher_net_stage(teacher: TeacherClassifier, name: str) -> nn.Module:
    return getattr(teacher.net, name)


class Stage1Net(nn.Module):
    """Bottleneck forward (with noise) → split features (and later stages through the frozen rest)."""

    def __init__(self, student: SplitClassifier, stages: list[str]) -> None:
        super().__init__()
        self.student = student
        self.stages = stages

    def forward(self, x: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
        s = self.student
        feat, liks = s.bottleneck_layer.forward_train(s.normalize(x), True)
        feats = [feat]
        for name in self.stages:
            feats.append(getattr(s, name)(feats[-1]))
        return feats, liks


class Stage2Net(nn.Module):
    """Student logits with rounded latents (the frozen entropy model quantises as at inference)."""

    def __init__(self, student: SplitClassifier) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: Tensor) -> Tensor:
        return self.student.forward_train(x, noise=False)["logits"]


def load_teacher(path: str | os.PathLike, config: dict[str, Any], num_classes: int | None = None,
                 image_size: int | None = None, class_names: list[str] | None = None) -> TeacherClassifier:
    """A splitbits teacher checkpoint, or a bare torchvision/timm state dict (``{"model"|"state_dict": sd}``
    or ``sd``) for ``config.model.arch`` — e.g. ImageNet weights the user downloaded."""
    path = Path(path)
    try:
        ck = read_checkpoint(path)
        arch = config["model"]["arch"]
        if ck.get("format") == "splitbits-ckpt":
            if ck.get("kind") != "teacher":
                raise TrainError(f"teacher: {path} is a {ck.get('kind')} checkpoint, not a teacher")
            model, _ = model_from_checkpoint(path, ck)
            if model.spec.arch != arch:
                raise TrainError(f"teacher: {path} is a {model.spec.arch}, the config's student is a {arch}")
            return model
        sd = state_dict_of(path, ck)
    except CheckpointError as exc:
        raise TrainError(f"teacher: {exc}") from None
    if num_classes is None:
        fc = sd.get("fc.weight", sd.get("head.fc.weight"))
        num_classes = int(fc.shape[0]) if fc is not None else 1000
    spec = ModelSpec(arch=arch, family=None, num_classes=num_classes, input_size=image_size or 224,
                     class_names=class_names)
    if config["model"]["tiny_widths"] is not None:
        spec.tiny_widths = tuple(config["model"]["tiny_widths"])
    model = TeacherClassifier(spec)
    try:
        model.net.load_state_dict(sd)
    except RuntimeError as exc:
        raise TrainError(f"teacher: {path} does not fit a {arch} with {num_classes} classes: "
                         f"{str(exc).splitlines()[0]}") from exc
    return model


def student_spec(config: dict[str, Any], teacher_spec: ModelSpec) -> ModelSpec:
    """The student's spec: the teacher's backbone, classes and normalisation + the config's bottleneck."""
    m = config["model"]
    spec = ModelSpec(arch=teacher_spec.arch, family=m["family"], num_classes=teacher_spec.num_classes,
                     input_size=teacher_spec.input_size, mean=teacher_spec.mean, std=teacher_spec.std,
                     bottleneck=dict(m["bottleneck"]), tiny_widths=teacher_spec.tiny_widths,
                     class_names=teacher_spec.class_names)
    spec.validate()
    return spec


def frozen_in_stage2(student: SplitClassifier) -> list[str]:
    """Names of the bottleneck sub-modules that stage 2 freezes (encoder and entropy model)."""
    return list(FROZEN_IN_STAGE2[student.family])


def _set_stage(student: SplitClassifier, stage: str) -> list[nn.Parameter]:
    """requires_grad for ``stage`` (1 or 2); returns the main optimiser's parameters."""
    for p in student.parameters():
        p.requires_grad_(False)
    bl = student.bottleneck_layer
    if stage == "stage1":
        for p in bl.parameters():
            p.requires_grad_(True)
        return [p for n, p in bl.named_parameters() if not n.endswith("quantiles")]
    frozen = tuple(f"bottleneck_layer.{m}." for m in frozen_in_stage2(student))
    params = []
    for n, p in student.named_parameters():
        if not n.startswith(frozen):
            p.requires_grad_(True)
            params.append(p)
    return params


def train_student(config: dict[str, Any], teacher_ckpt: str | os.PathLike | None, out: str | os.PathLike,
                  device: str | None = None, resume: bool = False, progress: bool = True,
                  threads: int | None = None, max_epochs: int | None = None) -> dict[str, Any]:
    """Two-stage Entropic Student training from ``teacher_ckpt`` (or ``config.student.teacher``).

    Returns the metrics: student/teacher val top-1, estimated bits and bytes per image, β, wall
    times per stage. ``max_epochs`` (counting both stages) stops early with a resumable checkpoint.
    """
    config = validate_config(config)
    if config["kind"] != "student":
        raise ConfigError(f"train_student needs a kind: student config, got {config['kind']}")
    _resolve_dataset(config)
    teacher_ckpt = teacher_ckpt or config["student"]["teacher"]
    if not teacher_ckpt:
        raise ConfigError("a student needs a teacher checkpoint: --teacher CKPT (or student.teacher)")
    if not Path(teacher_ckpt).is_file():
        raise TrainError(f"teacher checkpoint not found: {teacher_ckpt}")
    config["student"]["teacher"] = str(teacher_ckpt)
    ctx = setup_run(device, threads, progress)
    try:
        return _train_student(config, Path(teacher_ckpt), Path(out), ctx, resume, max_epochs)
    finally:
        _teardown(ctx)


def _train_student(config: dict[str, Any], teacher_ckpt: Path, out: Path, ctx: RunContext, resume: bool,
                   max_epochs: int | None) -> dict[str, Any]:
    s1, s2 = config["stage1"], config["stage2"]
    ck = _check_resume(out, config, "student") if resume else None
    if ck is not None and ck["train_state"].get("finished"):
        log.info("%s is already finished; nothing to do", out)
        return dict(ck.get("metrics", {}))
    teacher, student, loaders = _build_student(config, teacher_ckpt, ctx)
    aug_gen = torch.Generator().manual_seed(config["seed"] * 1000 + ctx.rank + 1)
    gens = {"sampler": _sampler_generator(loaders), "augment": aug_gen}

    def write(state: dict[str, Any]) -> None:
        save_checkpoint(out, student, student.spec, kind="student", config=config, metrics={}, train_state=state)

    loop = EpochLoop(ctx, Bars(ctx.progress), gens, write, {"stage1": 0.0, "stage2": 0.0}, [],
                     math.inf if max_epochs is None else max_epochs)
    stage, epoch, ts, extra_metrics = "stage1", 0, {}, {}
    if ck is not None:
        student.load_state_dict(ck["model"])
        ts = ck["train_state"]
        stage, epoch, loop.walls, loop.history = ts["stage"], ts["epoch"], dict(ts["wall_s"]), list(ts["history"])
        extra_metrics = dict(ts.get("extra_metrics", {}))
        _set_rng_state(ts["rng"], gens)
        log.info("resuming %s in %s at epoch %d", out, stage, epoch)
    with loop.bars as bars:
        if stage == "stage1":
            train = _stage1(student, teacher, loaders.with_batch_size(s1["batch_size"]), config, loop)
            train.restore(ts)
            epoch = loop.run(train, epoch)
            if epoch >= s1["epochs"]:
                extra_metrics = _finish_stage1(student, train.loaders, s1, loop)
                stage, epoch = "stage2", 0
        if stage == "stage2" and loop.budget > 0:
            train = _stage2(student, teacher, loaders.with_batch_size(s2["batch_size"]), config, loop, extra_metrics)
            train.restore(ts)
            epoch = loop.run(train, epoch)
        if stage != "stage2" or epoch < s2["epochs"]:
            return {"finished": False, "stage": stage, "epoch": epoch, "wall_stage1_s": loop.walls["stage1"],
                    "wall_stage2_s": loop.walls["stage2"]}
        for p in student.parameters():
            p.requires_grad_(False)
        student.bottleneck_layer.update(force=True)
        ev = evaluate(student, train.loaders, ctx, teacher=teacher, desc="eval", bar=bars)
    metrics = _student_metrics(config, student.spec, teacher_ckpt, train.loaders, ev, extra_metrics, loop)
    if ctx.main:
        metrics.update(_jpeg_reference(train.loaders, config))
        save_checkpoint(out, student, student.spec, kind="student", config=config, metrics=metrics,
                        train_state=loop.done_state(s2["epochs"]))
        log.info("student (%s, β=%g): val top-1 %.2f %% (teacher %.2f %%), %.1f bytes/image estimated -> %s",
                 student.spec.family, config["student"]["beta"], ev["top1"], ev["teacher_top1"],
                 ev["est_bytes_per_image"], out)
    return metrics


def _build_student(config: dict[str, Any], teacher_ckpt: Path,
                   ctx: RunContext) -> tuple[TeacherClassifier, SplitClassifier, Loaders]:
    """Seed, load the frozen teacher, build the loaders and the student (its rest copied from the teacher)."""
    seed = config["seed"]
    _seed_all(seed)
    data_cfg = dict(config["data"])
    teacher = load_teacher(teacher_ckpt, config, config["model"]["num_classes"], data_cfg["image_size"])
    if data_cfg["image_size"] is None:
        data_cfg["image_size"] = teacher.spec.input_size
    loaders = build_loaders(data_cfg, seed, ctx.rank, ctx.world, ctx.device.type == "cuda")
    if len(loaders.classes) != teacher.spec.num_classes:
        raise TrainError(f"the teacher has {teacher.spec.num_classes} classes, {data_cfg['dataset']} has "
                         f"{len(loaders.classes)}")
    if teacher.spec.class_names is None:
        teacher.spec.class_names = loaders.class_names
    student = build_student(student_spec(config, teacher.spec), teacher=teacher.net)
    teacher = _to_device(teacher, ctx).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, _to_device(student, ctx), loaders


def _stage1(student: SplitClassifier, teacher: TeacherClassifier, loaders: Loaders, config: dict[str, Any],
            loop: EpochLoop) -> Stage:
    """The bottleneck learns feature distillation + β·rate; the quantiles learn the auxiliary loss."""
    s1, beta, ctx = config["stage1"], config["student"]["beta"], loop.ctx
    stages = rest_stage_names(student.spec.arch) if s1["distill"] == "all" else []
    params = _set_stage(student, "stage1")
    bl = student.bottleneck_layer
    quantiles = [p for n, p in bl.named_parameters() if n.endswith("quantiles")]
    qnames = [f"student.bottleneck_layer.{n}" for n, _ in bl.named_parameters() if n.endswith("quantiles")]
    net = _ddp(Stage1Net(student, stages), ctx, ignore=qnames)
    opt = make_optimizer(params, s1)
    aux_opt = torch.optim.Adam(quantiles, lr=s1["aux_lr"])
    spe = _steps_per_epoch(loaders, s1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(s1, spe))

    def modes() -> None:
        student.eval()  # the frozen rest keeps its BN statistics
        bl.train()

    def step(x: Tensor, _y: Tensor, tot: list[float]) -> str:
        targets = _teacher_targets(teacher, x, stages)
        feats, liks = net(x)
        mse = sum(F.mse_loss(f, t, reduction="sum") for f, t in zip(feats, targets))
        bits = total_bits(liks)
        _optimizer_step(mse + beta * bits, opt, sched, params, s1["grad_clip"])
        aux_opt.zero_grad(set_to_none=True)
        aux = bl.aux_loss()
        aux.backward()
        if ctx.distributed:
            for q in quantiles:
                dist.all_reduce(q.grad)
                q.grad /= ctx.world
        aux_opt.step()
        n = len(x)
        tot[0] += mse.item()
        tot[1] += bits.item()
        tot[2] += aux.item() * n
        tot[3] += n
        return f"mse/img {mse.item() / n:.3g} bits/img {bits.item() / n:.0f}"

    def stats(tot: list[float]) -> dict[str, float]:
        n = max(tot[3], 1.0)
        return {"mse_per_image": tot[0] / n, "bits_per_image": tot[1] / n, "aux": tot[2] / n,
                "lr": opt.param_groups[0]["lr"]}

    return Stage("stage1", "stage 1", s1["epochs"], loaders, spe, 4, modes, step, stats,
                 {"optimizer": opt, "aux_optimizer": aux_opt, "scheduler": sched})


@torch.no_grad()
def _teacher_targets(teacher: TeacherClassifier, x: Tensor, stages: list[str]) -> list[Tensor]:
    """The teacher's split-point features and those of every later stage in ``stages``."""
    h = teacher.split_features(x)
    targets = [h]
    for name in stages:
        h = _teacher_net_stage(teacher, name)(h)
        targets.append(h)
    return targets


def _finish_stage1(student: SplitClassifier, loaders: Loaders, s1: dict[str, Any],
                   loop: EpochLoop) -> dict[str, Any]:
    """Build the CDF tables, evaluate, checkpoint the start of stage 2; returns the stage-1 metrics."""
    t0 = time.perf_counter()
    student.bottleneck_layer.update(force=True, update_quantiles=s1["update_quantiles"])
    ev1 = evaluate(student, loaders, loop.ctx, desc="eval stage 1", bar=loop.bars)
    loop.walls["stage1"] += time.perf_counter() - t0
    extra_metrics = {"stage1_val_top1": ev1["top1"], "stage1_est_bytes_per_image": ev1["est_bytes_per_image"]}
    if loop.ctx.main:
        log.info("stage1 done: val top-1 %.2f %%, %.1f bytes/image (estimated)", ev1["top1"],
                 ev1["est_bytes_per_image"])
        loop.write(loop.state("stage2", 0, {"optimizer": None}, {"extra_metrics": extra_metrics}))
    return extra_metrics


def _stage2(student: SplitClassifier, teacher: TeacherClassifier, loaders: Loaders, config: dict[str, Any],
            loop: EpochLoop, stage1_metrics: dict[str, Any]) -> Stage:
    """The decoder and the rest learn knowledge distillation on rounded latents (encoder, entropy model frozen)."""
    s2 = config["stage2"]
    params = _set_stage(student, "stage2")
    net = _ddp(Stage2Net(student), loop.ctx)
    opt = make_optimizer(params, s2)
    spe = _steps_per_epoch(loaders, s2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(s2, spe))

    def step(x: Tensor, y: Tensor, tot: list[float]) -> str:
        with torch.no_grad():
            t_logits = teacher(x)
        logits = net(x)
        loss = kd_loss(logits, t_logits, y, s2["temperature"], s2["alpha"])
        return _classifier_step(loss, logits, y, opt, sched, params, s2["grad_clip"], tot)

    return Stage("stage2", "stage 2", s2["epochs"], loaders, spe, 3, student.train, step,
                 lambda tot: _classifier_stats(tot, opt), {"optimizer": opt, "scheduler": sched},
                 epoch_offset=config["stage1"]["epochs"], extra_state={"extra_metrics": stage1_metrics})


def _student_metrics(config: dict[str, Any], spec: ModelSpec, teacher_ckpt: Path, loaders: Loaders,
                     ev: dict[str, float], extra_metrics: dict[str, Any], loop: EpochLoop) -> dict[str, Any]:
    """A finished student's metrics: final evaluation, stage-1 metrics, wall times, device."""
    walls, ctx = loop.walls, loop.ctx
    return {
        "kind": "student", "arch": spec.arch, "family": spec.family, "beta": config["student"]["beta"],
        "dataset": config["data"]["dataset"], "num_classes": spec.num_classes, "image_size": loaders.image_size,
        "teacher_checkpoint": str(teacher_ckpt),
        "val_top1": ev["top1"], "student_val_top1": ev["top1"], "teacher_val_top1": ev["teacher_top1"],
        "val_images": ev["val_images"], "train_images": len(loaders.train_set),
        "est_bits_per_image": ev["est_bits_per_image"], "est_bytes_per_image": ev["est_bytes_per_image"],
        "est_bpp": ev["est_bpp"], **{k: v for k, v in ev.items() if k.startswith("est_bits_")},
        **extra_metrics,
        "stage1_epochs": config["stage1"]["epochs"], "stage2_epochs": config["stage2"]["epochs"],
        "wall_stage1_s": walls["stage1"], "wall_stage2_s": walls["stage2"],
        "wall_train_s": walls["stage1"] + walls["stage2"],
        "device": str(ctx.device), "world_size": ctx.world, "threads": torch.get_num_threads(), "finished": True,
    }
