"""Accuracy of a model on a loader, and the size facts of a model (params, FLOPs)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "eval"
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over every sample of `loader`."""
    was_training = model.training
    model.eval().to(device)
    correct1 = correct5 = 0
    loss_sum, n = 0.0, 0
    for images, labels, _ in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(labels[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        n += labels.numel()
    model.train(was_training)
    return {
        "top1": 100.0 * correct1 / max(n, 1),
        "top5": 100.0 * correct5 / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "n": n,
    }


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """FLOPs of one forward pass on one image, by torch's flop counter (a multiply-add counts 2)."""
    # A frozen copy: the counter's module hooks fail on quantizers that slice trainable weights.
    model = copy.deepcopy(model).eval().requires_grad_(False)
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_size, device=device))
    return int(counter.get_total_flops())
