"""`export`: ONNX with a dynamic batch axis, checked by onnx.checker and for onnxruntime parity;
with `format: tensorrt`, also a TensorRT engine built from that ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from compress.deploy.onnx_export import check_parity, export_onnx
from compress.errors import StageFailed
from compress.recipe import _resolve_path
from compress.stages.base import StageConfig, StageContext, StageResult, register_stage


class ExportStage(StageConfig):
    """Export the current model and fail if onnxruntime disagrees with PyTorch beyond tolerance."""

    type: Literal["export"] = "export"
    format: Literal["onnx", "tensorrt"] = Field(
        "onnx",
        description="onnx, or tensorrt: the ONNX model plus a TensorRT engine (needs a GPU).",
    )
    opset: int = Field(20, ge=18, le=23, description="ONNX opset (the torch exporter needs >= 18).")
    dynamo: bool = Field(
        True, description="Use torch.export (false: the legacy TorchScript exporter)."
    )
    atol: float = Field(1e-4, gt=0, description="Parity: allowed |onnx - torch| ...")
    rtol: float = Field(1e-3, ge=0, description="... plus rtol * |torch|, per logit.")
    parity_samples: int = Field(64, gt=0, description="Test images used for the parity check.")
    precision: Literal["fp32", "fp16", "int8"] = Field(
        "fp32",
        description="TensorRT engine precision; int8 needs a Q/DQ ONNX model (explicit quantization).",
    )
    batch_sizes: list[int] = Field(
        [1, 32], min_length=1, description="TensorRT optimisation profile: min..max batch."
    )
    timing_cache: Path | None = Field(
        None, description="TensorRT timing cache file, reused across builds (default: none)."
    )
    workspace_mb: int = Field(1024, gt=0, description="TensorRT builder workspace (MiB).")

    _resolve_cache = field_validator("timing_cache", mode="before")(_resolve_path)

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b <= 0 for b in v):
            raise ValueError("every batch size must be > 0")
        return v

    def preflight_warnings(self) -> list[str]:
        if self.format != "tensorrt":
            return []
        from compress.deploy.tensorrt import tensorrt_problem

        problem = tensorrt_problem()
        return [f"export format tensorrt: {problem}; this stage will fail"] if problem else []


@register_stage("export", ExportStage)
def run(ctx: StageContext, cfg: ExportStage) -> StageResult:
    path = ctx.stage_dir / "model.onnx"
    export_onnx(ctx.model, path, ctx.data.input_size, opset=cfg.opset, dynamo=cfg.dynamo)
    n_test = len(ctx.data.samples("test"))
    images = next(iter(ctx.data.loader("test", batch_size=min(cfg.parity_samples, n_test))))[0]
    parity = check_parity(ctx.model, path, images)
    scale = parity.pop("max_abs_logit")
    allowed = cfg.atol + cfg.rtol * scale
    metrics = {
        "format": cfg.format,
        "opset": cfg.opset,
        "dynamo": cfg.dynamo,
        **parity,
        "tolerance": allowed,
        "size_bytes": path.stat().st_size,
    }
    if parity["max_abs_diff"] > allowed:
        raise StageFailed(
            f"ONNX parity failed: max |onnxruntime - torch| = {parity['max_abs_diff']:.3g} > "
            f"{allowed:.3g} (atol {cfg.atol} + rtol {cfg.rtol} * max|logit| {scale:.3g}); "
            f"try dynamo: false in stages[{ctx.index}]"
        )
    artifacts = {"onnx": str(path)}
    if cfg.format == "tensorrt":
        from compress.deploy.tensorrt import build_engine

        engine = ctx.stage_dir / f"model.{cfg.precision}.engine"
        metrics["tensorrt"] = build_engine(
            path,
            engine,
            cfg.precision,
            cfg.batch_sizes,
            timing_cache=cfg.timing_cache,
            workspace_mb=cfg.workspace_mb,
        )
        artifacts["engine"] = str(engine)
    return StageResult(
        metrics=metrics,
        artifacts=artifacts,
        model_metrics={
            "onnx_max_abs_diff": parity["max_abs_diff"],
            "onnx_bytes": metrics["size_bytes"],
        },
    )
