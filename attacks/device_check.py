"""``splitbits device check``: one prepared run on a lent CUDA machine, one JSON out (issue 14).

Steps, in this order, each timed and guarded by the budget: a step whose expected time
(:attr:`Sizes.estimates`) no longer fits in what is left is skipped and says so, and the loops
written here also stop at their step's deadline (twice its estimate, at most the budget's end):

* ``environment``: versions (python, torch, CUDA, cuDNN, numba, onnxruntime, compressai, constriction,
  torchvision, ...), the GPU and torch's numeric settings;
* ``tiny_student``: the two-stage Entropic Student recipe through ``splitbits.trainer.train`` (a short
  tiny teacher, then stage 1 and stage 2) on the builtin dataset: loss per epoch, samples/s;
* ``resnet50_student``: stage 1 of a ResNet-50 MSHP student (sc2bench architecture, random-init
  teacher) on builtin images at 224: loss first/last, samples/s;
* ``bench_attack``: ``splitbits bench attack`` (batched vs per-image PGD-E) on the device;
* ``pgd_e_resnet50``: batched PGD-E images/s on the ResNet-50 MSHP student at 224;
* ``numba_coder``: the runtime's coders on ResNet-50 latents on this machine's CPU (``bench codec``).

``--dry-run`` runs every step at tiny sizes on the CPU (what CI runs). The JSON is rewritten after
each step, so a run killed at its time limit still leaves the steps it finished.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import math
import platform
import re
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from splitbits.runtime.errors import SplitbitsError
from splitbits.runtime.machine import machine_info, package_versions
from splitbits.runtime.report import write_json

SCHEMA = "splitbits.device-check/1"
#: packages whose versions the environment step records (beside Python's)
VERSIONS = ("splitbits", "numpy", "numba", "numba-cuda", "llvmlite", "onnxruntime", "onnx", "torch", "torchvision",
            "timm", "compressai", "constriction", "pytorch-msssim", "scikit-image", "pillow", "scipy")


class DeviceCheckError(SplitbitsError):
    """A device check that cannot start (no such device, a full run without CUDA, an unknown step)."""


@dataclass(frozen=True)
class Sizes:
    """How much work each step does, and how long it is expected to take (seconds, the budget's check)."""

    teacher: tuple[str, ...]  # overrides of the tiny_teacher config
    student: tuple[str, ...]  # overrides of the tiny_mshp config
    r50_size: int  # ResNet-50 student: input side, images drawn from, batch, steps (warm-up steps untimed)
    r50_images: int
    r50_batch: int
    r50_steps: int
    r50_warmup: int
    attack: dict[str, Any]  # keyword arguments of attacks.bench.run_bench
    pgd_size: int  # PGD-E on the ResNet-50: input side, images, batch, steps, EOT samples
    pgd_images: int
    pgd_batch: int
    pgd_steps: int
    pgd_eot: int
    codec_images: int  # the coder benchmark on ResNet-50 latents at 224
    codec_repeats: int
    codec_slow_repeats: int
    codec_hyper_repeats: int
    codec_lanes: tuple[int, ...]
    codec_cold_start: bool
    estimates: dict[str, float] = field(default_factory=dict)


_DATA_SMALL = ("data.train_limit=64", "data.val_limit=16", "data.batch_size=16", "data.eval_batch_size=16",
               "data.jpeg_reference_images=0")

#: a lent GPU: a few hundred training steps each, sized for ~6 minutes in all (H200 estimates, generous)
FULL = Sizes(
    teacher=("train.epochs=2", "train.limit_batches=40", "train.warmup_epochs=0.5", "data.val_limit=256",
             "data.jpeg_reference_images=0"),
    student=("stage1.epochs=4", "stage1.limit_batches=75", "stage2.epochs=2", "stage2.limit_batches=50",
             "data.val_limit=256", "data.jpeg_reference_images=0"),
    r50_size=224, r50_images=512, r50_batch=64, r50_steps=300, r50_warmup=10,
    attack={"images": 256, "loop_images": 16, "batch": 64, "steps": 20, "eot": 16, "eps": 8.0, "sequential": True},
    pgd_size=224, pgd_images=256, pgd_batch=32, pgd_steps=20, pgd_eot=16,
    codec_images=8, codec_repeats=15, codec_slow_repeats=3, codec_hyper_repeats=11, codec_lanes=(0, 1, 2),
    codec_cold_start=True,
    estimates={"environment": 10, "tiny_student": 75, "resnet50_student": 90, "bench_attack": 60,
               "pgd_e_resnet50": 45, "numba_coder": 90},
)

#: the CPU dry run: every code path in seconds (ResNet-50 training at 64 px: 224 is slow on 2 cores)
DRY = Sizes(
    teacher=("train.epochs=1", "train.limit_batches=2", *_DATA_SMALL),
    student=("stage1.epochs=2", "stage1.limit_batches=2", "stage1.batch_size=8", "stage2.epochs=2",
             "stage2.limit_batches=2", *_DATA_SMALL),
    r50_size=64, r50_images=4, r50_batch=2, r50_steps=3, r50_warmup=1,
    attack={"images": 2, "loop_images": 1, "batch": 2, "steps": 2, "eot": 2, "eps": 8.0, "sequential": True},
    pgd_size=64, pgd_images=2, pgd_batch=2, pgd_steps=2, pgd_eot=2,
    codec_images=2, codec_repeats=2, codec_slow_repeats=1, codec_hyper_repeats=1, codec_lanes=(0,),
    codec_cold_start=False,
    estimates={"environment": 2, "tiny_student": 8, "resnet50_student": 8, "bench_attack": 3,
               "pgd_e_resnet50": 4, "numba_coder": 15},
)


@dataclass
class StepRun:
    """What a step gets: the device, the sizes, a scratch folder and the time its own loops stop at."""

    device: torch.device
    sizes: Sizes
    tmp: Path
    deadline: float  # time.perf_counter() value

    def past_deadline(self) -> bool:
        return time.perf_counter() > self.deadline


@dataclass
class CheckOptions:
    """The command's options: ``device`` auto (CUDA; the CPU in a dry run), cpu, cuda or cuda:N."""

    device: str = "auto"
    dry_run: bool = False
    budget_s: float = 420.0
    skip: tuple[str, ...] = ()
    sizes: Sizes | None = None  # None: FULL, or DRY in a dry run

    @property
    def chosen_sizes(self) -> Sizes:
        return self.sizes or (DRY if self.dry_run else FULL)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _images(size: int, count: int, dev: torch.device) -> tuple[Tensor, str]:
    """``count`` builtin validation images at ``size`` (``load_images``: rendered at ``size``) as
    uint8 NCHW on ``dev``, and where they came from."""
    from splitbits.runtime.codec.bench import load_images

    arr, _, source = load_images(size, count, "builtin")
    return torch.from_numpy(arr.copy()).permute(0, 3, 1, 2).contiguous().to(dev), source


def _first_last(losses: list[float]) -> dict[str, Any]:
    """Mean loss of the first and last tenth of the steps (at least one each), whether it fell, finiteness."""
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return {"loss_first": first, "loss_last": last, "loss_fell": last < first,
            "losses_finite": all(math.isfinite(v) for v in losses), "loss_window_steps": k}


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "machine"


def default_json_path(machine: dict[str, Any], dry_run: bool, when: dt.datetime) -> Path:
    """``docs/device/<date>-<gpu or host>.json`` (a dry run: ``runs/device/...-dry-run.json``, not committed)."""
    name = _slug(machine.get("gpu") or machine.get("hostname") or "machine")
    if dry_run:
        return Path("runs/device") / f"{when:%Y-%m-%d}-{name}-dry-run.json"
    return Path("docs/device") / f"{when:%Y-%m-%d}-{name}.json"


def resolve_device(name: str, dry_run: bool) -> torch.device:
    """The device of the run: ``auto`` is CUDA (the CPU in a dry run); a full run needs CUDA."""
    from splitbits.attacks.runner import pick_device

    dev = torch.device("cpu") if name == "auto" and dry_run else None
    if dev is None and name == "auto" and not torch.cuda.is_available():
        raise DeviceCheckError("no CUDA device here: the full check needs one (--dry-run runs the tiny sizes on "
                               "the CPU)")
    dev = dev or pick_device(name)
    if dev.type == "cpu" and not dry_run:
        raise DeviceCheckError("the full sizes need a GPU (hours on a CPU); use --dry-run on the CPU")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


# ---------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------


def _nvidia_smi() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or None
    return None


def _torch_facts(dev: torch.device) -> dict[str, Any]:
    """torch's build, threads and numeric settings, and the GPU's name, capability and memory."""
    facts: dict[str, Any] = {
        "version": torch.__version__, "cuda_build": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "cuda_available": torch.cuda.is_available(), "threads": torch.get_num_threads(),
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(), "device": str(dev),
    }
    if torch.cuda.is_available():
        facts["device_count"] = torch.cuda.device_count()
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        facts.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                     multiprocessors=p.multi_processor_count)
    return facts


def _environment(run: StepRun) -> dict[str, Any]:
    """Versions, torch and the GPU, ONNX Runtime's providers, the C library and nvidia-smi's line."""
    out: dict[str, Any] = {"versions": package_versions(VERSIONS), "torch": _torch_facts(run.device),
                           "libc": " ".join(platform.libc_ver())}
    with contextlib.suppress(ImportError):
        import onnxruntime

        out["onnxruntime_providers"] = onnxruntime.get_available_providers()
    if run.device.type == "cuda":
        out["nvidia_smi"] = _nvidia_smi()
    return out


def _epoch_figures(rows: list[dict[str, Any]], loss: Callable[[dict[str, Any]], float], steps_per_epoch: int,
                   batch: int, wall_s: float) -> dict[str, Any]:
    """One training stage from its history rows: loss per epoch, first/last, samples/s over the stage's wall."""
    losses = [float(loss(r)) for r in rows]
    samples = len(rows) * steps_per_epoch * batch
    return {"epochs": len(rows), "steps": len(rows) * steps_per_epoch, "batch": batch, "loss_per_epoch": losses,
            "loss_first": losses[0], "loss_last": losses[-1], "loss_fell": losses[-1] < losses[0],
            "losses_finite": all(math.isfinite(v) for v in losses), "wall_s": wall_s,
            "samples_per_s": samples / wall_s if wall_s > 0 else math.nan}


def _steps_per_epoch(cfg: dict[str, Any], stage: str) -> tuple[int, int]:
    """(batches per epoch, batch size) of a builtin run's stage: limit_batches, else the whole split."""
    from splitbits.runtime.datasets import BUILTIN_SIZES

    batch = cfg[stage].get("batch_size") or cfg["data"]["batch_size"]
    n = min(cfg["data"]["train_limit"] or BUILTIN_SIZES["train"], BUILTIN_SIZES["train"])
    full = n // batch if n >= batch else 1
    return min(full, cfg[stage]["limit_batches"] or full), batch


def _tiny_student(run: StepRun) -> dict[str, Any]:
    """A short tiny teacher, then the two-stage tiny MSHP student, through the trainer's own API."""
    from splitbits.trainer.checkpoint import read_checkpoint
    from splitbits.trainer.config import load_config
    from splitbits.trainer.train import train_student, train_teacher

    dev, s = str(run.device), run.sizes
    tpath, spath = run.tmp / "tiny_teacher.pt", run.tmp / "tiny_mshp.pt"
    tcfg, scfg = load_config("tiny_teacher", s.teacher), load_config("tiny_mshp", s.student)
    tm = train_teacher(tcfg, tpath, device=dev, progress=False)
    sm = train_student(scfg, tpath, spath, device=dev, progress=False)
    thist = read_checkpoint(tpath)["train_state"]["history"]
    shist = read_checkpoint(spath)["train_state"]["history"]
    beta = scfg["student"]["beta"]
    return {
        "note": "trainer.train's recipe (train_teacher, train_student) with the overrides below; stage walls "
                "include the stage's end (stage 1: CDF update and evaluation of data.val_limit images)",
        "teacher_overrides": list(s.teacher), "student_overrides": list(s.student),
        "teacher": _epoch_figures(thist, lambda r: r["loss"], *_steps_per_epoch(tcfg, "train"), tm["wall_train_s"]),
        "stage1": _epoch_figures([r for r in shist if r["stage"] == "stage1"],
                                 lambda r: r["mse_per_image"] + beta * r["bits_per_image"],
                                 *_steps_per_epoch(scfg, "stage1"), sm["wall_stage1_s"]),
        "stage2": _epoch_figures([r for r in shist if r["stage"] == "stage2"], lambda r: r["loss"],
                                 *_steps_per_epoch(scfg, "stage2"), sm["wall_stage2_s"]),
        "stage1_loss": "mse_per_image + beta * bits_per_image (per-epoch means)",
        "teacher_val_top1": tm["val_top1"], "student_val_top1": sm["student_val_top1"],
        "est_bytes_per_image": sm["est_bytes_per_image"], "beta": beta,
    }


def _teacher_features(teacher: torch.nn.Module, x: Tensor, stages: list[str]) -> list[Tensor]:
    """The teacher's split-point features and those of each later stage (stage 1's distillation targets)."""
    with torch.no_grad():
        h = teacher.split_features(x)
        targets = [h]
        for name in stages:
            h = getattr(teacher.net, name)(h)
            targets.append(h)
    return targets


def _timed_steps(step: Callable[[], float], steps: int, warmup: int, run: StepRun) -> dict[str, Any]:
    """``steps`` calls of ``step`` (each returns its loss); the first ``warmup`` are not timed; stops at the
    step's deadline. Returns the losses, the timed steps and their seconds."""
    losses: list[float] = []
    timed, t0 = 0, 0.0
    for i in range(steps):
        if i > warmup and run.past_deadline():  # at least one timed step
            break
        if i == warmup:
            _sync(run.device)
            t0 = time.perf_counter()
        losses.append(step())
        timed += i >= warmup
    _sync(run.device)
    seconds = time.perf_counter() - t0 if timed else 0.0
    return {"losses": losses, "timed_steps": timed, "timed_s": seconds, "stopped_at_deadline": len(losses) < steps}


def _resnet50_student(run: StepRun) -> dict[str, Any]:
    """Stage 1 of the ResNet-50 MSHP Entropic Student (the resnet50_mshp config's β, optimizers) on a
    random-init teacher: feature distillation at the split point and after layer2..4, + β·rate."""
    import torch.nn.functional as F

    from splitbits.trainer.config import load_config
    from splitbits.trainer.models import ModelSpec, TeacherClassifier, build_student
    from splitbits.trainer.train import Stage1Net, make_optimizer, rest_stage_names, total_bits

    s, dev = run.sizes, run.device
    cfg = load_config("resnet50_mshp")
    beta, s1 = cfg["student"]["beta"], cfg["stage1"]
    torch.manual_seed(0)
    spec = ModelSpec(arch="resnet50", family=None, num_classes=1000, input_size=s.r50_size)
    teacher = _frozen(TeacherClassifier(spec)).to(dev).eval()
    student = _frozen(build_student(replace(spec, family="mshp"), teacher=teacher.net)).to(dev).eval()
    bl = student.bottleneck_layer.train()
    for p in bl.parameters():
        p.requires_grad_(True)
    opt = make_optimizer([p for n, p in bl.named_parameters() if not n.endswith("quantiles")], s1)
    aux_opt = torch.optim.Adam([p for n, p in bl.named_parameters() if n.endswith("quantiles")], lr=s1["aux_lr"])
    stages = rest_stage_names("resnet50")
    net = Stage1Net(student, stages)
    images, source = _images(s.r50_size, s.r50_images, dev)
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        x = images[torch.randint(0, len(images), (s.r50_batch,), generator=gen).to(dev)].float() / 255
        feats, liks = net(x)
        mse = sum(F.mse_loss(f, t, reduction="sum") for f, t in zip(feats, _teacher_features(teacher, x, stages)))
        loss = mse + beta * total_bits(liks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        aux_opt.zero_grad(set_to_none=True)
        bl.aux_loss().backward()
        aux_opt.step()
        return loss.item() / s.r50_batch

    r = _timed_steps(step, s.r50_steps, s.r50_warmup, run)
    losses = r.pop("losses")
    return {"note": "stage 1 of resnet50_mshp (sc2bench architecture) with a random-init teacher: loss per image "
                    "= Σ MSE_sum over split/layer2/layer3/layer4 features + β·bits",
            "input": [3, s.r50_size, s.r50_size], "data": source, "batch": s.r50_batch, "beta": beta,
            "steps": len(losses), **_first_last(losses), **r,
            "samples_per_s": r["timed_steps"] * s.r50_batch / r["timed_s"] if r["timed_s"] else math.nan,
            "loss_curve": losses[:: max(1, len(losses) // 30)]}


def _bench_attack(run: StepRun) -> dict[str, Any]:
    """``splitbits bench attack`` on the device: batched vs per-image PGD-E (the 5× target)."""
    from splitbits.attacks.bench import run_bench

    res = run_bench(None, run.device, **run.sizes.attack)
    res.pop("machine", None)  # the run's machine is at the top of the JSON
    res["target_5x_met"] = res["speedup_vs_per_image"] >= 5
    return res


def _pgd_e(run: StepRun) -> dict[str, Any]:
    """Batched PGD-E (ε 8/255) on a ResNet-50 MSHP student (random init): images/s and the rate it adds."""
    from splitbits.attacks.model_ops import split_forward
    from splitbits.attacks.threats import AttackConfig, run_attack
    from splitbits.trainer.models import ModelSpec, build_model

    s, dev = run.sizes, run.device
    torch.manual_seed(0)
    model = _frozen(build_model(ModelSpec(arch="resnet50", family="mshp", num_classes=1000,
                                          input_size=s.pgd_size))).to(dev).eval()
    images, source = _images(s.pgd_size, s.pgd_images, dev)
    x = images.float() / 255
    gen = torch.Generator(device=dev).manual_seed(0)
    cfg = AttackConfig(name="pgd-e", eps=8 / 255, steps=s.pgd_steps, eot=s.pgd_eot)
    run_attack(model, x[:2], replace(cfg, steps=1), generator=gen)  # warm-up
    adv: list[Tensor] = []
    _sync(dev)
    t0 = time.perf_counter()
    for i in range(0, len(x), s.pgd_batch):
        if adv and run.past_deadline():  # at least one batch
            break
        adv.append(run_attack(model, x[i:i + s.pgd_batch], cfg, generator=gen).x_adv)
    _sync(dev)
    seconds, done = time.perf_counter() - t0, sum(len(a) for a in adv)
    with torch.no_grad():
        rates = [float(split_forward(model, xx, "round").rate().mean()) for xx in (x[:done], torch.cat(adv))]
    return {"note": "random-init ResNet-50 MSHP student (speed does not depend on the weights); rates are the "
                    "rounded −Σlog₂p in bits per image", "input": [3, s.pgd_size, s.pgd_size], "data": source,
            "eps": "8/255", "steps": s.pgd_steps, "eot": s.pgd_eot, "batch": s.pgd_batch, "images": done,
            "seconds": seconds, "images_per_s": done / seconds, "rate_clean_bits": rates[0],
            "rate_attacked_bits": rates[1], "rate_rose": rates[1] > rates[0],
            "stopped_at_deadline": done < len(x)}


def _numba_coder(run: StepRun) -> dict[str, Any]:
    """``bench codec``'s pieces: the runtime's coders (and compressai's) on ResNet-50 latents at 224, one
    thread, on this machine's CPU; with the Numba coder's first warm-up (JIT compile or disk cache)."""
    from splitbits.export import codec_reference as ref
    from splitbits.runtime.codec import bench

    s = run.sizes
    threads = torch.get_num_threads()
    machine, blas_one = bench.start_machine()
    coders, notes = bench.runtime_coders()
    t0 = time.perf_counter()
    coders["numba"].warmup()
    first_warmup = time.perf_counter() - t0
    try:
        torch_threads = ref.set_torch_threads(1)
        coders.update(ref.compressai_coders())
        images, _, source = bench.load_images(224, s.codec_images, "builtin")
        sets = ref.resnet50_sets(images, source, s.codec_hyper_repeats)
        settings = bench.BenchSettings(
            repeats=s.codec_repeats, slow_repeats=s.codec_slow_repeats, lanes=list(s.codec_lanes),
            cold_start=s.codec_cold_start, extra={"images": s.codec_images, "blas_threads_limited_to_1": blas_one,
                                                  "torch_threads": torch_threads})
        result = bench.run_codec_bench(sets, coders, settings, machine, notes)
    finally:
        torch.set_num_threads(threads)
    result.pop("command", None)
    summary = {name: {"numba_encode_msym_s": st["coders"]["numba"]["encode_msym_s"],
                      "numba_decode_msym_s": st["coders"]["numba"]["decode_msym_s"],
                      "lossless": all(c["roundtrip_ok"] for c in st["coders"].values()),
                      **st["ratios_encode_plus_decode"]} for name, st in result["sets"].items()}
    return {"summary": summary, "numba_first_warmup_s": first_warmup, **result}


#: the steps, in the order they run
STEPS: dict[str, Callable[[StepRun], dict[str, Any]]] = {
    "environment": _environment,
    "tiny_student": _tiny_student,
    "resnet50_student": _resnet50_student,
    "bench_attack": _bench_attack,
    "pgd_e_resnet50": _pgd_e,
    "numba_coder": _numba_coder,
}


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def check_steps(skip: tuple[str, ...]) -> None:
    """Every name in ``skip`` must be a step."""
    unknown = [s for s in skip if s not in STEPS]
    if unknown:
        raise DeviceCheckError(f"--skip {', '.join(unknown)}: no such step; the steps are {', '.join(STEPS)}")


@contextlib.contextmanager
def _gpu_memory(dev: torch.device, out: dict[str, Any]) -> Iterator[None]:
    """Peak GPU memory of the block into ``out["gpu_peak_mib"]``; frees cached memory afterwards."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        yield
    finally:
        gc.collect()
        if dev.type == "cuda":
            out["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
            torch.cuda.empty_cache()


def run_step(name: str, run: StepRun) -> dict[str, Any]:
    """One step: ``{"status": "ok", "seconds", ...figures}`` or ``{"status": "failed", "error", "traceback"}``."""
    memory: dict[str, Any] = {}
    t0 = time.perf_counter()
    with _gpu_memory(run.device, memory):
        try:
            out = {"status": "ok", **STEPS[name](run)}
        except Exception as exc:  # one step's failure must not lose the others' figures
            out = {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                   "traceback": traceback.format_exc().splitlines()[-12:]}
    return {**out, **memory, "seconds": time.perf_counter() - t0}


def checks(steps: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """What the issue asks of the figures, for the steps that ran."""
    ok = {k: v for k, v in steps.items() if v.get("status") == "ok"}
    out: dict[str, bool] = {}
    if "tiny_student" in ok:
        t = ok["tiny_student"]
        out["tiny_student: losses finite"] = all(t[k]["losses_finite"] for k in ("teacher", "stage1", "stage2"))
        out["tiny_student: stage-1 loss fell"] = t["stage1"]["loss_fell"]
        out["tiny_student: stage-2 loss fell"] = t["stage2"]["loss_fell"]
    if "resnet50_student" in ok:
        out["resnet50_student: losses finite"] = ok["resnet50_student"]["losses_finite"]
        out["resnet50_student: loss fell"] = ok["resnet50_student"]["loss_fell"]
    if "bench_attack" in ok:
        out["bench_attack: batched >= 5x per-image"] = ok["bench_attack"]["target_5x_met"]
    if "pgd_e_resnet50" in ok:
        out["pgd_e_resnet50: rate rose"] = ok["pgd_e_resnet50"]["rate_rose"]
    if "numba_coder" in ok:
        out["numba_coder: lossless"] = all(v["lossless"] for v in ok["numba_coder"]["summary"].values())
    return out


def _header(options: CheckOptions, dev: torch.device, sizes: Sizes, created: dt.datetime) -> dict[str, Any]:
    machine = machine_info()
    if dev.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(dev)
    return {"schema": SCHEMA, "created": created.isoformat(timespec="seconds"), "dry_run": options.dry_run,
            "device": str(dev), "budget_s": options.budget_s, "skip": list(options.skip), "machine": machine,
            "sizes": asdict(sizes), "steps": {}, "complete": False}


def run_check(options: CheckOptions, json_path: str | Path | None = None,
              say: Callable[[str], None] = print) -> tuple[dict[str, Any], Path]:
    """Every step not skipped, within the budget; the JSON (rewritten after each step) and its path."""
    check_steps(options.skip)
    t0 = time.perf_counter()
    dev, sizes = resolve_device(options.device, options.dry_run), options.chosen_sizes
    created = dt.datetime.now(dt.timezone.utc)
    result = _header(options, dev, sizes, created)
    in_repo = default_json_path(result["machine"], options.dry_run, created)
    result["path_in_repo"] = str(in_repo)
    path = Path(json_path) if json_path else in_repo
    say(f"device check on {dev}, budget {options.budget_s:.0f} s{' (dry run)' if options.dry_run else ''} -> {path}")
    with tempfile.TemporaryDirectory(prefix="splitbits-device-check-") as tmp:
        for name in STEPS:
            left = options.budget_s - (time.perf_counter() - t0)
            need = sizes.estimates.get(name, 0.0)
            if name in options.skip:
                result["steps"][name] = {"status": "skipped", "reason": "--skip"}
            elif need > left:
                result["steps"][name] = {"status": "skipped", "reason": f"would not fit: expected ~{need:.0f} s, "
                                                                        f"{max(left, 0):.0f} s of the budget left"}
            else:
                say(f"device check: {name} (expected ~{need:.0f} s, {left:.0f} s left) ...")
                deadline = time.perf_counter() + min(2 * need, left)
                result["steps"][name] = run_step(name, StepRun(dev, sizes, Path(tmp), deadline))
            step = result["steps"][name]
            say(f"device check: {name}: {step['status']}" + (f" in {step['seconds']:.1f} s" if "seconds" in step
                                                              else f" ({step['reason']})")
                + (f": {step['error']}" if "error" in step else ""))
            result["wall_s"] = time.perf_counter() - t0
            write_json(path, result, atomic=True)
    result["checks"] = checks(result["steps"])
    result["checks_judged"] = not options.dry_run
    result["complete"] = all(s["status"] == "ok" for s in result["steps"].values())
    result["wall_s"] = time.perf_counter() - t0
    write_json(path, result, atomic=True)
    return result, path
