"""`adapt_teacher`: fine-tune the teacher on the train split; later stages learn from the result.

A teacher trained on other data (or another copy of it, such as CIFAR-10's arrays against its
JPEGs) can be weaker on the run's images than a student becomes, and distillation then caps the
student. This stage trains a copy of the teacher with cross-entropy; the copy is saved in the
stage folder as `teacher.safetensors`, measured, and is the teacher of every later stage. The
current model passes through unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import ClassVar, Literal

from compress.stages.base import StageConfig, StageContext, StageResult, register_stage
from compress.stages.training import train_with
from compress.train.loop import TrainingConfig
from compress.train.objectives import CrossEntropyObjective


class AdaptTeacherStage(StageConfig, TrainingConfig):
    """Fine-tune a copy of the teacher with (label-smoothed) cross-entropy on the train split."""

    type: Literal["adapt_teacher"] = "adapt_teacher"
    needs_teacher: ClassVar[bool] = True


@register_stage("adapt_teacher", AdaptTeacherStage, makes="teacher")
def run(ctx: StageContext, cfg: AdaptTeacherStage) -> StageResult:
    teacher = copy.deepcopy(ctx.teacher).requires_grad_(True)
    result = train_with(
        replace(ctx, model=teacher), cfg, CrossEntropyObjective(cfg.label_smoothing)
    )
    return StageResult(model=teacher.eval().requires_grad_(False), metrics=result.metrics)
