"""`distill`: Hinton knowledge distillation of the current model from the fixed teacher."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from tqdm import tqdm

from compress.io import atomic_path
from compress.stages.base import StageConfig, StageContext, StageResult, register_stage
from compress.stages.train import train_with
from compress.train.loop import TrainingConfig
from compress.train.objectives import DistillationObjective

TEACHER_LOGITS = "teacher_logits.pt"


class DistillStage(StageConfig, TrainingConfig):
    """Train the current model on `alpha * T^2 * KL(s/T || t/T) + (1 - alpha) * CE`."""

    type: Literal["distill"] = "distill"
    temperature: float = Field(4.0, gt=0, description="Softmax temperature T of the KL term.")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the KL term; 1 - alpha weighs CE.")
    cache_teacher_logits: bool | Literal["auto"] = Field(
        "auto",
        description="Compute teacher logits once per sample and reuse them; auto = when "
        "data.augment is none (the train pipeline is then deterministic).",
    )
    needs_teacher: ClassVar[bool] = True


@torch.no_grad()
def teacher_logits_once(ctx: StageContext) -> torch.Tensor:
    """Teacher logits for every train sample (deterministic transform), cached in the stage folder."""
    path = ctx.stage_dir / TEACHER_LOGITS
    if path.is_file():
        return torch.load(path, weights_only=True)
    loader = ctx.data.loader("train", train=False)
    teacher, out = ctx.teacher, None
    for images, _, indices in tqdm(
        loader, desc="teacher logits", unit="batch", leave=False, disable=None
    ):
        logits = teacher(images.to(ctx.device)).float().cpu()
        if out is None:
            out = torch.empty(len(loader.dataset), logits.shape[1])
        out[indices] = logits
    assert out is not None
    if ctx.dist.is_main:
        with atomic_path(path) as tmp:
            torch.save(out, tmp)
    return out


@register_stage("distill", DistillStage, makes_model=True)
def run(ctx: StageContext, cfg: DistillStage) -> StageResult:
    cache = cfg.cache_teacher_logits
    if cache == "auto":
        cache = ctx.data.deterministic_train_transform()
    elif cache and not ctx.data.deterministic_train_transform():
        from compress.errors import InputError

        raise InputError(
            f"stages[{ctx.index}].cache_teacher_logits: needs data.augment: none "
            f"(augmentation '{ctx.data.cfg.augment}' changes the teacher's input every epoch)"
        )
    logits = teacher_logits_once(ctx) if cache else None
    objective = DistillationObjective(
        ctx.teacher, cfg.temperature, cfg.alpha, cfg.label_smoothing, teacher_logits=logits
    )
    result = train_with(ctx, cfg, objective)
    result.metrics["teacher_logits_cached"] = bool(cache)
    return result
