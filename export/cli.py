"""``splitbits export``: checkpoint → verified bundle (and TensorRT engines where TensorRT exists)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from splitbits.runtime.cli import CliError, Command, missing_extra


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a splitbits or sc2bench checkpoint (.pt)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--dataset", default="builtin",
                   help="where the golden inputs come from (builtin, imagefolder:PATH, ...)")
    p.add_argument("--golden", type=int, default=8, help="number of golden images")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (TensorRT 10.3 accepts ≤ 20)")
    p.add_argument("--json", metavar="FILE", help="write the export summary as JSON")
    g = p.add_argument_group("sc2bench checkpoints (no embedded spec)")
    g.add_argument("--arch", choices=["tiny", "resnet50", "resnet101", "regnety_064"])
    g.add_argument("--family", choices=["fp", "mshp"])
    g.add_argument("--num-classes", type=int, default=1000)
    g.add_argument("--input-size", type=int, default=224)


def run_export(args: argparse.Namespace) -> int:
    try:
        from splitbits.export.bundle import export_bundle
        from splitbits.trainer.checkpoint import load_model
        from splitbits.trainer.models import ModelSpec, SplitClassifier
    except ImportError as exc:
        raise missing_extra(exc, "train") from exc
    if args.golden < 1:
        raise CliError("--golden must be at least 1")
    spec = None
    if args.arch:
        if not args.family:
            raise CliError("--arch needs --family (fp or mshp)")
        spec = ModelSpec(arch=args.arch, family=args.family, num_classes=args.num_classes,
                         input_size=args.input_size)
    try:
        model, _ = load_model(args.source, spec)
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    if not isinstance(model, SplitClassifier):
        raise CliError(f"{args.source} is a plain classifier (teacher); export needs a split student")
    try:
        res = export_bundle(model, args.out, dataset=args.dataset, golden_count=args.golden, opset=args.opset,
                            overwrite=args.force, source=str(args.source))
    except FileExistsError as exc:
        raise CliError(str(exc)) from exc
    v = res.verification
    summary = {
        "bundle": str(res.path),
        "family": res.manifest["family"],
        "fingerprint": res.manifest["fingerprint"],
        "files": {k: m["bytes"] for k, m in res.manifest["files"].items()},
        "verification": v.to_dict(),
        "seconds": round(res.seconds, 2),
    }
    print(f"bundle {res.path}  family={summary['family']}  fingerprint={summary['fingerprint'][:16]}  "
          f"verified on onnxruntime: top-1 {v.top1_agree}/{v.images}, packets {v.packets_ok}/{v.images}, "
          f"max errors " + ", ".join(f"{k}={e:.2g}" for k, e in v.max_abs_err.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (checkpoints are cached here)")
    p.add_argument("--family", choices=["mshp", "fp"], default="mshp", help="entropy model of the student")
    p.add_argument("--fresh", action="store_true", help="retrain even if cached checkpoints match the config")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N validation images only")
    p.add_argument("--no-attacks", action="store_true", help="skip the attack/defence/corruption section")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_demo(args: argparse.Namespace) -> int:
    try:
        from splitbits.export.demo import run_demo as demo
    except ImportError as exc:
        raise missing_extra(exc, "train") from exc
    if args.limit is not None and args.limit < 1:
        raise CliError("--limit must be at least 1")
    r = demo(args.out, family=args.family, fresh=args.fresh, limit=args.limit, attacks=not args.no_attacks,
             progress=not args.no_progress)
    print(f"report: {Path(args.out) / 'report.md'}  (and report.json, bytes.png, latency.png, accuracy.png)")
    return 0 if r else 1


COMMANDS = {
    "demo": Command(
        "train, export, run and report on the builtin dataset (what `make demo` runs)",
        add_demo_arguments, run_demo,
        description="The whole pipeline on the builtin dataset: train the tiny teacher and split student "
        "(reusing cached checkpoints whose config is unchanged), export a verified bundle, push every "
        "validation image through edge encode -> packet -> server decode on ONNX Runtime, and write "
        "report.json, report.md and plots (accuracy, bytes per image real vs estimated vs JPEG q75, "
        "latency per stage).",
    ),
    "export": Command(
        "export a checkpoint to a verified bundle (ONNX + entropy tables + golden I/O)",
        add_export_arguments, run_export,
        description="Export a split student to a bundle directory: head/hyper/tail ONNX graphs, codec.npz, "
        "manifest.json with sha256 of every file, and golden/ reference I/O. The export verifies "
        "itself with ONNX Runtime (tensors within tolerance, identical integer symbols) and fails "
        "naming the tensor on a mismatch.",
    ),
}
