"""What the search tests share: the input size, parameter counts, and synthetic units and rewards
that let the loop run without building or training a candidate."""

from __future__ import annotations

import torch
from torch import nn

from compress.search.surgery import Candidate
from compress.search.units import FEATURES, Unit

SIZE = (3, 32, 32)
TARGET_REMOVED = {"block0", "block1", "block2"}


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def synthetic_units(n: int) -> list[Unit]:
    g = torch.Generator().manual_seed(0)
    values = torch.rand(n, len(FEATURES), generator=g).tolist()
    return [
        Unit(f"block{i}", "basic", True, ["conv1"], dict(zip(FEATURES, values[i], strict=True)))
        for i in range(n)
    ]


def synthetic_reward(candidate: Candidate) -> dict:
    """Highest when exactly TARGET_REMOVED is removed; scales of 0.5 are rewarded in shrinkage."""
    names = [f"block{i}" for i in range(6)]
    hits = sum((u in candidate.removed) == (u in TARGET_REMOVED) for u in names)
    halves = sum(s == 0.5 for _, s in candidate.scales)
    return {"reward_raw": hits / 6 + 0.1 * halves, "violates": False}
