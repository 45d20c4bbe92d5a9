"""Helpers shared by the stages that train (train, distill, quantize); registers no stage."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from tqdm import tqdm

from compress.config import StrictModel
from compress.errors import InputError
from compress.io import atomic_path
from compress.stages.base import StageContext, StageResult
from compress.train.hooks import TrainHooks
from compress.train.loop import TrainingConfig, fit
from compress.train.objectives import DistillationObjective
from compress.train.teacher_logits import TeacherLogits
from compress.train.tracking import MetricSink, build_sinks, close_sinks

TEACHER_LOGITS = "teacher_logits.pt"


class DistillationConfig(StrictModel):
    """The Hinton KD loss settings a stage trains with."""

    temperature: float = Field(4.0, gt=0, description="Softmax temperature T of the KL term.")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the KL term; 1 - alpha weighs CE.")
    cache_teacher_logits: bool | Literal["auto"] = Field(
        "auto",
        description="Compute teacher logits once per sample and reuse them; auto = when "
        "data.augment is none (the train pipeline is then deterministic).",
    )


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


def tracking_sinks(ctx: StageContext, cfg: TrainingConfig) -> list[MetricSink]:
    """The recipe's tracking sinks for this stage (TensorBoard, MLflow), none when it has none."""
    return build_sinks(
        ctx.recipe.tracking,
        ctx.stage_dir.parent,
        ctx.stage_dir.name,
        ctx.dist,
        run_name=ctx.recipe.name,
        params=cfg.model_dump(mode="json"),
    )


def train_with(
    ctx: StageContext, cfg: TrainingConfig, objective, hooks: TrainHooks | None = None
) -> StageResult:
    """Run the one training loop on the current model with `objective`; the model is the result.

    Its metrics also go to the recipe's `tracking` sinks.
    """
    if ctx.spec.int8 is not None and ctx.spec.int8.get("route") == "onnxruntime":
        raise InputError(
            f"stages[{ctx.index}]: the model was quantized by onnxruntime (ptq_int8) and runs "
            "only there, so it cannot train; put training stages before the quantize stage, or "
            "use qat_int8"
        )
    sinks = tracking_sinks(ctx, cfg)  # a missing extra fails here, before any training
    try:
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
            hooks=hooks,
            sinks=sinks,
            log_every_steps=ctx.recipe.tracking.log_every_steps,
        )
    except BaseException:
        close_sinks(sinks, failed=True)
        raise
    close_sinks(sinks)
    return StageResult(model=ctx.model, spec=ctx.spec, metrics=metrics)


@torch.no_grad()
def teacher_logits_once(ctx: StageContext, indices: list[int] | None = None) -> TeacherLogits:
    """Teacher logits for the train samples (deterministic transform), cached in the stage
    folder; with `indices`, only those samples get a row (see `TeacherLogits`)."""
    path = ctx.stage_dir / TEACHER_LOGITS
    if path.is_file():
        return TeacherLogits.load(torch.load(path, weights_only=True))
    loader = ctx.data.loader("train", train=False, indices=indices)
    samples, rows = [], []
    for images, _, batch in tqdm(
        loader, desc="teacher logits", unit="batch", leave=False, disable=None
    ):
        rows.append(ctx.teacher(images.to(ctx.device)).float().cpu())
        samples.append(batch)
    store = TeacherLogits.from_rows(
        len(ctx.data.samples("train")), torch.cat(samples), torch.cat(rows)
    )
    if ctx.dist.is_main:
        with atomic_path(path) as tmp:
            torch.save(store.state, tmp)
    return store


def distillation_objective(
    ctx: StageContext, cfg: DistillationConfig, label_smoothing: float = 0.0
) -> tuple[DistillationObjective, bool]:
    """The KD objective against the fixed teacher, and whether its logits are precomputed."""
    cache = cfg.cache_teacher_logits
    if cache == "auto":
        cache = ctx.data.deterministic_train_transform()
    elif cache and not ctx.data.deterministic_train_transform():
        raise InputError(
            f"stages[{ctx.index}].cache_teacher_logits: needs data.augment: none "
            f"(augmentation '{ctx.data.cfg.augment}' changes the teacher's input every epoch)"
        )
    logits = teacher_logits_once(ctx) if cache else None
    objective = DistillationObjective(
        ctx.teacher, cfg.temperature, cfg.alpha, label_smoothing, teacher_logits=logits
    )
    return objective, bool(cache)
