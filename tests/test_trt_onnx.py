"""The ONNX side of the TensorRT path, run here with ONNX Runtime (no TensorRT needed): GDN and
entropy-feeder detection, FP32 plans, mixed FP16 ONNX, INT8 Q/DQ, shapes/opset, engine naming."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

from splitbits.export.precision import (
    check_onnx,
    find_gdn,
    plan_fp32,
    profile_shapes,
    to_mixed_fp16,
)
from splitbits.export.tensorrt import (
    TrtBuildOptions,
    build_engines,
    choose_typing,
    graph_precision,
    layer_is_pinned,
    onnx_names_of_layer,
)
from splitbits.runtime.backends.tensorrt import (
    engine_filename,
    engine_key,
    select_engine,
    slugify,
    timing_cache_filename,
    version_tag,
)
from splitbits.runtime.cli import main as cli_main


def fp32_initializers_of(model: onnx.ModelProto, nodes) -> dict[str, int]:
    """Element type of each initializer read (directly) by ``nodes`` (a check of a mixed model)."""
    inits = {i.name: i.data_type for i in model.graph.initializer}
    wanted = set(nodes)
    return {i: inits[i] for n in model.graph.node if n.name in wanted for i in n.input if i in inits}


# --------------------------------------------------------------------------------------------
# GDN detection
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,gdn_prefix", [("fp", "/encoder/encoder"), ("mshp", "/g_a/g_a")])
def test_gdn_found_in_exported_heads_and_tails(tiny_bundles, family, gdn_prefix):
    head = onnx.load(str(tiny_bundles[family] / "head.onnx"))
    tail = onnx.load(str(tiny_bundles[family] / "tail.onnx"))
    hg, tg = find_gdn(head), find_gdn(tail)
    assert [(g.kind, g.name) for g in hg] == [("GDN", f"{gdn_prefix}.1"), ("GDN", f"{gdn_prefix}.3")]
    assert [g.kind for g in tg] == ["IGDN", "IGDN"]
    by_name = {n.name: n for n in head.graph.node}
    for g in hg:
        ops = {by_name[n].op_type for n in g.nodes}
        assert {"Conv", "Mul"} <= ops  # the γ/β convolution and the normalising product
        # only this layer's nodes (plus the exporter's shared Constant/Identity parameter nodes)
        assert all(n.startswith(g.name + "/") or by_name[n].op_type in ("Constant", "Identity") for n in g.nodes)
    # nothing else is a GDN: the first and last convolutions of the head are not in any match
    members = {n for g in hg for n in g.nodes}
    assert f"{gdn_prefix}.0/Conv" not in members and f"{gdn_prefix}.4/Conv" not in members


def _export(module, shape, path):
    torch = pytest.importorskip("torch")
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, as export/bundle.py
        torch.onnx.export(module, (torch.randn(*shape),), str(path), input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False)
    return onnx.load(str(path))


@pytest.mark.parametrize("inverse,kind", [(False, "GDN"), (True, "IGDN")])
def test_gdn_found_in_full_compressai_gdn(tmp_path, inverse, kind):
    """compressai's full GDN (x² → conv(γ, β) → sqrt/rsqrt → ×) as well as the simplified GDN1."""
    layers = pytest.importorskip("compressai.layers")
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), layers.GDN(8, inverse=inverse),
                              torch.nn.Conv2d(8, 4, 3, padding=1))
    model = _export(net, (1, 3, 16, 16), tmp_path / "gdn.onnx")
    found = find_gdn(model)
    assert [g.kind for g in found] == [kind]
    ops = {n.op_type for n in model.graph.node if n.name in found[0].nodes}
    assert "Conv" in ops and ("Pow" in ops or "Mul" in ops) and ("Sqrt" in ops or "Rsqrt" in ops or "Div" in ops)


def test_plain_convnet_has_no_gdn(tmp_path):
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
    assert find_gdn(_export(net, (1, 3, 16, 16), tmp_path / "plain.onnx")) == []


def test_fp32_plans_per_graph(tiny_bundles):
    b = tiny_bundles["mshp"]
    head = plan_fp32(onnx.load(str(b / "head.onnx")), "head")
    assert set(head.entropy) == {"/g_a/g_a.4/Conv", "/h_a/h_a.0/Conv", "/h_a/h_a.1/LeakyRelu", "/h_a/h_a.2/Conv"}
    assert "/g_a/g_a.0/Conv" not in head.nodes and "/g_a/g_a.2/Conv" not in head.nodes  # free for FP16/INT8
    assert {"y", "z"} <= head.tensors
    hyper = plan_fp32(onnx.load(str(b / "hyper.onnx")), "hyper")
    assert hyper.all_fp32 and len(hyper.nodes) == len(onnx.load(str(b / "hyper.onnx")).graph.node)
    tail = plan_fp32(onnx.load(str(b / "tail.onnx")), "tail")
    assert tail.entropy == [] and len(tail.gdn) == 2
    assert not any(n.startswith("/layer") for n in tail.nodes)  # the backbone runs reduced precision


# --------------------------------------------------------------------------------------------
# mixed FP16 and INT8 Q/DQ, checked with ONNX Runtime
# --------------------------------------------------------------------------------------------


def test_mixed_fp16_keeps_the_plan_in_fp32(tiny_bundles, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    b = tiny_bundles["mshp"]
    g = np.load(b / "golden" / "golden.npz")
    model = onnx.load(str(b / "head.onnx"))
    plan = plan_fp32(model, "head")
    mixed = to_mixed_fp16(model, plan)
    types = fp32_initializers_of(mixed, plan.nodes)
    assert types and set(types.values()) == {onnx.TensorProto.FLOAT}
    others = fp32_initializers_of(mixed, ["/g_a/g_a.0/Conv"])
    assert set(others.values()) == {onnx.TensorProto.FLOAT16}
    assert [i.type.tensor_type.elem_type for i in mixed.graph.input] == [onnx.TensorProto.FLOAT]
    onnx.save(mixed, str(tmp_path / "m.onnx"))
    out = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": g["x"]})
    np.testing.assert_allclose(out[0], g["y"], atol=5e-2, rtol=5e-2)
    assert to_mixed_fp16(model, plan_fp32(onnx.load(str(b / "hyper.onnx")), "hyper")) is model


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_onnx_only_build_verifies_against_golden(bundle_copy, precision):
    b = bundle_copy("mshp")
    res = build_engines(b, TrtBuildOptions(precision=precision, onnx_only=True, calib_count=8,
                                           dataset="builtin", progress=False))
    assert res.mode == "onnx-only" and res.ok, res.verification["problems"]
    v = res.verification
    assert v["exact_symbols"] == (precision != "int8") and v["top1_agree"] == v["images"]
    by = {gb.graph: gb for gb in res.graphs}
    assert by["hyper"].precision == "fp32" and by["hyper"].onnx == "hyper.onnx"
    if precision == "int8":
        q = by["head"].quantisation
        assert q["quantize_linear"] > 0 and q["dequantize_linear"] > 0
        assert set(q["quantised_nodes"]) == {"/g_a/g_a.0/Conv", "/g_a/g_a.2/Conv"}  # GDN/entropy feeders left out
        assert by["tail"].quantisation["quantised_nodes"]
        assert (b / "engines" / "head.int8-qdq.onnx").is_file()
        # stated tolerance for INT8 (tensors), symbols reported rather than required equal
        assert v["tolerance"] == {"atol": 0.25, "rtol": 0.1}
        assert v["max_abs_err"]["tail.logits"] <= 0.25
    elif precision == "fp16":
        assert by["head"].onnx == "engines/head.fp16-mixed.onnx" and by["head"].typing == "strong"
    # the ONNX side never touches the model files or the manifest's engines
    from splitbits.runtime.bundle import load_bundle

    assert load_bundle(b).engines() == {}


def test_qdq_onnx_leaves_excluded_nodes_in_float(bundle_copy):
    b = bundle_copy("fp")
    build_engines(b, TrtBuildOptions(precision="int8", onnx_only=True, calib_count=8, progress=False))
    q = onnx.load(str(b / "engines" / "head.int8-qdq.onnx"))
    plan = plan_fp32(onnx.load(str(b / "head.onnx")), "head")
    dq_out = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for n in q.graph.node:
        if n.name in plan.nodes and n.op_type == "Conv":
            assert not any(i in dq_out for i in n.input), n.name
    assert max(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) <= 20


# --------------------------------------------------------------------------------------------
# shapes, naming, typing (pure logic)
# --------------------------------------------------------------------------------------------


def test_exported_graphs_fit_tensorrt(tiny_bundles):
    for fam, b in tiny_bundles.items():
        for g in ("head", "hyper", "tail"):
            if not (b / f"{g}.onnx").exists():
                continue
            chk = check_onnx(onnx.load(str(b / f"{g}.onnx")))
            assert chk["opset"] <= 20 and chk["problems"] == [], (fam, g, chk)
            assert all(axes == [0] for axes in chk["dynamic_axes"].values())  # only the batch is dynamic


def test_profile_shapes():
    assert profile_shapes(["N", 3, 224, 224], 8) == ((1, 3, 224, 224), (8, 3, 224, 224), (8, 3, 224, 224))
    assert profile_shapes([-1, 24, 28, 28], 16, 4) == ((1, 24, 28, 28), (4, 24, 28, 28), (16, 24, 28, 28))
    assert profile_shapes([1, 3, 64, 64], 4) is None  # static: explicit shapes, no profile
    with pytest.raises(ValueError):
        profile_shapes(["N", 3, "H", "W"], 1)
    with pytest.raises(ValueError):
        profile_shapes(["N", 3, 8, 8], 4, 5)


def test_engine_names():
    slug = slugify("NVIDIA Jetson AGX Orin Developer Kit")
    assert slug == "nvidia-jetson-agx-orin-developer-kit"
    assert version_tag("10.3.0.30") == "10.3.0" and version_tag("11.0") == "11.0.0"
    assert engine_filename("head", slug, "10.3.0.30", "fp16") == \
        "engines/head.nvidia-jetson-agx-orin-developer-kit.trt10.3.0.fp16.engine"
    assert timing_cache_filename(slug, "10.3.0.30") == \
        "engines/nvidia-jetson-agx-orin-developer-kit.trt10.3.0.timing.cache"
    with pytest.raises(ValueError):
        engine_key("head", slug, "10.3", "bf16")


def test_engine_selection():
    engines = {engine_key(g, "orin", "10.3.0", p): {"precision": p}
               for g, p in [("head", "fp16"), ("head", "int8"), ("hyper", "fp32"), ("tail", "fp16"), ("tail", "fp32")]}
    assert select_engine(engines, "head", "orin", "10.3.0.30", "int8")[1]["precision"] == "int8"
    assert select_engine(engines, "hyper", "orin", "10.3.0.30", "fp16")[1]["precision"] == "fp32"  # hyper: FP32
    assert select_engine(engines, "tail", "orin", "10.3.0.30")[1]["precision"] == "fp16"  # default preference
    assert select_engine(engines, "tail", "orin", "10.4.0", "fp16") is None  # other TensorRT version
    assert select_engine(engines, "tail", "xavier", "10.3.0", "fp16") is None  # other device
    assert select_engine(engines, "tail", "orin", "10.3.0", "int8")[1]["precision"] == "fp32"


def test_typing_and_precision_decisions():
    assert graph_precision("hyper", "int8") == "fp32" and graph_precision("head", "int8") == "int8"
    assert choose_typing("10.3.0", True, "fp16", None) == "weak"
    assert choose_typing("10.3.0", True, "int8", None) == "strong"
    assert choose_typing("10.3.0", True, "fp16", True) == "strong"
    assert choose_typing("11.0.0", False, "fp16", None) == "strong"
    assert choose_typing("11.0.0", True, "fp32", None) == "strong"
    from splitbits.export.tensorrt import EngineBuildError

    with pytest.raises(EngineBuildError):
        choose_typing("11.0.0", False, "fp16", False)


def test_5_weak_typing_only_below_tensorrt_10_12():
    """Weak typing (BuilderFlag.FP16 + FP32 pins) is deprecated in 10.12 and gone in 11: from 10.12
    every build is strongly typed by default, and asking for weak typing is an error."""
    from splitbits.export.tensorrt import EngineBuildError

    assert choose_typing("10.11.0.33", True, "fp16", None) == "weak"
    assert choose_typing("10.12.0.36", True, "fp16", None) == "strong"
    assert choose_typing("10.12.0.36", True, "fp32", None) == "strong"
    assert choose_typing("10.13.3", True, "fp16", True) == "strong"
    with pytest.raises(EngineBuildError, match=r"deprecated in TensorRT 10\.12"):
        choose_typing("10.12.0.36", True, "fp16", False)


def test_layer_pin_matching(tiny_bundles):
    plan = plan_fp32(onnx.load(str(tiny_bundles["mshp"] / "head.onnx")), "head")
    assert onnx_names_of_layer("conv_7", "[ONNX Layer: /g_a/g_a.1/Conv]\x1f[ONNX Layer: /g_a/g_a.1/Mul]") == \
        {"conv_7", "/g_a/g_a.1/Conv", "/g_a/g_a.1/Mul"}
    assert layer_is_pinned("/g_a/g_a.1/Conv", None, [], plan)  # by layer name
    assert layer_is_pinned("fused_3", "[ONNX Layer: /h_a/h_a.0/Conv | extra]", [], plan)  # by metadata
    assert layer_is_pinned("anon", None, ["z"], plan)  # by output tensor
    assert not layer_is_pinned("/g_a/g_a.0/Conv", "[ONNX Layer: /g_a/g_a.0/Conv]", ["/g_a/g_a.0/Conv_output_0"], plan)


# --------------------------------------------------------------------------------------------
# the export command where TensorRT is absent
# --------------------------------------------------------------------------------------------


def test_export_trt_says_plainly_that_tensorrt_is_missing(bundle_copy, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; this checks the message where it is not")
    except ImportError:
        pass
    b = bundle_copy("fp")
    assert cli_main(["export", str(b), "--trt", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed here" in err and "--onnx-only" in err
    assert cli_main(["export", str(b)]) == 2  # a bundle without --trt
    assert "add --trt" in capsys.readouterr().err


def test_export_onnx_only_command(bundle_copy, tmp_path, capsys):
    b = bundle_copy("fp")
    rc = cli_main(["export", str(b), "--trt", "--precision", "fp16", "--onnx-only", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "verification on ONNX Runtime CPU (prepared ONNX): OK" in out
    assert (tmp_path / "r.json").is_file()
