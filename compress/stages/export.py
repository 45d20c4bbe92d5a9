"""`export`: ONNX with a dynamic batch axis, checked by onnx.checker and for onnxruntime parity;
with `format: tensorrt`, also a TensorRT engine built from that ONNX model.

An INT8 model (quantize: qat_int8/ptq_int8) exports as Q/DQ ONNX; onnxruntime's integer kernels
round differently from PyTorch's simulated quantization, so its gate is test accuracy: the ONNX
model must score within `int8_accuracy_tolerance` points of the PyTorch quantized model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, field_validator

from compress.deploy.onnx_export import OnnxRuntimeModel, check_parity, export_onnx
from compress.errors import StageFailed
from compress.evaluation import evaluate
from compress.quant.int8 import INT8_OPSET, export_int8_onnx, is_int8
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
    int8_accuracy_tolerance: float = Field(
        0.3, ge=0, description="INT8 models: allowed |ONNX - PyTorch| test top-1, in points."
    )
    precision: Literal["fp32", "fp16", "int8"] = Field(
        "fp32",
        description="TensorRT engine precision; int8 needs a Q/DQ ONNX model (explicit quantization).",
    )
    batch_sizes: list[PositiveInt] = Field(
        [1, 32], min_length=1, description="TensorRT optimisation profile: min..max batch."
    )
    timing_cache: Path | None = Field(
        None, description="TensorRT timing cache file, reused across builds (default: none)."
    )
    workspace_mb: int = Field(1024, gt=0, description="TensorRT builder workspace (MiB).")

    _resolve_cache = field_validator("timing_cache", mode="before")(_resolve_path)

    def preflight_warnings(self) -> list[str]:
        from compress.deploy.tensorrt import tensorrt_warnings

        return tensorrt_warnings("export format") if self.format == "tensorrt" else []


@register_stage("export", ExportStage)
def run(ctx: StageContext, cfg: ExportStage) -> StageResult:
    path = ctx.stage_dir / "model.onnx"
    export = _export_int8 if is_int8(ctx.model) else _export_float
    metrics, model_metrics = export(ctx, cfg, path)
    metrics["size_bytes"] = model_metrics["onnx_bytes"] = path.stat().st_size
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
    return StageResult(metrics=metrics, artifacts=artifacts, model_metrics=model_metrics)


def _parity_images(ctx: StageContext, cfg: ExportStage):
    n_test = len(ctx.data.samples("test"))
    return next(iter(ctx.data.loader("test", batch_size=min(cfg.parity_samples, n_test))))[0]


def _export_float(ctx: StageContext, cfg: ExportStage, path) -> tuple[dict, dict]:
    export_onnx(ctx.model, path, ctx.data.input_size, opset=cfg.opset, dynamo=cfg.dynamo)
    parity = check_parity(ctx.model, path, _parity_images(ctx, cfg))
    scale = parity.pop("max_abs_logit")
    allowed = cfg.atol + cfg.rtol * scale
    if parity["max_abs_diff"] > allowed:
        raise StageFailed(
            f"ONNX parity failed: max |onnxruntime - torch| = {parity['max_abs_diff']:.3g} > "
            f"{allowed:.3g} (atol {cfg.atol} + rtol {cfg.rtol} * max|logit| {scale:.3g}); "
            f"try dynamo: false in stages[{ctx.index}]"
        )
    metrics = {
        "format": cfg.format,
        "opset": cfg.opset,
        "dynamo": cfg.dynamo,
        **parity,
        "tolerance": allowed,
    }
    return metrics, {"onnx_max_abs_diff": parity["max_abs_diff"]}


def _export_int8(ctx: StageContext, cfg: ExportStage, path) -> tuple[dict, dict]:
    export_int8_onnx(ctx.model, path, ctx.data.input_size)
    loader = ctx.data.loader("test")
    torch_top1 = evaluate(ctx.model, loader, ctx.device, desc="test torch int8")["top1"]
    onnx_top1 = evaluate(OnnxRuntimeModel(path), loader, ctx.device, desc="test onnx int8")["top1"]
    parity = check_parity(ctx.model, path, _parity_images(ctx, cfg))
    parity.pop("max_abs_logit")
    gap = abs(onnx_top1 - torch_top1)
    if gap > cfg.int8_accuracy_tolerance:
        raise StageFailed(
            f"INT8 ONNX parity failed: onnxruntime test top-1 {onnx_top1:.2f}% vs PyTorch "
            f"{torch_top1:.2f}% ({gap:.2f} points > {cfg.int8_accuracy_tolerance})"
        )
    metrics = {
        "format": cfg.format,
        "onnx_form": "qdq-int8",
        "opset": INT8_OPSET,
        **parity,
        "torch_test_top1": torch_top1,
        "onnx_test_top1": onnx_top1,
        "int8_accuracy_tolerance": cfg.int8_accuracy_tolerance,
    }
    model_metrics = {"onnx_max_abs_diff": parity["max_abs_diff"], "onnx_test_top1": onnx_top1}
    return metrics, model_metrics
