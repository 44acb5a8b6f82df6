"""Where a measurement ran: the one description of a machine that every report carries.

``machine_info()`` is the base (host, CPU, cores, load, package versions); ``splitbits.jetson.device``
adds the Jetson facts (board, JetPack, power mode, clocks) and the training/attack side adds torch's
threads and GPU. ``busy_processes()`` says whether a timing shared the machine with other work.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

#: packages whose versions a report names
PACKAGES = ("splitbits", "numpy", "numba", "llvmlite", "constriction", "onnxruntime", "torch", "compressai")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        m = re.search(r"^(?:model name|Model)\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if m:
            return m.group(1).strip()
    return platform.processor() or platform.machine() or "unknown"


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed versions (``absent`` where not installed), with Python's."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def busy_processes(limit: int = 5) -> list[str]:
    """The busiest other processes (``top -bn1``, ≥ 5 % CPU), to say whether the machine was shared."""
    try:
        out = subprocess.run(["top", "-bn1", "-o", "%CPU"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    lines = out.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("PID")), None)
    rows: list[str] = []
    for ln in lines[start + 1:] if start is not None else []:
        parts = ln.split()
        if len(parts) >= 12 and parts[0] != str(os.getpid()):
            with contextlib.suppress(ValueError):
                if float(parts[8]) >= 5.0:
                    rows.append(f"{parts[11]} (pid {parts[0]}) {parts[8]}% CPU")
        if len(rows) >= limit:
            break
    return rows


def machine_info(*, versions: bool = True) -> dict[str, Any]:
    """Host, OS, CPU model and count, the cores this process may use, load average and versions."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    with contextlib.suppress(AttributeError):
        info["affinity"] = sorted(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        info["loadavg_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    if versions:
        info["versions"] = package_versions()
    return info
