"""`search`: N2N-style structural search (Ashok et al. 2018) for a smaller student.

A bidirectional LSTM keeps or removes each removable unit (a residual block, or a conv of a plain
CNN), then an autoregressive LSTM picks a width scale for each kept unit's convs; both learn by
REINFORCE from R = C(2 - C) * A_student / A_teacher. Candidates inherit the weights of the input
model (or, with `start_from: teacher`, of the teacher, adapted or not) and are fine-tuned briefly
with KD on cached teacher logits; accuracy comes from the validation split. The search itself is
`compress.search.run`; this stage gathers its inputs from the run.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from compress.errors import InputError
from compress.log import logger
from compress.search.evaluate import candidate_data
from compress.search.loop import PolicyMismatch
from compress.search.run import SearchInputs, run_search
from compress.search.settings import SearchSettings
from compress.stages.base import StageConfig, StageContext, StageResult, register_stage
from compress.stages.training import teacher_logits_once


class SearchStage(SearchSettings, StageConfig):
    """Search for a smaller student by policy-gradient block removal and width shrinkage."""

    type: Literal["search"] = "search"
    needs_teacher: ClassVar[bool] = True


def report_section(
    report: dict[str, Any], entries: list[dict[str, Any]], run_dir: Path
) -> list[str]:
    """report.md's Search section: each search stage's plot (search.png) of the candidates."""
    from compress.search.plot import render_search

    lines = []
    for entry in entries:
        png = render_search(run_dir / entry["dir"], entry.get("metrics", {}))
        if png is not None:
            lines.append(f"![{entry['label']}: candidates]({entry['dir']}/{png.name})")
    return ["## Search", "", *lines, ""] if lines else []


@register_stage("search", SearchStage, makes="model", report_section=report_section)
def run(ctx: StageContext, cfg: SearchStage) -> StageResult:
    if not ctx.data.samples("val"):
        raise InputError(
            f"stages[{ctx.index}] (search): candidates are scored on the validation split, "
            "which is empty; set data.val_fraction > 0 or add a val/ folder"
        )
    if cfg.start_from == "teacher":  # a copy: the teacher stays on its device for the KD
        start, start_spec = copy.deepcopy(ctx.teacher).cpu().requires_grad_(True), ctx.teacher_spec
    else:
        start, start_spec = ctx.model.cpu(), ctx.spec
    candidates = candidate_data(ctx.data, cfg, ctx.recipe.seed)
    if cfg.candidate_steps:  # cached in the stage folder: a resumed search reads them back
        candidates.teacher_logits = teacher_logits_once(ctx, candidates.train_indices)
    inputs = SearchInputs(
        start=start,
        start_spec=start_spec,
        teacher=ctx.teacher,
        full_val=ctx.data.loader("val"),
        candidates=candidates,
        device=ctx.device,
        work_dir=ctx.stage_dir,
        dist=ctx.dist,
        seed=ctx.recipe.seed,
    )
    try:
        outcome = run_search(inputs, cfg)
    except PolicyMismatch as e:
        raise InputError(f"stages[{ctx.index}].warm_start: {e}") from None
    metrics = outcome.metrics
    logger.info("search: best " + json.dumps({k: metrics[k] for k in list(metrics)[:6]}))
    return StageResult(
        model=outcome.model,
        spec=outcome.spec,
        metrics=metrics,
        artifacts=outcome.artifacts,
        model_metrics={"search_reward": outcome.best.reward_raw},
    )
