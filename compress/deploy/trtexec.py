"""trtexec: version-aware command lines, and parsing of its `--exportTimes` JSON and text summary.

TensorRT 11 flipped trtexec's defaults (CUDA graph and spin-wait on, host/device copies off) and
removed the precision flags (`--fp16`, `--int8`, `--best`): precision comes from the ONNX model.
The same command therefore gives different numbers across versions, so every result records the
TensorRT version and the full command.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from pydantic import Field

from compress.deploy.external_data import external_data_files
from compress.deploy.timing import (
    DEFAULT_PRECISION,
    Backend,
    BenchSettings,
    Precision,
    TimeoutS,
    check_model_file,
    check_precision,
    input_shape_for,
    summarize_repeats,
)
from compress.errors import StageFailed


class TrtexecOptions(BenchSettings):
    """Options of the trtexec backend (this machine's trtexec)."""

    precision: Precision = None
    trtexec: str | None = Field(
        None, description="trtexec executable (default: PATH, then /usr/src/tensorrt/bin)."
    )
    transfers: bool = Field(False, description="Time the host/device copies too.")
    timeout_s: TimeoutS = 1800


_VERSION = re.compile(r"\[TensorRT v(\d+)\]")
_STAT = re.compile(r"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\))\s*=\s*([-\d.eE+]+)\s*ms")
_SUMMARY_NAMES = {
    "Latency": "latency",
    "Enqueue Time": "enqueue",
    "H2D Latency": "h2d",
    "GPU Compute Time": "gpu_compute",
    "D2H Latency": "d2h",
}


def parse_version(text: str) -> str | None:
    """`10.3.0` from trtexec's banner `[TensorRT v100300]` (major*10000 + minor*100 + patch)."""
    m = _VERSION.search(text)
    if not m:
        return None
    n = int(m.group(1))
    if n >= 10000:
        return f"{n // 10000}.{n // 100 % 100}.{n % 100}"
    return f"{n // 1000}.{n // 100 % 10}.{n % 100}"  # TensorRT 8: v8601 = 8.6.1


def parse_times(text: str) -> dict[str, list[float]]:
    """Per-iteration milliseconds from an `--exportTimes` file (warm-ups excluded by trtexec)."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise StageFailed(f"trtexec --exportTimes output is not JSON ({e})") from None
    if not isinstance(records, list) or not records or "latencyMs" not in records[0]:
        raise StageFailed("trtexec --exportTimes output has no per-iteration latencyMs records")
    keys = ("latencyMs", "computeMs", "h2dMs", "d2hMs")
    out = {k: [float(r[k]) for r in records if k in r] for k in keys}
    out["enqueueMs"] = [float(r["endEnqMs"]) - float(r["startEnqMs"]) for r in records]
    return out


def parse_summary(text: str) -> dict[str, Any]:
    """The `=== Performance summary ===` block of trtexec's log as numbers (milliseconds, qps)."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        body = re.sub(r"^\[[^\]]*\]\s*\[[A-Z]\]\s*", "", line.strip())
        if body.startswith("Throughput:"):
            out["throughput_qps"] = float(body.split(":", 1)[1].split()[0])
        elif body.startswith("Total Host Walltime:"):
            out["host_walltime_s"] = float(body.split(":", 1)[1].split()[0])
        elif body.startswith("Total GPU Compute Time:"):
            out["gpu_compute_total_s"] = float(body.split(":", 1)[1].split()[0])
        else:
            name, _, rest = body.partition(":")
            key = _SUMMARY_NAMES.get(name.strip())
            if key is None or "=" not in rest:
                continue
            stats: dict[str, float] = {}
            for stat, pct, value in _STAT.findall(rest):
                stats[f"p{float(pct):g}" if pct else stat] = float(value)
            out[key] = stats
    if "latency" not in out:
        raise StageFailed("trtexec output has no performance summary (did the run fail?)")
    return out


def find_trtexec() -> str | None:
    for candidate in (
        "trtexec",
        "/usr/src/tensorrt/bin/trtexec",
        "/usr/local/tensorrt/bin/trtexec",
    ):
        found = shutil.which(candidate)
        if found:
            return found
    return None


def shape_arg(input_name: str, shape: list[int]) -> str:
    return f"{input_name}:{'x'.join(str(d) for d in shape)}"


def build_flags(
    major: int,
    onnx: str,
    engine: str,
    precision: str,
    input_name: str,
    min_shape: list[int],
    opt_shape: list[int],
    max_shape: list[int],
    timing_cache: str | None = None,
) -> list[str]:
    """trtexec arguments that build `engine` from `onnx` without running it."""
    flags = [
        f"--onnx={onnx}",
        f"--saveEngine={engine}",
        "--skipInference",
        f"--minShapes={shape_arg(input_name, min_shape)}",
        f"--optShapes={shape_arg(input_name, opt_shape)}",
        f"--maxShapes={shape_arg(input_name, max_shape)}",
    ]
    if timing_cache:
        flags.append(f"--timingCacheFile={timing_cache}")
    if major < 11:  # TensorRT 11 removed these: precision comes from the ONNX model
        flags += {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8"]}[precision]
    return flags


def run_flags(
    major: int,
    engine: str,
    input_name: str,
    shape: list[int],
    settings: BenchSettings,
    times_path: str,
    transfers: bool = False,
) -> list[str]:
    """trtexec arguments for one timed run with the same meaning on TensorRT 10 and 11:
    CUDA graph, spin-wait, and (unless `transfers`) GPU compute without host/device copies.
    trtexec warms up for a time, so `settings.warmup` is read as milliseconds here (>= 200)."""
    flags = [
        f"--loadEngine={engine}",
        f"--shapes={shape_arg(input_name, shape)}",
        f"--warmUp={max(200, settings.warmup)}",
        f"--iterations={settings.min_iters}",
        f"--duration={max(1, round(settings.min_duration_s))}",
        "--percentile=50,90,99",
        f"--exportTimes={times_path}",
    ]
    if major < 11:
        flags += ["--useCudaGraph", "--useSpinWait"]
        if not transfers:
            flags.append("--noDataTransfers")
    elif transfers:
        flags.append("--includeDataTransfers")
    return flags


def result_from_times(
    times_runs: list[dict[str, list[float]]],
    summaries: list[dict[str, Any]],
    batch_size: int,
    **fields: Any,
) -> dict[str, Any]:
    """A benchmark result from repeated trtexec runs: the `latencyMs` of each iteration through
    the shared statistics, plus GPU-compute p50 and trtexec's own throughput."""
    stats = summarize_repeats([[t / 1e3 for t in r["latencyMs"]] for r in times_runs], batch_size)
    compute = summarize_repeats([[t / 1e3 for t in r["computeMs"]] for r in times_runs], batch_size)
    out = {**fields, **stats, "gpu_compute_p50_ms": compute["p50_ms"]}
    qps = [s["throughput_qps"] for s in summaries if "throughput_qps" in s]
    if qps:
        out["trtexec_throughput_qps"] = sorted(qps)[len(qps) // 2]
    return out


def _run(cmd: list[str], timeout: float) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StageFailed(f"{cmd[0]} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise StageFailed(f"{' '.join(cmd[:2])} ... failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout + proc.stderr


def onnx_input(path: Path) -> tuple[str, list[Any]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inp = model.graph.input[0]
    dims = [
        d.dim_value if d.HasField("dim_value") else d.dim_param
        for d in inp.type.tensor_type.shape.dim
    ]
    return inp.name, dims


def bench_trtexec(
    path: Path | str, batch_size: int, options: TrtexecOptions | None = None
) -> dict[str, Any]:
    """Build an engine from the ONNX model with the local trtexec, then time it."""
    options = options or TrtexecOptions()
    precision = check_precision(options.precision or DEFAULT_PRECISION)
    transfers, timeout_s = options.transfers, options.timeout_s
    path = check_model_file(path)
    external_data_files(path)  # trtexec reads it beside the file
    exe = options.trtexec or find_trtexec()
    if exe is None:
        raise StageFailed(
            "trtexec not found on PATH or in /usr/src/tensorrt/bin: install TensorRT, or bench "
            "with --backend onnxruntime (this machine) or --backend ssh (a remote device)"
        )
    version = parse_version(_run([exe, "--help"], 60)) or "unknown"
    major = int(version.split(".")[0]) if version != "unknown" else 10
    name, dims = onnx_input(path)
    shape = input_shape_for(path, dims, batch_size)
    with tempfile.TemporaryDirectory(prefix="compress-trtexec-") as tmp:
        engine = str(Path(tmp) / "model.engine")
        build = build_flags(major, str(path), engine, precision, name, shape, shape, shape)
        _run([exe, *build], timeout_s)
        times, summaries, flags = [], [], []
        for i in range(options.repeats):
            times_path = str(Path(tmp) / f"times{i}.json")
            flags = run_flags(major, engine, name, shape, options, times_path, transfers)
            summaries.append(parse_summary(_run([exe, *flags], timeout_s)))
            times.append(parse_times(Path(times_path).read_text()))
    return result_from_times(
        times,
        summaries,
        batch_size,
        backend="trtexec",
        precision=precision,
        batch_size=batch_size,
        input_shape=shape,
        timed="trtexec latencyMs per iteration"
        + (" (H2D + compute + D2H)" if transfers else " (GPU compute, no host copies)"),
        flags={"build": build, "run": flags, "repeats": options.repeats},
        tensorrt_version=version,
        device="local GPU",
    )


def run_trtexec(
    path: Path, batch_sizes: list[int], options: TrtexecOptions
) -> list[dict[str, Any]]:
    return [bench_trtexec(path, b, options) for b in batch_sizes]


BACKEND = Backend("trtexec", TrtexecOptions, run_trtexec, "trtexec on this machine's GPU")
