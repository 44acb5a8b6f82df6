"""Campaigns and the server side on Ray (splitbits.cluster), on one in-process Ray of 2 CPUs
started once for the module: the same rows as a plain run, a worker killed mid-unit, the Parquet
export, `serve --ray` with `send` against it, and the TCP-vs-Ray-Serve load test."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("torch")

from support import make_student, tamper_tail  # noqa: E402

from splitbits.attacks.campaign import ResultStore, export_parquet, parse_campaign, plan_units, run_campaign  # noqa: E402
from splitbits.runtime.cli import main as cli_main  # noqa: E402
from splitbits.runtime.client import HttpLinkClient, LinkError  # noqa: E402

#: measured times: they differ between any two runs, everything else must not
TIMINGS = {"created", "edge_ms_p50", "defence_ms", "attack_s", "rank"}


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_student(tmp_path_factory.mktemp("cluster_student"))


def _raw(student) -> dict:
    ckpt, bundle = student
    return {"name": "ray", "models": [{"checkpoint": str(ckpt), "bundle": str(bundle)}],
            "limit": 6, "chunk": 3, "batch": 3, "threads": 1, "device": "cpu",
            "threats": [{"name": "pgd-e", "eps": [8], "steps": 1, "eot": 2}, {"name": "noise", "eps": [8]}],
            "defences": ["none", "jpeg"]}


@pytest.fixture(scope="module")
def campaign(student):
    return parse_campaign(_raw(student))


@pytest.fixture(scope="module")
def plain(campaign, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    run_campaign(campaign, out, progress=False)
    return out


def _rows(out) -> dict[str, dict]:
    st = ResultStore(out / "results.sqlite")
    try:
        rows = st.rows()
    finally:
        st.close()
    keyed = {r["row_key"]: {k: v for k, v in r.items() if k not in TIMINGS} for r in rows}
    assert len(keyed) == len(rows)  # no row twice
    for r in keyed.values():  # the per-image timings inside data are measured too
        r["data"] = {k: v for k, v in json.loads(r["data"]).items() if k not in ("edge_ms", "server_ms", "defence_ms")}
    return keyed


def _report(out) -> list[dict]:
    return [{k: v for k, v in p.items() if k not in TIMINGS}
            for p in json.loads((out / "report.json").read_text())["points"]]


def test_ray_campaign_same_rows_as_plain_run_resumes_and_exports_parquet(ray_cluster, campaign, plain, tmp_path):
    from splitbits.cluster.campaign import run_campaign_ray

    out = tmp_path / "ray"
    stored = []
    s = run_campaign_ray(campaign, out, progress=False, on_unit=lambda u, n: stored.append(n))
    units = len(plan_units(campaign))
    assert s["computed"] == units == len(stored) and s["skipped"] == 0 and not s["failed"]
    assert s["ray"]["resources"]["CPU"] == 2.0
    assert _rows(out) == _rows(plain) and len(_rows(out)) == units * len(campaign.defences)
    assert _report(out) == _report(plain)
    again = run_campaign_ray(campaign, out, progress=False)  # resume: every unit is stored
    assert again["computed"] == 0 and again["skipped"] == units
    pq = export_parquet(out)
    import pandas as pd

    frame = pd.read_parquet(pq)
    assert len(frame) == units * len(campaign.defences) and set(frame["row_key"]) == set(_rows(plain))


def test_ray_worker_killed_mid_unit_is_retried(ray_cluster, campaign, plain, tmp_path):
    from splitbits.cluster.campaign import run_campaign_ray

    marker = tmp_path / "killed"

    def kill_once(unit_key: str, images_done: int) -> None:  # runs in the Ray worker
        if "noise" in unit_key and "chunk1" in unit_key and images_done > 0 and not marker.exists():
            marker.write_text(f"{unit_key} {os.getpid()}")
            os.kill(os.getpid(), signal.SIGKILL)

    out = tmp_path / "ray_killed"
    s = run_campaign_ray(campaign, out, progress=False, fault=kill_once)
    assert marker.is_file(), "no worker was killed"
    assert s["computed"] == len(plan_units(campaign)) and not s["failed"]
    assert _rows(out) == _rows(plain)  # nothing missing, nothing twice, the same values
    assert _report(out) == _report(plain)


def test_ray_unit_that_fails_is_reported_and_left_for_the_next_run(ray_cluster, campaign, plain, tmp_path):
    from splitbits.attacks.campaign import CampaignError
    from splitbits.cluster.campaign import run_campaign_ray

    def fail(unit_key: str, images_done: int) -> None:  # an error in the unit itself: not retried
        if "noise" in unit_key and "chunk0" in unit_key:
            raise ValueError("injected failure")

    out = tmp_path / "failing"
    with pytest.raises(CampaignError, match=r"1 unit\(s\) failed.*injected failure"):
        run_campaign_ray(campaign, out, progress=False, fault=fail)
    units = len(plan_units(campaign))
    assert json.loads((out / "run_ray.json").read_text())["computed"] == units - 1
    s = run_campaign_ray(campaign, out, progress=False)
    assert s["computed"] == 1 and s["skipped"] == units - 1
    assert _rows(out) == _rows(plain)


def test_campaign_cli_ray_resumes_a_stored_run_and_writes_parquet(ray_cluster, student, campaign, plain, tmp_path,
                                                                   capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(plain, out)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(_raw(student)))  # YAML reads JSON
    assert cli_main(["campaign", str(cfg), "--out", str(out), "--ray", "--no-progress", "--parquet"]) == 0
    text = capsys.readouterr().out
    assert "computed 0 units" in text and "results.parquet" in text
    assert json.loads((out / "run_ray.json").read_text())["skipped"] == len(plan_units(campaign))


def test_cli_ray_options_are_checked(student, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"name": "x", "models": [str(student[0])]}))
    pem = tmp_path / "x.pem"
    pem.write_text("not used")
    bundle = str(student[1])
    for argv, err in [
        (["campaign", str(cfg), "--ray", "--shard", "0/2"], "--shard is for one host"),
        (["campaign", str(cfg), "--gpus-per-unit", "1"], "apply to --ray"),
        (["campaign", str(cfg), "--ray", "--device", "cuda", "--out", str(tmp_path / "o")], "--gpus-per-unit 1"),
        (["serve", bundle, "--ray", "--tls-cert", str(pem)], "--ray serves plain HTTP"),
        (["send", bundle, "--server", "https://h:8000"], "https is not supported"),
        (["send", bundle, "--server", "http://h:8000", "--tls-ca", str(pem)], "--tls-* are for the TCP server"),
    ]:
        assert cli_main(argv) == 2, argv
        assert err in capsys.readouterr().err, argv
    assert not (tmp_path / "o").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_ray_cli_error_contract_and_send(ray_cluster, student, tmp_path):
    """`serve --ray` (2 replicas) through the CLI; a bad packet gets its error and the replicas go on
    serving; `splitbits send --server http://...` paces and writes the same JSON as against TCP."""
    bundle, port = str(student[1]), _free_port()
    found: dict = {}

    def client() -> None:
        try:
            found.update(_exercise(bundle, port, tmp_path))
        except BaseException as exc:  # reported by the main thread
            found["exc"] = exc
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # stops `serve --ray`

    th = threading.Thread(target=client)
    th.start()
    rc = cli_main(["serve", bundle, "--ray", "--replicas", "2", "--port", str(port), "--backend", "onnxruntime",
                   "--stats-json", str(tmp_path / "serve.json")])
    th.join(60)
    if "exc" in found:
        raise found["exc"]
    assert rc == 0 and json.loads((tmp_path / "serve.json").read_text())["replicas"] == 2
    bad, big, good, res = found["bad"], found["big"], found["good"], found["send"]
    assert not bad.ok and bad.body["error"] not in ("InternalError", "BadReply") and bad.body["message"]
    assert not big.ok and big.body["error"] == "FrameError" and found["closed"]
    assert good.ok and len(good.body["logits"]) == 12  # the replicas still serve
    assert res["schema"] == "splitbits.send/1" and res["answered_ok"] == res["requested"] == 4
    assert res["link"]["emulated_mbps"] == 100.0 and res["wire"]["transport"] == "http"
    assert res["latency_ms"]["server.tail"]["n"] == 4 and res["wire"]["per_request"]["wire_sent"] > res["bytes"][
        "packet"]["mean"]


def test_serve_ray_refuses_a_bundle_that_fails_golden_verification(ray_cluster, student, tmp_path, capsys):
    bad = tamper_tail(student[1], tmp_path / "bad")
    rc = cli_main(["serve", str(bad), "--ray", "--port", str(_free_port()), "--backend", "onnxruntime"])
    assert rc == 3 and "REFUSED" in capsys.readouterr().err


def _exercise(bundle: str, port: int, tmp_path) -> dict:
    from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder

    deadline = time.monotonic() + 240
    packet = EdgeEncoder(bundle, "onnxruntime").encode(np.zeros((64, 64, 3), np.uint8))
    over = ServerDecoder(bundle, "onnxruntime").expect.max_bytes + 1

    async def talk() -> dict:
        c = await HttpLinkClient("127.0.0.1", port).connect()
        try:
            got = {"bad": await c.request(b"garbage" * 3), "big": await c.request(b"\0" * over)}
            got["closed"] = c.connection_error  # after a 413, as the TCP server after an impossible frame
        finally:
            await c.close()
        async with HttpLinkClient("127.0.0.1", port) as c2:
            return got | {"good": await c2.request(packet, want_logits=True)}

    async def up() -> bool:
        async with HttpLinkClient("127.0.0.1", port) as c:
            return (await c.request(packet)).ok

    while True:  # until the deployment answers
        try:
            if asyncio.run(up()):
                break
        except LinkError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("serve --ray did not answer within 240 s")
        time.sleep(1.0)
    out = asyncio.run(talk())
    js = tmp_path / "send.json"
    rc = cli_main(["send", bundle, "--server", f"http://127.0.0.1:{port}", "--limit", "4", "--link-mbps", "100",
                   "--concurrency", "2", "--backend", "onnxruntime", "--json", str(js), "--no-progress"])
    assert rc == 0
    return out | {"send": json.loads(js.read_text())}


def test_load_tcp_vs_ray_serve_two_replicas(ray_cluster, student):
    """Every request answered exactly once with its reference logits, by both servers; throughput of each."""
    from splitbits.cluster.bench import bench_serve

    res = bench_serve(str(student[1]), requests=48, concurrency=6, replicas=2, images=8)
    for k in ("tcp", "ray_serve"):
        r = res[k]
        assert r["answered_exactly_once"] and r["unexpected"] == 0 and not r["errors"], (k, r)
        assert r["logits_equal"] and r["answered_ok"] == 48, (k, r)
        assert r["images_per_s"] > 0
    assert res["ray_serve"]["replicas"] == 2 and res["ray_vs_tcp_throughput"] > 0
