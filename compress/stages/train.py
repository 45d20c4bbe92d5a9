"""`train`: supervised training of the current model with cross-entropy."""

from __future__ import annotations

from typing import Literal

from compress.stages.base import StageConfig, StageContext, StageResult, register_stage
from compress.stages.training import train_with
from compress.train.loop import TrainingConfig
from compress.train.objectives import CrossEntropyObjective


class TrainStage(StageConfig, TrainingConfig):
    """Train the current model on the train split with (label-smoothed) cross-entropy."""

    type: Literal["train"] = "train"


@register_stage("train", TrainStage, makes="model")
def run(ctx: StageContext, cfg: TrainStage) -> StageResult:
    return train_with(ctx, cfg, CrossEntropyObjective(cfg.label_smoothing))
