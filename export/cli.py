"""``splitbits export``: checkpoint → verified bundle (and TensorRT engines where TensorRT exists)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from splitbits.runtime.cli import (
    CliError,
    Command,
    existing_file,
    int_range,
    missing_extra,
    nonneg_float,
    output_file,
    positive_int,
)


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a splitbits or sc2bench checkpoint (.pt), or a bundle directory with --trt")
    p.add_argument("--out", help="bundle directory to write (checkpoint source)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--dataset", default="builtin",
                   help="where the golden inputs come from (builtin, imagefolder:PATH, ...)")
    p.add_argument("--golden", type=positive_int, default=8, help="number of golden images")
    p.add_argument("--opset", type=int_range(7, 20), default=17, help="ONNX opset (TensorRT 10.3 accepts ≤ 20)")
    p.add_argument("--json", type=output_file, metavar="FILE", help="write the export summary as JSON")
    g = p.add_argument_group("sc2bench checkpoints (no embedded spec)")
    g.add_argument("--arch", choices=["tiny", "resnet50", "resnet101", "regnety_064"])
    g.add_argument("--family", choices=["fp", "mshp"])
    g.add_argument("--num-classes", type=positive_int, default=1000)
    g.add_argument("--input-size", type=int_range(16, 8192), default=224)
    t = p.add_argument_group("TensorRT engines (source is a bundle directory; run on the target device)")
    t.add_argument("--trt", action="store_true", help="build head/hyper/tail engines for this GPU into the bundle")
    t.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp16",
                   help="engine precision; GDN and entropy-model inputs stay FP32, hyper is always FP32")
    t.add_argument("--max-batch", type=positive_int, default=1, help="largest batch of the optimisation profile")
    t.add_argument("--opt-batch", type=positive_int, default=None, help="batch TensorRT tunes for (None: --max-batch)")
    t.add_argument("--workspace-mib", type=positive_int, default=1024, help="builder workspace limit")
    t.add_argument("--graphs", default=None, help="comma-separated subset of head,hyper,tail")
    typing = t.add_mutually_exclusive_group()
    typing.add_argument("--strongly-typed", dest="strongly_typed", action="store_true", default=None,
                        help="precision from the ONNX types (mixed FP16 ONNX); the only mode of TensorRT 11. "
                        "None: weak for fp32/fp16 on TensorRT 10, strong for int8 and on TensorRT 11")
    typing.add_argument("--weakly-typed", dest="strongly_typed", action="store_false", default=None,
                        help="builder flags + per-layer FP32 pins (TensorRT 10 only)")
    t.add_argument("--calib", type=positive_int, default=64, help="INT8: calibration images from --dataset")
    t.add_argument("--calib-split", default="train", help="INT8: dataset split for calibration")
    t.add_argument("--calib-inputs", type=existing_file, metavar="FILE.npz",
                   help="INT8: calibration images from a file instead")
    t.add_argument("--onnx-only", action="store_true",
                   help="no TensorRT: prepare the ONNX (mixed FP16 / Q/DQ) and check it with ONNX Runtime")
    t.add_argument("--atol", type=nonneg_float, default=None, help="override the verification atol of this precision")
    t.add_argument("--rtol", type=nonneg_float, default=None, help="override the verification rtol of this precision")


def _is_bundle_dir(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def run_export_trt(args: argparse.Namespace) -> int:
    """``splitbits export BUNDLE --trt``: engines for this device (or the ONNX side only)."""
    try:
        from splitbits.export.tensorrt import TOLERANCES, TrtBuildOptions, build_engines
        from splitbits.runtime.verify import Tolerance
    except ImportError as exc:
        raise missing_extra(exc, "jetson") from exc
    tol = None
    if args.atol is not None or args.rtol is not None:
        base = TOLERANCES[args.precision]
        tol = Tolerance(atol=base.atol if args.atol is None else args.atol,
                        rtol=base.rtol if args.rtol is None else args.rtol)
    try:
        opts = TrtBuildOptions(
            precision=args.precision, max_batch=args.max_batch, opt_batch=args.opt_batch,
            workspace_mib=args.workspace_mib, graphs=args.graphs.split(",") if args.graphs else None,
            strongly_typed=args.strongly_typed, onnx_only=args.onnx_only, dataset=args.dataset,
            calib_count=args.calib, calib_split=args.calib_split, calib_inputs=args.calib_inputs, tol=tol)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    res = build_engines(args.source, opts)
    v = res.verification or {}
    for gb in res.graphs:
        what = gb.engine or gb.onnx
        print(f"{gb.graph:5s} {gb.precision} ({gb.typing} typing) {what}  FP32 nodes {gb.plan['fp32_nodes']}"
              + (f", pinned layers {gb.pinned_layers}" if gb.engine else "")
              + (f", Q/DQ nodes {len(gb.quantisation['quantised_nodes'])}" if gb.quantisation else ""))
    where = f"TensorRT {res.tensorrt} on {res.device}" if res.mode == "tensorrt" else "ONNX Runtime CPU (prepared ONNX)"
    print(f"verification on {where}: {'OK' if res.ok else 'FAILED'}  top-1 {v.get('top1_agree')}/{v.get('images')}  "
          "max errors " + ", ".join(f"{k}={e:.2g}" for k, e in v.get("max_abs_err", {}).items()))
    if v.get("symbol_mismatches"):
        print("symbols differing from golden (reported, INT8): "
              + ", ".join(f"{k}={n}" for k, n in v["symbol_mismatches"].items()))
    for problem in v.get("problems", []):
        print(f"  mismatch: {problem}")
    if args.json:
        from splitbits.runtime.report import write_json

        write_json(args.json, res.to_dict())
    return 0 if res.ok else 1


def run_export(args: argparse.Namespace) -> int:
    if _is_bundle_dir(args.source):
        if not args.trt:
            raise CliError(f"{args.source} is a bundle: add --trt to build TensorRT engines for it")
        return run_export_trt(args)
    if args.trt or args.onnx_only:
        raise CliError("--trt needs a bundle directory as source "
                       "(export the checkpoint first, then run --trt on the device)")
    if not args.out:
        raise CliError("--out is required when exporting a checkpoint")
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
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (checkpoints are cached here)")
    p.add_argument("--family", choices=["mshp", "fp"], default="mshp", help="entropy model of the student")
    p.add_argument("--fresh", action="store_true", help="retrain even if cached checkpoints match the config")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate on the first N validation images only")
    p.add_argument("--no-attacks", action="store_true", help="skip the attack/defence/corruption section")
    p.add_argument("--hyper", choices=["auto", "int", "float"], default="auto",
                   help="MSHP hyper path of the edge encoder: int (deterministic across devices; auto picks it) "
                        "or float (hyper.onnx)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--teacher-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the tiny_teacher config (repeatable), e.g. train.epochs=5")
    p.add_argument("--student-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the tiny_<family> student config, e.g. student.beta=0.32")


def run_demo(args: argparse.Namespace) -> int:
    try:
        from splitbits.export.demo import run_demo as demo
    except ImportError as exc:
        raise missing_extra(exc, "train") from exc
    if args.limit is not None and args.limit < 1:
        raise CliError("--limit must be at least 1")
    r = demo(args.out, family=args.family, fresh=args.fresh, limit=args.limit, attacks=not args.no_attacks,
             progress=not args.no_progress, teacher_overrides=tuple(args.teacher_set),
             student_overrides=tuple(args.student_set), hyper=args.hyper)
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
        "export a checkpoint to a verified bundle, or build TensorRT engines for a bundle (--trt)",
        add_export_arguments, run_export,
        description="Export a split student to a bundle directory: head/hyper/tail ONNX graphs, codec.npz, "
        "manifest.json with sha256 of every file, and golden/ reference I/O. The export verifies "
        "itself with ONNX Runtime (tensors within tolerance, identical integer symbols) and fails "
        "naming the tensor on a mismatch.\n\n"
        "With a bundle directory as source and --trt, build TensorRT engines for this GPU (run it on the "
        "Jetson itself): `splitbits export BUNDLE --trt --precision fp16`. GDN layers and everything "
        "feeding the entropy model stay FP32, hyper is always FP32, INT8 uses explicit Q/DQ calibrated on "
        "--dataset. Engines are verified against golden/ and listed in the manifest. Where TensorRT is "
        "missing, --onnx-only prepares the same ONNX and checks it with ONNX Runtime.",
    ),
}
