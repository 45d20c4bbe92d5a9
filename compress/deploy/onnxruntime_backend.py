"""The onnxruntime bench backend (this machine's CPU, or its CUDA execution provider), and models
timed in alternation (`interleaved_p50`, `int8_speedup`)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from compress.deploy.timing import (
    Backend,
    BenchSettings,
    check_model_file,
    cpu_name,
    default_threads,
    input_shape_for,
    timed_runs,
)
from compress.errors import InputError

Provider = Annotated[
    Literal["cpu", "cuda"],
    Field(description="onnxruntime execution provider (cuda: the CUDA execution provider)."),
]


class OnnxRuntimeOptions(BenchSettings):
    """Options of the onnxruntime backend."""

    provider: Provider = "cpu"


def onnxruntime_result(path: Path, batch_size: int, options: OnnxRuntimeOptions) -> dict[str, Any]:
    """Latency of one onnxruntime `run` at `batch_size`, on random inputs of the model's shape."""
    import onnxruntime as ort

    from compress.deploy.onnx_export import onnxruntime_session

    path = check_model_file(path)
    threads = options.threads or default_threads()
    try:
        session = onnxruntime_session(path, threads, options.provider)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several types for a bad file
        raise InputError(f"{path}: onnxruntime cannot load it ({e})") from None
    inp = session.get_inputs()[0]
    shape = input_shape_for(path, list(inp.shape), batch_size)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    feed = {inp.name: x}

    def call() -> None:
        session.run(None, feed)

    return {
        "backend": "onnxruntime",
        "provider": session.get_providers()[0],
        "precision": "fp32",
        "batch_size": batch_size,
        "threads": threads,
        "input_shape": shape,
        "timed": "InferenceSession.run, host end to end (inputs from host memory)",
        "flags": {**options.timing(), "threads": threads, "graph_optimization": "ORT_ENABLE_ALL"},
        "warmup": options.warmup,
        "min_iters": options.min_iters,
        "min_duration_s": options.min_duration_s,
        "onnxruntime_version": ort.__version__,
        "device": cpu_name() if options.provider == "cpu" else "cuda",
        "cpu": cpu_name(),
        **timed_runs(call, options, batch_size),
    }


def run_onnxruntime(
    path: Path, batch_sizes: list[int], options: OnnxRuntimeOptions
) -> list[dict[str, Any]]:
    return [onnxruntime_result(path, b, options) for b in batch_sizes]


def bench_onnxruntime(
    path: Path | str, batch_size: int = 1, threads: int | None = None, **options: Any
) -> dict[str, Any]:
    """One onnxruntime result; `options` are OnnxRuntimeOptions fields (warmup=, provider=, ...)."""
    return onnxruntime_result(
        Path(path), batch_size, OnnxRuntimeOptions(threads=threads, **options)
    )


def interleaved_p50(
    paths: dict[str, Path | str],
    batch_sizes: list[int],
    settings: BenchSettings,
    provider: str = "cpu",
) -> dict[str, dict[str, float]]:
    """p50 ms of each model by batch size on onnxruntime, the models timed in alternation: per
    batch size, `settings.repeats` rounds of one timed run of each model; the median of rounds."""
    options = OnnxRuntimeOptions(**{**settings.timing(), "repeats": 1, "provider": provider})
    p50: dict[str, dict[str, float]] = {}
    for b in batch_sizes:
        runs: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(settings.repeats):
            for name, path in paths.items():
                runs[name].append(onnxruntime_result(Path(path), b, options)["p50_ms"])
        p50[str(b)] = {name: statistics.median(v) for name, v in runs.items()}
    return p50


def int8_speedup(
    int8_path: Path | str,
    float_path: Path | str,
    batch_sizes: list[int],
    settings: BenchSettings,
    provider: str = "cpu",
) -> dict[str, Any]:
    """INT8 against FP32 on onnxruntime (`interleaved_p50`); each speed-up a ratio of medians."""
    p50 = interleaved_p50({"fp32": float_path, "int8": int8_path}, batch_sizes, settings, provider)
    return {
        "backend": "onnxruntime",
        "provider": provider,
        "threads": settings.threads or default_threads(),
        "fp32_p50_ms": {b: t["fp32"] for b, t in p50.items()},
        "int8_p50_ms": {b: t["int8"] for b, t in p50.items()},
        "speedup": {b: t["fp32"] / t["int8"] for b, t in p50.items()},
    }


BACKEND = Backend(
    "onnxruntime", OnnxRuntimeOptions, run_onnxruntime, "onnxruntime on this machine (CPU or CUDA)"
)
