"""A run folder's layout, and a reader that finds a stage's outputs by type and label.

A run folder holds `report.json`, the resolved `recipe.yaml`, a `teacher/` folder and one folder
per stage (`NN-label/`), each with its `stage.json` and, for a stage that makes one, its model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from compress.errors import InputError
from compress.io import read_json

REPORT_JSON = "report.json"
RECIPE_FILE = "recipe.yaml"  # the resolved recipe, written into every run folder
RUN_MARKER = ".compress-run"
STAGE_STATE = "stage.json"
MODEL_FILE = "model.safetensors"
TEACHER_FILE = "teacher.safetensors"  # written by a stage that adapts the teacher


def stage_folder(index: int, label: str) -> str:
    """The folder name of the stage at `index` labelled `label`."""
    return f"{index:02d}-{label}"


@dataclass(frozen=True)
class StageOutput:
    """One finished (or failed) stage of a run, as report.json records it."""

    index: int
    type: str
    label: str
    dir: Path
    status: str
    metrics: dict[str, Any]
    model_name: str  # the report entry of the model this stage left current
    wall_time_s: float | None = None

    @property
    def model_path(self) -> Path:
        """The model the stage made (a stage that makes none has no such file)."""
        return self.dir / MODEL_FILE

    @property
    def teacher_path(self) -> Path:
        """The teacher an adapt_teacher stage made."""
        return self.dir / TEACHER_FILE

    def load_model(self) -> tuple[nn.Module, Any]:
        """The stage's model and its spec."""
        from compress.models import load_model

        if not self.model_path.is_file():
            raise InputError(f"{self.dir}: stage {self.label!r} ({self.type}) saved no model")
        return load_model(self.model_path)

    def file(self, name: str) -> Path:
        """A file the stage wrote, e.g. `history.jsonl`; a clear error when it is missing."""
        path = self.dir / name
        if not path.is_file():
            raise InputError(f"{path}: not found (stage {self.label!r}, {self.type})")
        return path


class RunFolder:
    """Read a run folder: its report, its models' entries and its stages' outputs."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        report = self.path / REPORT_JSON
        if not report.is_file():
            raise InputError(f"{report}: not found (is {self.path} a compress run folder?)")
        self.report: dict[str, Any] = read_json(report)

    @property
    def status(self) -> str:
        return self.report.get("status", "unknown")

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        """Report entries by model name (`teacher`, `student`, each model-making stage's folder)."""
        return {m["name"]: m for m in self.report.get("models", [])}

    @property
    def stages(self) -> list[StageOutput]:
        return [
            StageOutput(
                index=s["index"],
                type=s["type"],
                label=s["label"],
                dir=self.path / s["dir"],
                status=s["status"],
                metrics=s.get("metrics", {}),
                model_name=s.get("model", ""),
                wall_time_s=s.get("wall_time_s"),
            )
            for s in sorted(self.report.get("stages", []), key=lambda s: s["index"])
        ]

    def stage(self, type: str | None = None, label: str | None = None) -> StageOutput:
        """The last stage of this type and/or label; a clear error naming what exists if none."""
        found = [
            s
            for s in self.stages
            if (type is None or s.type == type) and (label is None or s.label == label)
        ]
        if not found:
            wanted = ", ".join(f"{k}={v!r}" for k, v in (("type", type), ("label", label)) if v)
            have = ", ".join(f"{s.label} ({s.type})" for s in self.stages) or "none"
            raise InputError(f"{self.path}: no stage with {wanted} (stages: {have})")
        return found[-1]

    def model(self, type: str | None = None, label: str | None = None) -> dict[str, Any]:
        """The report entry of the model a stage left current (e.g. the final student)."""
        return self.models[self.stage(type, label).model_name]

    @property
    def final_stage(self) -> StageOutput | None:
        """The last stage that made a model (None when no stage did)."""
        made = self.final_model
        if made.get("role") != "stage":
            return None
        return next((s for s in self.stages if s.index == made.get("stage")), None)

    @property
    def final_model(self) -> dict[str, Any]:
        """The report entry of the last model a stage made (the input model if none did)."""
        made = [m for m in self.report.get("models", []) if m.get("role") == "stage"]
        return made[-1] if made else self.models["student"]
