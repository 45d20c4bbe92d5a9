"""Budget-feasible shrink actions (AMC's action bound): a width scale is offered only when the
candidate can still meet the cost limit with every later unit at its smallest width. Costs are
linear estimates from each unit's own count, so the built candidate is still measured and
penalised when it violates; the estimate only keeps the policies from wasting candidates on
architectures that cannot fit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from compress.search.surgery import kept_channels
from compress.search.units import Unit, conv_path


@dataclass
class CostBound:
    """One cost limit (parameters or FLOPs) over the units of one input model."""

    limit: float
    total: float  # the input model's cost
    unit_cost: dict[str, float]  # each unit's own cost at full width
    kept: dict[str, list[float]]  # per unit, the width fraction each scale index keeps

    def saving(self, unit: str, action: int) -> float:
        return self.unit_cost.get(unit, 0.0) * (1.0 - self.kept[unit][action])

    def max_saving(self, unit: str) -> float:
        return self.unit_cost.get(unit, 0.0) * (1.0 - min(self.kept[unit]))


def shrink_mask(
    bounds: Sequence[CostBound], removed: Sequence[str], targets: Sequence[str], actions: int
) -> Callable[[list[int]], torch.Tensor]:
    """allowed(previous actions) -> bool mask over the next target's scale indices. Where no
    scale can meet a bound, only the one that saves most is offered."""

    def allowed(previous: list[int]) -> torch.Tensor:
        t = len(previous)
        unit = targets[t]
        ok = torch.ones(actions, dtype=torch.bool)
        for b in bounds:
            rest = b.total - sum(b.unit_cost.get(r, 0.0) for r in removed)
            rest -= sum(b.saving(targets[j], a) for j, a in enumerate(previous))
            rest -= sum(b.max_saving(u) for u in targets[t + 1 :])
            ok &= torch.tensor([rest - b.saving(unit, a) <= b.limit for a in range(actions)])
        if not ok.any():
            ok[max(range(actions), key=lambda a: sum(b.saving(unit, a) for b in bounds))] = True
        return ok

    return allowed


def cost_bounds(
    model: torch.nn.Module,
    units: Sequence[Unit],
    scales: Sequence[float],
    round_to: int,
    limits: dict[str, float | None],
    totals: dict[str, float],
) -> list[CostBound]:
    """One bound per set limit (`params`, `flops`: the units' features of those names), the
    kept width of each scale rounded as the surgery rounds it."""
    kept: dict[str, list[float]] = {}
    for u in units:
        widths = [model.get_submodule(conv_path(u.name, c)).out_channels for c in u.shrinkable]
        kept[u.name] = [
            sum(kept_channels(w, s, round_to) / w for w in widths) / len(widths) if widths else 1.0
            for s in scales
        ]
    return [
        CostBound(limit, totals[key], {u.name: u.features[key] for u in units}, kept)
        for key, limit in limits.items()
        if limit is not None
    ]
