"""``splitbits demo``: train → export → run → attack → report, on the builtin dataset, end to end.

1. train the tiny teacher and the tiny MSHP (or FP) student (cached checkpoints are reused when
   their config is unchanged),
2. export the student to a verified bundle,
3. push every validation image through edge encode → packet → server decode on ONNX Runtime,
4. attack, corrupt and defend a subsample (a short version of a campaign, :func:`attack_section`):
   clean, PGD-E, PGD-Acc, sign noise (ε = 8/255) and two corruptions (shot noise and contrast,
   severity 3), each with and without the object-aware TV defence; bytes are real packets from the
   demo's bundle, top-1 from the server decoder; PGD uses fewer steps and EOT samples than the
   reference (20 and 16) to stay within about two minutes on a 2-core CPU, and the section says so,
5. write ``report.json``, ``report.md`` and plots: accuracy, bytes per image (real packets and the
   likelihood estimate side by side, plus JPEG q75 of the same images), latency per stage, attacks.

It lives in ``attacks``, the top layer, because it drives every package (trainer, export, runtime,
attacks).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitbits.attacks.defence import DefenceConfig
from splitbits.attacks.runner import RuntimeMeter, Target, evaluate_point, machine_info, to_tensor
from splitbits.attacks.threats import CLEAN, AttackConfig, ThreatPoint
from splitbits.runtime import packet as pkt
from splitbits.runtime.datasets import jpeg_size, load_arrays
from splitbits.runtime.pipeline import EdgeEncoder, IntHyper, ServerDecoder
from splitbits.runtime.progress import progress_bar
from splitbits.runtime.report import md_table, pyplot, rich_table, save, summary, write_json

log = logging.getLogger(__name__)

EDGE_STAGES = ("preprocess", "head", "quantize", "hyper", "encode", "packet")
SERVER_STAGES = ("parse", "decode", "hyper", "tail")

# the attack section: a short campaign on an evenly spaced subsample
DEMO_IMAGES = 48
DEMO_STEPS = 10
DEMO_EOT = 4
DEMO_EPS = 8 / 255
CORRUPTIONS = (("shot_noise", 3), ("contrast", 3))


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def run_demo(out: str | Path = "runs/demo", family: str = "mshp", fresh: bool = False, limit: int | None = None,
             attacks: bool = True, progress: bool = True, teacher_overrides: tuple[str, ...] = (),
             student_overrides: tuple[str, ...] = (), hyper: str = "auto") -> dict[str, Any]:
    """The whole demo; returns the report dict (also written to ``out/report.json``).

    ``hyper`` picks the MSHP hyper path of the edge encoder (``auto``: the bundle's integer path)."""
    from splitbits.export.bundle import export_bundle
    from splitbits.trainer.checkpoint import load_model

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    teacher_ckpt, student_ckpt, train_info = train_models(out, family, fresh, progress, tuple(teacher_overrides),
                                                          tuple(student_overrides))
    teacher, _ = load_model(teacher_ckpt)
    student, _ = load_model(student_ckpt)
    bundle_dir = out / f"bundle_{family}"
    exp = export_bundle(student, bundle_dir, overwrite=True, source=str(student_ckpt))

    images, labels = load_arrays("builtin", "val", student.spec.input_size, limit)
    tor = evaluate_torch(teacher, student, images, labels)
    run = evaluate_runtime(bundle_dir, images, labels, student, progress=progress, hyper=hyper)
    run["estimated_bytes"] = [b / 8 for b in tor["estimated_bits"]]
    run["jpeg_bytes"] = [jpeg_size(im) for im in images]
    acc = {"teacher (torch)": tor["teacher_top1"], "student (torch)": tor["student_torch_top1"],
           "student (runtime, packets)": run["top1"]}
    report: dict[str, Any] = {
        "dataset": {"name": "builtin", "split": "val", "images": len(images), "image_size": int(images.shape[1])},
        "family": family, "bundle": str(bundle_dir), "bundle_fingerprint": exp.manifest["fingerprint"],
        "accuracy": acc, "bytes": _bytes(run),
        "top1_agree_with_compressai_path": f"{run['top1_agree_with_compressai_path']}/{len(images)}",
        "latency_ms": _latency(run), "coder": run["coder"], "hyper": run["hyper"], "backend": run["backend"],
        "export_verification": exp.verification.to_dict(), "training": dict(train_info), "machine": machine_info(),
        "plots": _plots(out, run, acc),
    }
    if attacks:
        report["attacks"] = attack_section(student, bundle_dir, images, labels, out, progress=progress)
    report["wall_s"] = time.perf_counter() - t0
    write_json(out / "report.json", report)
    (out / "report.md").write_text(render_markdown(report))
    _print(report)
    return report


def _reusable(ckpt: Path, config: dict[str, Any], ignore: tuple[str, ...] = ()) -> bool:
    """A finished checkpoint trained with the same config (except ``ignore`` keys)."""
    if not ckpt.is_file():
        return False
    from splitbits.trainer.checkpoint import read_checkpoint
    from splitbits.trainer.config import config_diff

    try:
        ck = read_checkpoint(ckpt)
    except (ValueError, FileNotFoundError):
        return False
    if not ck.get("metrics", {}).get("finished"):
        return False
    return [d for d in config_diff(ck.get("config", {}), config) if d not in ignore] == []


def train_models(out: Path, family: str, fresh: bool, progress: bool, teacher_overrides: tuple[str, ...] = (),
                 student_overrides: tuple[str, ...] = ()) -> tuple[Path, Path, dict[str, Any]]:
    """Teacher and student checkpoints in ``out`` (trained or reused); returns their paths and info."""
    from splitbits.trainer.checkpoint import read_checkpoint
    from splitbits.trainer.config import load_config
    from splitbits.trainer.train import train_student, train_teacher

    info: dict[str, Any] = {}
    tcfg = load_config("tiny_teacher", teacher_overrides)
    teacher = out / "teacher.pt"
    trained_teacher = False
    if fresh or not _reusable(teacher, tcfg):
        log.info("training the teacher -> %s", teacher)
        t = time.perf_counter()
        train_teacher(tcfg, teacher, progress=progress)
        info["teacher_train_s"] = time.perf_counter() - t
        trained_teacher = True
    else:
        log.info("reusing %s", teacher)
    scfg = load_config(f"tiny_{family}", student_overrides)
    scfg["student"]["teacher"] = str(teacher)
    student = out / f"student_{family}.pt"
    if fresh or trained_teacher or not _reusable(student, scfg, ignore=("student.teacher",)):
        log.info("training the %s student -> %s", family, student)
        t = time.perf_counter()
        train_student(scfg, teacher, student, progress=progress)
        info["student_train_s"] = time.perf_counter() - t
    else:
        log.info("reusing %s", student)
    info["teacher_metrics"] = read_checkpoint(teacher)["metrics"]
    info["student_metrics"] = read_checkpoint(student)["metrics"]
    return teacher, student, info


@torch.no_grad()
def evaluate_torch(teacher: Any, student: Any, images: np.ndarray, labels: np.ndarray,
                   batch: int = 256) -> dict[str, Any]:
    """Teacher/student top-1 and the model's likelihood estimate of each image's bits."""
    t_ok = s_ok = 0
    est_bits: list[float] = []
    for i in range(0, len(images), batch):
        x = to_tensor(images[i:i + batch])
        y = torch.from_numpy(labels[i:i + batch])
        t_ok += int((teacher(x).argmax(1) == y).sum())
        out = student.forward_train(x, noise=False)
        s_ok += int((out["logits"].argmax(1) == y).sum())
        bits = sum((-torch.log2(v)).flatten(1).sum(1) for v in out["likelihoods"].values())
        est_bits += bits.tolist()
    n = len(images)
    return {"teacher_top1": t_ok / n, "student_torch_top1": s_ok / n, "estimated_bits": est_bits}


def evaluate_runtime(bundle: Path, images: np.ndarray, labels: np.ndarray, student: Any, warmup: int = 5,
                     progress: bool = True, hyper: str = "auto") -> dict[str, Any]:
    """Every image through EdgeEncoder → packet → ServerDecoder (ONNX Runtime), one at a time, beside
    the torch compress → decompress path of the same image."""
    enc, dec = EdgeEncoder(bundle, "onnxruntime", hyper=hyper), ServerDecoder(bundle, "onnxruntime")
    for img in images[:warmup]:
        dec.decode(enc.encode(img))
    packet_bytes, payload_bytes, ideal, edge_t, server_t, ref_bytes = [], [], [], [], [], []
    correct = agree = 0
    with progress_bar(len(images), "edge → packet → server", disabled=not progress) as bar:
        for i in range(len(images)):
            res = enc.analyze(images[i])
            d = dec.decode_full(res.packet)
            top1 = int(d.logits.argmax())
            correct += int(top1 == labels[i])
            packet_bytes.append(len(res.packet))
            payload_bytes.append(pkt.parse(res.packet, dec.expect).payload_bytes)
            ideal.append(sum(res.ideal_bits.values()) / 8)
            edge_t.append(res.timings_ms)
            server_t.append(d.timings_ms)
            ref = student.compress_reference(to_tensor(images[i:i + 1]))
            ref_bytes.append(sum(len(s) for strings in ref["strings"] for s in strings))
            ref_logits = student.decompress_reference(ref["strings"], ref["shape"])
            agree += int(ref_logits.argmax(1).item() == top1)
            bar.advance()
    return {
        "top1": correct / len(images),
        "top1_agree_with_compressai_path": agree,
        "packet_bytes": packet_bytes,
        "payload_bytes": payload_bytes,
        "ideal_bytes": ideal,
        "compressai_bytes": ref_bytes,
        "header_bytes": max(p - q for p, q in zip(packet_bytes, payload_bytes)),
        "edge_ms": {s: [t.get(s, 0.0) for t in edge_t] for s in EDGE_STAGES if any(s in t for t in edge_t)},
        "server_ms": {s: [t.get(s, 0.0) for t in server_t] for s in SERVER_STAGES if any(s in t for t in server_t)},
        "coder": enc.coder.name,
        "hyper": None if enc.hyper is None else ("int" if isinstance(enc.hyper, IntHyper) else "float"),
        "backend": enc.backend.describe(),
    }


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _bytes(run: dict[str, Any]) -> dict[str, Any]:
    """Bytes per image: real packets and their payload beside the estimates, compressai and JPEG q75."""
    pb, cb = np.asarray(run["packet_bytes"]), np.asarray(run["compressai_bytes"])
    payload = np.asarray(run["payload_bytes"])
    return {
        "real_packet": summary(pb),
        "payload": summary(payload),
        "estimate_likelihood": summary(run["estimated_bytes"]),
        "ideal_under_tables": summary(run["ideal_bytes"]),
        "compressai_strings": summary(cb),
        "jpeg_q75": summary(run["jpeg_bytes"]),
        "header_bytes": run["header_bytes"],
        "payload_vs_compressai": {"mean_ratio": float(payload.sum() / cb.sum()),
                                  "max_excess_bytes": int((payload - cb).max()),
                                  "within_1pct_16B": bool(((payload <= cb * 1.01 + 16)).all())},
        "packets_smaller_than_jpeg": float((pb < np.asarray(run["jpeg_bytes"])).mean()),
    }


def _latency(run: dict[str, Any]) -> dict[str, Any]:
    """Percentiles per stage and of the edge and server totals (ms)."""
    return {"edge": {k: summary(v) for k, v in run["edge_ms"].items()},
            "server": {k: summary(v) for k, v in run["server_ms"].items()},
            "edge_total": summary(np.sum(list(run["edge_ms"].values()), axis=0)),
            "server_total": summary(np.sum(list(run["server_ms"].values()), axis=0))}


def _plots(out: Path, r: dict[str, Any], acc: dict[str, float]) -> dict[str, str]:
    """bytes.png, latency.png and accuracy.png in ``out``; returns their file names by key."""
    plt = pyplot()
    files = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    series = [("real packets", r["packet_bytes"]), ("estimate −Σlog₂p / 8", r["estimated_bytes"]),
              ("JPEG q75 (same image)", r["jpeg_bytes"])]
    hi = np.percentile(np.concatenate([np.asarray(v) for _, v in series]), 99.5)
    bins = np.linspace(0, hi, 60)
    for name, v in series:
        ax.hist(v, bins=bins, alpha=0.55, label=f"{name}: median {np.median(v):.0f} B")
    ax.set_xlabel("bytes per image")
    ax.set_ylabel("images")
    ax.set_title("Bytes per image (builtin val)")
    ax.legend()
    files["bytes"] = save(fig, out / "bytes.png").name

    fig, ax = plt.subplots(figsize=(7, 4))
    labels, p50, p90, colors = [], [], [], []
    for side, key, col in (("edge", "edge_ms", "tab:blue"), ("server", "server_ms", "tab:orange")):
        for stage, vals in r[key].items():
            labels.append(f"{side}: {stage}")
            p50.append(np.percentile(vals, 50))
            p90.append(np.percentile(vals, 90))
            colors.append(col)
    y = np.arange(len(labels))
    ax.barh(y, p50, color=colors, xerr=[np.zeros(len(p50)), np.asarray(p90) - np.asarray(p50)], capsize=3)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("ms per image (bar: p50, whisker: p90)")
    ax.set_title("Latency per stage (ONNX Runtime, CPU)")
    files["latency"] = save(fig, out / "latency.png").name

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(acc)
    ax.bar(names, [100 * acc[k] for k in names], color=["tab:gray", "tab:green", "tab:blue"][: len(names)])
    for i, k in enumerate(names):
        ax.text(i, 100 * acc[k] + 0.5, f"{100 * acc[k]:.1f}", ha="center")
    ax.set_ylim(0, 105)
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("Accuracy")
    files["accuracy"] = save(fig, out / "accuracy.png").name
    return files


def render_markdown(r: dict[str, Any]) -> str:
    """``report.md`` of a demo report."""
    b, lat = r["bytes"], r["latency_ms"]
    lines = [
        f"# splitbits demo — tiny {r['family'].upper()} student on builtin",
        "",
        f"{r['dataset']['images']} validation images ({r['dataset']['image_size']}×{r['dataset']['image_size']}), "
        f"bundle `{r['bundle']}` (fingerprint `{r['bundle_fingerprint'][:16]}`), coder `{r['coder']}`"
        + (f", hyper path `{r['hyper']}`" if r.get("hyper") else "") + ", "
        f"backend {r['backend'].get('backend')}.",
        "",
        "## Accuracy",
        md_table(["model", "val top-1 (%)"], [(k, 100 * v) for k, v in r["accuracy"].items()]),
        "",
        f"Runtime top-1 equals the torch compress→decompress path on {r['top1_agree_with_compressai_path']} images.",
        "",
        "## Bytes per image",
        "Real sizes are `len()` of the packets; the estimate is −Σlog₂p of the model's likelihoods.",
        "",
        md_table(["", "mean", "median", "p90"], [
            (name, b[key]["mean"], b[key]["p50"], b[key]["p90"]) for name, key in (
                ("real packet (incl. header)", "real_packet"), ("payload (entropy-coded)", "payload"),
                ("estimate (model likelihood)", "estimate_likelihood"),
                ("ideal under exported tables", "ideal_under_tables"),
                ("compressai compress() strings", "compressai_strings"), ("JPEG q75 of the image", "jpeg_q75"))
        ]),
        "",
        f"Packet header: {b['header_bytes']} bytes. Payload / compressai = "
        f"{b['payload_vs_compressai']['mean_ratio']:.4f} "
        f"(max excess {b['payload_vs_compressai']['max_excess_bytes']} B; within 1 % + 16 B on every image: "
        f"{b['payload_vs_compressai']['within_1pct_16B']}). "
        f"Packets smaller than JPEG q75 on {100 * b['packets_smaller_than_jpeg']:.1f} % of images.",
        "",
        f"![bytes]({r['plots']['bytes']})",
        "",
        "## Latency per stage (ms, one image at a time)",
        md_table(["stage", "p50", "p90", "p99"], [
            (f"{side}: {k}", v["p50"], v["p90"], v["p99"])
            for side in ("edge", "server") for k, v in lat[side].items()
        ] + [("edge total", lat["edge_total"]["p50"], lat["edge_total"]["p90"], lat["edge_total"]["p99"]),
             ("server total", lat["server_total"]["p50"], lat["server_total"]["p90"], lat["server_total"]["p99"])]),
        "",
        f"![latency]({r['plots']['latency']})",
        "",
        f"![accuracy]({r['plots']['accuracy']})",
        "",
    ]
    if "attacks" in r and r["attacks"].get("markdown"):
        lines += [r["attacks"]["markdown"], ""]
    lines.append(f"Machine: {r['machine']['platform']}; total demo wall time {r['wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def _print(r: dict[str, Any]) -> None:
    """The headline figures on the terminal."""
    b = r["bytes"]
    rows = [(k, f"{100 * v:.1f} %") for k, v in r["accuracy"].items()]
    rows += [(f"bytes/image {name} (mean / median / p90)",
              f"{b[key]['mean']:.0f} / {b[key]['p50']:.0f} / {b[key]['p90']:.0f}")
             for name, key in (("real packet", "real_packet"), ("estimate", "estimate_likelihood"),
                               ("JPEG q75", "jpeg_q75"))]
    lat = r["latency_ms"]
    rows += [("edge latency p50 / p90 (ms)", f"{lat['edge_total']['p50']:.2f} / {lat['edge_total']['p90']:.2f}"),
             ("server latency p50 / p90 (ms)",
              f"{lat['server_total']['p50']:.2f} / {lat['server_total']['p90']:.2f}")]
    rich_table(f"splitbits demo ({r['dataset']['images']} builtin val images, {r['family']})", ["", "value"], rows)


# --------------------------------------------------------------------------------------------
# The attack section
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode without parameter gradients for the block; both restored after."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


def _subsample(labels: np.ndarray, n: int) -> np.ndarray:
    """Evenly spaced indices (the builtin labels cycle through the classes, so this stays balanced)."""
    if len(labels) <= n:
        return np.arange(len(labels))
    return np.linspace(0, len(labels) - 1, n).round().astype(np.int64)


def attack_section(student: Any, bundle_dir: str | Path, images: np.ndarray, labels: np.ndarray, out: str | Path,
                   progress: bool = True, n_images: int = DEMO_IMAGES, steps: int = DEMO_STEPS,
                   eot: int = DEMO_EOT) -> dict[str, Any]:
    """Run the short attack/defence/corruption study; returns a JSON-able dict with a ``markdown`` key."""
    t0 = time.perf_counter()
    idx = _subsample(labels, n_images)
    rows = _attack_rows(student, Path(bundle_dir), images[idx], labels[idx], idx, steps, eot, progress)
    png = _attack_plot(rows, Path(out) / "attacks.png")
    seconds = time.perf_counter() - t0
    table = md_table(
        ["input", "bytes", "Δ %", "top-1 %", "+OATV bytes", "Δ % vs clean", "+OATV top-1 %"],
        [(r["input"], r["none"]["bytes"], f"{r['none']['delta_pct']:+.1f}", 100 * r["none"]["top1"],
          r["oatv"]["bytes"], f"{r['oatv']['delta_pct']:+.1f}", 100 * r["oatv"]["top1"]) for r in rows])
    od = DefenceConfig(name="oatv")
    md = "\n".join([
        "## Attacks, corruptions and the object-aware TV defence",
        "",
        f"{len(idx)} validation images (evenly subsampled); real packet bytes (mean) and server top-1. "
        f"PGD uses {steps} steps and EOT {eot} (the reference uses 20 and 16; shortened to fit the demo), "
        f"schedule `{AttackConfig(name='pgd-e').schedule}` (adaptive step from 2ε with momentum, halving "
        f"and restart from the best point, best coded rate kept); PGD-Acc uses straight-through rounding. Defence: "
        f"{od.iterations} iterations, λ={od.lam}, α={od.alpha}, mask from the entropy model's likelihood "
        f"map ({rows[1]['oatv']['defence_ms']:.1f} ms/image here). Run `splitbits campaign` for full grids.",
        "",
        table,
        "",
        f"![attacks]({png.name})",
        "",
        f"(section wall time {seconds:.0f} s)",
    ])
    return {"images": len(idx), "steps": steps, "eot": eot, "eps": "8/255", "defence": od.to_dict(),
            "rows": rows, "plot": png.name, "seconds": seconds, "markdown": md}


def _attack_rows(student: Any, bundle_dir: Path, imgs: np.ndarray, labs: np.ndarray, idx: np.ndarray, steps: int,
                 eot: int, progress: bool) -> list[dict[str, Any]]:
    """One row per input (clean, PGD-E, PGD-Acc, noise, the corruptions): mean real bytes, surrogate
    bytes, top-1 and Δ against clean, without defence (``none``) and with OATV (``oatv``)."""
    points: list[tuple[str, ThreatPoint]] = [
        ("clean", CLEAN),
        ("PGD-E ε=8/255", ThreatPoint(attack=AttackConfig(name="pgd-e", eps=DEMO_EPS, steps=steps, eot=eot))),
        ("PGD-Acc ε=8/255", ThreatPoint(attack=AttackConfig(name="pgd-acc", eps=DEMO_EPS, steps=steps, eot=1))),
        ("noise ±8/255", ThreatPoint(attack=AttackConfig(name="noise", eps=DEMO_EPS))),
        *[(f"{c} (severity {s})", ThreatPoint(corruption=c, severity=s)) for c, s in CORRUPTIONS],
    ]
    defences = [DefenceConfig(name="none"), DefenceConfig(name="oatv")]
    meter = RuntimeMeter(bundle_dir)
    target = Target(student, bundle_dir, None, student.family, None, "demo student")
    rows: list[dict[str, Any]] = []
    with _frozen(student), progress_bar(len(points) * len(imgs), "attacks/defence/corruptions",
                                        disabled=not progress) as bar:
        for name, point in points:
            r = evaluate_point(target, meter, imgs, labs, point, defences, seed=0, indices=idx, batch=len(imgs),
                               progress=bar.advance)
            row: dict[str, Any] = {"input": name, "threat": point.threat, "level": point.level,
                                   "objective_rose": r.attack.get("loss_rose")}
            for label, m in r.defended.items():
                s = m.summary(labs)
                row[label] = {"bytes": s["bytes_mean"], "surrogate_bytes": s["surrogate_bytes_mean"],
                              "top1": s["top1"], "defence_ms": s["defence_ms"]}
            rows.append(row)
    clean = rows[0]["none"]
    for row in rows:
        for label in ("none", "oatv"):
            row[label]["delta_pct"] = 100.0 * (row[label]["bytes"] / clean["bytes"] - 1.0)
            row[label]["delta_top1_pt"] = 100.0 * (row[label]["top1"] - clean["top1"])
    return rows


def _attack_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Mean real bytes per input, without and with OATV, Δ % against clean on the bars."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    x = np.arange(len(rows))
    w = 0.38
    ax.bar(x - w / 2, [r["none"]["bytes"] for r in rows], w, label="no defence", color="tab:red")
    ax.bar(x + w / 2, [r["oatv"]["bytes"] for r in rows], w, label="object-aware TV", color="tab:blue")
    ax.axhline(rows[0]["none"]["bytes"], color="k", lw=0.8, ls=":", label="clean")
    for i, r in enumerate(rows):
        ax.text(i - w / 2, r["none"]["bytes"], f"{r['none']['delta_pct']:+.0f}%", ha="center", va="bottom",
                fontsize=7)
        ax.text(i + w / 2, r["oatv"]["bytes"], f"{r['oatv']['delta_pct']:+.0f}%", ha="center", va="bottom",
                fontsize=7)
    ax.set_xticks(x, [r["input"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("real bytes per image (mean)")
    ax.set_title("Packet size under attack / corruption, with and without defence")
    ax.legend(fontsize=8)
    return save(fig, path)
