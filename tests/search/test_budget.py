"""Budget-bounded shrink actions: the savings each width saves are exact, and a bounded search
keeps its real candidates within the budget."""

from __future__ import annotations

import random

import pytest

from compress.evaluation import count_flops
from compress.models import create_model
from compress.search.budget import CostBound, cost_bounds, removal_mask, shrink_mask
from compress.search.loop import PolicySearch
from compress.search.settings import SearchSettings
from compress.search.surgery import Candidate, build_candidate
from compress.search.units import find_units
from tests.search.conftest import SIZE, params


def _searched(mode: str, strategy: str, share: float, tmp_path) -> tuple[list, list, float]:
    """Two short searches of `mode` on ResNet-20 with a parameter budget of `share` of its own,
    without and with bounded actions: each built candidate's (params, blocks removed), and the
    limit."""
    model, _ = create_model("cifar_resnet20")
    model.eval()
    units = find_units(model, SIZE)
    total = params(model)
    limit = share * total
    settings = SearchSettings(mode=mode, strategy=strategy, updates=2, rollouts=5)
    bounds = cost_bounds(
        model, units, settings.scales, 8, {"params": limit}, {"params": total}, SIZE
    )

    def built(search_dir, bounds) -> list[tuple[int, int]]:
        out = []

        def evaluate(candidate: Candidate) -> dict:
            n = params(build_candidate(model, units, candidate, SIZE))
            out.append((n, len(candidate.removed)))
            return {"reward_raw": 0.5, "violates": n > limit}

        PolicySearch(units, evaluate, settings, tmp_path / search_dir, bounds=bounds).run()
        return out

    return built("free", None), built("bounded", bounds), limit


@pytest.mark.parametrize("strategy", ["random", "policy_gradient"])
def test_bounded_shrink_actions_keep_real_candidates_within_the_budget(strategy, tmp_path):
    free, bounded, limit = _searched("joint", strategy, 0.35, tmp_path)
    assert any(n > limit for n, _ in free)  # the same search without bounds breaks the budget
    assert len(bounded) >= 6 and all(n <= limit for n, _ in bounded)
    assert max(n for n, _ in bounded) > 0.8 * limit  # bounded, not simply shrunk to the minimum


@pytest.mark.parametrize("name", ["cifar_resnet20", "timm:resnet26"])
def test_bound_savings_match_built_candidates(name):
    """Params and FLOPs of bounded candidates are known exactly before they are built."""
    size = SIZE
    model, _ = create_model(name, num_classes=10)
    model.eval()
    units = find_units(model, size)
    scales = SearchSettings().scales
    totals = {"params": params(model), "flops": count_flops(model, size)}
    bounds = cost_bounds(model, units, scales, 8, {"params": 1.0, "flops": 1.0}, totals, size)
    rng = random.Random(0)
    for _ in range(3):
        actions = {u.name: rng.randrange(len(scales)) for u in units}
        built = build_candidate(
            model, units, Candidate.make([], {u: scales[a] for u, a in actions.items()}), size
        )
        actual = {"params": params(built), "flops": count_flops(built, size)}
        for bound, key in zip(bounds, ("params", "flops"), strict=True):
            estimate = bound.total - sum(bound.saving(u, a) for u, a in actions.items())
            assert estimate == pytest.approx(actual[key], rel=1e-9), key


def test_shrink_mask_offers_the_largest_saving_when_the_budget_cannot_be_met():
    bound = CostBound(
        limit=50.0,
        total=100.0,
        unit_cost={"a": 40.0, "b": 40.0},
        savings={"a": [30.0, 20.0, 0.0], "b": [30.0, 20.0, 0.0]},
    )
    allowed = shrink_mask([bound], [], ["a", "b"], 3)
    # a at 1.0 leaves 100 - 30 (b at its smallest) = 70 > 50; at 0.5: 50; at 0.25: 40
    assert allowed([]).tolist() == [True, True, False]
    assert allowed([1]).tolist() == [True, False, False]  # 80 - 30 = 50 at b's 0.25 only
    tight = CostBound(10.0, 100.0, {"a": 40.0}, {"a": [30.0, 20.0, 0.0]})
    assert shrink_mask([tight], [], ["a"], 3)([]).tolist() == [True, False, False]


def test_removal_mask_forces_removal_once_keeping_would_break_the_budget():
    costs = {"a": 30.0, "b": 40.0, "c": 10.0}
    savings = {"a": [20.0, 0.0], "b": [20.0, 0.0], "c": [5.0, 0.0]}
    bound = CostBound(limit=65.0, total=100.0, unit_cost=costs, savings=savings)
    allowed = removal_mask([bound], ["a", "b"])
    assert allowed([]).tolist() == [True, True]  # a kept, b removed: 60
    assert allowed([1]).tolist() == [True, False]  # both kept: 100
    assert allowed([0]).tolist() == [True, False]  # only a removed: 70
    # a joint search still shrinks what it keeps (a, b and c at their smallest save 45)
    joint = removal_mask([bound], ["a", "b"], shrinkable=["a", "b", "c"])
    assert joint([1]).tolist() == [True, True]  # 100 - 45 = 55
    tight = CostBound(limit=40.0, total=100.0, unit_cost=costs, savings=savings)
    joint = removal_mask([tight], ["a", "b"], shrinkable=["a", "b", "c"])
    assert joint([]).tolist() == [True, True]  # b removed, a and c shrunk: 100 - 40 - 25 = 35
    assert joint([1]).tolist() == [True, False]  # 55 > 40


@pytest.mark.parametrize("strategy", ["random", "policy_gradient"])
def test_bounded_removal_keeps_real_candidates_within_the_budget(strategy, tmp_path):
    # 0.45: at least both removable blocks of the last stage go
    free, bounded, limit = _searched("removal", strategy, 0.45, tmp_path)
    assert any(n > limit for n, _ in free)  # the same search without bounds breaks the budget
    assert len(bounded) >= 3 and all(n <= limit for n, _ in bounded)
    assert len({removed for _, removed in bounded}) > 1  # bounded, not every block removed
