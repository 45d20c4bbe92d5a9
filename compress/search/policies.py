"""The two recurrent policies: a bidirectional LSTM that keeps or removes each removable unit, and
an autoregressive LSTM that picks a width scale per kept unit. Every recurrent cell is a registered
submodule, so the optimiser trains all of it; neither depends on the number of units, so a policy
trained on one teacher runs on another."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Rollout:
    """Sampled actions with their summed log-probability and entropy (both differentiable)."""

    actions: list[int]
    log_prob: torch.Tensor
    entropy: torch.Tensor

    @classmethod
    def join(cls, parts: list[Rollout]) -> Rollout:
        """One rollout of `parts` sampled in turn: their actions in order, log-probs and
        entropies summed."""
        return cls(
            [a for p in parts for a in p.actions],
            torch.stack([p.log_prob for p in parts]).sum(),
            torch.stack([p.entropy for p in parts]).sum(),
        )


def _sample(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    uniform: bool,
    mask: torch.Tensor | None = None,
) -> Rollout:
    """Sample from the logits (or uniformly), over the actions `mask` allows (all without one)."""
    if mask is not None:
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    dist = torch.distributions.Categorical(logits=logits)
    if uniform:
        probs = torch.ones_like(logits) if mask is None else mask.expand_as(logits).to(logits)
    else:
        probs = dist.probs
    actions = torch.multinomial(probs.detach(), 1, generator=generator).squeeze(-1)
    return Rollout(actions.tolist(), dist.log_prob(actions).sum(), dist.entropy().sum())


class RemovalPolicy(nn.Module):
    """pi_remove(a_t | h_{t-1}, h_{t+1}, x_t): action 1 keeps unit t, 0 removes it."""

    def __init__(self, features: int, hidden: int = 30, layers: int = 2):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, layers, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (units, 2) for one sequence of unit features (units, features)."""
        out, _ = self.lstm(x.unsqueeze(0))
        return self.head(out.squeeze(0))

    def sample(
        self,
        x: torch.Tensor,
        generator=None,
        uniform: bool = False,
        allowed: Callable[[list[int]], torch.Tensor] | None = None,
    ) -> Rollout:
        """`allowed(previous actions)` masks each unit's (remove, keep) in turn (see
        compress.search.budget); the logits come from the whole sequence either way."""
        logits = self(x)
        if allowed is None:
            return _sample(logits, generator, uniform)
        steps: list[Rollout] = []
        actions: list[int] = []
        for t in range(logits.shape[0]):
            steps.append(_sample(logits[t : t + 1], generator, uniform, allowed(actions)))
            actions += steps[-1].actions
        return Rollout.join(steps)


class ShrinkPolicy(nn.Module):
    """pi_shrink(a_t | a_{t-1}, h_{t-1}, x_t): the index of unit t's width scale."""

    def __init__(self, features: int, actions: int, hidden: int = 30):
        super().__init__()
        self.actions = actions
        self.cell = nn.LSTMCell(features + actions, hidden)
        self.head = nn.Linear(hidden, actions)

    def sample(
        self,
        x: torch.Tensor,
        generator=None,
        uniform: bool = False,
        allowed: Callable[[list[int]], torch.Tensor] | None = None,
    ) -> Rollout:
        """`allowed(previous actions)` masks each step's choices (see compress.search.budget)."""
        h = c = x.new_zeros(1, self.cell.hidden_size)
        previous = x.new_zeros(1, self.actions)
        steps: list[Rollout] = []
        actions: list[int] = []
        for t in range(x.shape[0]):
            h, c = self.cell(torch.cat([x[t : t + 1], previous], dim=1), (h, c))
            mask = None if allowed is None else allowed(actions)
            steps.append(_sample(self.head(h), generator, uniform, mask))
            actions += steps[-1].actions
            previous = torch.nn.functional.one_hot(
                torch.tensor(steps[-1].actions), self.actions
            ).to(x)
        return Rollout.join(steps)


class MovingBaseline:
    """b <- decay * b + (1 - decay) * mean(R), starting at the first update's mean reward."""

    def __init__(self, decay: float = 0.9, value: float | None = None):
        self.decay, self.value = decay, value

    def update(self, rewards: list[float]) -> None:
        mean = sum(rewards) / len(rewards)
        self.value = (
            mean if self.value is None else self.decay * self.value + (1 - self.decay) * mean
        )


def reinforce_step(
    optimizer: torch.optim.Optimizer,
    rollouts: list[Rollout],
    rewards: list[float],
    baseline: MovingBaseline,
    entropy_weight: float = 0.0,
) -> list[float]:
    """One REINFORCE update where each rollout has its own advantage R_i - b; returns them.

    The baseline is the moving average of earlier updates (the first update uses its own mean).
    """
    if baseline.value is None:
        baseline.update(rewards)
    assert baseline.value is not None
    advantages = [r - baseline.value for r in rewards]
    loss = torch.stack(
        [
            -a * ro.log_prob - entropy_weight * ro.entropy
            for a, ro in zip(advantages, rollouts, strict=True)
        ]
    ).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    baseline.update(rewards)
    return advantages
