"""Latency measurement: the one place that computes latency statistics, for every backend.

Every backend (onnxruntime here; TensorRT, trtexec and ssh in their modules) returns the same
fields (`COMMON_FIELDS`) plus its own, and records what was timed and with which flags.
Methodology: warm-up, then `repeats` timed runs of at least `min_iters` calls and at least
`min_duration_s` seconds each; every statistic is the median over the runs.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import InputError

BACKENDS = ("onnxruntime", "tensorrt", "trtexec", "ssh")
STAT_KEYS = (
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "std_ms",
    "cv",
    "min_ms",
    "max_ms",
    "throughput_ips",
)
COMMON_FIELDS = frozenset(
    {"backend", "batch_size", "input_shape", "timed", "flags", "precision", "device", "iterations"}
    | set(STAT_KEYS)
)


@dataclass
class BenchSettings:
    """How long and how often to time; recorded in every result as `flags`."""

    warmup: int = 10
    min_iters: int = 100
    min_duration_s: float = 2.0
    repeats: int = 3
    threads: int | None = None

    def check(self) -> BenchSettings:
        for name in ("min_iters", "repeats"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name}: must be > 0 (got {getattr(self, name)})")
        if self.warmup < 0 or self.min_duration_s < 0:
            raise InputError("warmup and min_duration_s must be >= 0")
        if self.threads is not None and self.threads <= 0:
            raise InputError(f"threads: must be > 0 (got {self.threads})")
        return self


def summarize(times_s: list[float], batch_size: int) -> dict[str, float]:
    """Latency statistics in milliseconds and throughput in images per second."""
    ms = np.asarray(times_s) * 1e3
    mean = float(ms.mean())
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": mean,
        "std_ms": float(ms.std()),
        "cv": float(ms.std() / mean) if mean > 0 else 0.0,
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "iterations": int(ms.size),
        "throughput_ips": batch_size * 1e3 / mean if mean > 0 else 0.0,
    }


def time_calls(
    fn: Callable[[], Any],
    warmup: int,
    min_iters: int,
    min_duration_s: float,
    self_timed: bool = False,
) -> list[float]:
    """Seconds per call of `fn`: host wall clock, or what `fn` returns when `self_timed`
    (e.g. CUDA-event time of the enqueued work)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_duration_s:
        t0 = time.perf_counter()
        measured = fn()
        times.append(float(measured) if self_timed else time.perf_counter() - t0)
    return times


def summarize_repeats(runs: list[list[float]], batch_size: int) -> dict[str, Any]:
    """Each statistic as the median over repeated runs, with the runs' p50s and their spread."""
    per_run = [summarize(times, batch_size) for times in runs]
    out: dict[str, Any] = {k: statistics.median(r[k] for r in per_run) for k in STAT_KEYS}
    p50s = [r["p50_ms"] for r in per_run]
    out.update(
        iterations=sum(r["iterations"] for r in per_run),
        repeats=len(runs),
        run_p50_ms=p50s,
        run_p50_spread=(max(p50s) - min(p50s)) / out["p50_ms"] if out["p50_ms"] > 0 else 0.0,
    )
    return out


def timed_runs(
    fn: Callable[[], Any], settings: BenchSettings, batch_size: int, self_timed: bool = False
) -> dict[str, Any]:
    """Warm up once, time `settings.repeats` runs of `fn`, and summarise them."""
    runs = [
        time_calls(
            fn,
            settings.warmup if i == 0 else 0,
            settings.min_iters,
            settings.min_duration_s,
            self_timed,
        )
        for i in range(settings.repeats)
    ]
    return summarize_repeats(runs, batch_size)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def input_shape_for(path: Path, shape: list[Any], batch_size: int) -> list[int]:
    """The model's input shape at `batch_size`; symbolic non-batch dims become 1."""
    if isinstance(shape[0], int) and shape[0] > 0 and shape[0] != batch_size:
        raise InputError(f"{path}: fixed batch size {shape[0]}; cannot bench batch {batch_size}")
    return [batch_size] + [d if isinstance(d, int) and d > 0 else 1 for d in shape[1:]]


def check_model_file(path: Path | str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    return path


def bench_onnxruntime(
    path: Path,
    batch_size: int = 1,
    threads: int | None = None,
    warmup: int = 10,
    min_iters: int = 100,
    min_duration_s: float = 2.0,
    repeats: int = 3,
    provider: str = "cpu",
) -> dict[str, Any]:
    """Latency of one onnxruntime `run` at `batch_size`, on random inputs of the model's shape.

    `provider` is `cpu` or `cuda` (the CUDA execution provider, when this onnxruntime has it).
    """
    import onnxruntime as ort

    from compress.deploy.onnx_export import onnxruntime_session

    path = check_model_file(path)
    settings = BenchSettings(warmup, min_iters, min_duration_s, repeats, threads).check()
    threads = threads or default_threads()
    try:
        session = onnxruntime_session(path, threads, provider)
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
        "flags": {**asdict(settings), "threads": threads, "graph_optimization": "ORT_ENABLE_ALL"},
        "warmup": warmup,
        "min_iters": min_iters,
        "min_duration_s": min_duration_s,
        "onnxruntime_version": ort.__version__,
        "device": cpu_name() if provider == "cpu" else "cuda",
        "cpu": cpu_name(),
        **timed_runs(call, settings, batch_size),
    }


def run_backend(
    backend: str,
    path: Path | str,
    batch_size: int,
    settings: BenchSettings,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One benchmark result from `backend` (see BACKENDS); `options` are backend-specific."""
    options = dict(options or {})
    if backend == "onnxruntime":
        return bench_onnxruntime(
            path,
            batch_size,
            settings.threads,
            settings.warmup,
            settings.min_iters,
            settings.min_duration_s,
            settings.repeats,
            provider=options.get("provider", "cpu"),
        )
    if backend == "tensorrt":
        from compress.deploy.tensorrt import bench_tensorrt

        return bench_tensorrt(path, batch_size, settings, **options)
    if backend == "trtexec":
        from compress.deploy.trtexec import bench_trtexec

        return bench_trtexec(path, batch_size, settings, **options)
    if backend == "ssh":
        from compress.deploy.ssh import bench_ssh

        return bench_ssh(path, [batch_size], settings, **options)[0]
    raise InputError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def bench_sweep(
    backend: str,
    path: Path | str,
    batch_sizes: list[int],
    settings: BenchSettings,
    options: dict[str, Any] | None = None,
    single_stream: bool = False,
) -> list[dict[str, Any]]:
    """One result per batch size. `single_stream`: an MLPerf-SingleStream-like run, i.e. batch 1,
    each query issued when the previous one returns, reporting the 90th percentile."""
    if single_stream:
        batch_sizes = [1]
    if not batch_sizes or any(b <= 0 for b in batch_sizes):
        raise InputError(f"batch sizes must be > 0 (got {batch_sizes})")
    settings.check()
    if backend == "ssh":  # one connection, one copy, for the whole sweep
        from compress.deploy.ssh import bench_ssh

        results = bench_ssh(path, batch_sizes, settings, **(options or {}))
    else:
        results = [run_backend(backend, path, b, settings, options) for b in batch_sizes]
    if single_stream:
        for r in results:
            r["mode"] = "single_stream"
            r["single_stream_p90_ms"] = r["p90_ms"]
    return results


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def interleaved_p50(
    paths: dict[str, Path | str],
    batch_sizes: list[int],
    settings: BenchSettings,
    provider: str = "cpu",
) -> dict[str, dict[str, float]]:
    """p50 ms of each model by batch size on onnxruntime, the models timed in alternation: per
    batch size, `settings.repeats` rounds of one timed run of each model; the median of rounds."""
    p50: dict[str, dict[str, float]] = {}
    for b in batch_sizes:
        runs: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(settings.repeats):
            for name, path in paths.items():
                result = bench_onnxruntime(
                    Path(path),
                    b,
                    settings.threads,
                    settings.warmup,
                    settings.min_iters,
                    settings.min_duration_s,
                    repeats=1,
                    provider=provider,
                )
                runs[name].append(result["p50_ms"])
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
