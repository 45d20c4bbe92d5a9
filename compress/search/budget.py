"""Budget-feasible actions (AMC's action bound). A width scale is offered only when the candidate
can still meet the cost limit with every later unit at its smallest width; keeping a removable unit
is offered only when it can still meet the limit with every later removable unit removed (and, in
a joint search, every kept unit then shrunk to its smallest width). What shrinking
a unit at each scale saves is measured on the model with that unit alone shrunk (once per distinct
kept width); savings of different units add up exactly, as shrinkage keeps the residual stream's
width. The built candidate is still measured and penalised if it violates (a removed unit is
estimated by its own count, which a shape-fixing projection exceeds slightly)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from compress.evaluation import count_flops, count_params
from compress.search.surgery import Candidate, build_candidate, kept_channels
from compress.search.units import Unit, conv_path, out_width


@dataclass
class CostBound:
    """One cost limit (parameters or FLOPs) over the units of one input model."""

    limit: float
    total: float  # the input model's cost
    unit_cost: dict[str, float]  # each unit's own cost at full width (what its removal saves)
    savings: dict[str, list[float]]  # per unit, what shrinking it at each scale index saves

    def saving(self, unit: str, action: int) -> float:
        return self.savings.get(unit, [0.0] * (action + 1))[action]

    def max_saving(self, unit: str) -> float:
        return max(self.savings.get(unit, [0.0]))


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


def removal_mask(
    bounds: Sequence[CostBound], targets: Sequence[str], shrinkable: Sequence[str] = ()
) -> Callable[[list[int]], torch.Tensor]:
    """allowed(previous actions) -> bool mask over (remove, keep) for the next of the removable
    `targets`. Removing is always offered; keeping only where every bound can still be met with
    each later target removed and each unit of `shrinkable` left standing (the units a shrink
    step after the removal may cut) at its largest saving."""

    def allowed(previous: list[int]) -> torch.Tensor:
        t = len(previous)
        gone = {targets[j] for j, a in enumerate(previous) if a == 0} | set(targets[t + 1 :])
        keep = True
        for b in bounds:
            lowest = b.total - sum(b.unit_cost.get(u, 0.0) for u in gone)
            lowest -= sum(b.max_saving(u) for u in shrinkable if u not in gone)
            keep &= lowest <= b.limit
        return torch.tensor([True, keep])

    return allowed


def cost_bounds(
    model: torch.nn.Module,
    units: Sequence[Unit],
    scales: Sequence[float],
    round_to: int,
    limits: dict[str, float | None],
    totals: dict[str, float],
    input_size: tuple[int, int, int],
) -> list[CostBound]:
    """One bound per set limit (`params`, `flops`: the units' features of those names and the
    costs `totals` gives for `model`), each unit's savings measured as the module docstring says."""
    keys = [key for key, limit in limits.items() if limit is not None]
    if not keys:
        return []
    measure = {"params": count_params, "flops": lambda m: count_flops(m, input_size)}
    savings: dict[str, dict[str, list[float]]] = {key: {} for key in keys}
    for u in units:
        widths = [out_width(model.get_submodule(conv_path(u.name, c))) for c in u.shrinkable]
        measured: dict[tuple[int, ...], dict[str, float]] = {
            tuple(widths): dict.fromkeys(keys, 0.0)
        }
        for scale in scales:
            kept = tuple(kept_channels(w, scale, u.width_multiple(round_to)) for w in widths)
            if kept not in measured:
                try:
                    only = Candidate.make([], {u.name: scale})
                    shrunk = build_candidate(model, units, only, input_size, round_to)
                    measured[kept] = {key: totals[key] - measure[key](shrunk) for key in keys}
                except (ValueError, RuntimeError):  # a cut the surgery refuses saves nothing
                    measured[kept] = dict.fromkeys(keys, 0.0)
            for key in keys:
                savings[key].setdefault(u.name, []).append(measured[kept][key])
    return [
        CostBound(limits[key], totals[key], {u.name: u.features[key] for u in units}, savings[key])
        for key in keys
    ]
