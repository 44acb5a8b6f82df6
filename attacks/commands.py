"""The CLI of the attacks package: ``splitbits attack`` (one point), ``campaign`` (a grid), ``demo``,
``bench attack`` and ``device check``. Standard library and ``splitbits.runtime.cli`` only at import."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from splitbits.runtime.cli import (
    CliError,
    Command,
    extension,
    float_range,
    int_range,
    needs_extra,
    output_file,
    positive_float,
    positive_int,
)
from splitbits.trainer.spec_cli import add_spec_arguments, spec_from_args

ATTACK_DESCRIPTION = """\
Attack (or corrupt) a split model's inputs and measure the REAL packet bytes from the runtime.

TARGET is a bundle directory (its manifest names the source checkpoint and holds the model spec; or
pass --checkpoint) or a checkpoint (exported once to a cached bundle; or pass --bundle). An sc2bench
checkpoint carries no spec: attack the bundle exported from it, or give --arch/--family (and
--num-classes/--input-size if not 1000/224). The torch model supplies gradients;
bytes are len(packet) from the ONNX Runtime edge encoder and top-1 comes from the server decoder, for
the clean images and the attacked ones, each with every --defence. The surrogate (−Σlog₂p/8) is shown
beside the real bytes, and the attack is checked: its objective must rise.

Threats: clean, pgd-e (rate), pgd-acc (cross-entropy), noise (±ε sign noise), pgd-e-lowfreq,
pgd-e-region, pgd-e-bpda (through --through); corruptions: --attack corruption --corruption NAME
--severity S (or --attack NAME). ε is in units of 1/255 unless --eps-unit unit ("8/255" also works).

examples:
  splitbits attack runs/demo/bundle_mshp --attack pgd-e --eps 8 --defence oatv --json pgd8.json
  splitbits attack runs/demo/student_mshp.pt --attack noise --eps 8 --limit 128
  splitbits attack runs/demo/bundle_mshp --attack corruption --corruption shot_noise --severity 3
  splitbits attack runs/demo/bundle_mshp --attack pgd-e-bpda --eps 8 --through oatv --defence oatv
  splitbits attack runs/demo/bundle_mshp --attack pgd-e --eps 8 --save-inputs adv.npz   # for the device bench
  splitbits attack sc2bench_r50_mshp.pt --arch resnet50 --family mshp --attack pgd-e --eps 8 --limit 32
"""

CAMPAIGN_DESCRIPTION = """\
Run a grid of models × threats × ε (and corruptions × severities) × defences from a YAML config,
storing results row by row in OUT/results.sqlite: an interrupted campaign loses at most the unit in
flight, and rerunning the same command resumes without redoing stored rows.

Past one process, on Ray (pip install 'splitbits[cluster]'): each unit is a Ray task, scheduled on
whichever worker is free and retried if its worker dies; the results stream back to this process,
which alone writes the store (so OUT stays on this machine's disk). Without ADDRESS Ray runs in
this process on this machine's cores; with one it joins a started cluster (`ray start --head` on
one node, `ray start --address HEAD:6379` on the others; the models and dataset paths must be
readable on every node; Ray >= 2.59 clusters want RAY_AUTH_MODE=token and the head's token on every
node and here):

  splitbits campaign CONFIG.yaml --ray                       # every core of this machine
  splitbits campaign CONFIG.yaml --ray auto --gpus-per-unit 1  # the cluster this node belongs to

On one machine without Ray, --shard I/N runs every N-th unit in this process (start N of them; the
SQLite file is shared in WAL mode, one host only):

  splitbits campaign CONFIG.yaml --shard 1/4

Writes OUT/report.md, report.html, report.json and PNG plots (bytes vs ε, accuracy vs ε, bytes per
corruption and severity); --parquet also writes OUT/results.parquet (every stored row, for pandas).
See attacks/campaigns/example.yaml for every key.
"""

DEMO_DESCRIPTION = """\
The whole pipeline on the builtin dataset: train the tiny teacher and split student (reusing cached
checkpoints whose config is unchanged), export a verified bundle, push every validation image through
edge encode -> packet -> server decode on ONNX Runtime, and write report.json, report.md and plots
(accuracy, bytes per image real vs estimated vs JPEG q75, latency per stage).
"""

BENCH_ATTACK_DESCRIPTION = """\
``splitbits bench attack``: batched PGD-E vs per-image loops with the same settings, in one run.

Three implementations of the same attack (``--steps`` PGD steps, ``--eot`` noise samples per step):

* ``batched``: ``--batch`` images at once, the EOT samples of all of them in one forward/backward
  (what ``splitbits attack`` and campaigns use);
* ``per_image``: one image at a time, its EOT samples still batched;
* ``per_image_sequential_eot``: one image at a time and one EOT sample per forward/backward,
  gradients accumulated (the straightforward reference-style loop).

Images/s of each and the speedups of ``batched`` over the two loops go to stdout and ``--json``,
together with the machine's load average and thread count (timings on a shared CPU vary).

``--strength`` (needs ``--checkpoint``): how strong each PGD schedule is instead of how fast. Every
schedule of ``--schedules`` (auto: the default APGD-style; reference: the paper's procedure; fixed:
Madry PGD, the schedule before auto) attacks the same ``--limit`` images of each ``--sets`` entry
(builtin, photos = scikit-image's photographs, noise, imagefolder:PATH) at the model's input size;
the payload is the real packet of the uint8 attacked image (ONNX Runtime on the bundle: ``--bundle``,
else an export cached like ``splitbits attack``'s). Prints per set and schedule the mean bytes, the
increase over clean, images/s and images through g_a forward/backward per image, and the share of
images where auto is >= the best of the others; --json has the per-image bytes.

  splitbits bench attack --strength --checkpoint ck.pt --sets builtin,photos --limit 32 --json s.json
"""


def _attack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="bundle directory or checkpoint (.pt)")
    g = p.add_argument_group("threat")
    g.add_argument("--attack", default="pgd-e", help="threat name, 'corruption', or a corruption name")
    g.add_argument("--eps", default="8", help="L∞ budget in units of 1/255 (or k/255, or see --eps-unit)")
    g.add_argument("--eps-unit", choices=("255", "unit"), default="255", help="unit of --eps numbers")
    g.add_argument("--steps", type=positive_int, default=20, help="PGD steps")
    g.add_argument("--step-size", type=positive_float, default=None,
                   help="PGD step (fraction of [0,1]); default per --schedule: 2ε first step (auto), "
                   "2.5·ε/steps (fixed), 0.1 (reference)")
    g.add_argument("--eot", type=positive_int, default=16, help="EOT samples of the quantisation noise per step")
    g.add_argument("--no-random-start", action="store_true", help="start PGD at the clean image")
    g.add_argument("--schedule", choices=("auto", "fixed", "reference"), default="auto",
                   help="PGD schedule: auto (APGD-style adaptive step, best iterate by the coded rate; the default), "
                   "fixed (Madry: step 2.5ε/steps, random start) or reference (the paper's procedure, pgd-e only: "
                   "--eot copies per step, signed steps of --step-size, default 0.1, averaged)")
    g.add_argument("--terms", default="y,z", help="rate terms the entropy attacks maximise: y, z or y,z")
    g.add_argument("--quant", choices=("noise", "ste"), default="noise",
                   help="gradient through quantisation: uniform noise (EOT) or straight-through rounding")
    g.add_argument("--band", type=float_range(0, 1, lo_open=True), default=0.25,
                   help="pgd-e-lowfreq: fraction of the DCT band kept")
    g.add_argument("--through", default="oatv", help="pgd-e-bpda/-region: the defence attacked (oatv, tv, jpeg)")
    g.add_argument("--through-grad", choices=("bpda", "unroll"), default="bpda",
                   help="pgd-e-bpda: identity backward (BPDA) or autograd through every defence iteration")
    g.add_argument("--corruption", default=None, help="corruption name (with --attack corruption)")
    g.add_argument("--severity", type=int_range(1, 5), default=3, help="corruption severity 1..5")
    d = p.add_argument_group("defence")
    d.add_argument("--defence", action="append", default=[], metavar="SPEC",
                   help="measure also with this defence (repeatable): oatv, tv, jpeg, "
                        "e.g. oatv:iterations=100,lam=0.1,alpha=0.15 or jpeg:quality=50")
    s = p.add_argument_group("data and run")
    s.add_argument("--dataset", default="builtin", help="builtin, imagefolder:PATH or imagenet-c:PATH?...")
    s.add_argument("--split", default="val")
    s.add_argument("--limit", type=positive_int, default=64, help="first N images of the split")
    s.add_argument("--image-size", type=int_range(16, 8192), default=None, help="default: the model's input size")
    s.add_argument("--batch", type=positive_int, default=32, help="images per attack batch (EOT multiplies it)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torch side; bytes always on ORT)")
    s.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--checkpoint", default=None, help="checkpoint of a bundle whose manifest has no source")
    s.add_argument("--bundle", default=None, help="bundle of a checkpoint TARGET (default: cached export)")
    s.add_argument("--json", type=output_file, default=None, metavar="FILE", help="write the full result as JSON")
    s.add_argument("--save-inputs", type=output_file, default=None, metavar="FILE.npz",
                   help="write the attacked uint8 NHWC images and labels (for the on-device bench)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_spec_arguments(p)


def _threat_point(args: argparse.Namespace) -> Any:
    """The threat options as a ``ThreatPoint`` (checked; no work yet)."""
    from splitbits.attacks.threats import AttackConfig, ThreatPoint, check_threat, parse_eps
    from splitbits.runtime.corruptions import CORRUPTIONS

    name = args.attack
    if name == "corruption" or name in CORRUPTIONS:
        corr = args.corruption or (name if name in CORRUPTIONS else None)
        if corr is None:
            raise CliError(f"--attack corruption needs --corruption NAME ({', '.join(CORRUPTIONS)})")
        return ThreatPoint(corruption=corr, severity=args.severity)
    check_threat(name)
    eps = 0.0 if name == "clean" else parse_eps(args.eps, args.eps_unit)
    terms = tuple(t.strip() for t in args.terms.split(",") if t.strip())
    return ThreatPoint(attack=AttackConfig(
        name=name, eps=eps, steps=args.steps, step_size=args.step_size, eot=args.eot,
        random_start=not args.no_random_start, terms=terms, quant=args.quant, band=args.band,
        through=args.through, through_grad=args.through_grad, schedule=args.schedule))


def _defences(specs: list[str]) -> list[Any]:
    """``none`` and each ``--defence`` (``NAME,NAME`` or one ``NAME:KEY=VALUE,...``) once, as DefenceConfigs."""
    from splitbits.attacks.defence import DefenceConfig

    out = [DefenceConfig(name="none")]
    for s in specs:
        for part in [s] if ":" in s else s.split(","):
            try:
                d = DefenceConfig.parse(part.strip())
            except (ValueError, TypeError) as exc:
                raise CliError(f"--defence {part!r}: {exc}") from None
            if d.label not in [o.label for o in out]:
                out.append(d)
    return out


def _attack_run(args: argparse.Namespace) -> int:
    with needs_extra("attacks"):
        import numpy as np
        import torch

        from splitbits.attacks.runner import attack_point, machine_info, pick_device, resolve_target
        from splitbits.runtime.datasets import load_arrays
        from splitbits.runtime.report import write_json

    point, defences = _threat_point(args), _defences(args.defence)  # everything is checked before any work
    spec = spec_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    target = resolve_target(args.target, checkpoint=args.checkpoint, bundle=args.bundle, device=dev, spec=spec)
    images, labels = load_arrays(args.dataset, args.split, args.image_size or target.model.spec.input_size,
                                 args.limit)
    run, attacked = attack_point(target, images, labels, point, defences, seed=args.seed, batch=args.batch,
                                 progress=not args.no_progress)
    _print_attack(run, f"{target.name} ({target.family}, β={target.beta}) — {len(images)} images of "
                       f"{args.dataset} {args.split}")
    if args.json:
        dataset = {"spec": args.dataset, "split": args.split, "images": len(images)}
        write_json(args.json, {"target": run.pop("target"), "dataset": dataset, **run, "device": str(dev),
                               "machine": machine_info()})
        print(f"wrote {args.json}")
    if args.save_inputs:
        path = Path(args.save_inputs)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, images=attacked, labels=labels, clean_images=images, threat=point.threat,
                            level=point.level)
        print(f"wrote {path} ({len(images)} attacked uint8 images)")
    return 0


def _print_attack(run: dict[str, Any], title: str) -> None:
    """The table of ``attack_point``'s results (clean, then attacked, each per defence) and its checks."""
    from splitbits.runtime.report import rich_table

    rows = []
    for which, name in (("clean", "clean"), ("attacked", f"{run['threat']} {run['level']}")):
        for label, s in run["results"][which].items():
            rows.append([name, label, s["bytes_mean"], f"{s['delta_bytes_pct']:+.1f}", s["surrogate_bytes_mean"],
                         100 * s["top1"], f"{s['delta_top1_pt']:+.1f}", s["edge_ms_p50"], s["defence_ms"]])
    rich_table(title, ["input", "defence", "bytes", "Δ %", "surrogate B", "top-1 %", "Δ top-1 pt", "edge ms p50",
                       "defence ms/img"], rows)
    checks = run["checks"]
    if checks:
        print("checks: " + ", ".join(f"{k}={v}" for k, v in checks.items() if not k.startswith("objective_")))
        if checks.get("loss_rose") is False or checks.get("real_bytes_rose") is False:
            print("warning: the attack did not raise its objective / the real bytes on these images")


def _campaign_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="campaign YAML (see attacks/campaigns/example.yaml)")
    p.add_argument("--out", default=None, help="output folder (default: the config's out, else runs/campaigns/NAME)")
    p.add_argument("--fresh", action="store_true", help="discard stored results and start over")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from stored rows")
    p.add_argument("--dry-run", action="store_true", help="validate the config and list the units; run nothing")
    p.add_argument("--parquet", action="store_true",
                   help="also write OUT/results.parquet, every stored row (pandas and pyarrow: the cluster extra)")
    p.add_argument("--shard", default=None, metavar="I/N", help="one host, without Ray: run shard I of N here")
    p.add_argument("--device", default=None, help="override the config's device")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = p.add_argument_group("Ray (the cluster extra)")
    r.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the units as Ray tasks: in this process, or on the cluster at ADDRESS (auto: the "
                        "cluster this node joined, or HOST:6379)")
    r.add_argument("--cpus-per-unit", type=positive_float, default=1.0, help="CPUs a unit takes (torch threads)")
    r.add_argument("--gpus-per-unit", type=float_range(0), default=0.0,
                   help="GPUs a unit takes (> 0: units run on CUDA)")
    r.add_argument("--ray-cpus", type=positive_int, default=None,
                   help="without ADDRESS: the CPUs of the in-process Ray (None: all of this machine's)")
    r.add_argument("--max-retries", type=int_range(0, 100), default=3,
                   help="times a unit is retried when its worker dies")


def _campaign_run(args: argparse.Namespace) -> int:
    with needs_extra("attacks"):
        from splitbits.attacks.campaign import load_campaign, output_dir, plan_units, report_campaign, run_campaign

    if args.ray is not None and args.shard:
        raise CliError("--ray schedules every unit itself; --shard is for one host without Ray")
    if args.ray is None and (args.ray_cpus or args.gpus_per_unit):
        raise CliError("--ray-cpus and --gpus-per-unit apply to --ray")
    c = load_campaign(args.config)
    out = output_dir(c, args.out)
    if args.report_only:
        files = report_campaign(c, out)
        print(f"wrote {files['markdown']} and {files['html']}")
        return _parquet(out, args.parquet)
    if args.dry_run:
        print(f"{c.config['name']}: {len(c.models)} model(s) × {len(c.points)} points × "
              f"{len(c.defences)} defence(s); {len(plan_units(c))} units of ≤{c.config['chunk']} images → {out}")
        for p in c.points:
            print(f"  {p.threat:14s} {p.level}")
        return 0
    if args.parquet:  # before the work, not after it
        with needs_extra("cluster"):
            import pandas  # noqa: F401
            import pyarrow  # noqa: F401
    if args.ray is not None:
        run_ray = extension("campaign.ray", "cluster")
        summary = run_ray(c, out, address=args.ray or None, fresh=args.fresh, device=args.device,
                          cpus=args.cpus_per_unit, gpus=args.gpus_per_unit, num_cpus=args.ray_cpus,
                          max_retries=args.max_retries, progress=not args.no_progress)
    else:
        summary = run_campaign(c, out, fresh=args.fresh, shard=args.shard, device=args.device,
                               progress=not args.no_progress)
    print(f"campaign {c.config['name']}: computed {summary['computed']} units, skipped {summary['skipped']} "
          f"(stored), {summary['rows']} rows in {out / 'results.sqlite'}")
    if "report" in summary:
        print(f"report: {summary['report']['markdown']}, {summary['report']['html']}")
    return _parquet(out, args.parquet)


def _parquet(out: Path, wanted: bool) -> int:
    """``--parquet``: every stored row to OUT/results.parquet."""
    if wanted:
        from splitbits.attacks.campaign import export_parquet

        with needs_extra("cluster"):
            print(f"wrote {export_parquet(out)}")
    return 0


def _bench_attack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, metavar="CKPT_OR_BUNDLE",
                   help="student checkpoint, or a bundle (its manifest names the checkpoint and holds the spec); "
                        "default: an untrained tiny MSHP model (speed does not depend on weights)")
    p.add_argument("--images", type=positive_int, default=64, help="images attacked by the batched implementation")
    p.add_argument("--loop-images", type=positive_int, default=8, help="images attacked by each per-image loop")
    p.add_argument("--batch", type=positive_int, default=32, help="batch of the batched implementation")
    p.add_argument("--steps", type=positive_int, default=20, help="PGD steps")
    p.add_argument("--eot", type=positive_int, default=16, help="EOT samples per step")
    p.add_argument("--eps", type=float_range(0, 255), default=8.0, help="ε in units of 1/255")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("--skip-sequential", action="store_true", help="skip the sequential-EOT loop (slow)")
    p.add_argument("--json", type=output_file, default=None, metavar="FILE", help="write the results as JSON")
    add_spec_arguments(p)
    s = p.add_argument_group("attack strength (--strength)")
    s.add_argument("--strength", action="store_true", help="compare the PGD-E schedules' payload increase instead")
    s.add_argument("--bundle", default=None, help="bundle of --checkpoint (default: cached export)")
    s.add_argument("--sets", default="builtin,photos,noise", help="image sets: builtin, photos, noise, imagefolder:P")
    s.add_argument("--schedules", default="auto,reference,fixed", help="PGD schedules to compare (first: the one "
                   "whose per-image share is reported)")
    s.add_argument("--limit", type=positive_int, default=32, help="images per set")
    s.add_argument("--seed", type=int, default=0)


def _bench_attack_run(args: argparse.Namespace) -> int:
    with needs_extra("attacks"):
        import torch

        from splitbits.attacks.bench import run_bench
        from splitbits.attacks.runner import pick_device
        from splitbits.runtime.report import print_json, rich_table, write_json

    spec = spec_from_args(args)
    if spec is not None and not args.checkpoint:
        raise CliError("--arch/--family describe the --checkpoint to bench; give --checkpoint too")
    torch.set_num_threads(args.threads)
    if args.strength:
        return _strength_run(args, spec)
    res = run_bench(args.checkpoint, pick_device(args.device), images=args.images, loop_images=args.loop_images,
                    batch=args.batch, steps=args.steps, eot=args.eot, eps=args.eps,
                    sequential=not args.skip_sequential, spec=spec)
    rows = [(k, res[k]["images"], res[k]["seconds"], res[k]["images_per_s"], res[k]["rate_attacked_bits"])
            for k in ("batched", "per_image", "per_image_sequential_eot") if k in res]
    rich_table(f"PGD-E throughput ({args.steps} steps, EOT {args.eot}, {res['settings']['device']}, "
               f"load {res['machine']['loadavg_1_5_15']})",
               ["implementation", "images", "s", "images/s", "attacked bits"], rows)
    line = f"speedup batched vs per-image: {res['speedup_vs_per_image']:.1f}×"
    if "speedup_vs_per_image_sequential_eot" in res:
        line += f"; vs per-image sequential EOT: {res['speedup_vs_per_image_sequential_eot']:.1f}×"
    print(line)
    if args.json:
        write_json(args.json, res)
    else:
        print_json(res)
    return 0


def _strength_run(args: argparse.Namespace, spec: Any) -> int:
    from splitbits.attacks.runner import pick_device, resolve_target
    from splitbits.attacks.strength import compare_schedules, table
    from splitbits.runtime.report import print_json, rich_table, write_json

    if not args.checkpoint:
        raise CliError("--strength needs --checkpoint (a trained student: strength depends on the weights)")
    target = resolve_target(args.checkpoint, bundle=args.bundle, device=pick_device(args.device), spec=spec)
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]

    def progress(name: str, sched: str, r: dict[str, Any]) -> None:
        print(f"{name:>8} {sched:>9}: {sum(r['bytes']) / len(r['bytes']):9.1f} B  {r['seconds']:8.1f} s", flush=True)

    res = compare_schedules(target, sets, schedules=schedules, default=schedules[0], eps=args.eps / 255,
                            steps=args.steps, eot=args.eot, limit=args.limit, batch=args.batch, seed=args.seed,
                            progress=progress)
    rows = table(res)
    share = f"{schedules[0]}_ge_best_other_share"
    rich_table(f"PGD-E strength, ε={args.eps:g}/255, {args.steps} steps, EOT/copies {args.eot}",
               ["set", "n", "schedule", "clean B", "attacked B", "Δ %", "img/s", "g_a fwd/img", "g_a bwd/img",
                f"{schedules[0]} ≥ best other"],
               [(r["set"], r["n"], r["schedule"], r["clean_bytes"], r["attacked_bytes"], r["increase_pct"],
                 r["images_per_s"], r["g_a_fwd_per_image"], r["g_a_bwd_per_image"], r[share]) for r in rows])
    res["table"] = rows
    if args.json:
        write_json(args.json, res)
    else:
        print_json(rows)
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
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


def _demo_run(args: argparse.Namespace) -> int:
    with needs_extra("attacks"):
        from splitbits.attacks.demo import run_demo

    run_demo(args.out, family=args.family, fresh=args.fresh, limit=args.limit, attacks=not args.no_attacks,
             progress=not args.no_progress, teacher_overrides=tuple(args.teacher_set),
             student_overrides=tuple(args.student_set), hyper=args.hyper)
    print(f"report: {Path(args.out) / 'report.md'}  (and report.json, bytes.png, latency.png, accuracy.png)")
    return 0


DEVICE_CHECK_DESCRIPTION = """\
The prepared check of a CUDA machine (issue 14), one JSON out. Steps, each timed and guarded by
--budget-s (a step whose expected time no longer fits is skipped and says so):

  environment       versions (python, torch, CUDA, cuDNN, numba, onnxruntime, compressai, constriction,
                    torchvision), the GPU
  tiny_student      the two-stage Entropic Student recipe (trainer.train: short tiny teacher, stage 1,
                    stage 2) on builtin: loss per epoch (it must fall), samples/s
  resnet50_student  stage 1 of a ResNet-50 MSHP student at 224 (random-init teacher, builtin images
                    at 224): loss first/last, samples/s
  bench_attack      `bench attack`: batched vs per-image PGD-E (the 5x target)
  pgd_e_resnet50    batched PGD-E images/s on the ResNet-50 MSHP student at 224
  numba_coder       the runtime's coders on ResNet-50 latents on this machine's CPU (`bench codec`)

--dry-run runs every step at tiny sizes on the CPU in seconds (what CI runs). The JSON is rewritten
after each step. Exit 1 if a step failed or (full run) a check is not met. On a lent GPU machine
run it through jetson/device_check.sh, which installs the carried wheels first (README: Device check).
"""


def _device_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: every code path in seconds (CI)")
    p.add_argument("--json", type=output_file, default=None, metavar="FILE",
                   help="default: docs/device/<date>-<gpu or host>.json (a dry run: runs/device/...-dry-run.json)")
    p.add_argument("--budget-s", type=positive_float, default=420.0,
                   help="seconds for all the steps; a step that would not fit is skipped")
    p.add_argument("--device", default="auto", help="auto (CUDA; the CPU with --dry-run), cuda, cuda:N, cpu")
    p.add_argument("--skip", action="append", default=[], metavar="STEP",
                   help="skip a step (repeatable, or comma-separated)")


def _device_check_run(args: argparse.Namespace) -> int:
    with needs_extra("attacks"):
        from splitbits.attacks.device_check import CheckOptions, run_check

    skip = tuple(s.strip() for item in args.skip for s in item.split(",") if s.strip())
    result, path = run_check(CheckOptions(device=args.device, dry_run=args.dry_run, budget_s=args.budget_s,
                                          skip=skip), args.json, say=lambda line: print(line, flush=True))
    failed = [k for k, v in result["steps"].items() if v["status"] == "failed"]
    unmet = [k for k, ok in result["checks"].items() if not ok]
    print(f"device check on {result['device']} in {result['wall_s']:.1f} s: "
          + ", ".join(f"{k} {v['status']}" for k, v in result["steps"].items()))
    judged = "" if result["checks_judged"] else " (a dry run: not judged)"
    print(f"checks not met{judged}: {', '.join(unmet) or 'none'}")
    print(f"wrote {path}")
    return 1 if failed or (unmet and result["checks_judged"]) else 0


COMMANDS = {
    "demo": Command(
        "train, export, run and report on the builtin dataset (what `make demo` runs)",
        _demo_args, _demo_run, description=DEMO_DESCRIPTION,
    ),
    "attack": Command("attack/corrupt one point and measure real packet bytes, accuracy and latency",
                      _attack_args, _attack_run, description=ATTACK_DESCRIPTION),
    "campaign": Command("run a resumable attack/corruption/defence grid from a YAML config (--shard I/N, --ray)",
                        _campaign_args, _campaign_run, description=CAMPAIGN_DESCRIPTION),
    "bench.attack": Command("batched vs per-image attack throughput (images/s)",
                            _bench_attack_args, _bench_attack_run, description=BENCH_ATTACK_DESCRIPTION),
    "device.check": Command("the prepared check of a CUDA machine: training, attacks, coders; one JSON",
                            _device_check_args, _device_check_run, description=DEVICE_CHECK_DESCRIPTION),
}
