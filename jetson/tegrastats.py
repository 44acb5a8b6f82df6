"""tegrastats: parse its lines and sample it during a benchmark for power, clocks and memory.

Lines differ by board and JetPack; the parser takes what is there::

    AGX Orin:         RAM 1282/62795MB (lfb 15152x4MB) SWAP 0/31398MB (cached 0MB)
                      CPU [0%@729,0%@729,...] EMC_FREQ 0%@2133 GR3D_FREQ 0%@0 GR3D2_FREQ 0%@0 ...
                      CPU@42.593C ... tj@42.593C VDD_GPU_SOC 2399mW/2399mW VDD_CPU_CV 400mW/400mW
                      VIN_SYS_5V0 4032mW/4032mW NC 0mW/0mW VDDQ_VDD2_1V8AO 301mW/301mW NC 0mW/0mW
    Orin Nano / NX:   ... VDD_IN 5251mW/8535mW VDD_CPU_GPU_CV 512mW/1944mW VDD_SOC 2720mW/3659mW
    Xavier / TX2:     ... GPU 0/0 CPU 310/310 SOC 1240/1240 ... or VDD_IN 4000/4000 (mW, no unit)

Every power rail reads ``instant/average`` in mW. The board's input power is ``VDD_IN`` (or
``POM_5V_IN`` on older boards); where the board has no input rail (AGX Orin) the rails are summed
and the report says so. ``NC`` entries are the power monitor's not-connected channels (AGX Orin has
two): not rails, never summed or named. Energy per image integrates the *instant* readings over the measured
window (the average column runs over tegrastats' whole lifetime).
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

_RAIL = re.compile(r"(?<![\w@])([A-Za-z][A-Za-z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?![\w/])")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
_NOT_RAILS = {"RAM", "SWAP", "IRAM", "NC"}  # NC: an INA3221 channel that is not connected


@dataclass
class TegraSample:
    t: float = 0.0  # monotonic seconds (set by the sampler)
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    swap_used_mb: int | None = None
    cpu: list[tuple[int, int] | None] = field(default_factory=list)  # (load %, MHz) per core; None = off
    gpu_load: int | None = None
    gpu_mhz: int | None = None
    emc_load: int | None = None
    emc_mhz: int | None = None
    temps_c: dict[str, float] = field(default_factory=dict)
    rails_mw: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (instant, average)

    def power_mw(self) -> tuple[float | None, str]:
        """(board power in mW, how it was obtained)."""
        for name in INPUT_RAILS:
            if name in self.rails_mw:
                return float(self.rails_mw[name][0]), name
        if self.rails_mw:
            return float(sum(v[0] for v in self.rails_mw.values())), "sum of " + "+".join(sorted(self.rails_mw))
        return None, "no power rails in tegrastats output"


def parse_line(line: str) -> TegraSample:
    """One tegrastats line → :class:`TegraSample` (fields absent from the line stay ``None``/empty)."""
    s = TegraSample()
    if m := _RAM.search(line):
        s.ram_used_mb, s.ram_total_mb = int(m.group(1)), int(m.group(2))
    if m := _SWAP.search(line):
        s.swap_used_mb = int(m.group(1))
    if m := _CPU.search(line):
        for core in m.group(1).split(","):
            core = core.strip()
            if not core or core == "off":
                s.cpu.append(None)
                continue
            load, _, mhz = core.partition("%@")
            try:
                s.cpu.append((int(load.rstrip("%")), int(mhz) if mhz else 0))
            except ValueError:
                s.cpu.append(None)
    if m := _GR3D.search(line):
        s.gpu_load = int(m.group(1))
        if m.group(2):
            s.gpu_mhz = max(int(v) for v in m.group(2).split(",") if v)
    if m := _EMC.search(line):
        s.emc_load = int(m.group(1))
        s.emc_mhz = int(m.group(2)) if m.group(2) else None
    s.temps_c = {k: float(v) for k, v in _TEMP.findall(line)}
    cpu_span = _CPU.search(line)
    for m in _RAIL.finditer(line):
        if m.group(1) in _NOT_RAILS or (cpu_span and cpu_span.start() <= m.start() < cpu_span.end()):
            continue
        s.rails_mw[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return s


def energy_summary(samples: Sequence[TegraSample], t0: float, t1: float, images: int) -> dict[str, Any]:
    """Mean board power over ``[t0, t1]`` and energy per image (instant readings, trapezoids)."""
    window = [s for s in samples if t0 <= s.t <= t1 and s.power_mw()[0] is not None]
    if not window:
        return {"available": False, "reason": "no tegrastats power samples inside the measured window"}
    pts = [(s.t, s.power_mw()[0]) for s in window]
    if len(pts) == 1:
        mean_mw = pts[0][1]
    else:
        area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in itertools.pairwise(pts))
        span = pts[-1][0] - pts[0][0]
        mean_mw = area / span if span > 0 else sum(p for _, p in pts) / len(pts)
    duration = t1 - t0
    energy_j = mean_mw / 1e3 * duration
    gpu = [s.gpu_mhz for s in window if s.gpu_mhz]
    emc = [s.emc_mhz for s in window if s.emc_mhz]
    cpu = [c[1] for s in window for c in s.cpu if c]
    ram = [s.ram_used_mb for s in window if s.ram_used_mb is not None]
    return {
        "available": True,
        "source": window[0].power_mw()[1],
        "samples": len(window),
        "window_s": duration,
        "mean_power_w": mean_mw / 1e3,
        "energy_j": energy_j,
        "energy_per_image_mj": energy_j * 1e3 / images if images else None,
        "rails_mean_mw": {k: sum(s.rails_mw[k][0] for s in window if k in s.rails_mw) / len(window)
                          for k in window[0].rails_mw},
        "clocks_mhz": {"gpu_max": max(gpu) if gpu else None, "emc_max": max(emc) if emc else None,
                       "cpu_max": max(cpu) if cpu else None},
        "gpu_load_mean": (sum(s.gpu_load or 0 for s in window) / len(window)),
        "ram_used_mb_max": max(ram) if ram else None,
        "temps_c_max": {k: max(s.temps_c.get(k, float("-inf")) for s in window) for k in window[-1].temps_c},
    }


class TegraStatsSampler:
    """Runs ``tegrastats --interval MS`` in the background and keeps the parsed samples.

    ``command`` may be replaced (tests feed recorded lines through a small script)."""

    def __init__(self, interval_ms: int = 100, command: Sequence[str] | None = None) -> None:
        self.interval_ms = interval_ms
        self.command = list(command) if command else ["tegrastats", "--interval", str(interval_ms)]
        self.samples: list[TegraSample] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("tegrastats") is not None

    def start(self) -> TegraStatsSampler:
        self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                      bufsize=1)
        self._thread = threading.Thread(target=self._read, name="tegrastats", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            line = line.strip()
            if line:
                s = parse_line(line)
                s.t = time.monotonic()
                self.samples.append(s)

    def stop(self) -> list[TegraSample]:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        return self.samples

    def __enter__(self) -> TegraStatsSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
