"""`export`: ONNX with a dynamic batch axis, checked by onnx.checker and for onnxruntime parity."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from compress.deploy.onnx_export import check_parity, export_onnx
from compress.errors import StageFailed
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
