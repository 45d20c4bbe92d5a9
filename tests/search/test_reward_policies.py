"""N2N's reward with its budget penalty, and the REINFORCE step of the policies."""

from __future__ import annotations

import pytest
import torch

from compress.search.policies import MovingBaseline, RemovalPolicy, reinforce_step
from compress.search.reward import constrained_reward, reward
from compress.search.units import FEATURES, feature_matrix
from tests.search.conftest import synthetic_units


def test_reward_formula_and_budget_penalties():
    # C = 1 - 25/100 = 0.75: R = 0.75 * 1.25 * 90/92
    assert reward(90.0, 92.0, 25.0, 100.0) == pytest.approx(0.75 * 1.25 * 90 / 92)
    assert reward(92.0, 92.0, 100.0, 100.0) == 0.0  # the teacher itself earns nothing
    assert reward(92.0, 92.0, 0.0, 100.0) == pytest.approx(1.0)
    raw = 0.6
    assert constrained_reward(raw, False, 3, 15) == raw  # within budget: untouched
    soft = constrained_reward(raw, True, 0, 15)  # eps = 1 at the start: (1 - 1) + 1 * R
    assert soft == pytest.approx(raw)
    middle = constrained_reward(raw, True, 5, 15)  # eps = (2/3)^4
    eps = (2 / 3) ** 4
    assert middle == pytest.approx(eps - 1 + eps * raw)
    assert constrained_reward(raw, True, 15, 15) == -1.0  # annealed: a hard -1
    assert constrained_reward(raw, True, 40, 15) == -1.0


def test_each_rollout_gets_its_own_advantage():
    policy = RemovalPolicy(len(FEATURES))
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.01)
    x = feature_matrix(synthetic_units(4))
    rollouts = [policy.sample(x, torch.Generator().manual_seed(i)) for i in range(3)]
    baseline = MovingBaseline(0.9, value=0.5)
    advantages = reinforce_step(optimizer, rollouts, [0.2, 0.5, 0.9], baseline)
    assert advantages == pytest.approx([-0.3, 0.0, 0.4])
    assert baseline.value == pytest.approx(0.9 * 0.5 + 0.1 * (1.6 / 3))
