"""`export`: ONNX with a dynamic batch axis, checked by onnx.checker and for onnxruntime parity.

An INT8 model (quantize: qat_int8/ptq_int8) exports as Q/DQ ONNX; onnxruntime's integer kernels
round differently from PyTorch's simulated quantization, so its gate is test accuracy: the ONNX
model must score within `int8_accuracy_tolerance` points of the PyTorch quantized model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from compress.deploy.onnx_export import OnnxRuntimeModel, check_parity, export_onnx
from compress.errors import StageFailed
from compress.evaluation import evaluate
from compress.quant.int8 import INT8_OPSET, export_int8_onnx, is_int8
from compress.stages.base import StageConfig, StageContext, StageResult, register_stage


class ExportStage(StageConfig):
    """Export the current model and fail if onnxruntime disagrees with PyTorch beyond tolerance."""

    type: Literal["export"] = "export"
    format: Literal["onnx"] = Field("onnx", description="Output format.")
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


@register_stage("export", ExportStage)
def run(ctx: StageContext, cfg: ExportStage) -> StageResult:
    path = ctx.stage_dir / "model.onnx"
    if is_int8(ctx.model):
        return _export_int8(ctx, cfg, path)
    export_onnx(ctx.model, path, ctx.data.input_size, opset=cfg.opset, dynamo=cfg.dynamo)
    n_test = len(ctx.data.samples("test"))
    images = next(iter(ctx.data.loader("test", batch_size=min(cfg.parity_samples, n_test))))[0]
    parity = check_parity(ctx.model, path, images)
    scale = parity.pop("max_abs_logit")
    allowed = cfg.atol + cfg.rtol * scale
    metrics = {
        "format": "onnx",
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
    return StageResult(
        metrics=metrics,
        artifacts={"onnx": str(path)},
        model_metrics={
            "onnx_max_abs_diff": parity["max_abs_diff"],
            "onnx_bytes": metrics["size_bytes"],
        },
    )


def _export_int8(ctx: StageContext, cfg: ExportStage, path) -> StageResult:
    export_int8_onnx(ctx.model, path, ctx.data.input_size)
    loader = ctx.data.loader("test")
    torch_top1 = evaluate(ctx.model, loader, ctx.device, desc="test torch int8")["top1"]
    onnx_top1 = evaluate(OnnxRuntimeModel(path), loader, ctx.device, desc="test onnx int8")["top1"]
    images = next(iter(ctx.data.loader("test", batch_size=cfg.parity_samples)))[0]
    parity = check_parity(ctx.model, path, images)
    parity.pop("max_abs_logit")
    gap = abs(onnx_top1 - torch_top1)
    metrics = {
        "format": "onnx-qdq-int8",
        "opset": INT8_OPSET,
        **parity,
        "torch_test_top1": torch_top1,
        "onnx_test_top1": onnx_top1,
        "int8_accuracy_tolerance": cfg.int8_accuracy_tolerance,
        "size_bytes": path.stat().st_size,
    }
    if gap > cfg.int8_accuracy_tolerance:
        raise StageFailed(
            f"INT8 ONNX parity failed: onnxruntime test top-1 {onnx_top1:.2f}% vs PyTorch "
            f"{torch_top1:.2f}% ({gap:.2f} points > {cfg.int8_accuracy_tolerance})"
        )
    return StageResult(
        metrics=metrics,
        artifacts={"onnx": str(path)},
        model_metrics={
            "onnx_max_abs_diff": parity["max_abs_diff"],
            "onnx_bytes": metrics["size_bytes"],
            "onnx_test_top1": onnx_top1,
        },
    )
