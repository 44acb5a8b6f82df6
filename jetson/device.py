"""What this machine is: Jetson board, L4T/JetPack, CUDA, TensorRT, power mode (nvpmodel), clocks.

Everything degrades to ``None`` off a Jetson, so the same report runs on a desktop (the emulation).
``splitbits device`` prints it as JSON; ``jetson/setup.sh`` calls it to show what was found.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from splitbits.runtime.machine import machine_info

# JetPack releases by L4T version (the apt meta-package nvidia-jetpack is asked first).
JETPACK_BY_L4T = {
    "36.2": "6.0 DP", "36.3": "6.0", "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1",
    "35.3": "5.1.1", "35.4": "5.1.2", "35.5": "5.1.3", "35.6": "5.1.4",
}


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (res.stdout or "") + (res.stderr or "")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip("\x00 \n")
    except OSError:
        return None


def parse_l4t_release(text: str) -> str | None:
    """``# R36 (release), REVISION: 4.0, ...`` → ``"36.4.0"``."""
    m = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", text)
    if not m:
        return None
    rev = m.group(2).split(".")
    return ".".join([m.group(1), *rev, "0"][:3])


def jetpack_from_l4t(l4t: str | None) -> str | None:
    if not l4t:
        return None
    for key in (l4t, ".".join(l4t.split(".")[:2])):
        if key in JETPACK_BY_L4T:
            return JETPACK_BY_L4T[key]
    return None


def parse_nvpmodel(text: str) -> dict[str, Any] | None:
    """``nvpmodel -q`` output (``NV Power Mode: MAXN`` then the mode id) → ``{"name", "id"}``."""
    m = re.search(r"NV Power Mode:\s*(\S.*?)\s*$", text, re.M)
    if not m:
        return None
    mode: dict[str, Any] = {"name": m.group(1), "id": None}
    after = text[m.end():].split()
    if after and after[0].isdigit():
        mode["id"] = int(after[0])
    return mode


def parse_cuda_version(text: str) -> str | None:
    """``nvcc --version`` (``release 12.6, V12.6.68``) or version.json text → ``"12.6"``/``"12.6.68"``."""
    m = re.search(r'"cuda"\s*:\s*\{[^}]*"version"\s*:\s*"([\d.]+)"', text) or re.search(r"release ([\d.]+)", text)
    return m.group(1) if m else None


def jetson_board() -> str | None:
    from splitbits.runtime.backends.tensorrt import jetson_model

    return jetson_model()


def cuda_version() -> str | None:
    for path in ("/usr/local/cuda/version.json",):
        text = _read(path)
        if text and (v := parse_cuda_version(text)):
            return v
    out = _run(["nvcc", "--version"]) or (_run(["/usr/local/cuda/bin/nvcc", "--version"])
                                          if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    return parse_cuda_version(out) if out else None


def tensorrt_version() -> str | None:
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except ImportError:
        out = _run(["dpkg-query", "-W", "-f=${Version}", "libnvinfer10"])
        return out.strip() if out and out.strip() and "no packages" not in out else None


def gpu_devfreq() -> dict[str, Any] | None:
    """Current/max GPU clock (MHz) from devfreq (Jetson iGPU)."""
    for d in sorted(glob.glob("/sys/class/devfreq/*")):
        name = os.path.basename(d)
        if not re.search(r"gpu|gv11b|ga10b|gp10b|gb10b", name):
            continue
        cur, mx = _read(f"{d}/cur_freq"), _read(f"{d}/max_freq")
        if cur and cur.isdigit():
            return {"device": name, "cur_mhz": int(cur) // 1_000_000,
                    "max_mhz": int(mx) // 1_000_000 if mx and mx.isdigit() else None}
    return None


def cpu_freqs_mhz() -> list[int]:
    out = []
    for f in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq")):
        v = _read(f)
        if v and v.isdigit():
            out.append(int(v) // 1000)
    return out


def device_info() -> dict[str, Any]:
    """Everything a benchmark report needs to say where it ran: ``runtime.machine.machine_info`` and
    the Jetson facts (board, JetPack, power mode, clocks), CUDA and TensorRT."""
    info = machine_info()
    info.update(jetson=None, cuda=cuda_version(), tensorrt=tensorrt_version())
    board = jetson_board()
    if board:
        l4t = parse_l4t_release(_read("/etc/nv_tegra_release") or "")
        jp = _run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"])
        jp = jp.strip() if jp and re.match(r"^\d", jp.strip()) else None
        nvp = _run(["nvpmodel", "-q"])
        info["jetson"] = {
            "board": board,
            "l4t": l4t,
            "jetpack": jp or jetpack_from_l4t(l4t),
            "power_mode": parse_nvpmodel(nvp) if nvp else None,
            "gpu_clock": gpu_devfreq(),
            "cpu_mhz": cpu_freqs_mhz(),
            "tegrastats": shutil.which("tegrastats") is not None,
        }
    info["name"] = board or info["cpu"]
    return info
