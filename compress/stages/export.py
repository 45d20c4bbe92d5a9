"""`export`: ONNX with a dynamic batch axis, checked by onnx.checker and for onnxruntime parity;
with `format: tensorrt`, also a TensorRT engine built from that ONNX model.

An INT8 model (quantize: qat_int8/ptq_int8) exports as Q/DQ ONNX; onnxruntime's integer kernels
round differently from PyTorch's simulated quantization, so its gate is test accuracy: the ONNX
model must score within `int8_accuracy_tolerance` points of the PyTorch quantized model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import onnx
from pydantic import Field, PositiveInt, field_validator

from compress.config import resolve_path
from compress.deploy.onnx_export import (
    OnnxRuntimeModel,
    check_parity,
    checked_onnx_file,
    export_onnx,
)
from compress.deploy.onnxruntime_backend import int8_speedup
from compress.deploy.timing import BenchSettings
from compress.errors import StageFailed
from compress.evaluation import evaluate
from compress.log import logger
from compress.quant.int8 import INT8_OPSET, export_int8_onnx, is_int8
from compress.quant.ort_int8 import OnnxInt8Model
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
        1.0,
        ge=0,
        description="Brevitas INT8 models: allowed |ONNX - PyTorch quantized| test top-1, in "
        "points (x86 CPUs without VNNI saturate some of onnxruntime's U8S8 sums).",
    )
    int8_max_drop: float = Field(
        1.0,
        ge=0,
        description="onnxruntime-quantized INT8 models: allowed drop of the Q/DQ model's test "
        "top-1 below the float model's, in points.",
    )
    speedup_batch_sizes: list[PositiveInt] | None = Field(
        [1, 32],
        description="INT8 models: batch sizes at which the Q/DQ model is timed against its FP32 "
        "export on onnxruntime CPU (int8_speedup); null: not timed.",
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

    _resolve_cache = field_validator("timing_cache", mode="before")(resolve_path)

    def preflight_warnings(self) -> list[str]:
        from compress.deploy.tensorrt import tensorrt_warnings

        return tensorrt_warnings("export format") if self.format == "tensorrt" else []


@register_stage("export", ExportStage)
def run(ctx: StageContext, cfg: ExportStage) -> StageResult:
    path = ctx.stage_dir / "model.onnx"
    if isinstance(ctx.model, OnnxInt8Model):
        export = _export_onnxruntime_int8
    else:
        export = _export_int8 if is_int8(ctx.model) else _export_float
    metrics, model_metrics = export(ctx, cfg, path)
    if export is not _export_float:
        speedup = _int8_speedup(ctx, cfg, path)
        if speedup is not None:
            metrics["int8_speedup"] = speedup
            model_metrics["int8_speedup"] = speedup["speedup"]
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


def _int8_speedup(ctx: StageContext, cfg: ExportStage, path: Path) -> dict | None:
    """INT8 against the FP32 export of the model it was quantized from (onnxruntime CPU)."""
    float_onnx = ctx.artifacts.get("float_onnx")
    if not cfg.speedup_batch_sizes or float_onnx is None or not Path(float_onnx).is_file():
        return None
    settings = BenchSettings(warmup=5, min_iters=20, min_duration_s=0.5, repeats=3)
    result = int8_speedup(path, float_onnx, cfg.speedup_batch_sizes, settings)
    reliable = result.get("reliable", {})
    slower = {b: round(s, 2) for b, s in result["speedup"].items() if s < 1 and reliable.get(b)}
    if slower:
        logger.warning(
            f"stages[{ctx.index}]: the INT8 model is slower than FP32 on onnxruntime CPU "
            f"(speed-up by batch size: {slower}); see the quantize stage's placement trials"
        )
    noisy = sorted(b for b, ok in reliable.items() if not ok)
    if noisy:
        logger.warning(
            f"stages[{ctx.index}]: INT8 speed-up at batch sizes {noisy} is within the timing "
            "noise of this machine (its spread exceeds the effect); see int8_speedup.paired"
        )
    return result


def _parity_images(ctx: StageContext, cfg: ExportStage):
    n_test = len(ctx.data.samples("test"))
    return next(iter(ctx.data.loader("test", batch_size=min(cfg.parity_samples, n_test))))[0]


def _export_float(ctx: StageContext, cfg: ExportStage, path) -> tuple[dict, dict]:
    export_onnx(ctx.model, path, ctx.data.input_size, opset=cfg.opset, dynamo=cfg.dynamo)
    parity = check_parity(ctx.model, path, _parity_images(ctx, cfg))
    scale = parity.pop("max_abs_logit")
    if not math.isfinite(scale):
        raise StageFailed(
            f"ONNX parity failed: the PyTorch model's logits are not finite ({scale}); the model "
            "is broken (did training diverge? see the training stage's metrics.jsonl)"
        )
    allowed = cfg.atol + cfg.rtol * scale
    if not parity["max_abs_diff"] <= allowed:  # a NaN difference fails too
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


def _export_onnxruntime_int8(ctx: StageContext, cfg: ExportStage, path) -> tuple[dict, dict]:
    """Write the model's Q/DQ ONNX; gate: its test top-1 against the float model's."""
    model: OnnxInt8Model = ctx.model
    with checked_onnx_file(path) as onnx_path:
        onnx_path.write_bytes(model.onnx_bytes())
    loader = ctx.data.loader("test")
    float_top1 = evaluate(model.float_model, loader, ctx.device, desc="test fp32")["top1"]
    onnx_top1 = evaluate(OnnxRuntimeModel(path), loader, ctx.device, desc="test onnx int8")["top1"]
    parity = check_parity(model.float_model, path, _parity_images(ctx, cfg))
    parity.pop("max_abs_logit")
    drop = float_top1 - onnx_top1
    if not drop <= cfg.int8_max_drop:  # a NaN fails too
        raise StageFailed(
            f"INT8 accuracy gate failed: onnxruntime test top-1 {onnx_top1:.2f}% is {drop:.2f} "
            f"points below the float model's {float_top1:.2f}% (int8_max_drop "
            f"{cfg.int8_max_drop}); keep sensitive layers in float with full_precision, or "
            "calibrate on more batches"
        )
    metrics = {
        "format": cfg.format,
        "onnx_form": "qdq-int8",
        # a Q/DQ model after max_accuracy_drop: the library that quantized it (QAT: brevitas)
        "int8_route": (ctx.spec.int8 or {}).get("quantized_by", "onnxruntime"),
        "opset": onnx.load(str(path), load_external_data=False).opset_import[0].version,
        **{f"float_{k}": v for k, v in parity.items()},
        "float_test_top1": float_top1,
        "onnx_test_top1": onnx_top1,
        "int8_top1_drop": drop,
        "int8_max_drop": cfg.int8_max_drop,
    }
    return metrics, {"onnx_test_top1": onnx_top1, "int8_top1_drop": drop}


def _export_int8(ctx: StageContext, cfg: ExportStage, path) -> tuple[dict, dict]:
    export_int8_onnx(ctx.model, path, ctx.data.input_size)
    loader = ctx.data.loader("test")
    torch_top1 = evaluate(ctx.model, loader, ctx.device, desc="test torch int8")["top1"]
    onnx_top1 = evaluate(OnnxRuntimeModel(path), loader, ctx.device, desc="test onnx int8")["top1"]
    parity = check_parity(ctx.model, path, _parity_images(ctx, cfg))
    parity.pop("max_abs_logit")
    gap = abs(onnx_top1 - torch_top1)
    if not gap <= cfg.int8_accuracy_tolerance:  # a NaN fails too
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
