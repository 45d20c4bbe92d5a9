"""The shrink phase alone: N2N's shrink policy against random search from one removal result.

Takes the stage-1 architecture (the removal phase's best) of an earlier sequential search
(`--from`, a search stage folder of benchmarks/n2n_cifar10.py, e.g. its policy_gradient-0 run),
builds it from that run's teacher, and runs a `mode: shrink` search from it per strategy at the
same candidate budget (`--updates` x `--rollouts`). Data, teacher, candidate training and parameter
budget are read from that run's resolved `recipe.yaml`, so both phases share them; the reward is
still relative to the full teacher. About 15 minutes per strategy on 2 CPU cores at the
defaults. `--free-actions` turns the bounded shrink actions off (the stage's
`bound_actions: false`). Last stdout line: one JSON object (each
strategy's best reward, its val top-1 and parameters, the mean reward of its valid candidates,
over-budget candidates, candidate evaluation time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml

from benchmarks._common import inherited_candidate, require, run_recipe, save
from compress.runs import RECIPE_FILE
from compress.search import read_history, read_search_state
from compress.search.records import STATE_FILE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--from", dest="source", type=Path, required=True, help="a search stage folder")
    p.add_argument("--updates", type=int, default=20)
    p.add_argument("--rollouts", type=int, default=5)
    p.add_argument("--strategies", nargs="+", default=["policy_gradient", "random"])
    p.add_argument("--free-actions", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="keep the runs here")
    args = p.parse_args()
    stage1 = read_search_state(require(args.source / STATE_FILE).parent).stage1
    if stage1 is None:
        raise SystemExit(f"{args.source}: the search has no finished removal phase")
    removed = stage1.removed
    source = yaml.safe_load(require(args.source.parent / RECIPE_FILE).read_text())
    search = next(st for st in source["stages"] if st["type"] == "search")
    root = args.out or Path(tempfile.mkdtemp(prefix="n2n-shrink-"))
    root.mkdir(parents=True, exist_ok=True)
    start = inherited_candidate(
        source["teacher"], {"removed": removed, "scales": {}}, root / "stage1.safetensors"
    )
    rows = []
    for strategy in args.strategies:
        stage = {
            **search,
            "name": None,
            "mode": "shrink",
            "strategy": strategy,
            "updates": args.updates,
            "rollouts": args.rollouts,
            "bound_actions": not args.free_actions,
            "warm_start": None,
        }
        recipe = {
            "name": strategy,
            "seed": args.seed,
            "data": source["data"],
            "teacher": source["teacher"],
            "student": {"model": str(start)},
            "stages": [stage],
        }
        out = root / f"{strategy}-{args.updates}"
        run, wall = run_recipe(recipe, out)
        found = run.stage(type="search")
        m = found.metrics
        records = read_history(found.dir)
        valid = [r.reward_raw for r in records if r.valid and not r.violates]
        row = {
            "strategy": strategy,
            "best_reward": m["best_reward"],
            "best_val_top1": m["best_val_top1"],
            "best_params": m["best_params"],
            "candidates": len(records),
            "over_budget": sum(r.violates for r in records),
            "mean_valid_reward": statistics.mean(valid),
            "candidate_eval_s": m["candidate_eval_s"],
            "wall_s": wall,  # of this invocation: a resumed run's is short
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    name = "n2n_shrink_phase" + ("_free_actions" if args.free_actions else "")
    budget = {"updates": args.updates, "rollouts": args.rollouts, "seed": args.seed}
    save(
        name,
        {"stage1_removed": removed, "bound_actions": not args.free_actions, **budget, "rows": rows},
    )


if __name__ == "__main__":
    main()
