"""`train`: supervised training of the current model with cross-entropy."""

from __future__ import annotations

from typing import Literal

from compress.stages.base import StageConfig, StageContext, StageResult, register_stage
from compress.train.loop import TrainingConfig, fit
from compress.train.objectives import CrossEntropyObjective


class TrainStage(StageConfig, TrainingConfig):
    """Train the current model on the train split with (label-smoothed) cross-entropy."""

    type: Literal["train"] = "train"


def train_loaders(ctx: StageContext, cfg: TrainingConfig):
    """The train loader (sharded under torchrun) and the validation loader of a training stage."""
    from torch.utils.data.distributed import DistributedSampler

    data = ctx.data
    dataset = data.dataset("train", train=True)
    sampler = None
    if ctx.dist.enabled:
        sampler = DistributedSampler(
            dataset, ctx.dist.world_size, ctx.dist.rank, shuffle=True, seed=ctx.recipe.seed
        )
    train = data.loader("train", train=True, batch_size=cfg.batch_size, sampler=sampler)
    val = data.loader("val") if data.samples("val") else None
    return train, val


def train_with(ctx: StageContext, cfg: TrainingConfig, objective) -> StageResult:
    """Run the one training loop on the current model with `objective`; the model is the result."""
    train, val = train_loaders(ctx, cfg)
    label = getattr(cfg, "label", "train")
    metrics = fit(
        ctx.model,
        objective,
        train,
        val,
        cfg,
        ctx.device,
        ctx.stage_dir,
        ctx.dist,
        desc=label,
        seed=ctx.recipe.seed,
    )
    return StageResult(model=ctx.model, spec=ctx.spec, metrics=metrics)


@register_stage("train", TrainStage, makes_model=True)
def run(ctx: StageContext, cfg: TrainStage) -> StageResult:
    return train_with(ctx, cfg, CrossEntropyObjective(cfg.label_smoothing))
