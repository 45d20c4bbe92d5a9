"""`quantize`: quantized distillation and differentiable quantization (Polino et al. 2018).

- quantized_distillation: the weights of every conv/linear layer but the full-precision ones are
  quantized to `bits` uniform levels per bucket on each forward pass; the optimiser updates
  full-precision shadow weights with the straight-through gradient.
- differentiable_quantization: the weights stay fixed; per tensor, 2**bits points (in each bucket's
  [min, max] scale) are learned by SGD, each weight taking its nearest point; with `bit_budget`,
  tensors with larger gradient norms get more points (the total is unchanged).
- qat_int8: Brevitas quantization-aware training of INT8 weights and activations (see
  compress/quant/int8.py), calibrated first, trained on the same KD loss; exports as Q/DQ ONNX.
- ptq_int8: post-training INT8, calibrated on training images, by one of two routes
  (`int8_route`): `brevitas`, the same quantized model as qat_int8 without training, or
  `onnxruntime`, onnxruntime's `quantize_static` on the exported FP32 ONNX model with compress's
  measured Q/DQ placement (compress/quant/ort_int8.py). `auto` takes onnxruntime for the
  onnxruntime target (it covers every model that exports, and places Q/DQ by measured speed) and
  Brevitas for the tensorrt target, falling back to onnxruntime's quantizer in ModelOpt's TensorRT
  configuration where Brevitas cannot handle an op.
The first two train on KD against the fixed teacher (the paper's code: T 2, alpha 0.7).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, Literal

import onnx
from pydantic import Field, model_validator

from compress.deploy.onnx_export import export_float_reference
from compress.errors import InputError, StageFailed
from compress.io import read_json_if_intact
from compress.log import logger
from compress.markdown import fmt, table
from compress.models import ModelSpec
from compress.quant.compact import save_compact
from compress.quant.int8 import (
    Int8Target,
    Int8Unsupported,
    calibrate,
    export_int8_onnx,
    int8_size,
    quantize_int8,
)
from compress.quant.ort_int8 import (
    OnnxInt8Model,
    Placement,
    calibration_batches,
    onnx_int8_size,
    quantize_onnx_int8,
)
from compress.quant.points import PointQuantizer, assign_points, gradient_norms
from compress.quant.qdq_layers import float_reference
from compress.quant.sensitivity import (
    SENSITIVITY_JSON,
    SENSITIVITY_PNG,
    BudgetUnreachable,
    Ranking,
    report_lines,
    run_sensitivity,
    spread_warning,
    validation_set,
)
from compress.quant.size import size_report
from compress.quant.weights import WeightQuantizer, select_layers
from compress.stages.base import StageConfig, StageContext, StageResult, register_stage
from compress.stages.training import (
    DistillationConfig,
    distillation_objective,
    train_loaders,
    train_with,
)
from compress.train.loop import TrainingConfig
from compress.train.objectives import DistillationObjective

COMPACT_FILE = "model.compact.safetensors"
INT8_METHODS = ("qat_int8", "ptq_int8")


class QuantizeStage(StageConfig, TrainingConfig, DistillationConfig):
    """Quantize the current model's conv/linear weights while distilling from the teacher."""

    type: Literal["quantize"] = "quantize"
    method: Literal[
        "quantized_distillation", "differentiable_quantization", "qat_int8", "ptq_int8"
    ] = Field("quantized_distillation", description="Quantization method.")
    bits: int = Field(
        4, ge=1, le=32, description="Bits per quantized weight: 2**bits levels (8 for *_int8)."
    )
    bucket_size: int | None = Field(
        256, gt=0, description="Values sharing one (min, max) scale; null = one per tensor."
    )
    stochastic_rounding: bool = Field(
        False, description="quantized_distillation: round stochastically in training forwards."
    )
    full_precision: list[str] | None = Field(
        None, description="Layers kept in fp32 (module names); default: first conv, last linear."
    )
    points_init: Literal["quantiles", "uniform"] = Field(
        "quantiles", description="differentiable_quantization: initial points."
    )
    bit_budget: bool = Field(
        False, description="differentiable_quantization: share points by gradient norm."
    )
    distill_from: Literal["teacher", "input"] = Field(
        "teacher",
        description="KD target: the recipe's teacher, or the unquantized input model "
        "(what the paper's differentiable quantization code does).",
    )
    temperature: float = Field(2.0, gt=0, description="Softmax temperature T (paper's code: 2).")
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the KL term (paper's code: 0.7).")
    lr: float = Field(
        0.01,
        gt=0,
        description="Peak learning rate of the weights (quantized_distillation; qat_int8 "
        "defaults to 1e-4) or of the points (differentiable_quantization: 1e-4).",
    )
    int8_target: Int8Target = Field(
        "onnxruntime",
        description="*_int8: the runtime the Q/DQ model is shaped for: onnxruntime (uint8 "
        "activations after ReLU, fast on CPU) or tensorrt (signed int8 activations).",
    )
    calibration_batches: int = Field(
        16,
        gt=0,
        description="*_int8: training batches (unaugmented) that set the activation scales.",
    )
    int8_route: Literal["auto", "brevitas", "onnxruntime"] = Field(
        "auto",
        description="ptq_int8: brevitas (fx graph quantization), onnxruntime (quantize_static "
        "on the FP32 ONNX model), or auto: onnxruntime for the onnxruntime target; brevitas for "
        "tensorrt, else onnxruntime where Brevitas cannot handle an op. qat_int8: brevitas.",
    )
    max_accuracy_drop: float | None = Field(
        None,
        ge=0,
        le=100,
        description="*_int8: the most the Q/DQ model's validation top-1 may fall below the float "
        "model's, in points; the layers that cost the most accuracy per unit of speed return to "
        "float (FP16 on TensorRT) until it holds (sensitivity.json). null: every layer INT8.",
    )
    budget_margin_se: float = Field(
        0.0,
        ge=0,
        le=5,
        description="max_accuracy_drop: hold the budget with this many standard errors of the "
        "per-image top-1 difference to spare, so that it also holds beyond the validation "
        "images (1: about 84% one-sided confidence). 0: the validation drop alone.",
    )
    sensitivity_images: int = Field(
        1000,
        gt=0,
        le=100_000,
        description="max_accuracy_drop: validation images it is measured on.",
    )
    sensitivity_ranking: Ranking | None = Field(
        None,
        description="max_accuracy_drop: order layers by accuracy recovered per unit of speed "
        "lost on onnxruntime CPU (speed) or by accuracy alone (accuracy). null: speed for the "
        "onnxruntime target, accuracy for tensorrt (whose per-layer speed is not measured).",
    )
    int8_placement: Placement = Field(
        "measured",
        description="ptq_int8 through onnxruntime: all (every op its quantizer supports) or "
        "measured (op groups stay float where that is faster on onnxruntime CPU; onnxruntime "
        "target only).",
    )

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        method = data.get("method")
        if data.get("max_accuracy_drop") is not None and method not in INT8_METHODS:
            raise ValueError(
                "max_accuracy_drop: returns INT8 layers to float, so it needs method ptq_int8 or "
                f"qat_int8 (got {method or 'quantized_distillation'})"
            )
        if data.get("sensitivity_ranking") == "speed" and data.get("int8_target") == "tensorrt":
            raise ValueError(
                "sensitivity_ranking: speed measures onnxruntime CPU kernels; use accuracy for "
                "the tensorrt target"
            )
        if method == "differentiable_quantization":
            data = {"lr": 1e-4, **data}
        elif method in INT8_METHODS:
            if data.get("bits", 8) != 8:
                raise ValueError(f"bits: {method} quantizes to 8 bits (got {data['bits']})")
            data = {"lr": 1e-4, **data, "bits": 8}
            if method == "ptq_int8":  # calibration only: the training fields are not used
                data = {"epochs": 1, **data}
            elif data.get("int8_route") == "onnxruntime":
                raise ValueError("int8_route: qat_int8 trains in PyTorch, so only through brevitas")
            if data.get("int8_target") == "tensorrt" and data.get("int8_placement") == "measured":
                raise ValueError(
                    "int8_placement: measured times onnxruntime's CPU kernels; use all for the "
                    "tensorrt target"
                )
        return data

    @property
    def needs_teacher(self) -> bool:  # type: ignore[override]
        return self.method != "ptq_int8" and self.distill_from == "teacher"


def _objective(ctx: StageContext, cfg: QuantizeStage):
    if cfg.distill_from == "teacher":
        return distillation_objective(ctx, cfg, cfg.label_smoothing)
    reference = copy.deepcopy(ctx.model).to(ctx.device).eval().requires_grad_(False)
    return DistillationObjective(reference, cfg.temperature, cfg.alpha, cfg.label_smoothing), False


def _run_int8(ctx: StageContext, cfg: QuantizeStage) -> StageResult:
    if ctx.spec.int8 is not None:
        raise InputError(f"stages[{ctx.index}].method: the model is already INT8-quantized")
    float_onnx = ctx.stage_dir / "float.onnx"  # the FP32 reference the INT8 speed-up is timed on
    if ctx.dist.is_main:
        _export_float(ctx, float_onnx)
    float_model = ctx.model  # the QAT route replaces ctx.model with the quantized one
    route = cfg.int8_route
    if route == "auto":
        route = "onnxruntime" if cfg.int8_target == "onnxruntime" else "brevitas"
        if cfg.method == "qat_int8":
            route = "brevitas"
    try:
        result = _run_brevitas(ctx, cfg) if route == "brevitas" else None
    except Int8Unsupported as e:
        if cfg.int8_route != "auto" or cfg.method == "qat_int8":
            raise InputError(f"stages[{ctx.index}] ({cfg.method}): {e}") from None
        logger.warning(f"{e}; quantizing with onnxruntime's quantizer instead")
        route, result = "onnxruntime", None
    if result is None:
        result = _run_onnxruntime(ctx, cfg, float_onnx)
    if cfg.max_accuracy_drop is not None and ctx.dist.is_main:
        _fit_accuracy_budget(ctx, cfg, result, float_model, float_onnx, route)
    result.metrics.update(method=cfg.method, bits=8, int8_target=cfg.int8_target, int8_route=route)
    result.model_metrics = {
        "quantization": cfg.method,
        "int8_route": route,
        "bits": 8,
        **{
            k: result.metrics.get(k)
            for k in (
                "bits_per_weight",
                "huffman_bits_per_weight",
                "quantized_size_bytes",
                "compression_ratio",
                "int8_layers",
                "weight_layers",
                "float_layers",
                "val_top1_drop",
            )
            if k in result.metrics
        },
    }
    if ctx.dist.is_main:
        result.artifacts["float_onnx"] = str(float_onnx)
    return result


def _fit_accuracy_budget(
    ctx: StageContext,
    cfg: QuantizeStage,
    result: StageResult,
    float_model,
    float_onnx: Path,
    route: str,
) -> None:
    """Return the layers that cost the most validation accuracy per unit of speed to float until
    the Q/DQ model is within `max_accuracy_drop`; the result becomes that Q/DQ model (run by
    onnxruntime, its spec naming `route`, the library that quantized it), with sensitivity.json
    and sensitivity.png in the stage folder."""
    model = result.model
    if isinstance(model, OnnxInt8Model):
        qdq = onnx.load_from_string(model.onnx_bytes())
    else:  # Brevitas: its Q/DQ export is what deploys
        with tempfile.TemporaryDirectory(prefix="compress-int8-") as tmp:
            path = export_int8_onnx(model, Path(tmp) / "int8.onnx", ctx.data.input_size)
            qdq = onnx.load(str(path))
    reference = onnx.load(str(float_onnx))
    # onnxruntime's quantizer keeps the FP32 model's names, so a float layer gets its weights and
    # folded activations back; Brevitas keeps activations explicit, and its (QAT-trained) weights
    # are the dequantized integers.
    fp32 = float_reference(qdq, reference) if isinstance(model, OnnxInt8Model) else None
    ranking = cfg.sensitivity_ranking or (
        "speed" if cfg.int8_target == "onnxruntime" else "accuracy"
    )
    note = "tensorrt target: float layers build in FP16 or FP32; ranked by accuracy"
    try:
        analysis, chosen = run_sensitivity(
            qdq,
            reference,
            validation_set(reference, ctx.data, cfg.sensitivity_images),
            ranking,
            cfg.max_accuracy_drop,
            fp32,
            ctx.stage_dir,
            note if cfg.int8_target == "tensorrt" else "",
            trained=cfg.method == "qat_int8",
            margin_se=cfg.budget_margin_se,
        )
    except BudgetUnreachable as e:
        raise StageFailed(
            f"stages[{ctx.index}].{e} (each layer's sensitivity: "
            f"{ctx.stage_dir / SENSITIVITY_JSON})"
        ) from None
    paths = {
        "sensitivity": ctx.stage_dir / SENSITIVITY_JSON,
        "sensitivity_plot": ctx.stage_dir / SENSITIVITY_PNG,
    }
    logger.info(
        f"stages[{ctx.index}]: {len(analysis.chosen)} of {len(analysis.layers)} quantized layers and ops "
        f"in float for max_accuracy_drop {cfg.max_accuracy_drop}: validation top-1 drop "
        f"{analysis.int8_drop:.2f} -> {analysis.final_drop:.2f} points"
    )
    advice = spread_warning(len(analysis.chosen), len(analysis.layers), analysis.latency_vs_int8)
    if advice:
        logger.warning(f"stages[{ctx.index}]: {advice}")
    result.model = OnnxInt8Model(float_model.cpu(), chosen.SerializeToString())
    result.spec = _int8_spec(ctx, cfg, route="onnxruntime", quantized_by=route)
    result.metrics.update(
        onnx_int8_size(chosen, reference),
        float_layers=len(analysis.chosen),
        float_modules=[r.layer.module for r in analysis.layers if r.float],
        val_top1_drop=analysis.final_drop,
        int8_val_top1_drop=analysis.int8_drop,
        max_accuracy_drop=cfg.max_accuracy_drop,
        sensitivity_ranking=ranking,
        latency_vs_int8=analysis.latency_vs_int8,
        sensitivity_seconds=analysis.seconds,
    )
    result.artifacts.update({k: str(p) for k, p in paths.items()})


def _export_float(ctx: StageContext, path: Path) -> Path:
    return export_float_reference(ctx.model, path, ctx.data.input_size)


def _int8_spec(ctx: StageContext, cfg: QuantizeStage, **route: str) -> ModelSpec:
    input_size = list(ctx.data.input_size)
    int8 = {**route, "target": cfg.int8_target, "input_size": input_size}
    return ModelSpec(ctx.spec.name, ctx.spec.kwargs, int8=int8)


def _run_brevitas(ctx: StageContext, cfg: QuantizeStage) -> StageResult:
    objective = _objective(ctx, cfg)[0] if cfg.method == "qat_int8" else None
    input_size = ctx.data.input_size
    model = quantize_int8(ctx.model, cfg.int8_target, input_size)
    batch_size = cfg.batch_size or ctx.data.cfg.batch_size
    calibration_loader = ctx.data.loader("train", train=False, batch_size=batch_size)
    seen = calibrate(model, calibration_loader, ctx.device, cfg.calibration_batches)
    with tempfile.TemporaryDirectory(prefix="compress-int8-") as tmp:  # fail before training
        export_int8_onnx(model, Path(tmp) / "check.onnx", input_size)
    if objective is not None:
        ctx.model = model
        result = train_with(ctx, cfg, objective)
    else:
        result = StageResult(model=model)
    result.spec = _int8_spec(ctx, cfg)
    result.metrics.update(int8_size(model), calibration_images=seen)
    return result


def _run_onnxruntime(ctx: StageContext, cfg: QuantizeStage, float_onnx: Path) -> StageResult:
    batch_size = cfg.batch_size or ctx.data.cfg.batch_size
    loader = ctx.data.loader("train", train=False, batch_size=batch_size)
    batches = calibration_batches(loader, cfg.calibration_batches)
    with tempfile.TemporaryDirectory(prefix="compress-int8-") as tmp:
        if not ctx.dist.is_main:  # the main rank wrote the float model into the stage folder
            float_onnx = _export_float(ctx, Path(tmp) / "float.onnx")
        qdq = Path(tmp) / "int8.onnx"
        try:
            placement = quantize_onnx_int8(
                float_onnx,
                qdq,
                batches,
                cfg.int8_target,
                cfg.int8_placement if cfg.int8_target == "onnxruntime" else "all",
                cfg.full_precision,
            )
        except InputError as e:
            raise InputError(f"stages[{ctx.index}].{e}") from None
        onnx_bytes = qdq.read_bytes()
        size = onnx_int8_size(onnx.load(str(qdq)), onnx.load(str(float_onnx)))
    if placement.excluded_groups and size["int8_layers"] * 2 < size["weight_layers"]:
        logger.warning(
            f"stages[{ctx.index}]: {size['weight_layers'] - size['int8_layers']} of "
            f"{size['weight_layers']} conv/linear layers stayed float: their integer kernels "
            f"measured slower on this CPU (float groups {placement.excluded_groups}); "
            "int8_placement: all makes every layer INT8 (smaller, and faster on CPUs with VNNI)"
        )
    model = OnnxInt8Model(ctx.model.cpu(), onnx_bytes)
    result = StageResult(model=model, spec=_int8_spec(ctx, cfg, route="onnxruntime"))
    result.metrics.update(
        size, calibration_images=sum(len(b) for b in batches), **placement.to_dict()
    )
    return result


def _method(m: dict[str, Any]) -> str:
    """The quantization method, with the INT8 route and how many weight layers are INT8."""
    text = str(m.get("quantization"))
    if m.get("int8_route"):
        text += f" ({m['int8_route']}"
        if m.get("weight_layers"):
            text += f", {m['int8_layers']}/{m['weight_layers']} layers INT8"
        text += ")"
    return text


def _speedup(speedup: dict[str, float] | None) -> str:
    if not speedup:
        return "–"
    return ", ".join(f"{ratio:.2f}x (batch {b})" for b, ratio in speedup.items())


def report_section(
    report: dict[str, Any], entries: list[dict[str, Any]], run_dir: Path
) -> list[str]:
    """report.md's Quantization section: every quantized model's bits, size and INT8 speed-up."""
    quantized = [m for m in report["models"] if m.get("bits") is not None]
    if not quantized:
        return []
    lines = [
        "## Quantization",
        "",
        "Bits per weight count the bucket scales (and learned codebooks) or the per-channel "
        "INT8 scales. Sub-8-bit models: the size is Polino et al.'s Huffman accounting, not a "
        "file, and the compact file is what is written; INT8 models: the size is the INT8 "
        "weights with their scales, and the Q/DQ ONNX file is what is written.",
        "",
    ]
    rows = []
    for m in quantized:
        huffman = m.get("huffman_bits_per_weight")
        rows.append(
            [
                m["name"],
                _method(m),
                m["bits"],
                f"{m['bits_per_weight']:.3f}",
                "–" if huffman is None else f"{huffman:.3f}",
                fmt(m["quantized_size_bytes"], "bytes"),
                fmt(m.get("compact_bytes") or m.get("onnx_bytes"), "bytes"),
                f"{m['compression_ratio']:.1f}x",
                _speedup(m.get("int8_speedup")),
            ]
        )
    headers = ["model", "method", "bits", "bits/weight", "Huffman bits/weight", "size"]
    headers += ["written file", "fp32 / size", "INT8 speed-up"]
    lines += table(headers, rows)
    lines += [
        "",
        "INT8 speed-up: p50 latency of the FP32 export over the Q/DQ model's on onnxruntime "
        "CPU, timed in alternation in the export stage, by batch size.",
        "",
    ]
    for entry in entries:
        doc = read_json_if_intact(run_dir / entry["dir"] / SENSITIVITY_JSON)
        if isinstance(doc, dict):
            plot = f"{entry['dir']}/{SENSITIVITY_PNG}"
            lines += [f"### Mixed precision: {entry['label']}", ""]
            lines += report_lines(doc, plot if (run_dir / plot).is_file() else None)
    return lines


@register_stage("quantize", QuantizeStage, makes="model", report_section=report_section)
def run(ctx: StageContext, cfg: QuantizeStage) -> StageResult:
    if cfg.method in INT8_METHODS:
        return _run_int8(ctx, cfg)
    try:
        names, keep = select_layers(ctx.model, cfg.full_precision)
    except ValueError as e:
        raise InputError(f"stages[{ctx.index}].full_precision: {e}") from None
    objective, cached = _objective(ctx, cfg)
    points = None
    if cfg.method == "quantized_distillation":
        hooks = WeightQuantizer(
            ctx.model, cfg.bits, cfg.bucket_size, cfg.stochastic_rounding, cfg.full_precision
        )
    else:
        points = [2**cfg.bits] * len(names)
        if cfg.bit_budget:
            loader = train_loaders(ctx, cfg)[0]
            points = assign_points(
                gradient_norms(ctx.model, loader, names, ctx.device), 2**cfg.bits
            )
        hooks = PointQuantizer(ctx.model, points, names, cfg.bucket_size, cfg.points_init)
    result = train_with(ctx, cfg, objective, hooks=hooks)
    codes = hooks.codes()
    size = size_report(ctx.model, codes)
    compact = ctx.stage_dir / COMPACT_FILE
    if ctx.dist.is_main:
        save_compact(ctx.model, ctx.spec, codes, compact)
        size["compact_bytes"] = compact.stat().st_size
        result.artifacts["compact"] = str(compact)
    result.metrics.update(
        size,
        method=cfg.method,
        bits=cfg.bits,
        bucket_size=cfg.bucket_size,
        full_precision_layers=keep,
        points_per_tensor=dict(zip(names, points, strict=True)) if points else None,
        teacher_logits_cached=cached,
    )
    result.model_metrics = {
        "quantization": cfg.method,
        "bits": cfg.bits,
        **{
            k: size.get(k)
            for k in (
                "bits_per_weight",
                "huffman_bits_per_weight",
                "quantized_size_bytes",
                "compression_ratio",
                "compact_bytes",
            )
        },
    }
    return result
