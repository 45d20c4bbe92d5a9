"""How many policy updates N2N needs to beat random search, on a synthetic reward.

About 2.5 minutes on 2 CPU cores (shared with another job) at the defaults (16 seeds; budgets
6x4, 15x5 and 30x5).

The real search (benchmarks/n2n_cifar10.py) pays seconds per candidate; this one runs the real
`PolicySearch` (both policies, the sequential removal-then-shrink phases or those of `--mode`, the
parameter budget, its penalty and the bounded shrink actions; `--free-actions` drops the bound)
over the real units of cifar_resnet56, but scores a candidate with a synthetic accuracy instead of fine-tuning it, so
policy gradient and random search can be compared over many seeds and budgets. The synthetic
accuracy, per seed: each block costs a random 0.4-3 points when removed (1.5x in the last stage),
each kept block a random 0-5 points x (1 - scale)^1.5 when shrunk, removing more than 10 blocks
costs 0.4 points per extra block, plus Gaussian noise of 1.2 points (the spread of a 1,000-image
validation score); the reward is N2N's on the units' real parameter counts, under a budget of a
third of the teacher's parameters. Only the trend is meant to carry over: which budget (updates x
rollouts per phase) the policy needs before it pays. Last stdout line: one JSON object (per budget,
each strategy's mean best reward over the seeds, its standard error, the ratio policy / random,
and the mean paired difference policy - random with its standard error).
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import add_search_mode, save
from compress.models import create_model
from compress.search.budget import CostBound, cost_bounds
from compress.search.loop import PolicySearch
from compress.search.reward import reward
from compress.search.settings import SearchSettings
from compress.search.surgery import Candidate
from compress.search.units import Unit, find_units

TEACHER_ACCURACY = 0.93


def synthetic_evaluate(units: list[Unit], total_params: float, seed: int) -> Callable:
    """A candidate scorer for one synthetic world (see the module docstring)."""
    g = random.Random(seed)
    removal_cost = {
        u.name: g.uniform(0.004, 0.03) * (1.5 if u.name.startswith("layer3") else 1.0)
        for u in units
    }
    shrink_cost = {u.name: g.uniform(0.0, 0.05) for u in units}
    unit_params = sum(u.features["params"] for u in units)
    budget = total_params / 3

    def evaluate(candidate: Candidate) -> dict:
        removed, scales = set(candidate.removed), dict(candidate.scales)
        loss = sum(removal_cost[n] for n in removed)
        loss += sum(shrink_cost[n] * (1 - s) ** 1.5 for n, s in scales.items())
        loss += 0.004 * max(0, len(removed) - 10)
        accuracy = max(0.1, TEACHER_ACCURACY - loss) + g.gauss(0, 0.012)
        params = total_params - unit_params
        params += sum(
            u.features["params"] * scales.get(u.name, 1.0) for u in units if u.name not in removed
        )
        return {
            "reward_raw": reward(accuracy, TEACHER_ACCURACY, params, total_params),
            "violates": params > budget,
        }

    return evaluate


def best_reward(
    strategy: str,
    seed: int,
    updates: int,
    rollouts: int,
    units: list[Unit],
    total: float,
    bounds: list[CostBound],
    **settings_fields: Any,
) -> float:
    """The best reward of one search; `settings_fields` are further `SearchSettings` fields."""
    settings = SearchSettings(
        strategy=strategy, updates=updates, rollouts=rollouts, **settings_fields
    )
    evaluate = synthetic_evaluate(units, total, 1000 + seed)
    with tempfile.TemporaryDirectory() as tmp:
        best = PolicySearch(units, evaluate, settings, Path(tmp), seed=seed, bounds=bounds).run()
    return best.reward_raw if best else -1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--budgets", nargs="+", default=["6x4", "15x5", "30x5"], help="updates x rollouts per phase"
    )
    p.add_argument("--seeds", type=int, default=16)
    add_search_mode(p, "the search stage's mode (updates x rollouts are per phase)")
    defaults = SearchSettings()
    p.add_argument("--policy-lr", type=float, default=defaults.policy_lr)
    p.add_argument("--entropy-weight", type=float, default=defaults.entropy_weight)
    p.add_argument("--name", default=None, help="results/NAME.json (default from the flags)")
    p.add_argument(
        "--free-actions",
        action="store_true",
        help="shrink actions not held to the budget (the search stage's bound_actions: false)",
    )
    args = p.parse_args()
    logging.getLogger("compress").setLevel(logging.WARNING)
    model, _ = create_model("cifar_resnet56")
    units = find_units(model, (3, 32, 32))
    total = float(sum(q.numel() for q in model.parameters()))
    scales = defaults.scales
    limits = {"params": total / 3}
    bounds = (
        []
        if args.free_actions
        else cost_bounds(model, units, scales, 8, limits, {"params": total}, (3, 32, 32))
    )
    policy = {
        "mode": args.mode,
        "policy_lr": args.policy_lr,
        "entropy_weight": args.entropy_weight,
    }
    results = []
    for budget in args.budgets:
        updates, rollouts = (int(v) for v in budget.split("x"))
        phases = 2 if args.mode == "sequential" else 1
        row = {"updates": updates, "rollouts": rollouts, "candidates": phases * updates * rollouts}
        best = {}
        for strategy in ("policy_gradient", "random"):
            best[strategy] = [
                best_reward(strategy, s, updates, rollouts, units, total, bounds, **policy)
                for s in range(args.seeds)
            ]
            row[strategy] = {
                "mean_best_reward": statistics.mean(best[strategy]),
                "stderr": statistics.stdev(best[strategy]) / args.seeds**0.5,
            }
        # both strategies meet the same synthetic world per seed: the paired difference is sharper
        diff = [a - b for a, b in zip(best["policy_gradient"], best["random"], strict=True)]
        row["policy_minus_random"] = {
            "mean": statistics.mean(diff),
            "stderr": statistics.stdev(diff) / args.seeds**0.5,
        }
        row["policy_vs_random"] = (
            row["policy_gradient"]["mean_best_reward"] / row["random"]["mean_best_reward"]
        )
        print(row, flush=True)
        results.append(row)
    name = "n2n_policy_budget" + ("_free_actions" if args.free_actions else "")
    name += "" if args.mode == "sequential" else f"_{args.mode}"
    save(
        args.name or name,
        {
            "seeds": args.seeds,
            **policy,
            "bound_actions": not args.free_actions,
            "budgets": results,
        },
    )


if __name__ == "__main__":
    main()
