"""`quantize`: quantized distillation (Polino et al. 2018) of the current model from the teacher.

The weights of every conv/linear layer but the full-precision ones are quantized to `bits` uniform
levels per bucket on each forward pass; the optimiser updates full-precision shadow weights with the
straight-through gradient; the loss is KD against the fixed teacher (the paper's code: T 2, alpha 0.7).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from compress.errors import InputError
from compress.quant.weights import WeightQuantizer
from compress.stages.base import StageConfig, StageContext, StageResult, register_stage
from compress.stages.training import DistillationConfig, distillation_objective, train_with
from compress.train.loop import TrainingConfig


class QuantizeStage(StageConfig, TrainingConfig, DistillationConfig):
    """Quantized distillation: b-bit bucketed uniform weights trained against the teacher."""

    type: Literal["quantize"] = "quantize"
    method: Literal["quantized_distillation"] = Field(
        "quantized_distillation", description="Quantization method."
    )
    bits: int = Field(4, ge=1, le=32, description="Bits per quantized weight: 2**bits levels.")
    bucket_size: int | None = Field(
        256, gt=0, description="Values sharing one (min, max) scale; null = one per tensor."
    )
    stochastic_rounding: bool = Field(
        False, description="Round stochastically in training forwards (deterministic at the end)."
    )
    full_precision: list[str] | None = Field(
        None, description="Layers kept in fp32 (module names); default: first conv, last linear."
    )
    temperature: float = Field(2.0, gt=0, description="Softmax temperature T (paper's code: 2).")
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the KL term (paper's code: 0.7).")
    lr: float = Field(0.01, gt=0, description="Peak learning rate (fine-tuning a trained model).")
    needs_teacher: ClassVar[bool] = True


@register_stage("quantize", QuantizeStage, makes_model=True)
def run(ctx: StageContext, cfg: QuantizeStage) -> StageResult:
    try:
        quantizer = WeightQuantizer(
            ctx.model, cfg.bits, cfg.bucket_size, cfg.stochastic_rounding, cfg.full_precision
        )
    except ValueError as e:
        raise InputError(f"stages[{ctx.index}].full_precision: {e}") from None
    objective, cached = distillation_objective(ctx, cfg, cfg.label_smoothing)
    result = train_with(ctx, cfg, objective, hooks=quantizer)
    size = quantizer.size_report(ctx.model)
    result.metrics.update(size, method=cfg.method, teacher_logits_cached=cached)
    result.model_metrics = {
        k: size[k]
        for k in (
            "bits",
            "bits_per_weight",
            "huffman_bits_per_weight",
            "quantized_size_bytes",
            "compression_ratio",
        )
    }
    return result
