"""Bench backends behind one interface, the single-stream mode, device profiles, and TensorRT:
a clear message where it is missing, and real engine builds and timings where a GPU has it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from benchmarks.deploy_latency import int8_onnx
from compress.deploy.bench import COMMON_FIELDS, BenchSettings, bench_sweep
from compress.deploy.devices import load_profile, profile_names
from compress.deploy.ssh import RemoteError, check_profile
from compress.deploy.tensorrt import tensorrt_problem
from compress.errors import InputError
from tests.conftest import run_cli, small_recipe_for, write_recipe

QUICK = BenchSettings(warmup=2, min_iters=10, min_duration_s=0.05, repeats=2, threads=1)
TRT_PROBLEM = tensorrt_problem()
needs_trt = pytest.mark.skipif(TRT_PROBLEM is not None, reason=f"no TensorRT here: {TRT_PROBLEM}")


@pytest.fixture(scope="module")
def student(resnet20_weights):
    from compress.models import create_model

    return create_model("cifar_resnet20", weights=resnet20_weights)[0].eval()


@pytest.fixture(scope="module")
def student_onnx(tmp_path_factory, student):
    from compress.deploy.onnx_export import export_onnx

    return export_onnx(student, tmp_path_factory.mktemp("onnx") / "student.onnx", (3, 32, 32))


def test_batch_sweep_records_common_fields_and_flags(student_onnx):
    results = bench_sweep("onnxruntime", student_onnx, [1, 4], QUICK)
    assert [r["batch_size"] for r in results] == [1, 4]
    for r in results:
        assert r.keys() >= COMMON_FIELDS
        assert r["input_shape"] == [r["batch_size"], 3, 32, 32]
        assert r["flags"]["repeats"] == 2 and r["flags"]["threads"] == 1
        assert r["iterations"] >= 20 and 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    # a batch of 4 takes longer than a batch of 1 on one thread
    assert results[1]["p50_ms"] > results[0]["p50_ms"]


def test_single_stream_mode_reports_p90_at_batch_1(student_onnx):
    (r,) = bench_sweep("onnxruntime", student_onnx, [8, 32], QUICK, single_stream=True)
    assert r["batch_size"] == 1 and r["mode"] == "single_stream"
    assert r["single_stream_p90_ms"] == r["p90_ms"] >= r["p50_ms"]


def test_bad_settings_and_missing_cuda_provider_are_clear(student_onnx):
    with pytest.raises(InputError, match="repeats: must be > 0"):
        bench_sweep("onnxruntime", student_onnx, [1], BenchSettings(repeats=0))
    with pytest.raises(InputError, match="backend 'tflite'"):
        bench_sweep("tflite", student_onnx, [1], QUICK)
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(InputError, match="no CUDAExecutionProvider"):
        bench_sweep("onnxruntime", student_onnx, [1], QUICK, {"provider": "cuda"})


def test_device_profiles_load_and_guard_the_device():
    assert set(profile_names()) >= {"orin_nano_jp6", "orin_nx_jp6", "agx_orin_jp6", "agx_orin_jp7"}
    nano = load_profile("orin_nano_jp6")
    assert nano["tensorrt_major"] == 10 and nano["dla_cores"] == 0
    assert load_profile("agx_orin_jp7")["tensorrt_major"] == 11
    check_profile({"tensorrt": "10.3.0", "power_mode": "MAXN_SUPER"}, nano)
    with pytest.raises(RemoteError, match="expects TensorRT 10.x; the device has 11.4.0"):
        check_profile({"tensorrt": "11.4.0"}, nano)
    with pytest.raises(RemoteError, match="requires power mode MAXN_SUPER; the device is in 15W"):
        check_profile({"tensorrt": "10.3.0", "power_mode": "15W"}, nano)
    with pytest.raises(InputError, match="not found"):
        load_profile("xavier")


@pytest.mark.skipif(TRT_PROBLEM is None, reason="TensorRT and a GPU are present")
def test_missing_tensorrt_is_one_clear_message(
    student_onnx, tmp_path, cifar_root, resnet56_weights
):
    result = run_cli("bench", str(student_onnx), "--backend", "tensorrt")
    assert result.returncode == 1
    assert "TensorRT" in result.stderr and "Traceback" not in result.stderr
    assert "Still available without it: export format onnx; bench backends onnxruntime" in (
        result.stderr
    )
    recipe = small_recipe_for(cifar_root, resnet56_weights)
    recipe["stages"][2] = {"type": "export", "format": "tensorrt", "precision": "fp16"}
    result = run_cli("validate", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.returncode == 0
    assert "warning: stages[2] (export): export format tensorrt: TensorRT" in result.stderr


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_builds_with_metadata_and_times(student_onnx, tmp_path, precision):
    from compress.deploy.tensorrt import bench_tensorrt, build_engine, engine_metadata_path

    cache = tmp_path / "timing.cache"
    engine = tmp_path / f"student.{precision}.engine"
    meta = build_engine(student_onnx, engine, precision, [1, 8], timing_cache=cache)
    assert engine.stat().st_size > 0 and cache.stat().st_size > 0
    saved = json.loads(engine_metadata_path(engine).read_text())
    assert saved["precision"] == precision == meta["precision"]
    assert saved["profile"]["min"][0] == 1 and saved["profile"]["max"][0] == 8
    assert saved["tensorrt_version"] and saved["gpu"]
    for b in (1, 8):
        r = bench_tensorrt(engine, b, QUICK)
        assert r.keys() >= COMMON_FIELDS and r["input_shape"][0] == b
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["e2e_p50_ms"] > 0
        assert "CUDA events" in r["timed"]


@needs_trt
def test_tensorrt_int8_engine_from_qdq_onnx(student, student_onnx, tmp_path):
    from compress.deploy.tensorrt import bench_tensorrt, build_engine

    with pytest.raises(InputError, match="needs a Q/DQ ONNX model"):
        build_engine(student_onnx, tmp_path / "bad.engine", "int8")
    qdq = int8_onnx(student, tmp_path / "student.qdq.onnx", torch.randn(32, 3, 32, 32))
    meta = build_engine(qdq, tmp_path / "student.int8.engine", "int8", [1])
    assert meta["precision_source"] == "Q/DQ nodes"
    assert bench_tensorrt(tmp_path / "student.int8.engine", 1, QUICK)["p50_ms"] > 0


@pytest.mark.skipif(shutil.which("trtexec") is None, reason="trtexec is not on PATH")
def test_trtexec_backend_builds_and_times(student_onnx):
    (r,) = bench_sweep("trtexec", student_onnx, [1], QUICK)
    assert r["backend"] == "trtexec" and r["tensorrt_version"] != "unknown"
    assert 0 < r["p50_ms"] <= r["p99_ms"] and r["iterations"] > 0


def test_qdq_model_for_int8_engines_keeps_predictions(student, student_onnx, tmp_path, cifar_root):
    """The INT8 route's Q/DQ model (symmetric, as TensorRT needs) still classifies like FP32."""
    import numpy as np
    import onnx

    from compress.config import DataConfig
    from compress.data import ImageFolderData
    from compress.deploy.onnx_export import onnxruntime_session
    from compress.deploy.tensorrt import has_qdq

    data = ImageFolderData(DataConfig(root=cifar_root, test_limit_per_class=20))
    images = next(iter(data.loader("test", batch_size=200)))[0]
    qdq = int8_onnx(student, tmp_path / "student.qdq.onnx", images[:64])
    images = images.numpy()
    assert has_qdq(qdq) and not has_qdq(student_onnx)
    graph = onnx.load(str(qdq)).graph
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    constants.update(
        (n.output[0], onnx.numpy_helper.to_array(n.attribute[0].t))
        for n in graph.node
        if n.op_type == "Constant"
    )
    zero_points = [constants[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    fp32 = onnxruntime_session(student_onnx, 1).run(None, {"input": images})[0]
    int8 = onnxruntime_session(qdq, 1).run(None, {"input": images})[0]
    assert np.mean(fp32.argmax(1) == int8.argmax(1)) >= 0.9


def test_bench_stage_ssh_backend_needs_a_host(cifar_root, resnet56_weights):
    from compress.recipe import parse_recipe

    recipe = small_recipe_for(cifar_root, resnet56_weights)
    recipe["stages"][3] = {"type": "bench", "backend": "ssh"}
    with pytest.raises(InputError, match=r"stages\[3\]: backend ssh needs `ssh: \{host: ...\}`"):
        parse_recipe(recipe)
    recipe["stages"][3]["ssh"] = {"host": "orin", "device_profile": "orin_nano_jp6", "port": 2222}
    stage = parse_recipe(recipe).stages[3]
    assert stage.options()["host"] == "orin" and stage.options()["port"] == 2222
