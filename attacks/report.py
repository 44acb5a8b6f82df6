"""Campaign reports: aggregate the stored rows, write Markdown + HTML tables and PNG plots.

Per (model, threat, level, defence) the chunks are pooled (per-image values concatenated):
real bytes (mean of ``len(packet)``), Δ% against the same model's clean images *without* defence,
the surrogate −Σlog₂p/8, server top-1 on the packets, Δ top-1 in points, edge latency p50 and the
defence's own time per image. Plots follow the paper: bytes vs ε per threat, accuracy vs ε, and
Δ bytes per corruption × severity.
"""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from splitbits.runtime.report import fmt, md_table, pyplot, save, write_json

SUMMARY_HEADERS = ["model", "threat", "ε / corruption", "defence", "n", "bytes", "Δ bytes %", "surrogate B",
                   "top-1 %", "Δ top-1 pt", "edge ms p50", "defence ms/img", "loss rose"]


def point_of(row: dict[str, Any]) -> str:
    """``model_id|point key`` of a stored row (its unit key without the chunk)."""
    return str(row["unit_key"]).rsplit("|chunk", 1)[0]


def aggregate(rows: list[dict[str, Any]], points: set[str] | None = None,
              defences: set[str] | None = None) -> list[dict[str, Any]]:
    """Pool chunk rows into one record per (model, grid point, defence), with Δ against clean.

    ``points`` (``model_id|point key`` strings) keeps only the rows of the current config, so rows
    left by an earlier config with other attack parameters in the same store are not mixed in;
    ``defences`` (labels) likewise.
    """
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if (points is None or point_of(r) in points) and (defences is None or r["defence"] in defences):
            groups[(r["model_id"], point_of(r), r["threat"], r["level"], r["defence"])].append(r)
    recs = []
    for (mid, _point, threat, level, defence), rs in groups.items():
        data = [json.loads(r["data"]) for r in rs]
        b = np.concatenate([d["bytes"] for d in data]).astype(np.float64)
        s = np.concatenate([d["surrogate_bytes"] for d in data]).astype(np.float64)
        preds = np.concatenate([d["preds"] for d in data])
        labels = np.concatenate([d["labels"] for d in data])
        edge = np.concatenate([d["edge_ms"] for d in data])
        rose = [r["loss_rose"] for r in rs if r["loss_rose"] is not None]
        n = int(b.size)
        recs.append({
            "model_id": mid, "model": rs[0]["model"], "family": rs[0]["family"], "beta": rs[0]["beta"],
            "threat": threat, "level": level, "eps": rs[0]["eps"], "corruption": rs[0]["corruption"],
            "severity": rs[0]["severity"], "defence": defence, "n": n, "chunks": len(rs),
            "bytes": float(b.mean()) if n else math.nan, "bytes_p50": float(np.median(b)) if n else math.nan,
            "surrogate_bytes": float(s.mean()) if n else math.nan,
            "top1": float((preds == labels).mean()) if n else math.nan,
            "edge_ms_p50": float(np.median(edge)) if n else math.nan,
            "defence_ms": float(np.mean([r["defence_ms"] or 0.0 for r in rs])),
            "attack_s": float(np.sum([r["attack_s"] or 0.0 for r in rs])),
            "objective": rs[0]["objective"],
            "objective_clean": float(np.mean([r["objective_clean"] for r in rs])) if rs[0]["objective_clean"]
            is not None else None,
            "objective_adv": float(np.mean([r["objective_adv"] for r in rs])) if rs[0]["objective_adv"]
            is not None else None,
            "loss_rose": (all(bool(x) for x in rose)) if rose else None,
        })
    clean = {r["model_id"]: r for r in recs if r["threat"] == "clean" and r["defence"] == "none"}
    for r in recs:
        c = clean.get(r["model_id"])
        r["delta_bytes_pct"] = 100.0 * (r["bytes"] / c["bytes"] - 1.0) if c else math.nan
        r["delta_top1_pt"] = 100.0 * (r["top1"] - c["top1"]) if c else math.nan
        r["clean_bytes"] = c["bytes"] if c else math.nan
    order = {"clean": 0, "pgd-e": 1, "pgd-acc": 2, "noise": 3, "pgd-e-lowfreq": 4, "pgd-e-region": 5,
             "pgd-e-bpda": 6, "corruption": 7}
    recs.sort(key=lambda r: (r["model"], r["model_id"], order.get(r["threat"], 9), r["eps"] or 0.0,
                             r["corruption"] or "", r["severity"] or 0, r["defence"] != "none", r["defence"]))
    return recs


def _pct(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.1f}"


def summary_rows(recs: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    for r in recs:
        rose = "" if r["loss_rose"] is None else ("yes" if r["loss_rose"] else "**no**")
        out.append([f"{r['model']} ({r['family']}, β={r['beta']})", r["threat"], r["level"], r["defence"], r["n"],
                    r["bytes"], _pct(r["delta_bytes_pct"]), r["surrogate_bytes"], 100 * r["top1"],
                    _pct(r["delta_top1_pt"]), r["edge_ms_p50"], r["defence_ms"], rose])
    return out


def paper_rows(recs: list[dict[str, Any]], defence: str) -> list[list[Any]]:
    """Paper-style: clean / attacked / defended bytes side by side for one defence."""
    by = {(r["model_id"], r["threat"], r["level"], r["defence"]): r for r in recs}
    out = []
    for r in recs:
        if r["defence"] != "none":
            continue
        d = by.get((r["model_id"], r["threat"], r["level"], defence))
        out.append([r["model"], r["threat"], r["level"], r["clean_bytes"], r["bytes"], _pct(r["delta_bytes_pct"]),
                    100 * r["top1"], d["bytes"] if d else math.nan, _pct(d["delta_bytes_pct"]) if d else "–",
                    100 * d["top1"] if d else math.nan])
    return out


def plots(recs: list[dict[str, Any]], out: Path) -> dict[str, str]:
    """bytes_vs_eps.png, accuracy_vs_eps.png, corruptions.png (only those with data)."""
    plt = pyplot()
    files: dict[str, str] = {}
    models = sorted({(r["model"], r["model_id"]) for r in recs})
    eps_recs = [r for r in recs if r["threat"] not in ("clean", "corruption")]
    if eps_recs:
        for key, ylabel, fname in (("bytes", "real bytes per image (mean)", "bytes_vs_eps.png"),
                                   ("top1", "server top-1 (%)", "accuracy_vs_eps.png")):
            fig, axes = plt.subplots(1, len(models), figsize=(8.5 * len(models), 4.4), squeeze=False)
            for ax, (mname, mid) in zip(axes[0], models):
                mine = [r for r in eps_recs if r["model_id"] == mid]
                clean = [r for r in recs if r["model_id"] == mid and r["threat"] == "clean"]
                threats = sorted({r["threat"] for r in mine})
                defs = sorted({r["defence"] for r in recs if r["model_id"] == mid}, key=lambda d: (d != "none", d))
                styles = {d: ls for d, ls in zip(defs, ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3))] * 4)}
                for threat, defence in sorted({(r["threat"], r["defence"]) for r in mine}):
                    pts = sorted((r["eps"] * 255, r[key]) for r in mine if r["threat"] == threat
                                 and r["defence"] == defence)
                    xs, ys = zip(*pts)
                    ys = [100 * y for y in ys] if key == "top1" else ys
                    ax.plot(xs, ys, marker="o", color=f"C{threats.index(threat) % 10}", ls=styles[defence],
                            label=f"{threat}" + ("" if defence == "none" else f" + {defence}"))
                for c in clean:
                    v = 100 * c[key] if key == "top1" else c[key]
                    ax.axhline(v, color="k", lw=0.8, ls=styles.get(c["defence"], "-"),
                               label="clean" + ("" if c["defence"] == "none" else f" + {c['defence']}"))
                ax.set_xscale("log", base=2)
                ax.set_xlabel("ε (×1/255)")
                ax.set_ylabel(ylabel)
                ax.set_title(mname)
                ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
            files[key] = save(fig, out / fname).name
    cor = [r for r in recs if r["threat"] == "corruption"]
    if cor:
        defs = sorted({r["defence"] for r in cor}, key=lambda d: (d != "none", d))
        panels = [(m, d) for m in models for d in defs]
        names = sorted({r["corruption"] for r in cor})
        sevs = sorted({r["severity"] for r in cor})
        fig, axes = plt.subplots(1, len(panels), figsize=(max(5, 0.9 * len(sevs) + 3) * len(panels),
                                                          0.38 * len(names) + 1.8), squeeze=False)
        deltas = [abs(r["delta_bytes_pct"]) for r in cor if np.isfinite(r["delta_bytes_pct"])]
        lim = max([1.0, *deltas])  # one colour scale for every panel
        for ax, ((mname, mid), d) in zip(axes[0], panels):
            grid = np.full((len(names), len(sevs)), np.nan)
            for r in cor:
                if r["model_id"] == mid and r["defence"] == d:
                    grid[names.index(r["corruption"]), sevs.index(r["severity"])] = r["delta_bytes_pct"]
            im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
            for i in range(len(names)):
                for j in range(len(sevs)):
                    if np.isfinite(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:+.0f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(sevs)), [str(s) for s in sevs])
            ax.set_yticks(range(len(names)), names)
            ax.set_xlabel("severity")
            ax.set_title(f"{mname}: Δ bytes % vs clean" + ("" if d == "none" else f" (+ {d})"), fontsize=9)
            fig.colorbar(im, ax=ax, shrink=0.8)
        files["corruptions"] = save(fig, out / "corruptions.png").name
    return files


def _html_table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c)).replace('**', '')}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


PAPER_HEADERS = ["model", "threat", "ε / corruption", "clean B", "attacked B", "Δ %", "top-1 %", "defended B",
                 "Δ % vs clean", "defended top-1 %"]


PUBLISHED_KEYS = ("model", "family", "beta", "threat", "level", "defence", "clean_kb", "attacked_kb", "delta_pct",
                  "top1")
PUBLISHED_HEADERS = ["model", "family", "β", "threat", "ε / corruption", "defence", "ours clean KB",
                     "ours KB", "ours Δ %", "ours top-1 %", "paper clean KB", "paper KB", "paper Δ %",
                     "paper top-1 %"]


def load_published(path: str | Path) -> dict[str, Any]:
    """A published-figures file (JSON): ``citation``, ``status``, ``rows`` (each with :data:`PUBLISHED_KEYS`;
    KB = 1000 bytes per image, Δ % against the same model's clean images, top-1 in %)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"published figures {p}: {exc}") from None
    if not (isinstance(data, dict) and isinstance(data.get("citation"), str) and isinstance(data.get("rows"), list)):
        raise ValueError(f"published figures {p}: need a JSON object with 'citation' (text) and 'rows' (list)")
    for i, r in enumerate(data["rows"]):
        if not isinstance(r, dict) or set(r) - set(PUBLISHED_KEYS) or not {"model", "threat", "level"} <= set(r):
            raise ValueError(f"published figures {p}: rows[{i}] must be an object with model, threat, level and "
                             f"only the keys {', '.join(PUBLISHED_KEYS)}")
    return data


def _published_key(model: Any, family: Any, beta: Any, threat: Any, level: Any, defence: Any) -> tuple:
    return (str(model), str(family), None if beta is None else round(float(beta), 4), str(threat), str(level),
            str(defence or "none"))


def published_rows(recs: list[dict[str, Any]], published: dict[str, Any]) -> list[list[Any]]:
    """Every point of ours (the paper's layout: KB/image clean and attacked, Δ %, top-1, defended and
    corruption rows) with the published figures of the same model, family, β, threat, level and defence."""
    pub = {_published_key(r["model"], r.get("family"), r.get("beta"), r["threat"], r["level"], r.get("defence")): r
           for r in published["rows"]}
    out = []
    for r in recs:
        p = pub.get(_published_key(r["model"], r["family"], r["beta"], r["threat"], r["level"], r["defence"]), {})
        beta = "–" if r["beta"] is None else r["beta"]
        out.append([r["model"], r["family"], beta, r["threat"], r["level"], r["defence"], r["clean_bytes"] / 1000,
                    r["bytes"] / 1000, _pct(r["delta_bytes_pct"]), 100 * r["top1"],
                    *(p.get(k, "–") for k in ("clean_kb", "attacked_kb", "delta_pct", "top1"))])
    return out


def _published_section(recs: list[dict[str, Any]], published: dict[str, Any]) -> tuple[list[str], list[str]]:
    rows = published_rows(recs, published)
    head = f"Published: {published['citation']}"
    notes = [head] + ([f"Status of the published figures: {published['status']}"] if published.get("status") else [])
    md = ["## Ours beside the published figures", "", *[n + "  " for n in notes], "",
          md_table(PUBLISHED_HEADERS, rows), ""]
    hp = ["<h2>Ours beside the published figures</h2>", *[f"<p>{html.escape(n)}</p>" for n in notes],
          _html_table(PUBLISHED_HEADERS, rows)]
    return md, hp


def render(recs: list[dict[str, Any]], files: dict[str, str], title: str,
           published: dict[str, Any] | None = None) -> tuple[str, str]:
    """(markdown, html) of the report; with ``published`` (:func:`load_published`) a section puts the
    paper's figures beside ours."""
    defences = sorted({r["defence"] for r in recs if r["defence"] != "none"})
    md = [f"# Attack campaign: {title}", "",
          "Bytes are `len(packet)` from the runtime (ONNX Runtime edge encoder); top-1 is the server's "
          "prediction from that packet; the surrogate is −Σlog₂p/8 of the torch model on the same input. "
          "Δ is against the same model's clean images without defence.", ""]
    hp = [f"<h1>Attack campaign: {html.escape(title)}</h1>", f"<p>{html.escape(md[2])}</p>"]
    for d in defences:
        rows = paper_rows(recs, d)
        md += [f"## Clean / attacked / defended ({d})", "", md_table(PAPER_HEADERS, rows), ""]
        hp += [f"<h2>Clean / attacked / defended ({html.escape(d)})</h2>", _html_table(PAPER_HEADERS, rows)]
    if published is not None:
        pm, ph = _published_section(recs, published)
        md += pm
        hp += ph
    rows = summary_rows(recs)
    md += ["## All points", "", md_table(SUMMARY_HEADERS, rows), ""]
    hp += ["<h2>All points</h2>", _html_table(SUMMARY_HEADERS, rows)]
    failed = [r for r in recs if r["loss_rose"] is False]
    if failed:
        note = ("Attacks whose objective did not rise: "
                + ", ".join(f"{r['threat']} {r['level']} ({r['model']})" for r in failed))
        md += [note, ""]
        hp += [f"<p><b>{html.escape(note)}</b></p>"]
    for key in ("bytes", "top1", "corruptions"):
        if key in files:
            md += [f"![{key}]({files[key]})", ""]
            hp += [f'<p><img src="{html.escape(files[key])}" alt="{key}"></p>']
    style = ("<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #bbb;padding:3px 6px;text-align:right}th{background:#eee}</style>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{style}</head>" \
           f"<body>{''.join(hp)}</body></html>\n"
    return "\n".join(md) + "\n", page


def write_report(rows: list[dict[str, Any]], out: str | Path, title: str = "campaign",
                 points: set[str] | None = None, defences: set[str] | None = None,
                 published: dict[str, Any] | None = None) -> dict[str, Path]:
    """Aggregate stored result rows into out/report.{md,html,json} + PNGs.

    ``points``, ``defences``: see :func:`aggregate` (None: every stored row); ``published``: the paper's
    figures (:func:`load_published`) to put beside ours.
    """
    recs = aggregate(rows, points, defences)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = plots(recs, out) if recs else {}
    md, page = render(recs, files, title, published)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(page)
    extra = {} if published is None else {"published": {"citation": published["citation"],
                                                        "status": published.get("status"),
                                                        "rows": published_rows(recs, published)}}
    write_json(out / "report.json", {"title": title, "points": recs, "plots": files, **extra})
    return {"markdown": out / "report.md", "html": out / "report.html", "json": out / "report.json",
            **{k: out / v for k, v in files.items()}}
