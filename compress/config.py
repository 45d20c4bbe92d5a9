"""Recipe building blocks: strict config sections, recipe-relative paths, data and model sections.

Everything here is below the recipe loader (`compress.recipe`) and the stages, so that data, training
and stage modules can use these types without importing the loader.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


MAX_INT = 2**53
"""No integer setting is larger (the largest integer JSON round-trips exactly)."""


def _wants_int(annotation: Any) -> bool:
    """True for `int`, `int | None` and the like, where a boolean is surely a mistake."""
    args = typing.get_args(annotation) or (annotation,)
    return int in args and bool not in args


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are validated on assignment too, floats
    are finite, and integer fields take neither booleans nor absurd magnitudes."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_integers(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _wants_int(field.annotation):
            if isinstance(v, bool):
                raise ValueError(f"expected an integer, not the boolean {str(v).lower()}")
            if isinstance(v, int) and abs(v) > MAX_INT:
                raise ValueError(f"{v} is out of range (at most {MAX_INT:,})")
        return v


def resolve_path(value: Any, info: ValidationInfo) -> Any:
    """Before-validator: a relative path is taken from the recipe's folder (`base_dir` context)."""
    base = (info.context or {}).get("base_dir")
    if value is None or base is None:
        return value
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else (Path(base) / p).resolve()


def _is_file(value: Path) -> Path:
    if not value.is_file():
        raise ValueError(f"file not found: {value}")
    return value


RecipePath = Annotated[Path, BeforeValidator(resolve_path)]
"""A path; relative ones are taken from the recipe's folder."""

ExistingFile = Annotated[Path, BeforeValidator(resolve_path), AfterValidator(_is_file)]
"""A path to a file that must exist; relative ones are taken from the recipe's folder."""


class DataConfig(StrictModel):
    """ImageFolder data: `root/train/<class>/*`, `root/test/<class>/*`, optional `root/val/`."""

    root: RecipePath = Field(
        description="Folder with train/ and test/ (and optionally val/) subfolders."
    )
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of train carved out as validation when no val/ exists."
    )
    limit_per_class: int | None = Field(
        None, gt=0, description="Use at most this many train (and val/) images per class."
    )
    test_limit_per_class: int | None = Field(
        None, gt=0, description="Use at most this many test images per class."
    )
    image_size: int | None = Field(
        None,
        gt=0,
        le=4096,
        description="Model input side; null keeps the images' own (square) size.",
    )
    resize: int | None = Field(
        None,
        gt=0,
        le=8192,
        description="Shorter side after decoding; default image_size/0.875 for >= 64 px, else none.",
    )
    augment: Literal["none", "flip", "crop_flip", "random_resized_crop"] = Field(
        "crop_flip",
        description="Train augmentation (CIFAR: crop_flip; ImageNet: random_resized_crop).",
    )
    crop_padding: int = Field(4, ge=0, le=1024, description="Padding for augment=crop_flip.")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="Normalisation mean (RGB).")
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="Normalisation std (RGB).")
    batch_size: int = Field(128, gt=0, le=65_536, description="Training batch size (per process).")
    eval_batch_size: int = Field(256, gt=0, le=65_536, description="Evaluation batch size.")
    num_workers: int = Field(0, ge=0, le=256, description="DataLoader worker processes.")
    cache_mb: int = Field(
        4096, ge=0, description="Hold decoded images in memory when a split fits this budget (MiB)."
    )

    @field_validator("root")
    @classmethod
    def _root_exists(cls, v: Path) -> Path:
        if not v.is_dir():
            raise ValueError(f"data folder not found: {v}")
        return v

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError("every std value must be > 0")
        return v


class ModelConfig(StrictModel):
    """A model: its spec, optional weights file, and keyword arguments for its builder."""

    model: str = Field(
        description="cifar_resnet{20,32,44,56,110}, timm:NAME, torchvision:NAME, or a saved model path."
    )
    weights: ExistingFile | None = Field(
        None, description="Checkpoint to load (state dict or safetensors)."
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Builder arguments, e.g. {num_classes: 10, img_size: 32}."
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"model": v} if isinstance(v, str) else v

    @field_validator("model", mode="before")
    @classmethod
    def _resolve_saved(cls, v: Any, info: ValidationInfo) -> Any:
        from compress.models.registry import is_saved_model

        if isinstance(v, str) and is_saved_model(v):
            return str(resolve_path(v, info))
        return v

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from compress.models import check_spec

        check_spec(v)
        return v

    @field_validator("kwargs")
    @classmethod
    def _safe_kwargs(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """No argument that loads or fetches anything or is out of bounds; one the builder takes
        (tried on the meta device, no memory; `num_classes`, when absent, comes from the data)."""
        from compress.models.registry import check_model_kwargs
        from compress.models.spec_schema import problems_error

        model = info.data.get("model")
        problems = check_model_kwargs(model, v) if model is not None else []
        if problems:
            raise problems_error(problems, v)
        return v


class TrackingConfig(StrictModel):
    """Experiment tracking: the training stages' loss, learning rate and epoch metrics also go to
    TensorBoard (`<run>/tensorboard/<stage folder>/`) and/or MLflow. Both are off by default and
    each needs its extra: `pip install 'compress[tensorboard]'`, `pip install 'compress[mlflow]'`."""

    tensorboard: bool = Field(
        False, description="Write TensorBoard event files to `<run>/tensorboard/<stage folder>/`."
    )
    mlflow: bool = Field(
        False, description="Log to MLflow: one run per compress run, a nested run per stage."
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow tracking server or store; null: `sqlite:///<run>/mlflow/mlflow.db` "
        "in the run folder.",
    )
    mlflow_experiment: str | None = Field(
        None, description="MLflow experiment name; null: the recipe's `name`."
    )
    log_every_steps: int = Field(
        10,
        gt=0,
        description="Log the training loss and learning rate every this many optimiser steps "
        "(the epoch metrics after every epoch).",
    )

    @field_validator("mlflow_tracking_uri", "mlflow_experiment", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        return None if v == "" else v  # `${MLFLOW_TRACKING_URI:-}` with the variable unset

    @field_validator("tensorboard", "mlflow")
    @classmethod
    def _installed(cls, v: bool, info: ValidationInfo) -> bool:
        from compress.train.tracking import missing_package

        problem = missing_package(info.field_name) if v else None
        if problem is not None:
            raise ValueError(problem)
        return v


# ---------------------------------------------------------------- error messages


def format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "recipe"


UNKNOWN_KEY = "unknown key (see recipes/README.md for the fields this section takes)"


def _message(err: dict[str, Any], unknown: str = UNKNOWN_KEY) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    bounds = {
        "greater_than": "> {gt}",
        "greater_than_equal": ">= {ge}",
        "less_than": "< {lt}",
        "less_than_equal": "<= {le}",
    }
    if kind in bounds:
        return "must be " + bounds[kind].format(**ctx) + f" (got {err.get('input')!r})"
    if kind == "extra_forbidden":
        return unknown
    if kind == "missing":
        return "required field is missing"
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        msg += f" (got {err.get('input')!r})"
    return msg


def validation_problems(
    e: ValidationError,
    prefix: tuple[Any, ...] = (),
    rename: Callable[[str], str] = str,
    unknown: str = UNKNOWN_KEY,
) -> list[str]:
    """Each error of a pydantic validation as `field.path: problem`, under `prefix`."""
    lines = []
    for err in e.errors():
        loc = prefix + tuple(p for p in err["loc"] if not str(p).startswith("function-"))
        lines.append(f"{rename(format_loc(loc))}: {_message(err, unknown)}")
    return lines
