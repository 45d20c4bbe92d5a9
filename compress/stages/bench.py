"""`bench`: latency and throughput of the exported model (needs an earlier `export` stage)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from compress.deploy.bench import bench_onnxruntime
from compress.deploy.onnx_export import export_onnx
from compress.errors import InputError
from compress.stages.base import StageConfig, StageContext, StageResult, register_stage


class BenchStage(StageConfig):
    """Time the latest exported model (and the teacher, for comparison) at each batch size."""

    type: Literal["bench"] = "bench"
    needs_earlier: ClassVar[tuple[str, ...]] = ("export",)
    backend: Literal["onnxruntime"] = Field("onnxruntime", description="Inference runtime.")
    batch_sizes: list[int] = Field([1], min_length=1, description="Batch sizes to time.")
    threads: int | None = Field(None, gt=0, description="Intra-op threads (default: all CPUs).")
    warmup: int = Field(10, ge=0, description="Untimed runs first.")
    min_iters: int = Field(100, gt=0, description="At least this many timed runs ...")
    min_duration_s: float = Field(2.0, ge=0, description="... and at least this many seconds ...")
    repeats: int = Field(3, gt=0, description="... per run; each statistic is the median of runs.")
    teacher: bool = Field(
        True, description="Also export and time the teacher, for the report's latency ratio."
    )

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b <= 0 for b in v):
            raise ValueError("every batch size must be > 0")
        return v


def _bench_all(path: str | Path, cfg: BenchStage) -> list[dict]:
    return [
        bench_onnxruntime(
            path, b, cfg.threads, cfg.warmup, cfg.min_iters, cfg.min_duration_s, cfg.repeats
        )
        for b in cfg.batch_sizes
    ]


@register_stage("bench", BenchStage)
def run(ctx: StageContext, cfg: BenchStage) -> StageResult:
    onnx_path = ctx.artifacts.get("onnx")
    if onnx_path is None:
        raise InputError(f"stages[{ctx.index}] (bench): needs an earlier `export` stage")
    result = StageResult()
    result.metrics["results"] = _bench_all(onnx_path, cfg)
    result.model_metrics = latency_fields(result.metrics["results"])
    if cfg.teacher and ctx.recipe.teacher is not None:
        teacher_path = export_onnx(ctx.teacher, ctx.stage_dir / "teacher.onnx", ctx.data.input_size)
        result.metrics["teacher_results"] = _bench_all(teacher_path, cfg)
        result.teacher_metrics = latency_fields(result.metrics["teacher_results"])
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
