"""Latency measurement: the one place that computes latency statistics, for every backend.

Every backend (one module each: onnxruntime_backend, tensorrt, trtexec, remote) returns the same
fields (`COMMON_FIELDS`) plus its own, and records what was timed and with which flags.
Methodology: warm-up, then `repeats` timed runs of at least `min_iters` calls and at least
`min_duration_s` seconds each; every statistic is the median over the runs.

Two things compared (two models, two training loops) are measured in matched pairs
(`paired_ratio`, `interleave`, `paired_result`): their runs alternate, and the comparison is the
median of the per-pair ratios, with their spread and whether the spread is smaller than the effect
(`PairedResult.reliable`). Load on a shared machine then slows both sides of a pair alike.

This module imports no backend; each backend describes itself with a `Backend` that the registry
(`compress.deploy.backends`) collects.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from pydantic import Field, ValidationError

from compress.config import StrictModel, validation_problems
from compress.errors import InputError

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
TIMING_FIELDS = ("warmup", "min_iters", "min_duration_s", "repeats", "threads")
PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_PRECISION = "fp32"

Precision = Annotated[
    Literal["fp32", "fp16", "int8"] | None,
    Field(description="Engine precision (default: the device profile's, else fp32)."),
]

TimeoutS = Annotated[
    float, Field(gt=0, description="Seconds one command (a build, a timed run) may take.")
]


class BenchSettings(StrictModel):
    """How long and how often to time; recorded in every result as `flags`. Every backend's
    options model extends it."""

    warmup: int = Field(
        10,
        ge=0,
        le=1_000_000,
        description="Untimed calls before timing (trtexec: milliseconds, at least 200).",
    )
    min_iters: int = Field(100, gt=0, le=10_000_000, description="Timed calls per run, at least.")
    min_duration_s: float = Field(
        2.0, ge=0, le=3600, description="Seconds per timed run, at least."
    )
    repeats: int = Field(
        3, gt=0, le=1000, description="Timed runs; each statistic is the median over them."
    )
    threads: int | None = Field(
        None, gt=0, le=1024, description="Intra-op threads (default: all CPUs)."
    )

    def timing(self) -> dict[str, Any]:
        """The timing settings alone (what results record as `flags`)."""
        return {name: getattr(self, name) for name in TIMING_FIELDS}


@dataclass(frozen=True)
class Backend:
    """A bench backend: its name, its options model and the function that runs it.

    `run(model_path, batch_sizes, options)` returns one result per batch size.
    """

    name: str
    options: type[BenchSettings]
    run: Callable[[Path, list[int], Any], list[dict[str, Any]]]
    summary: str = ""


def describe_errors(e: ValidationError, flag: Callable[[str], str] = str) -> str:
    """A pydantic error as `field: problem; ...`; `flag` renames fields (e.g. to CLI flags)."""
    return "; ".join(validation_problems(e, rename=flag, unknown="unknown field"))


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}: expected fp32, fp16 or int8")
    return precision


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


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- paired comparisons ----------------------------------------------------------------------

Order = Literal["abab", "abba"]
MIN_PAIRS = 3  # fewer pairs give no spread worth the name: never reliable
RELIABLE_RULE = (
    "reliable: at least 3 pairs, and the interquartile range of the paired ratios smaller than "
    "the effect |median_ratio - 1|"
)


@dataclass(frozen=True)
class PairedResult:
    """Two measurements compared in matched pairs: `ratios[i] = b_values[i] / a_values[i]`.

    For times, a ratio below 1 means b is faster; for throughputs, above 1 means b is faster.
    `spread` is the interquartile range of the ratios (`ratio_q1`..`ratio_q3`, linear
    interpolation), `effect` is |median_ratio - 1|, and `reliable` follows `RELIABLE_RULE`.
    """

    median_ratio: float
    spread: float
    effect: float
    reliable: bool
    n_pairs: int
    ratio_q1: float
    ratio_q3: float
    ratio_min: float
    ratio_max: float
    a_median: float
    b_median: float
    ratios: tuple[float, ...]
    a_values: tuple[float, ...]
    b_values: tuple[float, ...]

    def as_dict(self, values: bool = True) -> dict[str, Any]:
        """The result for a JSON file, with the rule; `values=False` leaves out the per-pair
        values."""
        out = asdict(self)
        if not values:
            for k in ("ratios", "a_values", "b_values"):
                out.pop(k)
        else:
            out.update({k: list(out[k]) for k in ("ratios", "a_values", "b_values")})
        return {**out, "rule": RELIABLE_RULE}

    def warning(self, what: str) -> str | None:
        """One line saying why `what` (e.g. "INT8 speed-up at batch 1") is not reliable; None
        when it is."""
        if self.reliable:
            return None
        if self.n_pairs < MIN_PAIRS:
            why = f"only {self.n_pairs} pair(s), at least {MIN_PAIRS} needed"
        else:
            why = (
                f"the paired ratios' spread (IQR {self.spread:.3f}, range {self.ratio_min:.3f}.."
                f"{self.ratio_max:.3f}) is not smaller than the effect {self.effect:.3f}"
            )
        return (
            f"WARNING: {what} {self.median_ratio:.3f} over {self.n_pairs} pairs is not reliable: "
            f"{why}; load on the machine may decide it"
        )


def paired_result(a_values: Sequence[float], b_values: Sequence[float]) -> PairedResult:
    """Compare matched measurements (`a_values[i]` and `b_values[i]` from the same pair)."""
    if len(a_values) != len(b_values) or not a_values:
        raise ValueError(
            f"paired values: {len(a_values)} and {len(b_values)}; expected one each per pair"
        )
    a = np.asarray(a_values, dtype=float)
    b = np.asarray(b_values, dtype=float)
    if (a <= 0).any() or not np.isfinite(a).all() or not np.isfinite(b).all():
        raise ValueError("paired values must be finite, and a's positive")
    ratios = b / a
    q1, median, q3 = (float(q) for q in np.percentile(ratios, [25, 50, 75]))
    spread, effect = q3 - q1, abs(median - 1.0)
    return PairedResult(
        median_ratio=median,
        spread=spread,
        effect=effect,
        reliable=bool(len(ratios) >= MIN_PAIRS and spread < effect),
        n_pairs=len(ratios),
        ratio_q1=q1,
        ratio_q3=q3,
        ratio_min=float(ratios.min()),
        ratio_max=float(ratios.max()),
        a_median=float(np.median(a)),
        b_median=float(np.median(b)),
        ratios=tuple(float(r) for r in ratios),
        a_values=tuple(float(v) for v in a),
        b_values=tuple(float(v) for v in b),
    )


K = TypeVar("K")
V = TypeVar("V")


def interleave(
    measures: Mapping[K, Callable[[], V]],
    rounds: int,
    order: Order = "abba",
    warmup_rounds: int = 0,
) -> dict[K, list[V]]:
    """Call every measure once per round, in turn, and return what each returned, by round.

    `order="abab"` keeps the same order every round (A B, A B, ...); `"abba"` reverses it every
    other round (A B, B A, ...), so a steady drift in load favours neither side. The first
    `warmup_rounds` rounds run the same way and are dropped.
    """
    if rounds <= 0:
        raise ValueError(f"rounds must be > 0 (got {rounds})")
    if order not in ("abab", "abba"):
        raise ValueError(f"order {order!r}: expected abab or abba")
    names = list(measures)
    values: dict[K, list[V]] = {name: [] for name in names}
    for r in range(warmup_rounds + rounds):
        turn = names[::-1] if order == "abba" and r % 2 else names
        for name in turn:
            value = measures[name]()
            if r >= warmup_rounds:
                values[name].append(value)
    return values


def paired_ratio(
    a: Callable[[], float],
    b: Callable[[], float],
    pairs: int,
    order: Order = "abba",
    warmup_rounds: int = 0,
) -> PairedResult:
    """Measure `a` and `b` alternately, `pairs` times each, and compare them pair by pair.

    Each callable runs one measurement and returns it (seconds of one timed run, images per
    second, ...); the ratios are b's value over a's, pair by pair (see `PairedResult`).
    """
    values = interleave({"a": a, "b": b}, pairs, order, warmup_rounds)
    return paired_result(values["a"], values["b"])
