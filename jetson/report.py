"""``splitbits report RESULTS...``: compare bench/send results side by side.

Reads the JSON of ``splitbits bench`` (schema ``splitbits.bench/1``) and ``splitbits send``
(``splitbits.send/1``) — files or directories of them — and writes Markdown and HTML tables plus
plots that put devices, backends, precisions and inputs (clean, corrupted, attacked) next to each
other: accuracy, bytes per image (and the change against the matching clean run), per-stage p50
latency, end-to-end p50/p99, throughput, transmit time at 1/10/100 Mbit/s, power and energy.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from splitbits.runtime.errors import SplitbitsError
from splitbits.runtime.report import fmt, md_table

log = logging.getLogger(__name__)
SCHEMAS = ("splitbits.bench/1", "splitbits.send/1")
STAGE_ORDER = ("edge.preprocess", "edge.head", "edge.quantize", "edge.hyper", "edge.encode", "link.transmit",
               "link.send", "server.decode", "server.hyper", "server.queue", "server.tail")
RATES = ("1", "10", "100")


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every bench/send JSON among ``paths`` (directories are searched for ``*.json``), each checked
    by :func:`check_result`; other JSON files are skipped with a warning."""
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("**/*.json")) if p.is_dir() else [p])
    out = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError (not a text file)
            log.warning("skipping %s: %s", f, exc)
            continue
        if not isinstance(data, dict) or data.get("schema") not in SCHEMAS:
            log.warning("skipping %s: not a splitbits bench/send result", f)
            continue
        data["_file"] = str(f)
        check_result(data)
        out.append(data)
    return out


_OBJECTS = ("device", "backend", "inputs", "bundle", "link", "latency_ms", "throughput", "power", "accuracy")


class ResultError(SplitbitsError):
    """A bench/send result file whose keys the report reads have the wrong types."""


def check_result(r: dict[str, Any]) -> None:
    """The keys the report reads, with their types: a result file is input like any other, so a
    malformed one is a :class:`ResultError` naming the file and the key, not a crash in a table."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ResultError(f"{r.get('_file', '?')}: not a valid bench/send result: {what}")

    def number(v: Any) -> bool:
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))

    for key in _OBJECTS:
        need(isinstance(r.get(key) or {}, dict), f"{key} must be an object")
    lat = r.get("latency_ms") or {}
    need(all(isinstance(v, dict) and all(map(number, v.values())) for v in lat.values()),
         "latency_ms must map stages to {p50, p99, ...} numbers")
    for key in ("throughput", "accuracy"):
        need(all(map(number, (r.get(key) or {}).values())), f"{key} values must be numbers")
    power = r.get("power") or {}
    need(number(power.get("mean_power_w")) and number(power.get("energy_per_image_mj"))
         and isinstance(power.get("power_mode") or {}, dict), "power must hold numbers and a power_mode object")
    model_ms = (r.get("link") or {}).get("model_ms", {})
    need(isinstance(model_ms, dict) and all(map(number, model_ms.values())), "link.model_ms must map rates to ms")
    if "bytes" in r:
        b = r["bytes"]
        mean = b.get("packet", {}).get("mean") if isinstance(b, dict) and isinstance(b.get("packet"), dict) else None
        need(mean is not None and number(mean), "bytes.packet.mean must be a number")


def precision_of(backend: dict[str, Any]) -> str:
    """``head=fp16,hyper=fp32,tail=fp16`` → ``fp16``; ONNX Runtime → ``fp32``."""
    p = str(backend.get("precision") or "")
    if "=" in p:
        vals = {kv.split("=", 1)[1] for kv in p.split(",") if "=" in kv}
        low = [v for v in ("int8", "fp16") if v in vals]
        return low[0] if low else "fp32"
    return p if p and p != "auto" else "fp32"


def _device(r: dict[str, Any]) -> str:
    d = r.get("device") or {}
    return str(d.get("name") or d.get("hostname") or "?")


def _is_clean(r: dict[str, Any]) -> bool:
    inp = r.get("inputs") or {}
    return not inp.get("attack") and not inp.get("inputs_file")


def _group_key(r: dict[str, Any]) -> tuple:
    b = r.get("backend") or {}
    return (r.get("schema"), (r.get("bundle") or {}).get("fingerprint"), _device(r), b.get("backend"),
            precision_of(b), (r.get("link") or {}).get("emulated_mbps"))


def _p(r: dict[str, Any], stage: str, q: str = "p50") -> float:
    v = (r.get("latency_ms") or {}).get(stage)
    return float(v[q]) if v and v.get(q) is not None else math.nan


def rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One comparable row per successful run (refused runs are listed separately)."""
    ok = [r for r in results if r.get("status", "ok") == "ok" and "bytes" in r]
    clean = {_group_key(r): r for r in ok if _is_clean(r)}
    out = []
    for r in ok:
        b = r.get("backend") or {}
        mean_bytes = float(r["bytes"]["packet"]["mean"])
        ref = clean.get(_group_key(r))
        delta = None
        if ref is not None and ref is not r:
            ref_bytes = float(ref["bytes"]["packet"]["mean"])
            delta = (mean_bytes - ref_bytes) / ref_bytes * 100 if ref_bytes else None
        power = r.get("power") or {}
        thr = r.get("throughput") or {}
        acc = (r.get("accuracy") or {}).get("top1")
        out.append({
            "run": Path(r["_file"]).stem if "_file" in r else "?",
            "kind": "send" if r["schema"].startswith("splitbits.send") else "bench",
            "device": _device(r),
            "backend": str(b.get("backend", "?")),
            "precision": precision_of(b),
            "inputs": (r.get("inputs") or {}).get("name", "?"),
            "images": r.get("images"),
            "top1": acc if acc is not None else math.nan,
            "bytes": mean_bytes,
            "delta_bytes_pct": delta if delta is not None else math.nan,
            "e2e_p50": _p(r, "end_to_end"),
            "e2e_p99": _p(r, "end_to_end", "p99"),
            "throughput": thr.get("end_to_end_images_per_s", thr.get("images_per_s")) or math.nan,
            "tx_ms": {k: (r.get("link") or {}).get("model_ms", {}).get(k, math.nan) for k in RATES},
            "stages": {s: _p(r, s) for s in STAGE_ORDER if s in (r.get("latency_ms") or {})},
            "power_w": power.get("mean_power_w", math.nan) if power.get("available") else math.nan,
            "energy_mj": power.get("energy_per_image_mj", math.nan) if power.get("available") else math.nan,
            "power_mode": ((power.get("power_mode") or {}).get("name") if power.get("available") else None) or "–",
        })
    return out


def refused(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [[Path(r.get("_file", "?")).stem, _device(r), str((r.get("backend") or {}).get("backend")),
             str(r.get("reason", "refused"))] for r in results if r.get("status") == "refused"]


def tables(rs: list[dict[str, Any]]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The report's tables as (headers, rows)."""
    runs = (["run", "kind", "device", "backend", "precision", "inputs", "images", "top-1", "bytes/img", "Δ bytes %",
             "e2e p50 ms", "e2e p99 ms", "img/s", "W", "mJ/img", "power mode"],
            [[r["run"], r["kind"], r["device"], r["backend"], r["precision"], r["inputs"], r["images"], r["top1"],
              r["bytes"], r["delta_bytes_pct"], r["e2e_p50"], r["e2e_p99"], r["throughput"], r["power_w"],
              r["energy_mj"], r["power_mode"]] for r in rs])
    stages = [s for s in STAGE_ORDER if any(s in r["stages"] for r in rs)]
    lat = (["run", *[f"{s} p50" for s in stages]],
           [[r["run"], *[r["stages"].get(s, math.nan) for s in stages]] for r in rs])
    link = (["run", "inputs", "bytes/img", "Δ bytes %", *[f"{k} Mbit/s ms" for k in RATES]],
            [[r["run"], r["inputs"], r["bytes"], r["delta_bytes_pct"], *[r["tx_ms"][k] for k in RATES]] for r in rs])
    return {"Runs": runs, "Per-stage latency (p50, ms)": lat, "Link: transmit time of the measured bytes": link}


def markdown(results: Sequence[dict[str, Any]]) -> str:
    rs = rows(results)
    parts = ["# splitbits results", ""]
    for title, (headers, body) in tables(rs).items():
        parts += [f"## {title}", "", md_table(headers, body), ""]
    bad = refused(results)
    if bad:
        parts += ["## Refused runs (failed golden verification: no numbers)", "",
                  md_table(["run", "device", "backend", "reason"], bad), ""]
    parts.append("Bytes are `len()` of real packets; transmit times are bytes·8/rate; Δ bytes is against the "
                 "clean run of the same bundle, device, backend and precision.")
    return "\n".join(parts) + "\n"


def html_report(results: Sequence[dict[str, Any]], images: Sequence[str] = ()) -> str:
    rs = rows(results)
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>splitbits results</title>",
           "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
           "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}"
           "td:first-child,th:first-child{text-align:left}</style></head><body><h1>splitbits results</h1>"]
    all_tables = tables(rs)
    bad = refused(results)
    if bad:
        all_tables["Refused runs (failed golden verification)"] = (["run", "device", "backend", "reason"], bad)
    for title, (headers, body) in all_tables.items():
        out.append(f"<h2>{html.escape(title)}</h2><table><tr>"
                   + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>")
        for row in body:
            out.append("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>")
        out.append("</table>")
    for img in images:
        out.append(f"<p><img src='{html.escape(img)}' style='max-width:100%'></p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def plots(results: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """latency.png (stacked p50 per stage), bytes.png, link.png (transmit time vs link rate)."""
    from splitbits.runtime.report import pyplot, save

    rs = rows(results)
    if not rs:
        return []
    plt = pyplot()
    written = []
    labels = [r["run"] for r in rs]
    stages = [s for s in STAGE_ORDER if any(s in r["stages"] for r in rs)]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rs)), 4))
    bottom = [0.0] * len(rs)
    for s in stages:
        vals = [0.0 if math.isnan(r["stages"].get(s, math.nan)) else r["stages"].get(s, 0.0) for r in rs]
        ax.bar(labels, vals, bottom=bottom, label=s)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("p50 latency per stage (ms)")
    ax.legend(fontsize=7, ncol=2)
    ax.tick_params(axis="x", rotation=30, labelsize=7)
    written.append(save(fig, out_dir / "latency.png"))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rs)), 4))
    ax.bar(labels, [r["bytes"] for r in rs], color="tab:orange")
    ax.set_ylabel("bytes per image")
    ax.tick_params(axis="x", rotation=30, labelsize=7)
    written.append(save(fig, out_dir / "bytes.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    rates = [float(k) for k in RATES]
    for r in rs:
        ax.plot(rates, [r["tx_ms"][k] for k in RATES], marker="o", label=f"{r['run']} ({r['inputs']})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link rate (Mbit/s)")
    ax.set_ylabel("transmit time per image (ms)")
    ax.legend(fontsize=7)
    written.append(save(fig, out_dir / "link.png"))
    return written


def write_report(paths: Iterable[str | Path], out_dir: str | Path, formats: Sequence[str] = ("md", "html"),
                 with_plots: bool = True) -> dict[str, Any]:
    results = load_results(paths)
    if not results:
        raise ValueError("no splitbits bench/send results found")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    imgs = plots(results, out) if with_plots else []
    files += imgs
    if "md" in formats:
        text = markdown(results)
        if imgs:
            text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in imgs) + "\n"
        (out / "report.md").write_text(text)
        files.append(out / "report.md")
    if "html" in formats:
        (out / "report.html").write_text(html_report(results, [p.name for p in imgs]))
        files.append(out / "report.html")
    return {"results": len(results), "files": [str(f) for f in files]}
