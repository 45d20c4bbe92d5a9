"""Latency measurement: the one place that times inference.

Warm-up, then at least `min_iters` timed runs and at least `min_duration_s` seconds; every result
records what was timed (one `session.run` call, host end to end) and with which settings.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import InputError


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
    fn: Callable[[], Any], warmup: int, min_iters: int, min_duration_s: float
) -> list[float]:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_duration_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def summarize_repeats(runs: list[list[float]], batch_size: int) -> dict[str, Any]:
    """Each statistic as the median over repeated runs, with the runs' p50s and their spread."""
    per_run = [summarize(times, batch_size) for times in runs]
    keys = (
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
    out: dict[str, Any] = {k: statistics.median(r[k] for r in per_run) for k in keys}
    p50s = [r["p50_ms"] for r in per_run]
    out.update(
        iterations=sum(r["iterations"] for r in per_run),
        repeats=len(runs),
        run_p50_ms=p50s,
        run_p50_spread=(max(p50s) - min(p50s)) / out["p50_ms"] if out["p50_ms"] > 0 else 0.0,
    )
    return out


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def bench_onnxruntime(
    path: Path,
    batch_size: int = 1,
    threads: int | None = None,
    warmup: int = 10,
    min_iters: int = 100,
    min_duration_s: float = 2.0,
    repeats: int = 3,
) -> dict[str, Any]:
    """Latency of one onnxruntime CPU `run` at `batch_size`, on random inputs of the model's shape.

    One warm-up, then `repeats` timed runs of at least `min_iters` calls and `min_duration_s`
    seconds each; every statistic is the median over the runs.
    """
    import onnxruntime as ort

    from compress.deploy.onnx_export import onnxruntime_session

    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file not found: {path}")
    threads = threads or default_threads()
    try:
        session = onnxruntime_session(path, threads)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several types for a bad file
        raise InputError(f"{path}: onnxruntime cannot load it ({e})") from None
    inp = session.get_inputs()[0]
    shape = [batch_size] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
    if isinstance(inp.shape[0], int) and inp.shape[0] != batch_size:
        raise InputError(
            f"{path}: fixed batch size {inp.shape[0]}; cannot bench batch {batch_size}"
        )
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    feed = {inp.name: x}

    def call() -> None:
        session.run(None, feed)

    runs = [
        time_calls(call, warmup if i == 0 else 0, min_iters, min_duration_s) for i in range(repeats)
    ]
    return {
        "backend": "onnxruntime",
        "provider": "CPUExecutionProvider",
        "batch_size": batch_size,
        "threads": threads,
        "input_shape": shape,
        "timed": "InferenceSession.run, host end to end",
        "warmup": warmup,
        "min_iters": min_iters,
        "min_duration_s": min_duration_s,
        "onnxruntime_version": ort.__version__,
        "cpu": cpu_name(),
        **summarize_repeats(runs, batch_size),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
