"""`distill`: knowledge distillation of the current model from the fixed teacher.

- `logits`: Hinton KD, `alpha * T^2 * KL(s/T || t/T) + (1 - alpha) * CE`.
- `feature`: KD plus a hint loss (projector + mean squared error) on chosen taps.
- `scalekd`: KD plus ScaleKD's feature terms (Fan et al. 2024): cross-attention projectors (CAP),
  dual-view feature mimicking (DFM) and teacher parameter perception (TPP), each switchable;
  defaults are the paper's (T 1, alpha 0.5, spatial 0.08, frequency 0.06, softmax scale 5).

Projectors belong to the training objective only: the stage's output model is the bare student.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from compress.errors import InputError
from compress.kd.taps import TapSpec
from compress.stages.base import StageConfig, StageContext, StageResult, register_stage
from compress.stages.training import DistillationConfig, distillation_objective, train_with
from compress.train.loop import TrainingConfig

# Options that only one method reads; setting them for another method is an error.
METHOD_OPTIONS = {
    "feature": ("feature_weight",),
    "scalekd": (
        "spatial_weight",
        "frequency_weight",
        "cap",
        "dfm",
        "tpp",
        "heads",
        "softmax_scale",
    ),
}
TAP_OPTIONS = ("teacher_taps", "student_taps")


class DistillStage(StageConfig, TrainingConfig, DistillationConfig):
    """Train the current model on KD from the teacher, with feature terms for feature/scalekd."""

    type: Literal["distill"] = "distill"
    needs_teacher: ClassVar[bool] = True
    method: Literal["logits", "feature", "scalekd"] = Field(
        "logits", description="logits (Hinton KD), feature (KD + hint loss) or scalekd."
    )
    teacher_taps: list[TapSpec] | None = Field(
        None,
        description="feature/scalekd: teacher features to match, as stage indices (negative from "
        "the end) or module names; default [-1] (feature), [-2, -1] (scalekd).",
    )
    student_taps: list[TapSpec] | None = Field(
        None, description="feature/scalekd: the student features matched to teacher_taps, pairwise."
    )
    feature_weight: float = Field(1.0, ge=0, description="feature: weight of the hint loss.")
    spatial_weight: float = Field(
        0.08, ge=0, description="scalekd: weight of DFM's spatial view (per tap pair)."
    )
    frequency_weight: float = Field(
        0.06, ge=0, description="scalekd: weight of DFM's frequency view (DCT without DC)."
    )
    cap: bool = Field(
        True, description="scalekd: cross-attention projectors (off: 1x1 conv hint projectors)."
    )
    dfm: bool = Field(True, description="scalekd: dual views (off: the spatial view only).")
    tpp: bool = Field(
        True,
        description="scalekd: teacher parameter perception (needs exactly two tap pairs; off: "
        "each pair compared directly).",
    )
    heads: int | None = Field(
        None, gt=0, description="scalekd: CAP attention heads; default about 64 channels a head."
    )
    softmax_scale: float = Field(5.0, gt=0, description="scalekd: CAP attention logit scale.")

    @model_validator(mode="before")
    @classmethod
    def _method_options(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        method = data.get("method", "logits")
        for other, names in METHOD_OPTIONS.items():
            wrong = [n for n in names if n in data and other != method]
            if wrong:
                raise ValueError(
                    f"{', '.join(wrong)}: only for method {other} (method is {method})"
                )
        taps = [n for n in TAP_OPTIONS if n in data]
        if taps and method == "logits":
            raise ValueError(f"{', '.join(taps)}: only for methods feature and scalekd")
        if method == "scalekd":  # the paper's logit term: 0.5 task + 0.5 soft targets at T 1
            data = {"temperature": 1.0, "alpha": 0.5, **data}
        if method != "logits":
            if data.get("cache_teacher_logits") is True:
                raise ValueError(
                    f"cache_teacher_logits: method {method} needs the teacher's features every step"
                )
            default = [-2, -1] if method == "scalekd" else [-1]
            data = {
                "teacher_taps": default,
                "student_taps": default,
                **data,
                "cache_teacher_logits": False,
            }
        return data


def feature_objective(ctx: StageContext, cfg: DistillStage):
    """The feature/scalekd objective, its projectors sized by one probe pass of both models."""
    from compress.kd.objectives import FeatureHintObjective, ScaleKDObjective

    ctx.model.to(ctx.device)
    probe = torch.zeros(2, *ctx.data.input_size, device=ctx.device)
    common = (ctx.teacher, ctx.model, cfg.teacher_taps, cfg.student_taps, probe)
    kd = {
        "temperature": cfg.temperature,
        "alpha": cfg.alpha,
        "label_smoothing": cfg.label_smoothing,
    }
    try:
        if cfg.method == "feature":
            return FeatureHintObjective(*common, weight=cfg.feature_weight, **kd)
        return ScaleKDObjective(
            *common,
            spatial_weight=cfg.spatial_weight,
            frequency_weight=cfg.frequency_weight,
            cap=cfg.cap,
            dfm=cfg.dfm,
            tpp=cfg.tpp,
            heads=cfg.heads,
            softmax_scale=cfg.softmax_scale,
            **kd,
        )
    except InputError as e:
        raise InputError(f"stages[{ctx.index}].{e}") from None


@register_stage("distill", DistillStage, makes="model")
def run(ctx: StageContext, cfg: DistillStage) -> StageResult:
    if cfg.method == "logits":
        objective, cached = distillation_objective(ctx, cfg, cfg.label_smoothing)
    else:
        objective, cached = feature_objective(ctx, cfg), False
    result = train_with(ctx, cfg, objective)
    result.metrics["teacher_logits_cached"] = cached
    result.metrics["method"] = cfg.method
    if cfg.method != "logits":
        result.metrics["projector_params"] = sum(p.numel() for p in objective.parameters())
    return result
