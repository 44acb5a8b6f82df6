"""``splitbits train``: train a teacher or an Entropic Student from a config (standard library only here)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from splitbits.runtime.cli import CliError, Command, needs_extra, output_file, positive_int

DESCRIPTION = """\
Train a teacher classifier or a split Entropic Student from a YAML config.

CONFIG is a builtin config name or a YAML file. Builtin configs:
  tiny_teacher              tiny ResNet on the builtin dataset (CPU, minutes)
  tiny_mshp, tiny_fp        tiny students (mean-scale hyperprior / factorized prior)
  resnet50_mshp, resnet50_fp, resnet101_mshp, resnet101_fp, regnety_064_mshp, regnety_064_fp
                            sc2bench Entropic Student recipes (need --set data.dataset=imagefolder:PATH
                            and an ImageNet teacher: a splitbits teacher checkpoint or a
                            torchvision/timm state dict file)

A kind: teacher config trains with cross-entropy. A kind: student config needs --teacher and
runs stage 1 (bottleneck: feature distillation + beta * rate) then stage 2 (decoder + rest:
knowledge distillation with the encoder and entropy model frozen).

Override any config key with --set SECTION.KEY=VALUE (YAML value), e.g.
  --set student.beta=0.32 --set stage1.epochs=10 --set data.dataset=imagefolder:/data/imagenet
The paper's rate weights are beta in {0.08, 0.16, 0.32, 0.64, 1.28, 2.56}.

Distributed: torchrun --nproc_per_node=N -m splitbits.runtime.cli train CONFIG ... (DDP,
one GPU per process; rank 0 writes the checkpoint). A checkpoint is written after every
epoch; --resume continues an interrupted run from OUT (with the same config).

Examples:
  splitbits train tiny_teacher --out runs/teacher.pt
  splitbits train tiny_mshp --teacher runs/teacher.pt --out runs/mshp.pt --set student.beta=0.32
  splitbits train --print-config tiny_mshp
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("config", help="builtin config name (e.g. tiny_mshp) or a YAML file")
    # --out and --teacher are checked in run: a bad checkpoint path is one line, as for every checkpoint reader
    p.add_argument("--out", metavar="CKPT", help="checkpoint to write (required unless --print-config)")
    p.add_argument("--teacher", metavar="CKPT", help="teacher checkpoint (students only)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override a config key, e.g. student.beta=0.32 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from --out")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="training device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=output_file, metavar="FILE", help="also write the final metrics as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--print-config", action="store_true",
                   help="print the complete, validated config (after --set) and exit")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def summary_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of the end-of-training summary table."""
    rows: list[tuple[str, str]] = []

    def add(label: str, key: str, unit: str = "") -> None:
        if key in metrics and metrics[key] is not None:
            rows.append((label, _fmt(metrics[key]) + unit))

    add("kind", "kind")
    add("arch", "arch")
    add("family", "family")
    add("beta", "beta")
    add("dataset", "dataset")
    add("val top-1", "val_top1", " %")
    add("teacher val top-1", "teacher_val_top1", " %")
    add("est. bytes / image", "est_bytes_per_image")
    add("est. bits y / z", "est_bits_y")
    if "est_bits_z" in metrics and rows and rows[-1][0] == "est. bits y / z":
        rows[-1] = ("est. bits y / z", f"{_fmt(metrics['est_bits_y'])} / {_fmt(metrics['est_bits_z'])}")
    add("JPEG q75 bytes / image", "jpeg75_bytes_per_image")
    add("wall stage 1", "wall_stage1_s", " s")
    add("wall stage 2", "wall_stage2_s", " s")
    add("wall training", "wall_train_s", " s")
    add("device", "device")
    return rows


def _print_summary(metrics: dict[str, Any], out: str) -> None:
    rows = [*summary_rows(metrics), ("checkpoint", out)]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="training summary", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for k, v in rows:
            table.add_row(k, v)
        Console().print(table)
    except ImportError:  # pragma: no cover - rich is a core dependency
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")


def run(args: argparse.Namespace) -> int:
    with needs_extra("train"):
        from splitbits.trainer.config import ConfigError, load_config
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc
    if args.print_config:
        import yaml

        sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
        return 0
    if not args.out:
        raise CliError("--out CKPT is required")
    if os.path.exists(args.out) and not os.path.isfile(args.out):
        raise CliError(f"--out {args.out} exists and is not a file")
    if config["kind"] == "teacher" and args.teacher:
        raise CliError("--teacher is only for student configs (this config is kind: teacher)")
    with needs_extra("train"):
        from splitbits.trainer.train import TrainError, train_student, train_teacher
    from splitbits.runtime.datasets import DatasetError

    progress = not args.no_progress
    try:
        if config["kind"] == "teacher":
            metrics = train_teacher(config, args.out, device=args.device, resume=args.resume,
                                    progress=progress, threads=args.threads)
        else:
            metrics = train_student(config, args.teacher, args.out, device=args.device, resume=args.resume,
                                    progress=progress, threads=args.threads)
    except (ConfigError, TrainError, DatasetError) as exc:
        raise CliError(str(exc)) from exc
    from splitbits.trainer.data import dist_env

    if dist_env()[0] != 0:
        return 0
    if args.json:
        from splitbits.runtime.report import write_json

        write_json(args.json, dict(sorted(metrics.items())))  # sorted keys, as before
    _print_summary(metrics, args.out)
    return 0


COMMANDS = {
    "train": Command(
        help="train a teacher or an Entropic Student (two stages) from a config",
        add_arguments=add_arguments,
        run=run,
        description=DESCRIPTION,
    ),
}
