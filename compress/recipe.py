"""The recipe schema (pydantic v2) and its loader: env interpolation, `--set` overrides, clear errors.

Stage configs live with their stages (`compress/stages/`); the loader validates each entry of
`stages` against the config class registered for its `type`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    model_validator,
)

from compress.config import (
    DataConfig,
    ModelConfig,
    StrictModel,
    TrackingConfig,
    validation_problems,
)
from compress.errors import InputError
from compress.io import parse_yaml, read_yaml


class Recipe(StrictModel):
    """A run: data, a fixed teacher, the student it starts from, and the stages applied in order."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name (folder-safe)."
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed for data splits, initialisation and shuffling."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto picks cuda if present."
    )
    data: DataConfig = Field(description="The data set (see `data` below).")
    teacher: ModelConfig | None = Field(None, description="Fixed teacher (needed by distill).")
    student: ModelConfig | None = Field(
        None, description="Model the stages start from; default: the teacher's architecture."
    )
    stages: list[Any] = Field(min_length=1, description="Ordered list of stages (see below).")
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="Experiment tracking, off by default: `{tensorboard, mlflow, mlflow_tracking_uri, "
        "mlflow_experiment, log_every_steps}` (docs/runs.md, Tracking experiments).",
    )

    @model_validator(mode="after")
    def _needs_a_model(self) -> Recipe:
        if self.teacher is None and self.student is None:
            raise ValueError("set `teacher` or `student` (the model the stages start from)")
        if not all(isinstance(s, BaseModel) for s in self.stages):
            return self  # a stage entry is invalid: its own errors are reported instead
        needing = [i for i, s in enumerate(self.stages) if getattr(s, "needs_teacher", False)]
        if self.teacher is None and needing:
            i = needing[0]
            hint = " (or distill_from: input)" if self.stages[i].type == "quantize" else ""
            raise ValueError(
                f"stages[{i}] ({self.stages[i].type}) learns from a teacher: set `teacher`{hint}"
            )
        for i, stage in enumerate(self.stages):
            needed = getattr(stage, "needs_earlier", ())
            earlier = {s.type for s in self.stages[:i]}
            if needed and not earlier & set(needed):
                raise ValueError(
                    f"stages[{i}] ({stage.type}) needs an earlier {' or '.join(needed)} stage"
                )
        return self

    def student_config(self) -> ModelConfig:
        """The model the first stage starts from: `student`, else the teacher's architecture."""
        if self.student is not None:
            return self.student
        assert self.teacher is not None
        return ModelConfig(model=self.teacher.model, kwargs=self.teacher.kwargs)


# ---------------------------------------------------------------- loading


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(obj: Any, path: str = "") -> Any:
    """Replace ${VAR} and ${VAR:-default} in string values with the environment's values."""
    if isinstance(obj, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_interpolate(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, str):

        def sub(m: re.Match) -> str:
            value = os.environ.get(m.group(1))
            if value is None:
                if m.group(2) is None:
                    raise InputError(f"{path}: environment variable {m.group(1)} is not set")
                return m.group(2)
            return value

        return _ENV.sub(sub, obj)
    return obj


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `--set a.b.0.c=VALUE` (VALUE parsed as YAML) to the raw recipe mapping."""
    if "=" not in assignment:
        raise InputError(f"--set {assignment!r}: expected KEY=VALUE, e.g. stages.1.epochs=3")
    key, value_text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise InputError(f"--set {assignment!r}: empty key")
    value = parse_yaml(value_text, f"--set {key.strip()}")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise InputError(f"--set {key}: '{where}' is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise InputError(f"--set {key}: '{'.'.join(parts[:i])}' is not a mapping or list")


def parse_recipe(raw: Any, base_dir: Path | str = ".") -> Recipe:
    """Validate a raw recipe mapping; raise InputError listing every problem with its field path."""
    from compress.stages import STAGES

    if not isinstance(raw, dict):
        raise InputError("recipe: expected a mapping at the top level (name, data, stages, ...)")
    raw = _interpolate(raw)
    context = {"base_dir": Path(base_dir).resolve()}
    problems: list[str] = []
    stages: list[Any] = []
    raw_stages = raw.get("stages")
    if isinstance(raw_stages, list):
        for i, entry in enumerate(raw_stages):
            if not isinstance(entry, dict) or "type" not in entry:
                problems.append(f"stages[{i}].type: required (one of {', '.join(sorted(STAGES))})")
                continue
            if entry["type"] not in STAGES:
                problems.append(
                    f"stages[{i}].type: unknown stage type {entry['type']!r} "
                    f"(one of {', '.join(sorted(STAGES))})"
                )
                continue
            try:
                stages.append(STAGES[entry["type"]].config.model_validate(entry, context=context))
            except ValidationError as e:
                problems.extend(validation_problems(e, ("stages", i)))
        raw = {**raw, "stages": stages if not problems else raw_stages}
    try:
        recipe = Recipe.model_validate(raw, context=context)
    except ValidationError as e:
        problems = validation_problems(e) + problems
        recipe = None
    if problems:
        raise InputError("invalid recipe:\n  " + "\n  ".join(problems))
    assert recipe is not None
    return recipe


def load_recipe(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, interpolate and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"recipe file not found: {path}")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping at the top level (name, data, stages, ...)")
    for assignment in overrides:
        apply_override(raw, assignment)
    return parse_recipe(raw, base_dir=path.parent)
