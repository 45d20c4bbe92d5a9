"""`distill`: Hinton knowledge distillation of the current model from the fixed teacher."""

from __future__ import annotations

from typing import ClassVar, Literal

from compress.stages.base import StageConfig, StageContext, StageResult, register_stage
from compress.stages.training import DistillationConfig, distillation_objective, train_with
from compress.train.loop import TrainingConfig


class DistillStage(StageConfig, TrainingConfig, DistillationConfig):
    """Train the current model on `alpha * T^2 * KL(s/T || t/T) + (1 - alpha) * CE`."""

    type: Literal["distill"] = "distill"
    needs_teacher: ClassVar[bool] = True


@register_stage("distill", DistillStage, makes_model=True)
def run(ctx: StageContext, cfg: DistillStage) -> StageResult:
    objective, cached = distillation_objective(ctx, cfg, cfg.label_smoothing)
    result = train_with(ctx, cfg, objective)
    result.metrics["teacher_logits_cached"] = cached
    return result
