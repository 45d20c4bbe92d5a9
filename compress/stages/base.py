"""The stage registry, and what a stage is given (StageContext) and returns (StageResult)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from compress.config import StrictModel

if TYPE_CHECKING:
    from compress.data import ImageFolderData
    from compress.models import ModelSpec
    from compress.recipe import Recipe
    from compress.train.distributed import DistInfo


class StageConfig(StrictModel):
    """Fields every stage has; each stage type subclasses this with `type: Literal[...]`."""

    type: str
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="Folder name suffix (default: the type)."
    )
    needs_teacher: ClassVar[bool] = False
    needs_earlier: ClassVar[tuple[str, ...]] = ()  # stage types one of which must come before

    @property
    def label(self) -> str:
        return self.name or self.type


@dataclass
class StageContext:
    """What a stage sees: the recipe, its folder, the data, the input model and the teacher."""

    recipe: Recipe
    index: int
    stage_dir: Path
    device: torch.device
    data: ImageFolderData
    model: nn.Module
    spec: ModelSpec
    dist: DistInfo
    artifacts: dict[str, str]
    teacher_loader: Callable[[], tuple[nn.Module, ModelSpec]]

    @property
    def teacher(self) -> nn.Module:
        """The fixed teacher in eval mode with gradients off (built on first use)."""
        return self.teacher_loader()[0]

    @property
    def teacher_spec(self) -> ModelSpec:
        """The spec that rebuilds the teacher's architecture."""
        return self.teacher_loader()[1]


@dataclass
class StageResult:
    """What a stage made: a new model (or None to pass the input on), metrics and artifact paths.

    `model` is the next stages' student, or their teacher for a stage type that makes teachers."""

    model: nn.Module | None = None
    spec: ModelSpec | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    model_metrics: dict[str, Any] = field(
        default_factory=dict
    )  # merged into the model's report entry
    teacher_metrics: dict[str, Any] = field(default_factory=dict)  # merged into the teacher's entry


StageFn = Callable[[StageContext, Any], StageResult]
ReportSection = Callable[[dict[str, Any], list[dict[str, Any]], Path], list[str]]
"""`section(report, entries, run_dir)`: report.md lines for this type's stages (`entries`, from
report.json); it may write files into their folders (a plot) and link them."""


@dataclass
class StageType:
    name: str
    config: type[StageConfig]
    run: StageFn
    makes: Literal["model", "teacher"] | None = None
    report_section: ReportSection | None = None

    @property
    def makes_model(self) -> bool:
        return self.makes == "model"


STAGES: dict[str, StageType] = {}


def register_stage(
    name: str,
    config: type[StageConfig],
    makes: Literal["model", "teacher"] | None = None,
    report_section: ReportSection | None = None,
):
    """Register `run(ctx, cfg) -> StageResult` as the stage type `name` configured by `config`.

    A stage that `makes` a model returns it as `StageResult.model`; the later stages start from it
    ("model") or learn from it ("teacher"). Such a stage runs on every torchrun rank, others on
    rank 0 only. `report_section` adds this type's section to report.md.
    """

    def decorator(fn: StageFn) -> StageFn:
        STAGES[name] = StageType(name, config, fn, makes, report_section)
        return fn

    return decorator
