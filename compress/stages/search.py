"""`search`: N2N-style structural search (Ashok et al. 2018) for a smaller student.

A bidirectional LSTM keeps or removes each removable unit (a residual block, or a conv of a plain
CNN), then an autoregressive LSTM picks a width scale for each kept unit's convs; both learn by
REINFORCE from R = C(2 - C) * A_student / A_teacher. Candidates inherit the weights of the input
model (or, with `start_from: teacher`, of the teacher, adapted or not) and are fine-tuned briefly
with KD on cached teacher logits; accuracy comes from the validation split.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch.utils.data import RandomSampler

from compress.config import resolve_path
from compress.errors import InputError, StageFailed
from compress.evaluation import count_flops, count_params, evaluate
from compress.io import atomic_path, read_json, write_json
from compress.log import logger
from compress.models import ModelSpec, load_model, save_model
from compress.search.budget import cost_bounds
from compress.search.loop import HISTORY_FILE, POLICY_FILE, PolicySearch, SearchSettings
from compress.search.reward import compression, reward
from compress.search.surgery import Candidate, build_candidate, candidate_spec
from compress.search.units import find_units
from compress.stages.base import StageConfig, StageContext, StageResult, register_stage
from compress.stages.training import teacher_logits_once
from compress.train.distributed import DistInfo, all_gather_lists, barrier
from compress.train.loop import TrainingConfig, fit
from compress.train.objectives import DistillationObjective

BEST_FILE = "best_candidate.safetensors"
BEST_INFO = "best_candidate.json"
N2N_SCALES = [0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


class SearchStage(StageConfig):
    """Search for a smaller student by policy-gradient block removal and width shrinkage."""

    type: Literal["search"] = "search"
    needs_teacher: ClassVar[bool] = True
    mode: Literal["sequential", "removal", "shrink", "joint"] = Field(
        "sequential",
        description="sequential: removal policy, then shrinkage on the best removal result "
        "(as in N2N); joint: both per rollout.",
    )
    start_from: Literal["model", "teacher"] = Field(
        "model",
        description="Candidates are cut from the current model, or from the teacher (after an "
        "adapt_teacher stage, the adapted copy), as N2N derives its students from the teacher.",
    )
    strategy: Literal["policy_gradient", "random"] = Field(
        "policy_gradient", description="random: uniform actions over the same space (a baseline)."
    )
    updates: int = Field(10, gt=0, description="Policy updates per phase (M).")
    rollouts: int = Field(5, gt=0, description="Candidates sampled per update (N).")
    scales: list[float] = Field(
        N2N_SCALES, min_length=1, description="Width scales the shrink policy picks from."
    )
    round_to: int = Field(8, gt=0, description="Shrunk channel counts are multiples of this.")
    cost: Literal["params", "flops", "latency"] = Field(
        "params", description="Cost in the reward's compression term C."
    )
    max_params: int | None = Field(None, gt=0, description="Budget: parameters.")
    max_flops: int | None = Field(None, gt=0, description="Budget: FLOPs per image.")
    max_latency_ms: float | None = Field(
        None, gt=0, description="Budget: eager batch-1 latency on this machine (ms)."
    )
    bound_actions: bool = Field(
        True,
        description="Shrink actions that would leave a candidate over max_params or max_flops "
        "(each unit's saving measured at each kept width) are not sampled, as AMC bounds its "
        "actions; off: sampled freely and only penalised, as in N2N.",
    )
    penalty_anneal_updates: int = Field(
        15, ge=0, description="Over-budget penalty goes from soft to a hard -1 over these updates."
    )
    policy_lr: float = Field(0.01, gt=0, description="Adam learning rate of the policies.")
    entropy_weight: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    baseline_decay: float = Field(0.9, ge=0, lt=1, description="Moving-average baseline decay.")
    hidden: int = Field(30, gt=0, description="LSTM hidden size of both policies.")
    warm_start: Path | None = Field(
        None, description="policy.pt of an earlier search (policy transfer)."
    )
    candidate_steps: int = Field(
        50, ge=0, description="KD fine-tuning steps per candidate (0: inherited weights only)."
    )
    candidate_batch_size: int = Field(64, gt=0, description="Batch size of candidate training.")
    candidate_images: int | None = Field(
        5000, gt=0, description="Train images candidates train on (null: the whole split)."
    )
    candidate_lr: float = Field(0.002, gt=0, description="Peak LR of candidate fine-tuning.")
    candidate_optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd or adamw.")
    temperature: float = Field(4.0, gt=0, description="KD temperature of candidate training.")
    alpha: float = Field(0.9, ge=0, le=1, description="KD weight of candidate training.")
    val_images: int | None = Field(
        1000, gt=0, description="Validation images each candidate is scored on (null: all)."
    )
    reinit: bool = Field(
        False, description="Re-initialise candidates (N2N's from-scratch children)."
    )
    project_shape_changes: bool = Field(
        False,
        description="Residual blocks that change shape (downsampling, widening) may be removed "
        "too: such a block becomes its own shortcut path (a ResNet's 1x1 conv + BN downsample or "
        "the CIFAR ResNets' zero-pad shortcut, then the block's activation), or a new 1x1 conv + BN "
        "for an inverted residual without a skip. Off: they stay (N2N keeps strided layers).",
    )

    _resolve_warm = field_validator("warm_start", mode="before")(resolve_path)

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if any(not 0 < s <= 1 for s in v):
            raise ValueError(f"every scale must be in (0, 1] (got {v})")
        return v

    @field_validator("warm_start")
    @classmethod
    def _warm_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"policy file not found: {v}")
        return v


def _sample(n: int, k: int | None, seed: int) -> list[int]:
    """k indices of n, reproducibly shuffled (all of them when k is None)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[: k or n])


def latency_ms(model: torch.nn.Module, input_size: tuple[int, int, int]) -> float:
    """Median eager batch-1 forward time on the CPU."""
    import statistics

    from compress.deploy.bench import time_calls

    model = copy.deepcopy(model).cpu().eval()  # the teacher stays where it is
    x = torch.zeros(1, *input_size)
    with torch.no_grad():
        times = time_calls(lambda: model(x), warmup=3, min_iters=20, min_duration_s=0.2)
    return 1e3 * statistics.median(times)


class CandidateEvaluator:
    """Builds, fine-tunes and scores one candidate; keeps the best one's weights on disk."""

    def __init__(
        self,
        ctx: StageContext,
        cfg: SearchStage,
        start: tuple[torch.nn.Module, ModelSpec],
        units,
        teacher_val: float,
    ):
        self.ctx, self.cfg, self.units = ctx, cfg, units
        self.start, self.start_spec = start[0].cpu().eval(), start[1]
        self.input_size = ctx.data.input_size
        self.teacher_val = teacher_val
        self.teacher_costs = self.costs(ctx.teacher)
        seed = ctx.recipe.seed
        train_idx = _sample(len(ctx.data.samples("train")), cfg.candidate_images, seed)
        val_idx = _sample(len(ctx.data.samples("val")), cfg.val_images, seed)
        self.val = ctx.data.loader("val", indices=val_idx)
        # The eval transform (deterministic, so the teacher's logits are computed once for every
        # candidate) in shuffled order: the split is stored class by class.
        self.train = ctx.data.loader(
            "train",
            train=False,
            batch_size=cfg.candidate_batch_size,
            sampler=RandomSampler(range(len(train_idx))),  # drawn from the loop's seeded RNG
            indices=train_idx,
        )
        logits = teacher_logits_once(ctx, train_idx) if cfg.candidate_steps else None
        self.objective = DistillationObjective(
            ctx.teacher, cfg.temperature, cfg.alpha, teacher_logits=logits
        )
        steps_per_epoch = max(1, len(self.train))
        epochs = max(1, math.ceil(cfg.candidate_steps / steps_per_epoch))
        self.training = TrainingConfig(
            epochs=epochs,
            optimizer=cfg.candidate_optimizer,
            lr=cfg.candidate_lr,
            batch_size=cfg.candidate_batch_size,
            max_steps_per_epoch=max(1, math.ceil(cfg.candidate_steps / epochs)),
        )
        self.steps = epochs * min(steps_per_epoch, self.training.max_steps_per_epoch or 1)
        info = ctx.stage_dir / BEST_INFO
        self.best_reward = read_json(info)["reward_raw"] if info.is_file() else -math.inf

    def costs(self, model: torch.nn.Module) -> dict[str, float]:
        out: dict[str, float] = {
            "params": count_params(model),
            "flops": count_flops(model, self.input_size),
        }
        if self.cfg.cost == "latency" or self.cfg.max_latency_ms is not None:
            out["latency_ms"] = latency_ms(model, self.input_size)
        return out

    def __call__(self, candidate: Candidate) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        try:
            model = build_candidate(
                self.start, self.units, candidate, self.input_size, cfg.round_to, cfg.reinit
            )
        except (ValueError, RuntimeError) as e:  # an architecture that does not run
            return {"reward_raw": None, "error": str(e)}
        costs = self.costs(model)
        if cfg.candidate_steps:
            work = ctx.stage_dir / f"candidate.rank{ctx.dist.rank}"
            shutil.rmtree(work, ignore_errors=True)
            fit(
                model,
                self.objective,
                self.train,
                None,
                self.training,
                ctx.device,
                work,
                DistInfo(),  # under torchrun each rank fine-tunes its own candidates alone
                desc="candidate",
                seed=ctx.recipe.seed,
            )
            shutil.rmtree(work, ignore_errors=True)
        val = evaluate(model, self.val, ctx.device, desc="candidate val")["top1"]
        key = "latency_ms" if cfg.cost == "latency" else cfg.cost
        raw = reward(val, self.teacher_val, costs[key], self.teacher_costs[key])
        violates = (
            (cfg.max_params is not None and costs["params"] > cfg.max_params)
            or (cfg.max_flops is not None and costs["flops"] > cfg.max_flops)
            or (cfg.max_latency_ms is not None and costs["latency_ms"] > cfg.max_latency_ms)
        )
        record = {
            **costs,
            "val_top1": val,
            "compression": compression(costs[key], self.teacher_costs[key]),
            "reward_raw": raw,
            "violates": bool(violates),
            "train_images": self.steps * cfg.candidate_batch_size,
        }
        if not violates and raw > self.best_reward:  # kept until `promote` sees every rank's
            self.best_reward = raw
            spec = candidate_spec(self.start_spec, model, self.units, candidate, self.input_size)
            save_model(model.cpu(), spec, self._rank_best(ctx.dist.rank))
            write_json(
                self._rank_best(ctx.dist.rank).with_suffix(".json"), {"key": candidate.key()}
            )
        return record

    def _rank_best(self, rank: int) -> Path:
        return self.ctx.stage_dir / f"best_candidate.rank{rank}.safetensors"

    def promote(self, best: dict[str, Any] | None) -> None:
        """After an update: the best candidate so far (evaluated on any rank) becomes BEST_FILE."""
        if best is None:
            return
        self.best_reward = max(self.best_reward, best["reward_raw"])
        info = self.ctx.stage_dir / BEST_INFO
        if not self.ctx.dist.is_main or (info.is_file() and read_json(info)["key"] == best["key"]):
            return
        source = self._rank_best(best.get("rank", 0))
        # The evaluating rank saved it, as it beat every reward that rank knew of.
        saved = source.with_suffix(".json")
        if not saved.is_file() or read_json(saved)["key"] != best["key"]:
            logger.warning(f"search: the weights of candidate {best['key']} were not kept")
            return
        with atomic_path(self.ctx.stage_dir / BEST_FILE) as tmp:
            shutil.copyfile(source, tmp)
        write_json(info, {"key": best["key"], "reward_raw": best["reward_raw"]})


def _settings(cfg: SearchStage, seed: int) -> SearchSettings:
    return SearchSettings(
        mode=cfg.mode,
        strategy=cfg.strategy,
        updates=cfg.updates,
        rollouts=cfg.rollouts,
        scales=list(cfg.scales),
        policy_lr=cfg.policy_lr,
        entropy_weight=cfg.entropy_weight,
        baseline_decay=cfg.baseline_decay,
        hidden=cfg.hidden,
        penalty_anneal_updates=cfg.penalty_anneal_updates,
        seed=seed,
    )


@register_stage("search", SearchStage, makes_model=True)
def run(ctx: StageContext, cfg: SearchStage) -> StageResult:
    if not ctx.data.samples("val"):
        raise InputError(
            f"stages[{ctx.index}] (search): candidates are scored on the validation split, "
            "which is empty; set data.val_fraction > 0 or add a val/ folder"
        )
    if cfg.start_from == "teacher":  # a copy: the teacher stays on its device for the KD
        start = copy.deepcopy(ctx.teacher).cpu().requires_grad_(True), ctx.teacher_spec
    else:
        start = ctx.model.cpu(), ctx.spec
    units = find_units(start[0], ctx.data.input_size, cfg.project_shape_changes)
    teacher_val = evaluate(ctx.teacher, ctx.data.loader("val"), ctx.device, desc="teacher val")
    evaluator = CandidateEvaluator(ctx, cfg, start, units, teacher_val["top1"])
    bounds = []
    if cfg.bound_actions:
        limits = {"params": cfg.max_params, "flops": cfg.max_flops}
        start = evaluator.costs(evaluator.start)
        bounds = cost_bounds(
            evaluator.start, units, cfg.scales, cfg.round_to, limits, start, ctx.data.input_size
        )
    try:
        search = PolicySearch(
            units,
            evaluator,
            _settings(cfg, ctx.recipe.seed),
            ctx.stage_dir,
            writer=ctx.dist.is_main,
            warm_start=cfg.warm_start,
            rank=ctx.dist.rank,
            world_size=ctx.dist.world_size,
            share=lambda records: all_gather_lists(ctx.dist, records),
            on_update=evaluator.promote,
            bounds=bounds,
        )
    except ValueError as e:
        raise InputError(f"stages[{ctx.index}].warm_start: {e}") from None
    evaluator.promote(search.best())  # a resumed search may stop before its next update
    best = search.run()
    barrier(ctx.dist)  # every rank ran the same search on its share of candidates; rank 0 saved
    if best is None:
        raise StageFailed(f"search: {search.why_no_best()}")
    model, spec = load_model(ctx.stage_dir / BEST_FILE)
    barrier(ctx.dist)
    if ctx.dist.is_main:
        for kept in ctx.stage_dir.glob("best_candidate.rank*"):
            kept.unlink()
    artifacts = {"search_history": str(ctx.stage_dir / HISTORY_FILE)}
    if ctx.dist.is_main:
        search.save_policies(ctx.stage_dir / POLICY_FILE)
        artifacts["search_policy"] = str(ctx.stage_dir / POLICY_FILE)
    records = list(search.records.values())
    metrics = {
        "best_reward": best["reward_raw"],
        "best_candidate": {k: best[k] for k in ("removed", "scales")},
        "best_val_top1": best["val_top1"],
        "best_params": best["params"],
        "best_flops": best["flops"],
        "teacher_val_top1": teacher_val["top1"],
        "teacher_params": evaluator.teacher_costs["params"],
        "teacher_flops": evaluator.teacher_costs["flops"],
        "units": len(units),
        "removable_units": sum(u.removable for u in units),
        "candidates_evaluated": len(records),
        "rollouts": sum(len(s["rewards"]) for s in search.summaries),
        "mean_reward_per_update": [s["mean_reward"] for s in search.summaries],
        "candidate_train_images": evaluator.steps * cfg.candidate_batch_size,
        "candidate_eval_s": sum(r.get("eval_s", 0.0) for r in records),
        "strategy": cfg.strategy,
        "mode": cfg.mode,
    }
    logger.info("search: best " + json.dumps({k: metrics[k] for k in list(metrics)[:6]}))
    return StageResult(
        model=model,
        spec=spec,
        metrics=metrics,
        artifacts=artifacts,
        model_metrics={"search_reward": best["reward_raw"]},
    )
