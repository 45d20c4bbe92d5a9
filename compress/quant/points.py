"""Differentiable quantization (Polino et al. 2018): learn the quantization points, not the weights.

Each quantized tensor keeps its per-bucket linear scaling (alpha, beta) fixed from the original
weights and a sorted set of points in [0, 1]; a weight takes its nearest point, and the gradient of
the loss reaches each point as the sum of alpha * dL/dw over the weights assigned to it (autograd of
the gather below computes exactly that). The weights themselves never change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from compress.quant.uniform import Quantized, bucket_scales, bucketize
from compress.train.hooks import TrainHooks


def initial_points(scaled: torch.Tensor, n: int, init: str) -> torch.Tensor:
    """`n` sorted points in [0, 1]: quantiles of the scaled weights, or evenly spaced."""
    if init == "uniform":
        return torch.linspace(0, 1, n)
    flat = scaled.flatten()
    if flat.numel() > 2**24:  # torch.quantile's input limit
        flat = flat[torch.randperm(flat.numel())[: 2**24]]
    return torch.quantile(flat, torch.linspace(0, 1, n)).contiguous()


class LearnedPoints(nn.Module):
    """A parametrization of a weight: nearest learned point per value, per-bucket affine scaling."""

    def __init__(self, weight: torch.Tensor, n_points: int, bucket_size: int | None, init: str):
        super().__init__()
        buckets = bucketize(weight, bucket_size or weight.numel()).float()
        alpha, beta = bucket_scales(buckets)
        self.register_buffer("scaled", (buckets - beta) / alpha)
        self.register_buffer("alpha", alpha)
        self.register_buffer("beta", beta)
        self.points = nn.Parameter(initial_points(self.scaled, n_points, init))
        self.shape = weight.shape

    @torch.no_grad()
    def sort_(self) -> None:
        self.points.copy_(self.points.sort().values)

    @torch.no_grad()
    def assignments(self) -> torch.Tensor:
        p = self.points
        return torch.bucketize(self.scaled, (p[1:] + p[:-1]) / 2)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        values = self.points[self.assignments()] * self.alpha + self.beta
        return values.flatten()[: self.shape.numel()].view(self.shape).to(original.dtype)

    def codes(self) -> Quantized:
        n = self.points.numel()
        return Quantized(
            self.assignments(), self.alpha, self.beta, n, self.shape, self.points.detach().clone()
        )


def assign_points(norms: list[float], points_per_tensor: int) -> list[int]:
    """Share points between tensors: each keeps half its own, the rest goes by gradient norm.

    The total is preserved; every tensor keeps at least 2 points.
    """
    if not norms:
        return []
    base = max(2, points_per_tensor // 2)
    total = points_per_tensor * len(norms)
    rest = total - base * len(norms)
    weight = sum(norms) or 1.0
    counts = [base + math.floor(rest * n / weight) for n in norms]
    leftover = total - sum(counts)
    while leftover != 0:  # rounding: give to the smallest, or take from the largest
        i = counts.index(min(counts)) if leftover > 0 else counts.index(max(counts))
        counts[i] += 1 if leftover > 0 else -1
        leftover += -1 if leftover > 0 else 1
    return counts


class PointQuantizer(TrainHooks):
    """Parametrizes the chosen weights with learned points; only the points train."""

    def __init__(
        self,
        model: nn.Module,
        n_points: list[int],
        names: list[str],
        bucket_size: int | None,
        init: str,
    ):
        self.names = names
        modules = dict(model.named_modules())
        model.requires_grad_(False)  # the weights never change; BN statistics still update
        self.points: dict[str, LearnedPoints] = {}
        for name, n in zip(names, n_points, strict=True):
            module = modules[name]
            points = LearnedPoints(module.weight.detach(), n, bucket_size, init)
            parametrize.register_parametrization(module, "weight", points, unsafe=True)
            self.points[f"{name}.weight"] = points
        self._modules = {n: modules[n] for n in names}

    def before_forward(self, model: nn.Module) -> None:
        for p in self.points.values():
            p.sort_()

    def codes(self) -> dict[str, Quantized]:
        return {name: p.codes() for name, p in self.points.items()}

    def on_train_end(self, model: nn.Module) -> None:
        """Bake the quantized weights into plain tensors: the saved model needs no parametrization."""
        for p in self.points.values():
            p.sort_()
        for module in self._modules.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        model.requires_grad_(True)


def gradient_norms(
    model: nn.Module, loader, names: list[str], device: torch.device, batches: int = 5
) -> list[float]:
    """L2 norm of each named layer's weight gradient under cross-entropy, over a few batches."""
    modules = dict(model.named_modules())
    model.to(device).train()
    model.zero_grad(set_to_none=True)
    for i, (images, labels, _) in enumerate(loader):
        if i >= batches:
            break
        F.cross_entropy(model(images.to(device)), labels.to(device)).backward()
    norms = [modules[n].weight.grad.norm().item() for n in names]
    model.zero_grad(set_to_none=True)
    return norms
