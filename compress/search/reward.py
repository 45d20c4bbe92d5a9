"""N2N's reward, R = C(2 - C) * A_student / A_teacher with C = 1 - cost/cost_teacher, and budgets."""

from __future__ import annotations

INVALID = -1.0


def compression(cost: float, teacher_cost: float) -> float:
    return 1.0 - cost / teacher_cost


def reward(accuracy: float, teacher_accuracy: float, cost: float, teacher_cost: float) -> float:
    c = compression(cost, teacher_cost)
    return c * (2.0 - c) * accuracy / teacher_accuracy


def penalty_weight(update: int, anneal_updates: int) -> float:
    """epsilon = clip((1 - update / anneal_updates)^4, 0, 1): 0 (a hard -1) once annealed."""
    if anneal_updates <= 0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - update / anneal_updates)) ** 4


def constrained_reward(raw: float, violates: bool, update: int, anneal_updates: int) -> float:
    """A budget-violating candidate scores (eps - 1) + eps * R: soft early on, -1 later."""
    if not violates:
        return raw
    eps = penalty_weight(update, anneal_updates)
    return (eps - 1.0) + eps * raw
