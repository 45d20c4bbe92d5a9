"""Bench backends behind one registry and one options model each, the single-stream mode, device
profiles, and TensorRT: a clear message where it is missing, and real engine builds and timings
where a GPU has it."""

from __future__ import annotations

import ast
import json
import shutil
import typing
from pathlib import Path

import pytest
import torch
import yaml

from compress.deploy.backends import (
    backend_names,
    bench,
    cli_fields,
    get_backend,
    options_from_args,
    plain_annotation,
)
from compress.deploy.devices import load_profile, profile_names
from compress.deploy.jetson import check_profile
from compress.deploy.remote import SSHOptions
from compress.deploy.ssh import RemoteError
from compress.deploy.tensorrt import TensorRTOptions, tensorrt_problem
from compress.deploy.timing import COMMON_FIELDS, BenchSettings
from compress.errors import InputError
from tests.conftest import run_cli, small_recipe_for, write_recipe


def int8_onnx(model, out_path: Path, calibration: torch.Tensor) -> Path:
    """`model` through the INT8 route shaped for TensorRT (symmetric per-channel weights, signed
    activations), calibrated on `calibration` images, as Q/DQ ONNX."""
    from compress.quant.int8 import calibrate, export_int8_onnx, quantize_int8

    input_size = tuple(calibration.shape[1:])
    model = quantize_int8(model, "tensorrt", input_size)
    batches = [(b,) for b in calibration.split(32)]
    calibrate(model, batches, torch.device("cpu"), len(batches))
    return export_int8_onnx(model, out_path, input_size)


QUICK = BenchSettings(warmup=2, min_iters=10, min_duration_s=0.05, repeats=2, threads=1)
BACKENDS = ["onnxruntime", "tensorrt", "trtexec", "ssh"]
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
    results = bench(student_onnx, "onnxruntime", QUICK, [1, 4])
    assert [r["batch_size"] for r in results] == [1, 4]
    for r in results:
        assert r.keys() >= COMMON_FIELDS
        assert r["input_shape"] == [r["batch_size"], 3, 32, 32]
        assert r["flags"]["repeats"] == 2 and r["flags"]["threads"] == 1
        assert r["iterations"] >= 20 and 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    # a batch of 4 takes longer than a batch of 1 on one thread
    assert results[1]["p50_ms"] > results[0]["p50_ms"]


def test_single_stream_mode_reports_p90_at_batch_1(student_onnx):
    (r,) = bench(student_onnx, "onnxruntime", QUICK, [8, 32], single_stream=True)
    assert r["batch_size"] == 1 and r["mode"] == "single_stream"
    assert r["single_stream_p90_ms"] == r["p90_ms"] >= r["p50_ms"]


def test_bad_settings_and_missing_cuda_provider_are_clear(student_onnx):
    with pytest.raises(InputError, match=r"backend onnxruntime: repeats: must be > 0 \(got 0\)"):
        bench(student_onnx, "onnxruntime", {"repeats": 0})
    with pytest.raises(InputError, match="backend onnxruntime: precision: unknown field"):
        bench(student_onnx, "onnxruntime", {"precision": "int8"})
    with pytest.raises(InputError, match=r"batch sizes must be > 0 \(got \[0\]\)"):
        bench(student_onnx, "onnxruntime", QUICK, [0])
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(InputError, match="no CUDAExecutionProvider"):
        bench(student_onnx, "onnxruntime", {**QUICK.timing(), "provider": "cuda"})


def test_registry_lists_the_backends_and_names_them_for_an_unknown_one(tmp_path):
    from compress.stages.bench import BenchStage

    assert backend_names()[:4] == BACKENDS
    assert list(typing.get_args(BenchStage.model_fields["backend"].annotation)) == BACKENDS
    for name in BACKENDS:
        backend = get_backend(name)
        assert backend.name == name and issubclass(backend.options, BenchSettings)
    known = "expected one of onnxruntime, tensorrt, trtexec, ssh"
    with pytest.raises(InputError, match=f"backend 'tflite': {known}"):
        bench(tmp_path / "model.onnx", "tflite")
    result = run_cli("bench", str(tmp_path / "model.onnx"), "--backend", "tflite")
    assert result.returncode == 2 and "invalid choice: 'tflite'" in result.stderr


def test_backend_modules_do_not_import_the_registry():
    """The registry imports the backends; a backend importing it back would be an import circle."""
    deploy = Path(__file__).parents[2] / "compress" / "deploy"
    for module in ("timing", "onnxruntime_backend", "tensorrt", "trtexec", "ssh", "jetson",
                   "remote", "devices", "external_data"):  # fmt: skip
        tree = ast.parse((deploy / f"{module}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "compress.deploy.backends" not in imported, module


def test_device_profiles_load_and_guard_the_device(tmp_path):
    assert set(profile_names()) >= {"orin_nano_jp6", "orin_nx_jp6", "agx_orin_jp6", "agx_orin_jp7"}
    nano = load_profile("orin_nano_jp6")
    assert nano.tensorrt_major == 10 and nano.jetson_clocks and nano.precision == "int8"
    assert load_profile("agx_orin_jp7").tensorrt_major == 11
    own = tmp_path / "board.yaml"
    own.write_text(yaml.safe_dump({**nano.model_dump(exclude={"precision"}), "name": "board"}))
    assert load_profile(str(own)).precision is None  # then the engine precision stays fp32
    own.write_text(yaml.safe_dump({**nano.model_dump(), "fan_profile": "cool"}))
    with pytest.raises(InputError, match="invalid device profile: fan_profile: unknown field"):
        load_profile(str(own))
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
        r = bench_tensorrt(engine, b, TensorRTOptions(**QUICK.timing()))
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
    options = TensorRTOptions(**QUICK.timing(), precision="int8")
    assert bench_tensorrt(tmp_path / "student.int8.engine", 1, options)["p50_ms"] > 0


@pytest.mark.skipif(shutil.which("trtexec") is None, reason="trtexec is not on PATH")
def test_trtexec_backend_builds_and_times(student_onnx):
    (r,) = bench(student_onnx, "trtexec", QUICK)
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
    recipe["stages"][3]["ssh"] = {"host": "orin", "device_profile": "xavier"}
    with pytest.raises(
        InputError, match=r"stages\[3\]\.ssh\.device_profile: device profile 'xavier'"
    ):
        parse_recipe(recipe)
    recipe["stages"][3]["ssh"] = {"host": "orin", "device_profile": "orin_nano_jp6", "port": 2222}
    options = parse_recipe(recipe).stages[3].options()
    assert isinstance(options, SSHOptions) and (options.host, options.port) == ("orin", 2222)


def test_device_profile_supplies_what_is_not_given_from_a_recipe_the_cli_and_python(
    cifar_root, resnet56_weights
):
    from compress.cli import build_parser
    from compress.recipe import parse_recipe

    profile = load_profile("orin_nano_jp6")
    recipe = small_recipe_for(cifar_root, resnet56_weights)
    ssh = {"host": "orin", "device_profile": "orin_nano_jp6"}
    recipe["stages"][3] = {"type": "bench", "backend": "ssh", "ssh": ssh}
    options = parse_recipe(recipe).stages[3].options()
    assert options.timing() == profile.bench.timing() != BenchSettings().timing()
    assert (options.warmup, options.min_iters, options.min_duration_s) == (200, 1000, 10)
    assert options.precision == "int8" and options.jetson_clocks is True

    # explicit values win, wherever they are given
    recipe["stages"][3].update(warmup=5, precision="fp16", ssh={**ssh, "jetson_clocks": False})
    options = parse_recipe(recipe).stages[3].options()
    assert (options.warmup, options.min_iters, options.repeats) == (5, 1000, 3)
    assert options.precision == "fp16" and options.jetson_clocks is False
    argv = ["bench", "m.onnx", "--backend", "ssh", "--host", "orin", "--device-profile",
            "orin_nano_jp6", "--warmup", "5", "--precision", "fp16", "--no-jetson-clocks"]  # fmt: skip
    assert options_from_args(build_parser().parse_args(argv)) == options
    python = SSHOptions(**ssh, warmup=5, precision="fp16", jetson_clocks=False)
    assert python == options
    # without a profile: the usual defaults, precision resolved to fp32 by the backend
    plain = SSHOptions(host="orin")
    assert plain.timing() == BenchSettings().timing() and plain.precision is None
    assert not plain.jetson_clocks


def _example(name: str, annotation) -> tuple[list[str], object]:
    """Command-line words that set field `name`, and the value they should give."""
    flag = "--" + name.replace("_", "-")
    kind = plain_annotation(annotation)
    if kind is bool:
        return [flag], True
    if typing.get_origin(kind) is typing.Literal:
        value = typing.get_args(kind)[-1]
        return [flag, str(value)], value
    if name == "device_profile":
        return [flag, "orin_nx_jp6"], "orin_nx_jp6"
    value = {int: 7, float: 0.5, str: "text", Path: Path("some/file")}[kind]
    return [flag, str(value)], value


def test_cli_flags_cover_every_options_field():
    from compress.cli import build_parser

    parser = build_parser()
    defaults = vars(parser.parse_args(["bench", "m.onnx"]))
    every = {f for name in BACKENDS for f in get_backend(name).options.model_fields}
    assert every <= defaults.keys() and set(cli_fields()) == every
    assert all(defaults[f] is None for f in every)  # unset: the model's default applies
    for name in BACKENDS:
        model = get_backend(name).options
        argv, want = ["bench", "m.onnx", "--backend", name], {}
        for field, info in model.model_fields.items():
            words, want[field] = _example(field, info.annotation)
            argv += words
        options = options_from_args(parser.parse_args(argv))
        assert isinstance(options, model) and options.model_dump() == want, name
    args = parser.parse_args(["bench", "m.onnx", "--min-duration", "0.25", "--no-transfers"])
    assert args.min_duration_s == 0.25 and args.transfers is False
