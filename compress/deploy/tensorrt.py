"""TensorRT engines from ONNX through the TensorRT Python API (10.x and 11.x), and their timing.

TensorRT is optional: it is imported only here, lazily, and its absence (or a missing CUDA
device) is reported as one message that says what is missing and what still works.

Precision: FP32 builds as is. INT8 is explicit quantization from a Q/DQ ONNX model on both
versions. FP16 on TensorRT 10 is the builder flag; TensorRT 11 removed weak typing, so FP16 comes
from an FP16 ONNX model converted with ModelOpt AutoCast (I/O kept in FP32).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field

from compress.deploy.external_data import external_data_files
from compress.deploy.timing import (
    DEFAULT_PRECISION,
    Backend,
    BenchSettings,
    Precision,
    check_model_file,
    check_precision,
    input_shape_for,
    timed_runs,
)
from compress.errors import InputError, StageFailed
from compress.io import atomic_path, file_sha256, read_json, write_json

STILL_WORKS = (
    "Still available without it: export format onnx; bench backends onnxruntime (CPU) and ssh "
    "(a remote device's own TensorRT or trtexec)."
)


class TensorRTUnavailable(StageFailed):
    """TensorRT or a CUDA device is missing."""


class TensorRTOptions(BenchSettings):
    """Options of the tensorrt backend (the TensorRT Python API on this machine's GPU)."""

    precision: Precision = None
    timing_cache: Path | None = Field(
        None, description="Timing cache file for an engine built from ONNX (read, then updated)."
    )


def tensorrt_warnings(what: str) -> list[str]:
    """The warning `compress validate` gives for `what` (e.g. 'export format') needing TensorRT."""
    problem = tensorrt_problem()
    return [f"{what} tensorrt: {problem}; this stage will fail"] if problem else []


def tensorrt_problem() -> str | None:
    """Why TensorRT engines cannot be built or timed here, or None when they can."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as e:
        return (
            f"TensorRT is not importable ({type(e).__name__}: {e}); install it with "
            "`pip install 'compress[tensorrt]' --extra-index-url https://pypi.nvidia.com` on a CUDA "
            "host, or use JetPack's system TensorRT on a Jetson"
        )
    import torch

    if not torch.cuda.is_available():
        return "TensorRT is installed but no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def import_tensorrt():
    problem = tensorrt_problem()
    if problem:
        raise TensorRTUnavailable(f"{problem}. {STILL_WORKS}")
    import tensorrt as trt

    return trt


def tensorrt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def has_qdq(onnx_path: Path) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def fp16_onnx(onnx_path: Path, out_path: Path) -> Path:
    """An FP16 copy of the model (FP32 inputs/outputs) by ModelOpt AutoCast, for TensorRT 11."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as e:
        raise TensorRTUnavailable(
            f"FP16 on TensorRT 11 needs an FP16 ONNX model, converted by NVIDIA ModelOpt ({e}); "
            "`pip install 'nvidia-modelopt[onnx]'`, or build fp32/int8"
        ) from None
    import onnx

    model = convert_to_mixed_precision(
        onnx_path=str(onnx_path), low_precision_type="fp16", keep_io_types=True
    )
    onnx.save(model, str(out_path))
    return out_path


def _parse(trt, network, logger, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # external data: checked by build_engine
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise StageFailed(f"TensorRT cannot parse {onnx_path}: {errors}")


def build_engine(
    onnx_path: Path | str,
    engine_path: Path | str,
    precision: str = "fp32",
    batch_sizes: tuple[int, ...] | list[int] = (1,),
    opt_batch: int | None = None,
    timing_cache: Path | str | None = None,
    workspace_mb: int = 1024,
    optimization_level: int = 3,
) -> dict[str, Any]:
    """Build and save an engine whose optimisation profile covers `batch_sizes`; write its
    metadata (TensorRT version, GPU, precision, profile, flags) to `<engine>.json` and return it."""
    onnx_path, engine_path = check_model_file(onnx_path), Path(engine_path)
    precision = check_precision(precision)
    external_data_files(onnx_path)  # the parser (and AutoCast) read it beside the file
    trt = import_tensorrt()
    import torch

    major = tensorrt_major(trt)
    if precision == "int8" and not has_qdq(onnx_path):
        raise InputError(
            f"{onnx_path}: precision int8 needs a Q/DQ ONNX model (QuantizeLinear/DequantizeLinear "
            "nodes, e.g. from a quantize stage with an int8 method); TensorRT calibration is "
            "deprecated in 10 and removed in 11"
        )
    source = onnx_path
    if precision == "fp16" and major >= 11:
        source = fp16_onnx(onnx_path, engine_path.with_suffix(".fp16.onnx"))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch; TensorRT 11 is always strongly typed
    _parse(trt, network, logger, source)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.builder_optimization_level = optimization_level
    flags = []
    if major < 11 and precision in ("fp16", "int8"):
        # TensorRT 10 is weakly typed: the flags allow the lower precision (for Q/DQ models INT8
        # is what the Q/DQ nodes say, as trtexec --int8 does); 11 removed them.
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.INT8)
        flags.append(f"BuilderFlag.{precision.upper()}")
    inp = network.get_input(0)
    dims = list(inp.shape)
    lo, hi = min(batch_sizes), max(batch_sizes)
    opt = opt_batch or lo
    profile_shapes = {k: [b, *dims[1:]] for k, b in (("min", lo), ("opt", opt), ("max", hi))}
    if any(d < 0 for d in dims[1:]):
        raise InputError(f"{onnx_path}: only the batch dimension may be dynamic (input {dims})")
    if dims[0] < 0:
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, *profile_shapes.values())
        config.add_optimization_profile(profile)
    elif (lo, hi) != (dims[0], dims[0]):
        raise InputError(f"{onnx_path}: fixed batch {dims[0]}; cannot build for {batch_sizes}")
    cache_bytes = b""
    if timing_cache and Path(timing_cache).is_file():
        cache_bytes = Path(timing_cache).read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)  # a cache from another GPU/version is not used
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise StageFailed(f"TensorRT could not build an engine from {onnx_path} ({precision})")
    build_s = time.perf_counter() - t0
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(plan))
    if timing_cache:
        with atomic_path(Path(timing_cache)) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    meta = {
        "engine": str(engine_path),
        "onnx": str(onnx_path),
        "onnx_sha256": file_sha256(onnx_path),
        "built_from": str(source),
        "tensorrt_version": trt.__version__,
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "precision": precision,
        "precision_source": (
            "Q/DQ nodes"
            if precision == "int8"
            else "FP16 ONNX (ModelOpt AutoCast)"
            if precision == "fp16" and major >= 11
            else "builder flag"
            if precision == "fp16"
            else "model"
        ),
        "builder_flags": flags,
        "input": inp.name,
        "profile": profile_shapes,
        "workspace_mb": workspace_mb,
        "optimization_level": optimization_level,
        "timing_cache": str(timing_cache) if timing_cache else None,
        "build_s": build_s,
        "size_bytes": engine_path.stat().st_size,
    }
    write_json(engine_metadata_path(engine_path), meta)
    return meta


def engine_metadata_path(engine_path: Path | str) -> Path:
    return Path(str(engine_path) + ".json")


def _torch_dtype(trt, dtype):
    import torch

    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int8: torch.int8,
        trt.bool: torch.bool,
    }
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    return table[dtype]


def bench_tensorrt(
    path: Path | str, batch_size: int, options: TensorRTOptions | None = None
) -> dict[str, Any]:
    """Time an engine (a `.engine`/`.plan` file, or an ONNX model built first at `precision`).

    Headline statistics: CUDA-event time of `execute_async_v3` (GPU work of one enqueue, inputs
    already on the device). `e2e_*`: host wall clock with the H2D and D2H copies from pinned memory.
    """
    options = options or TensorRTOptions()
    precision = options.precision or DEFAULT_PRECISION
    path = check_model_file(path)
    if path.suffix == ".onnx":
        external_data_files(path)  # refused before asking for TensorRT
    trt = import_tensorrt()
    import torch

    if path.suffix == ".onnx":
        engine_path = path.with_name(f"{path.stem}.{precision}.engine")
        meta = build_engine(
            path, engine_path, precision, [batch_size], timing_cache=options.timing_cache
        )
    else:
        engine_path = path
        meta_path = engine_metadata_path(path)
        meta = read_json(meta_path) if meta_path.is_file() else {"precision": precision}
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise StageFailed(f"{engine_path}: TensorRT {trt.__version__} cannot load this engine")
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    shape = input_shape_for(path, list(engine.get_tensor_shape(inputs[0])), batch_size)
    if not context.set_input_shape(inputs[0], shape):
        raise InputError(
            f"{engine_path}: batch {batch_size} is outside the engine's optimisation profile "
            f"{meta.get('profile', '')}; rebuild it with that batch size in batch_sizes"
        )
    device: dict[str, torch.Tensor] = {}
    for n in names:
        t = torch.empty(
            tuple(context.get_tensor_shape(n)),
            dtype=_torch_dtype(trt, engine.get_tensor_dtype(n)),
            device="cuda",
        )
        if n in inputs:
            t.normal_()
        device[n] = t
        context.set_tensor_address(n, t.data_ptr())
    host = {n: torch.empty_like(t, device="cpu").pin_memory() for n, t in device.items()}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def enqueue() -> float:
        start.record(stream)
        if not context.execute_async_v3(stream.cuda_stream):
            raise StageFailed("TensorRT execute_async_v3 failed")
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def end_to_end() -> None:
        with torch.cuda.stream(stream):
            for n in inputs:
                device[n].copy_(host[n], non_blocking=True)
            context.execute_async_v3(stream.cuda_stream)
            for n in names:
                if n not in inputs:
                    host[n].copy_(device[n], non_blocking=True)
        stream.synchronize()

    compute = timed_runs(enqueue, options, batch_size, self_timed=True)
    e2e = timed_runs(end_to_end, options, batch_size)
    return {
        "backend": "tensorrt",
        "precision": meta.get("precision", precision),
        "batch_size": batch_size,
        "input_shape": shape,
        "timed": "CUDA events around execute_async_v3 (GPU work of one enqueue, no host copies)",
        "flags": {**options.timing(), "engine": str(engine_path)},
        "device": torch.cuda.get_device_name(),
        "tensorrt_version": trt.__version__,
        "engine_metadata": meta,
        **compute,
        **{f"e2e_{k}": e2e[k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_ips")},
        "e2e_timed": "host wall clock: H2D copy + execute_async_v3 + D2H copy + stream sync",
    }


def run_tensorrt(
    path: Path, batch_sizes: list[int], options: TensorRTOptions
) -> list[dict[str, Any]]:
    return [bench_tensorrt(path, b, options) for b in batch_sizes]


BACKEND = Backend(
    "tensorrt", TensorRTOptions, run_tensorrt, "TensorRT Python API on this machine's GPU"
)
