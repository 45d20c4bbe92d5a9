"""The onnxruntime bench backend (this machine's CPU, or its CUDA execution provider), and models
timed in alternation (`interleaved_latency`, `interleaved_p50`, `int8_speedup`).

Models compared are timed in rounds, one timed run of each per round (`compress.deploy.timing.
interleave`), under a session policy (`SessionPolicy`); comparisons are paired per round
(`compress.deploy.timing.paired_result`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from compress.deploy.timing import (
    Backend,
    BenchSettings,
    Order,
    check_model_file,
    cpu_name,
    default_threads,
    input_shape_for,
    interleave,
    paired_result,
    time_calls,
    timed_runs,
)
from compress.errors import InputError

Provider = Annotated[
    Literal["cpu", "cuda"],
    Field(description="onnxruntime execution provider (cuda: the CUDA execution provider)."),
]

SessionPolicy = Literal["fresh", "kept"]
"""How models timed in alternation hold their sessions.

- `fresh`: a new session for every timed run, with its own warm-up and worker threads that spin
  (onnxruntime's default), alone in the process while it is timed: each run times the model the
  way a process that loads it would.
- `kept`: one session per model, opened once and kept for all rounds (warm-up in the first round
  only), with worker threads that do not spin: an idle session's spinning threads would take
  cores from the one being timed. Cheaper per round; batch-1 latency is higher without spinning.
"""
SESSION_POLICIES = ("fresh", "kept")


class OnnxRuntimeOptions(BenchSettings):
    """Options of the onnxruntime backend."""

    provider: Provider = "cpu"


def _session(path: Path, threads: int, provider: str, spinning: bool = True):
    """An onnxruntime session of `path`; a file onnxruntime cannot load is an InputError."""
    from compress.deploy.onnx_export import onnxruntime_session

    path = check_model_file(path)
    try:
        return onnxruntime_session(path, threads, provider, spinning=spinning)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several types for a bad file
        raise InputError(f"{path}: onnxruntime cannot load it ({e})") from None


def _feed(session, path: Path, batch_size: int) -> tuple[dict[str, np.ndarray], list[int]]:
    inp = session.get_inputs()[0]
    shape = input_shape_for(path, list(inp.shape), batch_size)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    return {inp.name: x}, shape


def onnxruntime_result(path: Path, batch_size: int, options: OnnxRuntimeOptions) -> dict[str, Any]:
    """Latency of one onnxruntime `run` at `batch_size`, on random inputs of the model's shape."""
    import onnxruntime as ort

    path = check_model_file(path)
    threads = options.threads or default_threads()
    session = _session(path, threads, options.provider)
    feed, shape = _feed(session, path, batch_size)

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
        "flags": {
            **options.timing(),
            "threads": threads,
            "graph_optimization": "ORT_ENABLE_ALL",
            "inter_op_threads": 1,
            "intra_op_spinning": True,
        },
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


def _fresh_p50(path: Path, batch_size: int, options: OnnxRuntimeOptions) -> Callable[[], float]:
    """A measure that opens a session, warms it up, times one run and returns its p50 ms."""
    return lambda: onnxruntime_result(path, batch_size, options)["p50_ms"]


def _kept_p50(
    path: Path, batch_size: int, settings: BenchSettings, provider: str
) -> Callable[[], float]:
    """A measure that times one run of a session kept open (non-spinning) and returns its p50 ms;
    the first call warms the session up."""
    session = _session(Path(path), settings.threads or default_threads(), provider, spinning=False)
    feed, _ = _feed(session, Path(path), batch_size)
    calls = 0

    def measure() -> float:
        nonlocal calls
        warmup = settings.warmup if calls == 0 else 0
        calls += 1
        times = time_calls(
            lambda: session.run(None, feed), warmup, settings.min_iters, settings.min_duration_s
        )
        return statistics.median(times) * 1e3

    return measure


def interleaved_latency(
    paths: dict[str, Path | str],
    batch_sizes: list[int],
    settings: BenchSettings,
    provider: str = "cpu",
    sessions: SessionPolicy = "fresh",
    order: Order = "abba",
) -> dict[str, dict[str, list[float]]]:
    """The p50 ms of each timed run, by batch size (as a string), model and round: per batch
    size, `settings.repeats` rounds of one timed run of each model, in turn (`order`), the
    sessions held as `sessions` says (`SessionPolicy`). Runs of the same round are matched pairs
    for `compress.deploy.timing.paired_result`."""
    if sessions not in SESSION_POLICIES:
        raise InputError(f"session policy {sessions!r}: expected fresh or kept")
    out: dict[str, dict[str, list[float]]] = {}
    for b in batch_sizes:
        if sessions == "kept":
            measures = {
                name: _kept_p50(Path(path), b, settings, provider) for name, path in paths.items()
            }
        else:
            options = OnnxRuntimeOptions(
                **{**settings.timing(), "repeats": 1, "provider": provider}
            )
            measures = {name: _fresh_p50(Path(path), b, options) for name, path in paths.items()}
        out[str(b)] = interleave(measures, settings.repeats, order)
        del measures  # kept sessions close before the next batch size's open
    return out


def interleaved_p50(
    paths: dict[str, Path | str],
    batch_sizes: list[int],
    settings: BenchSettings,
    provider: str = "cpu",
    sessions: SessionPolicy = "fresh",
) -> dict[str, dict[str, float]]:
    """p50 ms of each model by batch size on onnxruntime, the models timed in alternation
    (`interleaved_latency`): the median over the rounds."""
    runs = interleaved_latency(paths, batch_sizes, settings, provider, sessions)
    return {b: {name: statistics.median(v) for name, v in by.items()} for b, by in runs.items()}


def int8_speedup(
    int8_path: Path | str,
    float_path: Path | str,
    batch_sizes: list[int],
    settings: BenchSettings,
    provider: str = "cpu",
    sessions: SessionPolicy = "fresh",
) -> dict[str, Any]:
    """INT8 against FP32 on onnxruntime, timed in alternation (`interleaved_latency`).

    `speedup[b]` is the median over the rounds of FP32's p50 over INT8's in the same round;
    `paired[b]` gives its spread and `reliable[b]` whether the spread is smaller than the effect
    (`compress.deploy.timing.PairedResult`)."""
    runs = interleaved_latency(
        {"fp32": float_path, "int8": int8_path}, batch_sizes, settings, provider, sessions
    )
    paired = {b: paired_result(t["int8"], t["fp32"]) for b, t in runs.items()}
    return {
        "backend": "onnxruntime",
        "provider": provider,
        "threads": settings.threads or default_threads(),
        "sessions": sessions,
        "fp32_p50_ms": {b: p.b_median for b, p in paired.items()},
        "int8_p50_ms": {b: p.a_median for b, p in paired.items()},
        "speedup": {b: p.median_ratio for b, p in paired.items()},
        "reliable": {b: p.reliable for b, p in paired.items()},
        "paired": {b: p.as_dict() for b, p in paired.items()},
    }


BACKEND = Backend(
    "onnxruntime", OnnxRuntimeOptions, run_onnxruntime, "onnxruntime on this machine (CPU or CUDA)"
)
