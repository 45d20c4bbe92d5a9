"""`bench`: latency and throughput of the exported model (needs an earlier `export` stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from compress.config import StrictModel
from compress.deploy.bench import BenchSettings, bench_sweep
from compress.deploy.onnx_export import export_onnx
from compress.errors import InputError
from compress.stages.base import StageConfig, StageContext, StageResult, register_stage


class SSHConfig(StrictModel):
    """A remote device for `backend: ssh`; unset values come from `~/.ssh/config`."""

    host: str = Field(description="Host name or ~/.ssh/config alias.")
    user: str | None = Field(None, description="Login user.")
    port: int | None = Field(None, gt=0, lt=65536, description="SSH port.")
    identity_file: str | None = Field(None, description="Private key file (no passwords are used).")
    known_hosts: str | None = Field(None, description="known_hosts file; host keys are checked.")
    remote_python: str = Field("python3", description="Remote interpreter that has compress.")
    remote_backend: Literal["auto", "compress", "trtexec"] = Field(
        "auto", description="auto: compress bench when installed there, else trtexec."
    )
    device_profile: str | None = Field(
        None, description="Jetson profile (orin_nano_jp6, orin_nx_jp6, agx_orin_jp6, agx_orin_jp7)."
    )


class BenchStage(StageConfig):
    """Time the latest exported model (and the teacher, for comparison) at each batch size."""

    type: Literal["bench"] = "bench"
    needs_earlier: ClassVar[tuple[str, ...]] = ("export",)
    backend: Literal["onnxruntime", "tensorrt", "trtexec", "ssh"] = Field(
        "onnxruntime", description="Inference runtime (tensorrt/trtexec need a local GPU)."
    )
    provider: Literal["cpu", "cuda"] = Field("cpu", description="onnxruntime execution provider.")
    precision: Literal["fp32", "fp16", "int8"] = Field(
        "fp32", description="tensorrt/trtexec/ssh engine precision."
    )
    ssh: SSHConfig | None = Field(None, description="Remote device (backend ssh).")
    batch_sizes: list[PositiveInt] = Field([1], min_length=1, description="Batch sizes to time.")
    single_stream: bool = Field(
        False, description="MLPerf-SingleStream-like: batch 1 only, report the 90th percentile."
    )
    threads: int | None = Field(None, gt=0, description="Intra-op threads (default: all CPUs).")
    warmup: int = Field(10, ge=0, description="Untimed runs first.")
    min_iters: int = Field(100, gt=0, description="At least this many timed runs ...")
    min_duration_s: float = Field(2.0, ge=0, description="... and at least this many seconds ...")
    repeats: int = Field(3, gt=0, description="... per run; each statistic is the median of runs.")
    teacher: bool = Field(
        True, description="Also export and time the teacher, for the report's latency ratio."
    )

    @model_validator(mode="after")
    def _ssh_needs_host(self) -> BenchStage:
        if self.backend == "ssh" and self.ssh is None:
            raise ValueError("backend ssh needs `ssh: {host: ...}`")
        return self

    def preflight_warnings(self) -> list[str]:
        from compress.deploy.tensorrt import tensorrt_warnings

        return tensorrt_warnings("bench backend") if self.backend == "tensorrt" else []

    def options(self) -> dict[str, Any]:
        if self.backend == "onnxruntime":
            return {"provider": self.provider}
        if self.backend == "ssh":
            assert self.ssh is not None
            return {**self.ssh.model_dump(), "precision": self.precision}
        return {"precision": self.precision}

    def settings(self) -> BenchSettings:
        return BenchSettings(
            self.warmup, self.min_iters, self.min_duration_s, self.repeats, self.threads
        )


def _bench_all(path: str | Path, cfg: BenchStage) -> list[dict]:
    return bench_sweep(
        cfg.backend, path, cfg.batch_sizes, cfg.settings(), cfg.options(), cfg.single_stream
    )


@register_stage("bench", BenchStage)
def run(ctx: StageContext, cfg: BenchStage) -> StageResult:
    onnx_path = ctx.artifacts.get("onnx")
    if onnx_path is None:
        raise InputError(f"stages[{ctx.index}] (bench): needs an earlier `export` stage")
    engine = ctx.artifacts.get("engine")
    result = StageResult()
    model_path = engine if cfg.backend == "tensorrt" and engine else onnx_path
    result.metrics["results"] = _bench_all(model_path, cfg)
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
