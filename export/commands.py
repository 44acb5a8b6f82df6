"""``splitbits export``: checkpoint → verified bundle (and TensorRT engines where TensorRT exists)."""

from __future__ import annotations

import argparse
from pathlib import Path

from splitbits.runtime.cli import (
    CliError,
    Command,
    existing_dir,
    existing_file,
    int_range,
    needs_extra,
    nonneg_float,
    nonneg_int,
    output_file,
    positive_int,
)
from splitbits.trainer.spec_cli import add_spec_arguments, spec_from_args


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a splitbits or sc2bench checkpoint (.pt; sc2bench: with --arch/--family), "
                   "or a bundle directory with --trt")
    p.add_argument("--out", help="bundle directory to write (checkpoint source)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--dataset", default="builtin",
                   help="where the golden inputs come from (builtin, imagefolder:PATH, ...)")
    p.add_argument("--golden", type=positive_int, default=8, help="number of golden images")
    p.add_argument("--opset", type=int_range(7, 20), default=17, help="ONNX opset (TensorRT 10.3 accepts ≤ 20)")
    p.add_argument("--json", type=output_file, metavar="FILE", help="write the export summary as JSON")
    add_spec_arguments(p)
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
    with needs_extra("jetson"):
        from splitbits.export.tensorrt import TOLERANCES, TrtBuildOptions, build_engines
        from splitbits.runtime.verify import Tolerance
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
    print("\n".join(res.report_lines()))
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
    with needs_extra("train"):
        from splitbits.export.bundle import export_bundle
        from splitbits.runtime.report import write_json
        from splitbits.trainer.checkpoint import load_model
        from splitbits.trainer.models import SplitClassifier
    spec = spec_from_args(args)
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
    print(res.report_line())
    if args.json:
        write_json(args.json, res.summary())
    return 0


BENCH_CODEC_DESCRIPTION = """\
``splitbits bench codec``: the entropy coders on real latents, in one process, medians over repeats.

Latent sets (one image = one MSHP packet's z and y sections, or one FP packet's y section):

* ``resnet50_mshp_224`` / ``resnet50_fp_224``: the Entropic-Student ResNet-50 bottleneck,
  untrained but with compressai ``update()`` tables (seeded), on 224×224 builtin validation
  images (rendered at 224 since issue 11; earlier releases rendered smaller and upsampled);
* every ``--bundle PATH``: an exported bundle (e.g. the demo's trained tiny model), its head on
  ONNX Runtime over builtin validation images at the bundle's input size.

Coders, on the same symbols and tables: ``numba`` (the default coder; per latent and batched, and
with interleaved states for comparison), ``constriction`` (the alternative coder), compressai's
C++ rANS with the table lists built once (``compressai_core``, its bare coder) and compressai as
its users call it (``GaussianConditional.compress`` / ``decompress`` with the exported tables:
``compressai``, the issue's reference, which converts the tables to lists on every call). All run
single-threaded. Timings interleave the coders within each repeat so machine noise hits all
alike; figures are medians over (repeat × image) of the process' CPU time — one core's work, with
preemption by other processes on a shared machine excluded; torch, BLAS and ONNX Runtime run on one
thread — with wall-clock medians beside.
Bytes are ``len()`` of the blobs, next to the ideal −Σlog₂p under the exported tables (escapes at
their escape bytes).

For MSHP sets the integer hyper path is measured against the float one on the same latents:
payload bytes, idx agreement, top-1 (accuracy on labelled bundles; argmax agreement for the
untrained ResNet-50) and time per image (int path in numpy vs the float hyper graph on ONNX
Runtime, both on one thread).

Targets (issue 3) are evaluated per set and written with every figure, the machine and the
versions to ``--json``; ``--markdown`` writes the README table.
"""


def add_bench_codec_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=output_file, metavar="FILE",
                   help="write every figure, the machine and the versions here")
    p.add_argument("--markdown", type=output_file, metavar="FILE", help="write the README table here")
    p.add_argument("--images", type=positive_int, default=8, help="images per latent set (default 8)")
    p.add_argument("--repeats", type=positive_int, default=31, help="timing repeats per image (default 31)")
    p.add_argument("--slow-repeats", type=positive_int, default=5, help="repeats for compressai's coders (default 5)")
    p.add_argument("--bundle", type=existing_dir, action="append", default=[], metavar="PATH",
                   help="also bench an exported bundle's latents (e.g. the demo's trained tiny model); repeatable")
    p.add_argument("--bundle-images", type=positive_int, default=64,
                   help="images per bundle latent set, i.e. the batch of the batched figures (default 64)")
    p.add_argument("--accuracy-images", type=nonneg_int, default=1200,
                   help="validation images for the int-vs-float hyper top-1 of MSHP bundles (default 1200)")
    p.add_argument("--hyper-repeats", type=positive_int, default=21,
                   help="repeats for the hyper-path timings (default 21)")
    p.add_argument("--dataset", default="builtin", help="image source (default builtin)")
    p.add_argument("--no-resnet50", action="store_true", help="skip the ResNet-50 latent sets")
    p.add_argument("--lanes", type=int_range(0, 5), nargs="*", default=[0, 1, 2],
                   help="numba interleavings to compare, as log2(states) (default 0 1 2)")
    p.add_argument("--no-compressai", action="store_true", help="skip compressai's coders")
    p.add_argument("--torch-threads", type=nonneg_int, default=1,
                   help="torch threads for compressai's model API (default 1: one core; 0: torch's default)")
    p.add_argument("--no-cold-start", action="store_true", help="skip the fresh-process start-up measurement")


def run_bench_codec(args: argparse.Namespace) -> int:
    """The runtime's coders on bundle latents (torch-free), plus compressai's coders and the ResNet-50
    sets where torch and compressai are installed (else a note says they were skipped)."""
    with needs_extra("runtime"):
        from splitbits.runtime.codec import bench
    machine, blas_one = bench.start_machine()
    coders, notes = bench.runtime_coders()
    try:
        from splitbits.export import codec_reference as ref
    except ImportError as exc:  # a runtime-only install: no torch or compressai
        ref = None
        notes.append(f"compressai's coders and the ResNet-50 sets skipped: {exc.name or exc} is not installed "
                     "(pip install 'splitbits[train]')")
    torch_threads = ref.set_torch_threads(args.torch_threads) if ref else 0
    if ref and not args.no_compressai:
        coders.update(ref.compressai_coders())
    sets = []
    if ref and not args.no_resnet50:
        images, _, source = bench.load_images(224, args.images, args.dataset)
        sets += ref.resnet50_sets(images, source, args.hyper_repeats)
    sets += [bench.bundle_set(path, args.bundle_images, args.accuracy_images, args.dataset, args.hyper_repeats)
             for path in args.bundle]
    if not sets:
        why = "--no-resnet50" if ref else "the ResNet-50 sets need torch and compressai (the 'train' extra)"
        raise CliError(f"nothing to bench: {why} and no --bundle PATH")
    settings = bench.BenchSettings(
        repeats=args.repeats, slow_repeats=args.slow_repeats, lanes=args.lanes, cold_start=not args.no_cold_start,
        extra={"images": args.images, "bundle_images": args.bundle_images, "accuracy_images": args.accuracy_images,
               "blas_threads_limited_to_1": blas_one, "torch_threads": torch_threads})
    result = bench.run_codec_bench(sets, coders, settings, machine, notes)
    bench.write_report(result, args.json, args.markdown)
    return 0


COMMANDS = {
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
    "bench.codec": Command(
        "entropy coders on real latents: numba vs constriction vs compressai (speed, bytes vs ideal)",
        add_bench_codec_arguments, run_bench_codec, description=BENCH_CODEC_DESCRIPTION,
    ),
}
