"""The one training loop: every stage that trains calls `fit` with its own objective.

SGD or AdamW, linear warmup then cosine decay (per step), label smoothing, mixed precision on CUDA,
gradient clipping, an atomic checkpoint after every epoch (resumed automatically), a progress bar,
`metrics.jsonl`, and the same metrics to the tracking sinks it is given (TensorBoard, MLflow).
Runs unchanged under torchrun (DistributedDataParallel).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from compress.config import StrictModel
from compress.errors import StageFailed
from compress.evaluation import evaluate
from compress.io import atomic_path, write_text
from compress.log import logger
from compress.train.distributed import DistInfo, all_reduce_sum, average_gradients, barrier
from compress.train.hooks import TrainHooks
from compress.train.tracking import MetricSink

Objective = Callable[..., tuple[torch.Tensor, torch.Tensor]]
CHECKPOINT = "checkpoint.pt"
METRICS_LOG = "metrics.jsonl"


class TrainingConfig(StrictModel):
    """Optimisation settings shared by every stage that trains."""

    epochs: int = Field(gt=0, le=10_000, description="Passes over the training split.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (momentum) or adamw.")
    lr: float = Field(0.05, gt=0, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(5e-4, ge=0, description="Applied to weights, not to norms/biases.")
    warmup_epochs: float = Field(
        0.0, ge=0, le=10_000, description="Linear warmup length (may be fractional)."
    )
    min_lr: float = Field(0.0, ge=0, description="Floor of the cosine schedule.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient norm to this value.")
    amp: bool = Field(True, description="Mixed precision on CUDA (bf16 where supported).")
    batch_size: int | None = Field(None, gt=0, description="Overrides data.batch_size.")
    max_steps_per_epoch: int | None = Field(
        None, gt=0, description="Cut each epoch short (smoke tests, quick looks)."
    )


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _autocast(device: torch.device, enabled: bool):
    if device.type != "cuda" or not enabled:
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _write_log(stage_dir: Path, history: list[dict[str, Any]]) -> None:
    import json

    write_text(stage_dir / METRICS_LOG, "".join(json.dumps(h) + "\n" for h in history))


def fit(
    model: nn.Module,
    objective: Objective,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    cfg: TrainingConfig,
    device: torch.device,
    stage_dir: Path,
    dist: DistInfo,
    desc: str = "train",
    seed: int = 0,
    hooks: TrainHooks | None = None,
    sinks: Sequence[MetricSink] = (),
    log_every_steps: int = 1,
) -> dict[str, Any]:
    """Train `model` in place; resume from `stage_dir/checkpoint.pt` if present. Returns metrics.

    An objective that is an `nn.Module` with parameters (e.g. feature projectors) is trained
    alongside the model and checkpointed with it; it is never part of the model.

    Rank 0 logs to `sinks`, against the number of optimiser steps taken: `train/loss` (the batch's)
    and `train/lr` every `log_every_steps` steps, and each epoch's `metrics.jsonl` record as
    `epoch/<key>`. The caller closes the sinks.
    """
    hooks = hooks or TrainHooks()
    sinks = list(sinks) if dist.is_main else []
    model.to(device)
    extra = objective if isinstance(objective, nn.Module) else None
    trained: nn.Module = model
    if extra is not None:
        extra.to(device)
        trained = nn.ModuleList([model, extra])  # a view for the optimiser, not a new model
    optimizer = make_optimizer(trained, cfg)
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        warmup_cosine(total, round(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr / cfg.lr),
    )
    use_scaler = device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    ckpt_path = stage_dir / CHECKPOINT
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        if extra is not None:
            extra.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history, start_epoch = state["history"], state["epoch"]
        if dist.is_main:
            logger.info(f"{desc}: resuming after epoch {start_epoch}/{cfg.epochs}")
    for sink in sinks:
        sink.start(start_epoch * steps_per_epoch)

    net: nn.Module = model
    if dist.enabled:
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    for epoch in range(start_epoch, cfg.epochs):
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        # Shuffling and augmentation depend on (seed, epoch, rank) only, so a resumed run repeats them.
        if train_loader.generator is not None:
            train_loader.generator.manual_seed(seed * 1000 + epoch)
        torch.manual_seed((seed * 1000 + epoch) * 64 + dist.rank)
        net.train()
        if extra is not None:
            extra.train()
        loss_sum = correct = seen = 0.0
        t0 = time.perf_counter()
        quarter = max(1, steps_per_epoch // 4)
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"{desc} {epoch + 1}/{cfg.epochs}",
            unit="batch",
            disable=None if dist.is_main else True,  # None: off when stderr is not a terminal
            leave=False,
        )
        for step, (images, labels, indices) in enumerate(train_loader):
            if step >= steps_per_epoch:
                break
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            hooks.before_forward(model)
            with _autocast(device, cfg.amp):
                loss, logits = objective(net, images, labels, indices)
            if not torch.isfinite(loss.detach()).item():
                bar.close()
                kept = f"; {ckpt_path} keeps epoch {history[-1]['epoch']}" if history else ""
                raise StageFailed(
                    f"{desc}: the loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}: "
                    f"training diverged (lower lr, or add warmup_epochs or grad_clip){kept}"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if extra is not None and dist.enabled:
                average_gradients(dist, extra)  # DDP averages only the model's gradients
            hooks.before_step(model)
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            n = labels.numel()
            batch_loss = loss.item()
            loss_sum += batch_loss * n
            correct += (logits.argmax(1) == labels).sum().item()
            seen += n
            rate = seen * dist.world_size / (time.perf_counter() - t0)
            bar.update(1)
            progress = {
                "loss": f"{loss_sum / seen:.3f}",
                "acc": f"{100 * correct / seen:.1f}",
                "ips": f"{rate:.0f}",
            }
            bar.set_postfix(progress)
            global_step = epoch * steps_per_epoch + step + 1
            if sinks and global_step % log_every_steps == 0:
                for sink in sinks:
                    sink.log({"train/loss": batch_loss, "train/lr": lr}, global_step)
            if (
                bar.disable
                and dist.is_main
                and (step + 1) % quarter == 0
                and step + 1 < steps_per_epoch  # the epoch summary follows the last step
            ):
                # No terminal (CI, nohup): a line every quarter epoch instead of a bar.
                logger.info(
                    f"{desc} {epoch + 1}/{cfg.epochs} step {step + 1}/{steps_per_epoch}: "
                    + ", ".join(f"{k} {v}" for k, v in progress.items())
                )
        bar.close()
        elapsed = time.perf_counter() - t0
        loss_sum, correct, seen = all_reduce_sum(dist, [loss_sum, correct, seen], device)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_top1": 100 * correct / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": seen / elapsed,
            "epoch_time_s": elapsed,
        }
        if dist.is_main:
            if val_loader is not None:
                with hooks.evaluation(model):
                    val = evaluate(model, val_loader, device, desc="val")
                record.update(val_top1=val["top1"], val_loss=val["loss"])
            history.append(record)
            with atomic_path(ckpt_path) as tmp:
                torch.save(
                    {
                        "epoch": epoch + 1,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "history": history,
                        **({"objective": extra.state_dict()} if extra is not None else {}),
                    },
                    tmp,
                )
            _write_log(stage_dir, history)
            epoch_metrics = {f"epoch/{k}": float(v) for k, v in record.items() if k != "lr"}
            for sink in sinks:
                sink.log(epoch_metrics, (epoch + 1) * steps_per_epoch)
            summary = ", ".join(
                f"{k} {v:.3g}"
                for k, v in record.items()
                if k not in ("epoch", "lr", "epoch_time_s")
            )
            logger.info(f"{desc} epoch {epoch + 1}/{cfg.epochs}: {summary}")
        barrier(dist)

    hooks.on_train_end(model)
    model.eval()
    if extra is not None:
        extra.eval()
    last = history[-1] if history else {}
    return {
        "epochs": cfg.epochs,
        "final_train_loss": last.get("train_loss"),
        "final_val_top1": last.get("val_top1"),
        # Summed over every epoch, including those of an interrupted run that this one resumed.
        "train_time_s": sum(h["epoch_time_s"] for h in history),
        # The median epoch: robust to an epoch slowed by other load on the machine.
        "images_per_s": (
            statistics.median(h["images_per_s"] for h in history) if history else None
        ),
    }
