"""`bench`: latency and throughput of the exported model (needs an earlier `export` stage)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, PositiveInt, ValidationError, model_validator

from compress.deploy.backends import bench, get_backend
from compress.deploy.onnx_export import export_onnx
from compress.deploy.onnxruntime_backend import Provider
from compress.deploy.remote import SSHDevice
from compress.deploy.timing import (
    BenchSettings,
    Precision,
    describe_errors,
    interleave,
    paired_result,
)
from compress.errors import InputError
from compress.markdown import table
from compress.stages.base import StageConfig, StageContext, StageResult, register_stage


class BenchStage(BenchSettings, StageConfig):
    """Time the latest exported model (and the teacher, for comparison) at each batch size."""

    type: Literal["bench"] = "bench"
    needs_earlier: ClassVar[tuple[str, ...]] = ("export",)
    backend: Literal["onnxruntime", "tensorrt", "trtexec", "ssh"] = Field(
        "onnxruntime", description="Inference runtime (tensorrt/trtexec need a local GPU)."
    )
    provider: Provider = "cpu"
    precision: Precision = None
    ssh: SSHDevice | None = Field(None, description="Remote device (backend ssh).")
    batch_sizes: list[PositiveInt] = Field([1], min_length=1, description="Batch sizes to time.")
    single_stream: bool = Field(
        False, description="MLPerf-SingleStream-like: batch 1 only, report the 90th percentile."
    )
    teacher: bool = Field(
        True, description="Also export and time the teacher, for the report's latency ratio."
    )

    @model_validator(mode="after")
    def _check_options(self) -> BenchStage:
        if self.backend == "ssh" and self.ssh is None:
            raise ValueError("backend ssh needs `ssh: {host: ...}`")
        try:
            self.options()
        except ValidationError as e:
            raise ValueError(describe_errors(e)) from None
        except InputError as e:
            raise ValueError(str(e)) from None
        return self

    def preflight_warnings(self) -> list[str]:
        from compress.deploy.tensorrt import tensorrt_warnings

        return tensorrt_warnings("bench backend") if self.backend == "tensorrt" else []

    def options(self) -> BenchSettings:
        """The backend's options model from the fields this stage sets; a device profile
        (`ssh.device_profile`) supplies the timing settings and precision it leaves unset."""
        model = get_backend(self.backend).options
        given = {k: getattr(self, k) for k in self.model_fields_set if k in model.model_fields}
        if self.ssh is not None and self.backend == "ssh":
            given.update(self.ssh.model_dump(exclude_unset=True))
        return model.model_validate(given)


def _bench_all(path: str | Path, cfg: BenchStage) -> list[dict]:
    return bench(path, cfg.backend, cfg.options(), cfg.batch_sizes, cfg.single_stream)


def _median_over_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One result per batch size: each timing statistic is its median over the rounds."""
    merged = []
    for results in zip(*rounds, strict=True):
        entry = dict(results[0])
        for key in results[0]:
            timed = key.endswith("_ms") or key in ("throughput_ips", "cv")
            if timed and all(isinstance(r.get(key), (int, float)) for r in results):
                entry[key] = float(np.median([r[key] for r in results]))
        merged.append({**entry, "rounds": len(results)})
    return merged


def _bench_with_teacher(
    student: str | Path, teacher: str | Path, cfg: BenchStage
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Time the student and the teacher in alternating rounds (S T, T S, ...; one timed run each
    per round, `repeats` rounds), so that load on the machine hits both alike. Returns each
    model's results (medians over rounds) and the teacher-over-student p50 ratio per batch size,
    compared round by round."""
    one_run = cfg.options().model_copy(update={"repeats": 1})

    def timed(path: str | Path) -> Callable[[], list[dict]]:
        return lambda: bench(path, cfg.backend, one_run, cfg.batch_sizes, cfg.single_stream)

    runs = interleave({"student": timed(student), "teacher": timed(teacher)}, cfg.repeats)
    speedup = {}
    for i, batch_size in enumerate(cfg.batch_sizes):
        student_p50 = [rounds[i]["p50_ms"] for rounds in runs["student"]]
        teacher_p50 = [rounds[i]["p50_ms"] for rounds in runs["teacher"]]
        speedup[str(batch_size)] = paired_result(student_p50, teacher_p50).as_dict(values=False)
    return _median_over_rounds(runs["student"]), _median_over_rounds(runs["teacher"]), speedup


def report_section(
    report: dict[str, Any], entries: list[dict[str, Any]], run_dir: Path
) -> list[str]:
    """report.md's Latency section: one row per model, backend and batch size benched."""
    rows = [
        [
            m["name"],
            r["backend"],
            r["batch_size"],
            r["threads"],
            *(f"{r[k]:.3f}" for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms")),
            f"{r['throughput_ips']:.1f}",
        ]
        for m in report["models"]
        for r in m.get("latency", [])
    ]
    if not rows:
        return []
    headers = ["model", "backend", "batch", "threads", "p50 ms", "p90 ms", "p99 ms", "mean ms"]
    return ["## Latency", "", *table([*headers, "std ms", "images/s"], rows), ""]


@register_stage("bench", BenchStage, report_section=report_section)
def run(ctx: StageContext, cfg: BenchStage) -> StageResult:
    onnx_path = ctx.artifacts.get("onnx")
    if onnx_path is None:
        raise InputError(f"stages[{ctx.index}] (bench): needs an earlier `export` stage")
    engine = ctx.artifacts.get("engine")
    result = StageResult()
    model_path = engine if cfg.backend == "tensorrt" and engine else onnx_path
    if cfg.teacher and ctx.recipe.teacher is not None:
        teacher_path = export_onnx(ctx.teacher, ctx.stage_dir / "teacher.onnx", ctx.data.input_size)
        results, teacher_results, speedup = _bench_with_teacher(model_path, teacher_path, cfg)
        result.metrics.update(
            results=results, teacher_results=teacher_results, speedup_vs_teacher=speedup
        )
        result.teacher_metrics = latency_fields(teacher_results)
    else:
        result.metrics["results"] = _bench_all(model_path, cfg)
    result.model_metrics = latency_fields(result.metrics["results"])
    return result


def latency_fields(results: list[dict]) -> dict:
    """Report fields: every result, plus the p50 at the smallest batch as `latency_ms`."""
    smallest = min(results, key=lambda r: r["batch_size"])
    return {
        "latency": results,
        "latency_ms": smallest["p50_ms"],
        "latency_batch_size": smallest["batch_size"],
        "backend": smallest["backend"],
    }
