"""A whole search, from its inputs to the best student: find the units, score the teacher, evaluate
candidates under the policies (resuming a stopped search), and load the best one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from compress.errors import StageFailed
from compress.evaluation import evaluate
from compress.models import ModelSpec, load_model
from compress.search.budget import cost_bounds
from compress.search.evaluate import BEST_FILE, CandidateData, CandidateEvaluator
from compress.search.loop import PolicySearch
from compress.search.records import HISTORY_FILE, POLICY_FILE, CandidateRecord
from compress.search.settings import SearchSettings
from compress.search.units import find_units
from compress.train.distributed import DistInfo, all_gather_lists, barrier


@dataclass
class SearchInputs:
    """What a search works on. Candidates are cut from `start` (rebuilt by `start_spec`), trained
    and scored on `candidates`, and distilled from `teacher`, whose accuracy in the reward is
    measured on `full_val` (the whole validation split). `work_dir` keeps the history, the
    state a stopped search resumes from, and the best candidate's weights."""

    start: nn.Module
    start_spec: ModelSpec
    teacher: nn.Module
    full_val: DataLoader
    candidates: CandidateData
    device: torch.device
    work_dir: Path
    dist: DistInfo = field(default_factory=DistInfo)
    seed: int = 0


@dataclass
class SearchOutcome:
    """The best candidate within the budgets (its weights fine-tuned as evaluated), its record,
    the search's metrics and the files it wrote."""

    model: nn.Module
    spec: ModelSpec
    best: CandidateRecord
    metrics: dict[str, Any]
    artifacts: dict[str, str]


def run_search(inputs: SearchInputs, settings: SearchSettings) -> SearchOutcome:
    """Run (or finish) the search on every rank; StageFailed when no candidate met the budgets,
    PolicyMismatch when `settings.warm_start` does not fit the settings."""
    s, dist, work = settings, inputs.dist, Path(inputs.work_dir)
    input_size = inputs.candidates.input_size
    units = find_units(inputs.start, input_size, s.project_shape_changes)
    teacher_val = evaluate(inputs.teacher, inputs.full_val, inputs.device, desc="teacher val")
    evaluator = CandidateEvaluator(
        inputs.start,
        inputs.start_spec,
        units,
        inputs.teacher,
        teacher_val["top1"],
        inputs.candidates,
        s,
        inputs.device,
        work,
        dist,
        inputs.seed,
    )
    bounds = []
    if s.bound_actions:
        limits = {"params": s.max_params, "flops": s.max_flops}
        totals = evaluator.costs(evaluator.start)
        bounds = cost_bounds(
            evaluator.start, units, s.scales, s.round_to, limits, totals, input_size
        )
    search = PolicySearch(
        units,
        evaluator,
        s,
        work,
        seed=inputs.seed,
        writer=dist.is_main,
        warm_start=s.warm_start,
        rank=dist.rank,
        world_size=dist.world_size,
        share=lambda records: all_gather_lists(dist, records),
        on_update=evaluator.promote,
        bounds=bounds,
    )
    evaluator.promote(search.best())  # a resumed search may stop before its next update
    best = search.run()
    barrier(dist)  # every rank ran the same search on its share of candidates; rank 0 saved
    if best is None:
        raise StageFailed(f"search: {search.why_no_best()}")
    model, spec = load_model(work / BEST_FILE)
    barrier(dist)
    if dist.is_main:
        evaluator.clean_up()
    artifacts = {"search_history": str(work / HISTORY_FILE)}
    if dist.is_main:
        search.save_policies(work / POLICY_FILE)
        artifacts["search_policy"] = str(work / POLICY_FILE)
    records = list(search.records.values())
    metrics = {
        "best_reward": best.reward_raw,
        "best_candidate": {"removed": best.removed, "scales": best.scales},
        "best_val_top1": best.val_top1,
        "best_params": best.params,
        "best_flops": best.flops,
        "teacher_val_top1": teacher_val["top1"],
        "teacher_params": evaluator.teacher_costs["params"],
        "teacher_flops": evaluator.teacher_costs["flops"],
        "units": len(units),
        "removable_units": sum(u.removable for u in units),
        "candidates_evaluated": len(records),
        "rollouts": sum(len(u.rewards) for u in search.summaries),
        "mean_reward_per_update": [u.mean_reward for u in search.summaries],
        "candidate_train_images": evaluator.train_images,
        "candidate_eval_s": sum(r.eval_s for r in records),
        "strategy": s.strategy,
        "mode": s.mode,
    }
    return SearchOutcome(model, spec, best, metrics, artifacts)
