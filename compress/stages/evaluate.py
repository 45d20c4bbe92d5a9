"""`eval`: accuracy of the current model on a split."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from compress.evaluation import evaluate
from compress.stages.base import StageConfig, StageContext, StageResult, register_stage


class EvalStage(StageConfig):
    """Measure top-1/top-5 accuracy of the current model."""

    type: Literal["eval"] = "eval"
    split: Literal["test", "val", "train"] = Field("test", description="Which split to measure on.")


@register_stage("eval", EvalStage)
def run(ctx: StageContext, cfg: EvalStage) -> StageResult:
    result = evaluate(ctx.model, ctx.data.loader(cfg.split), ctx.device, desc=f"eval {cfg.split}")
    model_metrics = {"top1": result["top1"], "top5": result["top5"]} if cfg.split == "test" else {}
    return StageResult(metrics={"split": cfg.split, **result}, model_metrics=model_metrics)
