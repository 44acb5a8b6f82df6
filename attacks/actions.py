"""Implementations of ``splitbits attack`` and ``splitbits campaign`` (heavy imports live here)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from splitbits.attacks.defence import DefenceConfig
from splitbits.attacks.threats import ENTROPY_THREATS, AttackConfig, AttackConfigError, check_threat, parse_eps
from splitbits.runtime.cli import CliError
from splitbits.runtime.corruptions import CORRUPTIONS, CorruptionError, check_corruption


def machine_info() -> dict[str, Any]:
    """``runtime.machine.machine_info`` and torch's threads and GPU: every timing is reported with these."""
    import torch

    from splitbits.runtime.machine import machine_info as base

    return {**base(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def check_device(name: str):  # -> torch.device
    """``--device`` as a torch device that exists here, else a :class:`CliError`."""
    import torch

    from splitbits.attacks.runner import TargetError, pick_device

    try:
        dev = pick_device(name)
    except (TargetError, RuntimeError) as exc:  # RuntimeError: torch cannot parse the name
        raise CliError(f"--device {name}: {exc}") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CliError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def build_perturbation(args: argparse.Namespace):
    """Validate the threat options of ``splitbits attack`` (no work yet)."""
    from splitbits.attacks.runner import Perturbation

    name = args.attack
    try:
        if name == "corruption" or name in CORRUPTIONS:
            corr = args.corruption or (name if name in CORRUPTIONS else None)
            if corr is None:
                raise CliError(f"--attack corruption needs --corruption NAME ({', '.join(CORRUPTIONS)})")
            check_corruption(corr, args.severity)
            return Perturbation(corruption=corr, severity=args.severity)
        check_threat(name)
        eps = 0.0 if name == "clean" else parse_eps(args.eps, args.eps_unit)
        terms = tuple(t.strip() for t in args.terms.split(",") if t.strip())
        cfg = AttackConfig(name=name, eps=eps, steps=args.steps, step_size=args.step_size, eot=args.eot,
                           random_start=not args.no_random_start, terms=terms, quant=args.quant, band=args.band,
                           through=args.through, through_grad=args.through_grad)
        return Perturbation(attack=cfg)
    except (AttackConfigError, CorruptionError) as exc:
        raise CliError(str(exc)) from None


def parse_defences(specs: list[str]) -> list[DefenceConfig]:
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


def load_images(spec: str, split: str, image_size: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    from splitbits.runtime.datasets import open_dataset

    if limit is not None and limit < 1:
        raise CliError(f"--limit must be >= 1, got {limit}")
    ds = open_dataset(spec, split=split, image_size=image_size, limit=limit)
    if len(ds) == 0:
        raise CliError(f"dataset {spec} ({split}) has no images")
    images = np.stack([ds[i][0] for i in range(len(ds))])
    labels = np.asarray([ds[i][1] for i in range(len(ds))], dtype=np.int64)
    return images, labels


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled)


def attack_command(args: argparse.Namespace) -> int:
    import torch

    from splitbits.attacks.runner import (
        Perturbation,
        RuntimeMeter,
        TargetError,
        evaluate_point,
        resolve_target,
    )
    from splitbits.runtime.report import rich_table, write_json

    # 1. validate everything (no work yet)
    pert = build_perturbation(args)
    defences = parse_defences(args.defence)
    if args.batch < 1:
        raise CliError("--batch must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = check_device(args.device)
    try:
        target = resolve_target(args.target, checkpoint=args.checkpoint, bundle=args.bundle, device=dev)
    except TargetError as exc:
        raise CliError(str(exc)) from None
    images, labels = load_images(args.dataset, args.split, args.image_size or target.model.spec.input_size,
                                 args.limit)
    # 2. work
    meter = RuntimeMeter(target.bundle)
    t0 = time.perf_counter()
    with _progress(not args.no_progress) as prog:
        task = prog.add_task("clean", total=len(images))
        clean = evaluate_point(target, meter, images, labels, Perturbation(attack=AttackConfig(name="clean", eps=0.0)),
                               defences, seed=args.seed, batch=args.batch,
                               progress=lambda n: prog.advance(task, n))
        task2 = prog.add_task(f"{pert.threat} {pert.level}", total=len(images))
        res = evaluate_point(target, meter, images, labels, pert, defences, seed=args.seed,
                             indices=np.arange(len(images)), batch=args.batch, keep_inputs=True,
                             progress=lambda n: prog.advance(task2, n))
    wall = time.perf_counter() - t0
    base = clean.defended["none"].summary(labels)
    table, results = [], {"clean": {}, "attacked": {}}
    for which, r in (("clean", clean), ("attacked", res)):
        for label, m in r.defended.items():
            s = m.summary(labels)
            s["delta_bytes_pct"] = 100.0 * (s["bytes_mean"] / base["bytes_mean"] - 1.0)
            s["delta_top1_pt"] = 100.0 * (s["top1"] - base["top1"])
            results[which][label] = s | {"per_image": m.to_json()}
            name = "clean" if which == "clean" else f"{pert.threat} {pert.level}"
            table.append([name, label, s["bytes_mean"], f"{s['delta_bytes_pct']:+.1f}", s["surrogate_bytes_mean"],
                          100 * s["top1"], f"{s['delta_top1_pt']:+.1f}", s["edge_ms_p50"], s["defence_ms"]])
    checks: dict[str, Any] = {}
    if pert.attack is not None and pert.attack.name != "clean":
        a = res.attack
        checks["objective"] = a["objective"]
        checks["objective_clean_mean"] = a["clean_objective_mean"]
        checks["objective_attacked_mean"] = a["adv_objective_mean"]
        checks["loss_rose"] = a["loss_rose"]
        checks["linf_levels"] = a["linf_levels"]
        checks["linf_within_eps"] = a["linf_levels"] <= int(np.floor(pert.attack.eps * 255 + 1e-6))
        if pert.attack.name in ENTROPY_THREATS:
            checks["real_bytes_rose"] = results["attacked"]["none"]["bytes_mean"] > base["bytes_mean"]
    rich_table(f"{target.name} ({target.family}, β={target.beta}) — {len(images)} images of {args.dataset} "
               f"{args.split}", ["input", "defence", "bytes", "Δ %", "surrogate B", "top-1 %", "Δ top-1 pt",
                                 "edge ms p50", "defence ms/img"], table)
    if checks:
        print("checks: " + ", ".join(f"{k}={v}" for k, v in checks.items() if not k.startswith("objective_")))
        if checks.get("loss_rose") is False or checks.get("real_bytes_rose") is False:
            print("warning: the attack did not raise its objective / the real bytes on these images")
    report = {"target": target.describe(), "dataset": {"spec": args.dataset, "split": args.split,
                                                       "images": len(images)},
              "threat": pert.threat, "level": pert.level,
              "attack": {k: v for k, v in res.attack.items()}, "corruption": pert.corruption,
              "severity": pert.severity, "defences": [d.to_dict() for d in defences], "results": results,
              "checks": checks, "labels": labels.tolist(), "wall_s": wall, "seed": args.seed,
              "device": str(dev), "machine": machine_info()}
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    if args.save_inputs:
        path = Path(args.save_inputs)
        path.parent.mkdir(parents=True, exist_ok=True)
        assert res.inputs is not None
        np.savez_compressed(path, images=res.inputs, labels=labels,
                            clean_images=images, threat=pert.threat, level=pert.level)
        print(f"wrote {path} ({len(images)} attacked uint8 images)")
    return 0


def campaign_command(args: argparse.Namespace) -> int:
    from splitbits.attacks.campaign import CampaignError, current_points, load_campaign, plan_units, run_campaign
    from splitbits.attacks.report import write_report
    from splitbits.attacks.runner import TargetError
    from splitbits.runtime.report import write_json

    try:
        c = load_campaign(args.config)
    except CampaignError as exc:
        raise CliError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise CliError(f"{args.config}: not a text (YAML) file ({exc.reason} at byte {exc.start})") from None
    out = Path(args.out or c.config["out"] or Path("runs") / "campaigns" / c.config["name"])
    if args.report_only:
        db = out / "results.sqlite"
        if not db.is_file():
            raise CliError(f"no results in {out} (nothing to report)")
        files = write_report(db, out, title=c.config["name"], points=current_points(c),
                             defences={d.label for d in c.defences})
        print(f"wrote {files['markdown']} and {files['html']}")
        return 0
    units = plan_units(c)
    if args.dry_run:
        print(f"{c.config['name']}: {len(c.models)} model(s) × {len(c.points)} points × "
              f"{len(c.defences)} defence(s); {len(units)} units of ≤{c.config['chunk']} images → {out}")
        for p in c.points:
            print(f"  {p.threat:14s} {p.level}")
        return 0
    try:
        summary = run_campaign(c, out, fresh=args.fresh, shard=args.shard, device=args.device,
                               progress=not args.no_progress)
    except (CampaignError, TargetError, AttackConfigError) as exc:
        raise CliError(str(exc)) from None
    summary["machine"] = machine_info()
    write_json(out / f"run_rank{summary['rank']}.json", summary)
    print(f"campaign {c.config['name']}: computed {summary['computed']} units, skipped {summary['skipped']} "
          f"(stored), {summary['rows']} rows in {out / 'results.sqlite'}")
    if "report" in summary:
        print(f"report: {summary['report']['markdown']}, {summary['report']['html']}")
    return 0
