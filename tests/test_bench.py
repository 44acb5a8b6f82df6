"""The benchmark runner's desktop emulation (ONNX Runtime CPU), its refusal on a failing golden
verification, inputs (npz, corruption), the results report, and the Jetson parsers."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest
from support import tamper_tail

from splitbits.jetson import bench
from splitbits.jetson.commands import add_bench_bundle_arguments, run_bench_bundle
from splitbits.jetson.device import jetpack_from_l4t, parse_cuda_version, parse_l4t_release, parse_nvpmodel
from splitbits.jetson.report import load_results, markdown, precision_of, rows, write_report
from splitbits.jetson.tegrastats import TegraSample, TegraStatsSampler, energy_summary, parse_line
from splitbits.runtime.cli import EXIT_REFUSED
from splitbits.runtime.cli import main as cli_main
from splitbits.runtime.errors import InputError
from splitbits.runtime.inputs import load_inputs, parse_attack

ORIN_AGX = ("11-23-2026 13:20:01 RAM 2436/30593MB (lfb 6777x4MB) SWAP 0/15296MB (cached 0MB) "
            "CPU [2%@729,1%@729,0%@729,0%@729,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305,305] NVENC off "
            "NVDEC off APE 174 cpu@45.5C soc2@43.25C soc0@44.5C gpu@43.468C tj@45.5C soc1@43.968C "
            "VDD_GPU_SOC 2387mW/2387mW VDD_CPU_CV 398mW/398mW VIN_SYS_5V0 2718mW/2718mW VDDQ_VDD2_1V8AO 302mW/302mW")
ORIN_NANO = ("08-23-2026 13:57:46 RAM 3595/7607MB (lfb 1x1MB) SWAP 11/3804MB (cached 0MB) "
             "CPU [1%@729,off,3%@729,4%@729,5%@1510,6%@729] EMC_FREQ 2%@2133 GR3D_FREQ 7%@[306] cpu@51C "
             "soc2@50.562C gpu@50.5C tj@51C VDD_IN 5832mW/5852mW VDD_CPU_GPU_CV 1307mW/1327mW VDD_SOC 1468mW/1468mW")
NANO_JP4 = ("RAM 2071/3964MB (lfb 262x4MB) SWAP 0/1982MB (cached 0MB) CPU [4%@102,2%@102,off,off] EMC_FREQ 0% "
            "GR3D_FREQ 0% PLL@26.5C CPU@29C PMIC@50C GPU@27.5C AO@34C thermal@28C POM_5V_IN 1029/1029 "
            "POM_5V_GPU 0/0 POM_5V_CPU 123/123")


# --------------------------------------------------------------------------------------------
# parsers
# --------------------------------------------------------------------------------------------


def test_tegrastats_orin_nano_line():
    s = parse_line(ORIN_NANO)
    assert (s.ram_used_mb, s.ram_total_mb, s.swap_used_mb) == (3595, 7607, 11)
    assert s.cpu == [(1, 729), None, (3, 729), (4, 729), (5, 1510), (6, 729)]
    assert (s.gpu_load, s.gpu_mhz, s.emc_load, s.emc_mhz) == (7, 306, 2, 2133)
    assert s.temps_c["gpu"] == 50.5 and s.temps_c["tj"] == 51.0
    assert s.rails_mw == {"VDD_IN": (5832, 5852), "VDD_CPU_GPU_CV": (1307, 1327), "VDD_SOC": (1468, 1468)}
    assert s.power_mw() == (5832.0, "VDD_IN")


def test_tegrastats_agx_orin_sums_rails_and_says_so():
    s = parse_line(ORIN_AGX)
    assert "RAM" not in s.rails_mw and "SWAP" not in s.rails_mw
    assert s.gpu_mhz == 305 and s.cpu[-1] is None
    mw, how = s.power_mw()
    assert mw == 2387 + 398 + 2718 + 302 and how.startswith("sum of")


def test_tegrastats_older_format_without_units():
    s = parse_line(NANO_JP4)
    assert s.power_mw() == (1029.0, "POM_5V_IN")
    assert s.gpu_load == 0 and s.gpu_mhz is None and s.emc_mhz is None
    assert s.temps_c["GPU"] == 27.5
    assert parse_line("garbage").power_mw()[0] is None


def test_energy_summary_integrates_instant_power_over_the_window():
    samples = []
    for k, p in enumerate([5000, 7000, 7000, 5000]):
        s = TegraSample(t=10.0 + k * 0.5, rails_mw={"VDD_IN": (p, 1)}, gpu_mhz=600)
        samples.append(s)
    out = energy_summary(samples, 10.0, 11.5, images=3)
    assert out["available"] and out["samples"] == 4
    assert out["mean_power_w"] == pytest.approx(6.333, rel=1e-3)  # trapezoids: (6+7+6)/3
    assert out["energy_per_image_mj"] == pytest.approx(6.333 * 1.5 / 3 * 1e3, rel=1e-3)
    assert out["clocks_mhz"]["gpu_max"] == 600
    assert not energy_summary(samples, 20.0, 21.0, 3)["available"]


def test_tegrastats_sampler_reads_a_process(tmp_path):
    code = f"import time\nfor _ in range(200):\n    print({ORIN_NANO!r}, flush=True)\n    time.sleep(0.005)\n"
    sampler = TegraStatsSampler(command=[sys.executable, "-c", code])
    with sampler:
        for _ in range(200):
            if len(sampler.samples) >= 3:
                break
            import time

            time.sleep(0.01)
    assert len(sampler.samples) >= 3 and sampler.samples[0].rails_mw["VDD_IN"][0] == 5832
    assert sampler._proc is None  # stopped (and reaped) on exit


def test_nvpmodel_l4t_and_cuda_parsing():
    assert parse_nvpmodel("NV Power Mode: MAXN\n0\n") == {"name": "MAXN", "id": 0}
    assert parse_nvpmodel("NVPM WARN: something\nNV Power Mode: 15W\n2\n") == {"name": "15W", "id": 2}
    assert parse_nvpmodel("nothing") is None
    rel = "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13"
    assert parse_l4t_release(rel) == "36.4.0"
    assert jetpack_from_l4t("36.4.0") == "6.1" and jetpack_from_l4t("36.3.0") == "6.0"
    assert jetpack_from_l4t(None) is None
    assert parse_cuda_version("Cuda compilation tools, release 12.6, V12.6.68") == "12.6"
    assert parse_cuda_version('{"cuda" : {"name" : "CUDA SDK", "version" : "12.6.68"}}') == "12.6.68"


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def test_attack_spec_and_npz_inputs(tmp_path, images):
    assert parse_attack("corruption:shot_noise:3") == ("corruption", "shot_noise", 3)
    for bad in ("pgd:rate:8", "corruption:shot_noise", "corruption:x:9", "corruption:x:a"):
        with pytest.raises(InputError):
            parse_attack(bad)
    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(len(images)))
    s = load_inputs((3, 64, 64), inputs=tmp_path / "a.npz", limit=4)
    assert s.images.shape == (4, 64, 64, 3) and list(s.labels) == [0, 1, 2, 3] and s.name == "npz:a.npz"
    np.savez(tmp_path / "b.npz", images=images[:, :32])
    with pytest.raises(InputError, match="uint8"):
        load_inputs((3, 64, 64), inputs=tmp_path / "b.npz")
    with pytest.raises(InputError):
        load_inputs((3, 64, 64), inputs=tmp_path / "a.npz", attack="corruption:shot_noise:1")


# --------------------------------------------------------------------------------------------
# the runner (desktop emulation)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs_npz(tmp_path_factory):
    from support import textured_images as _images

    path = tmp_path_factory.mktemp("inputs") / "clean.npz"
    np.savez(path, images=_images(10, seed=7), labels=np.arange(10) % 10)
    return path


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_bench_bundle_arguments(parser)
    return run_bench_bundle(parser.parse_args(argv))


def test_bench_desktop_emulation_json_schema(tiny_bundles, inputs_npz, tmp_path):
    out = tmp_path / "bench.json"
    rc = _bench([str(tiny_bundles["mshp"]), "--backend", "onnxruntime", "--inputs", str(inputs_npz), "--warmup", "2",
                 "--repeat", "2", "--json", str(out), "--no-progress", "--power", "auto"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["schema"] == "splitbits.bench/1" and r["status"] == "ok"
    assert r["verification"]["ok"] and r["verification"]["backend"] == "onnxruntime"
    assert r["images"] == 20 and r["inputs"]["count"] == 10
    for stage in (*bench.STAGES, "edge_total", "server_total", "end_to_end"):
        s = r["latency_ms"][stage]
        assert s["n"] == 20 and 0 <= s["p50"] <= s["p90"] <= s["p99"]
    assert r["latency_ms"]["link.transmit"]["mean"] == pytest.approx(r["bytes"]["packet"]["mean"] * 8 / 10e6 * 1e3,
                                                                    rel=1e-6)
    assert r["bytes"]["packet"]["n"] == 10 and r["bytes"]["packet"]["mean"] > 20
    assert r["bytes"]["ideal"]["mean"] > 0
    assert r["bytes"]["header"]["mean"] == 9  # version 2's MSHP frame, from the parser
    assert r["bytes"]["overhead_vs_ideal"]["mean"] == pytest.approx(r["bytes"]["packet"]["mean"]
                                                                    - r["bytes"]["ideal"]["mean"])
    assert set(r["link"]["model_ms"]) == {"1", "10", "100"}
    ov = r["edge_overhead_vs_head"]  # per image (edge total − head) / head: the edge's work beyond the head
    assert ov["n"] == 20 and 0 < ov["p50"] <= ov["p90"]  # quantise, hyper and encode are never free
    assert 0.0 <= r["accuracy"]["top1"] <= 1.0 and r["accuracy"]["labelled"] == 10
    assert r["throughput"]["end_to_end_images_per_s"] > 0
    assert r["memory"]["peak_rss_mb"] > 0
    assert r["power"]["available"] is False and "tegrastats" in r["power"]["reason"]
    assert r["device"]["machine"] and r["backend"]["backend"] == "onnxruntime"


def test_bench_fp_family_has_no_hyper_stage(tiny_bundles, inputs_npz, tmp_path):
    out = tmp_path / "fp.json"
    assert _bench([str(tiny_bundles["fp"]), "--backend", "onnxruntime", "--inputs", str(inputs_npz), "--limit", "3",
                   "--warmup", "0", "--json", str(out), "--no-progress", "--power", "off"]) == 0
    r = json.loads(out.read_text())
    assert "edge.hyper" not in r["latency_ms"] and "server.hyper" not in r["latency_ms"]
    assert r["images"] == 3 and r["power"]["reason"] == "--power off"


def test_bench_refuses_a_bundle_that_fails_golden_verification(tiny_bundles, inputs_npz, tmp_path, capsys):
    bad = tamper_tail(tiny_bundles["fp"], tmp_path / "bad")
    out = tmp_path / "refused.json"
    rc = _bench([str(bad), "--backend", "onnxruntime", "--inputs", str(inputs_npz), "--json", str(out),
                 "--no-progress"])
    assert rc == EXIT_REFUSED
    r = json.loads(out.read_text())
    assert r["status"] == "refused" and not r["verification"]["ok"]
    assert any(p.startswith("tail.logits") for p in r["verification"]["problems"])
    assert "latency_ms" not in r and "bytes" not in r and "accuracy" not in r  # no numbers at all
    assert "REFUSED" in capsys.readouterr().err


def test_bench_through_the_cli_with_save_inputs(tiny_bundles, inputs_npz, tmp_path):
    saved = tmp_path / "saved.npz"
    rc = cli_main(["bench", str(tiny_bundles["fp"]), "--backend", "onnxruntime", "--inputs", str(inputs_npz),
                   "--limit", "2", "--warmup", "0", "--save-inputs", str(saved), "--no-progress"])
    assert rc == 0
    with np.load(saved) as z:
        assert z["images"].shape == (2, 64, 64, 3) and list(z["labels"]) == [0, 1]


def test_bench_corruption_attack_measures_the_corrupted_images(tiny_bundles, tmp_path):
    from splitbits.runtime.corruptions import corrupt
    from splitbits.runtime.datasets import open_dataset

    out, saved = tmp_path / "shot.json", tmp_path / "shot.npz"
    rc = _bench([str(tiny_bundles["fp"]), "--backend", "onnxruntime", "--limit", "4", "--warmup", "0",
                 "--attack", "corruption:shot_noise:3", "--save-inputs", str(saved), "--json", str(out),
                 "--no-progress"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["inputs"]["attack"] == "corruption:shot_noise:3" and r["inputs"]["name"].endswith("shot_noise:3")
    ds = open_dataset("builtin", "val", image_size=64, limit=4)
    clean = np.stack([ds[i][0] for i in range(4)])
    with np.load(saved) as z:
        measured = z["images"]
    assert not np.array_equal(measured, clean)
    np.testing.assert_array_equal(measured, corrupt(clean, "shot_noise", 3, seed=0))


def test_corruption_without_its_library_is_a_clear_error(monkeypatch, images):
    from splitbits.runtime.errors import InputError
    from splitbits.runtime.inputs import apply_corruption

    monkeypatch.setitem(sys.modules, "imagecorruptions", None)  # the library's import now fails
    with pytest.raises(InputError, match=r"pip install 'splitbits\[corruptions\]'"):
        apply_corruption(images, "shot_noise", 3)


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _result(name, backend, precision, mean_bytes, attack=None, status="ok"):
    r = {"schema": "splitbits.bench/1", "status": status, "device": {"name": name},
         "bundle": {"fingerprint": "f"}, "backend": {"backend": backend, "precision": precision},
         "inputs": {"name": "builtin:val" + (f"+{attack}" if attack else ""), **({"attack": attack} if attack else {})}}
    if status == "ok":
        r.update({"images": 10, "accuracy": {"top1": 0.5},
                  "bytes": {"packet": {"mean": mean_bytes}},
                  "latency_ms": {"edge.head": {"p50": 1.0, "p99": 2.0}, "end_to_end": {"p50": 3.0, "p99": 5.0}},
                  "throughput": {"end_to_end_images_per_s": 300.0},
                  "link": {"model_ms": {"1": mean_bytes * 8e-3, "10": mean_bytes * 8e-4, "100": mean_bytes * 8e-5}},
                  "power": {"available": True, "mean_power_w": 7.5, "energy_per_image_mj": 25.0,
                            "power_mode": {"name": "MAXN", "id": 0}}})
    else:
        r["reason"] = "golden verification failed: tail.logits"
    return r


def test_report_compares_runs_and_attack_deltas(tmp_path):
    files = {
        "orin-fp16-clean": _result("Jetson AGX Orin", "tensorrt", "head=fp16,hyper=fp32,tail=fp16", 1000),
        "orin-fp16-shot": _result("Jetson AGX Orin", "tensorrt", "head=fp16,hyper=fp32,tail=fp16", 1650,
                                  "corruption:shot_noise:3"),
        "desktop": _result("AMD EPYC", "onnxruntime", None, 1000),
        "broken": _result("Jetson AGX Orin", "tensorrt", "fp16", 0, status="refused"),
    }
    for k, v in files.items():
        (tmp_path / f"{k}.json").write_text(json.dumps(v))
    (tmp_path / "other.json").write_text("{}")
    results = load_results([tmp_path])
    assert len(results) == 4
    rs = {r["run"]: r for r in rows(results)}
    assert set(rs) == {"orin-fp16-clean", "orin-fp16-shot", "desktop"}
    assert rs["orin-fp16-shot"]["delta_bytes_pct"] == pytest.approx(65.0)
    assert rs["orin-fp16-shot"]["precision"] == "fp16" and rs["desktop"]["precision"] == "fp32"
    text = markdown(results)
    assert "Refused runs" in text and "broken" in text and "65" in text and "MAXN" in text
    out = write_report([tmp_path], tmp_path / "rep")
    names = {p.rsplit("/", 1)[-1] for p in out["files"]}
    assert names == {"report.md", "report.html", "latency.png", "bytes.png", "link.png"}
    assert "<table>" in (tmp_path / "rep" / "report.html").read_text()
    assert precision_of({"precision": "head=int8,hyper=fp32,tail=int8"}) == "int8"


def test_report_command(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps(_result("dev", "onnxruntime", None, 100)))
    assert cli_main(["report", str(tmp_path / "a.json")]) == 0
    assert "| a | bench | dev |" in capsys.readouterr().out
    assert cli_main(["report", str(tmp_path / "nothing.json")]) == 2


# --------------------------------------------------------------------------------------------
# bench codec
# --------------------------------------------------------------------------------------------

CODEC_ARGS = ["--no-resnet50", "--bundle-images", "4", "--accuracy-images", "0", "--repeats", "2",
              "--slow-repeats", "1", "--hyper-repeats", "1", "--no-cold-start"]


def test_bench_codec_figures_targets_and_markdown(tiny_bundles, tmp_path, capsys):
    """compressai's coders (tables loaded through compressai's buffers) round-trip the bundle's symbols
    like the runtime's; the JSON keys the README cites and the Markdown table are there."""
    pytest.importorskip("compressai")
    out, md = tmp_path / "codec.json", tmp_path / "md" / "codec.md"
    rc = cli_main(["bench", "codec", *CODEC_ARGS, "--bundle", str(tiny_bundles["mshp"]), "--lanes", "0", "1",
                   "--json", str(out), "--markdown", str(md)])
    assert rc == 0
    r = json.loads(out.read_text())
    ((name, s),) = r["sets"].items()
    assert name == "tiny_mshp_64:mshp" and list(s["sections"]) == ["z", "y"]
    assert sum(s["sections"].values()) == s["symbols_per_image"] and s["images"] == 4
    assert set(s["coders"]) == {"numba", "numba_batch", "numba_lanes2", "constriction", "compressai",
                                "compressai_core"}
    assert all(c["roundtrip_ok"] for c in s["coders"].values())
    assert s["coders"]["compressai"]["bytes_per_image"] == s["coders"]["compressai_core"]["bytes_per_image"]
    assert s["speed_judged_on"] == "batched" and s["symbols_per_image"] < 16384
    assert set(s["ratios_batched_encode_plus_decode"]) == {"numba_batch_vs_compressai",
                                                           "numba_batch_vs_compressai_core",
                                                           "numba_batch_vs_constriction"}
    assert s["targets"]["lossless (every coder)"] and s["targets"]["numba bytes <= ideal + 0.1% + 16 B (every image)"]
    h = s["int_hyper"]
    assert h["idx_agreement"] > 0.99 and "bytes_int_vs_float_pct" in h and "top1_int_minus_float_points" in h
    assert h["int_vs_float"] == pytest.approx(h["int_ms"] / h["float_onnxruntime_ms"])
    assert h["int_vs_float_path_with_indexes"] == pytest.approx(h["int_ms"] / h["float_path_with_indexes_ms"])
    assert r["all_targets_met"] == all(s["targets"].values())
    assert set(s["stream_bytes"]) == {"numba", "constriction", "note"}  # the runtime coders' one stream per image
    assert all(s["stream_bytes"][c]["excess_bytes_max"] <= 16 for c in ("numba", "constriction"))
    assert md.read_text().strip() == r["markdown"]
    assert "| tiny_mshp_64:mshp | 2828 |" in r["markdown"] and "| MSHP set |" in r["markdown"]
    assert "targets not met" in capsys.readouterr().out


NO_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "compressai", "torchvision", "timm"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from splitbits.runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_bench_codec_without_torch_runs_the_runtime_coders_and_says_compressai_was_skipped(tiny_bundles, tmp_path):
    import subprocess

    out = tmp_path / "codec.json"
    res = subprocess.run([sys.executable, "-c", NO_TORCH, "bench", "codec", *CODEC_ARGS, "--lanes", "0",
                          "--bundle", str(tiny_bundles["fp"]), "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    (s,) = r["sets"].values()
    assert set(s["coders"]) == {"numba", "numba_batch", "constriction"}
    assert all(c["roundtrip_ok"] for c in s["coders"].values())
    assert any("compressai" in n and "skipped" in n for n in r["notes"])
    assert "skipped" in res.stdout and "torch" in res.stdout
    res = subprocess.run([sys.executable, "-c", NO_TORCH, "bench", "codec", "--no-cold-start"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "nothing to bench" in res.stderr and "--bundle" in res.stderr
