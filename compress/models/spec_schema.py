"""What a model spec may hold: the schema of the spec a saved model file carries in its metadata,
and the rules every builder keyword argument passes (from a file, a recipe or the API) before it
reaches a builder.

A spec is data from whoever wrote the file or the recipe, so it never reaches a builder unchecked:
no argument may make a builder load or fetch anything (weights come from the model's `weights:`
field or from the file's own tensors), and sizes are bounded. Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]
"""Where in a spec's kwargs something is wrong (relative to the kwargs), and what."""

MAX_SIZE = 100_000
"""No integer builder argument (a class count, a width, a depth) is larger in magnitude."""
SIZE_LIMITS = {
    "num_classes": (0, 100_000),
    "img_size": (1, 4096),
    "image_size": (1, 4096),
    "input_size": (1, 4096),
    "in_chans": (1, 4096),
}
"""Bounds of the integers (each, for a list) of these arguments."""
MAX_MODEL_ELEMENTS = 1_000_000_000
"""No model compress builds has more parameter and buffer elements (4 GB in float32)."""
MAX_STRING = 1_000

# Arguments that load or fetch weights or files, whatever their value.
LOADING_KEYS = frozenset(
    {
        "pretrained",
        "weights",
        "weights_backbone",
        "checkpoint",
        "checkpoint_path",
        "file",
        "url",
        "path",
        "cache_dir",
        "model_dir",
        "hub_dir",
    }
)
LOADING_PREFIXES = ("pretrained_cfg", "hf_hub")
# Arguments shaped like these are refused unless their value is a number, a boolean or null
# (timm's `drop_path` rate and SwinV2's `pretrained_window_sizes` are architecture, not files).
PATHLIKE_PREFIXES = ("pretrained", "weights_", "checkpoint", "file_", "url_")
PATHLIKE_SUFFIXES = ("_path", "_file", "_filename", "_url", "_uri", "_dir")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".th", ".tar", ".ckpt", ".pkl", ".npz", ".npy")
CHECKPOINT_SUFFIXES += (".safetensors", ".onnx", ".h5", ".msgpack")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://|^(hf[-_]hub|file|https?):", re.IGNORECASE)


def is_saved_model(name: str) -> bool:
    """True when `name` is the path of a model file rather than a zoo, timm or torchvision name."""
    if ":" in name:
        return False
    return name.endswith(".safetensors") or "/" in name or os.sep in name or name.startswith(".")


def _numeric(value: Any) -> bool:
    """A number, a boolean, null, or a list of those: never a file or a URL."""
    if isinstance(value, list | tuple):
        return all(_numeric(v) for v in value)
    return value is None or isinstance(value, int | float)


def _integers(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return 0 < len(value) <= 8 and all(_integers(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def _string_problem(s: str) -> str | None:
    if len(s) > MAX_STRING:
        return f"a string of {len(s):,} characters (at most {MAX_STRING:,})"
    if _URL.match(s):
        return f"{s!r} looks like a URL: compress never downloads"
    if "/" in s or "\\" in s or s.startswith("~") or s.lower().endswith(CHECKPOINT_SUFFIXES):
        return f"{s!r} looks like a file path: builder arguments never name files"
    if s and os.path.isfile(s):
        return f"{s!r} names an existing file: builder arguments never name files"
    return None


def _value_problems(value: Any, loc: Loc, limits: tuple[int, int]) -> list[Problem]:
    """Strings that name files or URLs, integers out of `limits`, non-finite floats, anywhere
    inside `value`."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        low, high = limits
        if not low <= value <= high:
            return [(loc, f"must be between {low:,} and {high:,} (got {value:,})")]
        return []
    if isinstance(value, float):
        return [] if math.isfinite(value) else [(loc, f"must be a finite number (got {value})")]
    if isinstance(value, str):
        problem = _string_problem(value)
        return [(loc, problem)] if problem else []
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in _value_problems(v, (*loc, i), limits)]
    if isinstance(value, Mapping):
        return [p for k, v in value.items() for p in _value_problems(v, (*loc, str(k)), limits)]
    return [(loc, f"must be JSON data (got a {type(value).__name__})")]


def kwarg_problems(name: str, kwargs: Mapping[str, Any], saved: bool) -> list[Problem]:
    """Each builder argument of model `name` that would load or fetch something, names a file or a
    URL, or is out of bounds. `saved`: the spec comes from a saved model's metadata, where even
    the recipe's `pretrained: true` for a timm model is refused (compress never writes it)."""
    if not isinstance(kwargs, Mapping):
        return [((), f"must be a mapping of argument names to values (got {kwargs!r})")]
    problems: list[Problem] = []
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier():
            problems.append(((str(key),), "is not a keyword argument name"))
            continue
        low = key.lower()
        timm_pretrained = low == "pretrained" and name.startswith("timm:")
        if timm_pretrained and not saved and isinstance(value, bool):
            continue  # timm's weights from the local Hugging Face cache only (_build_timm)
        pathlike = low.startswith(PATHLIKE_PREFIXES) or low.endswith(PATHLIKE_SUFFIXES)
        if (
            low in LOADING_KEYS
            or low.startswith(LOADING_PREFIXES)
            or (pathlike and not _numeric(value))
        ):
            problems.append(((key,), _loading_message(name, saved)))
            continue
        if low in SIZE_LIMITS and value is not None and not _integers(value):
            problems.append(
                ((key,), f"must be an integer or a list of integers (got {_short(value)})")
            )
            continue
        limits = SIZE_LIMITS.get(low, (-MAX_SIZE, MAX_SIZE))
        problems += _value_problems(value, (key,), limits)
    return problems


def _loading_message(name: str, saved: bool) -> str:
    if saved:
        return (
            "a saved model's spec never asks its builder to load or fetch anything (its weights "
            "are the file's own tensors; compress never writes this argument)"
        )
    hint = (
        ", or `kwargs: {pretrained: true}`, which reads timm's published weights from the local "
        "Hugging Face cache"
        if name.startswith("timm:")
        else ""
    )
    return (
        "builder arguments may not load or fetch weights or files (compress builds the "
        "architecture with random weights): name a local checkpoint in the model's `weights:` "
        f"field instead{hint}"
    )


# ------------------------------------------------------------------ the saved file's spec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Int8Document(_Strict):
    """The arguments that rebuild an INT8 model (see compress.stages.quantize._int8_spec)."""

    route: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")] | None = None
    # the library that quantized it, where that is not the route that runs it (QAT, then float
    # layers chosen by max_accuracy_drop: brevitas, run by onnxruntime)
    quantized_by: Literal["brevitas", "onnxruntime"] | None = None
    target: Literal["onnxruntime", "tensorrt"]
    input_size: Annotated[list[Annotated[int, Field(ge=1, le=4096)]], Field(min_length=3)]

    @field_validator("input_size")
    @classmethod
    def _three(cls, v: list[int]) -> list[int]:
        if len(v) != 3:
            raise ValueError(f"expected [channels, height, width] (got {v})")
        return v


class SpecDocument(_Strict):
    """The JSON object a saved model's `compress.model_spec` metadata holds."""

    name: Annotated[str, Field(min_length=1, max_length=512)]
    kwargs: dict[str, Any] = Field(default_factory=dict)
    int8: Int8Document | None = None

    @field_validator("name")
    @classmethod
    def _architecture(cls, v: str) -> str:
        if is_saved_model(v):
            raise ValueError(f"names a file ({v!r}), not an architecture")
        return v

    @field_validator("kwargs")
    @classmethod
    def _safe_kwargs(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name")
        if name is None:
            return v  # the name's own error is reported
        problems = kwarg_problems(name, v, saved=True)
        if problems:
            raise problems_error(problems, v)
        prefix = name.split(":", 1)[0] + ":" if ":" in name else ""
        if prefix in KWARGS_SCHEMAS:
            KWARGS_SCHEMAS[prefix].model_validate(v)
        base = name.removeprefix(prefix)
        if prefix == "search:" and v["base"]["name"] != base:
            raise problems_error([(("base", "name"), f"must be {base!r}, as the name says")], v)
        return v


class SearchSpecKwargs(_Strict):
    """A `search:BASE` spec (compress.search.surgery.candidate_spec): the base architecture, the
    units removed, the kept convs' widths, and the input size the surgery traces with."""

    base: SpecDocument
    removed: list[Annotated[str, Field(min_length=1, max_length=512)]]
    channels: dict[str, dict[str, Annotated[int, Field(ge=1, le=MAX_SIZE)]]]
    input_size: Annotated[list[Annotated[int, Field(ge=1, le=4096)]], Field(min_length=3)]


KWARGS_SCHEMAS: dict[str, type[BaseModel]] = {"search:": SearchSpecKwargs}
"""The kwargs a spec kind's builder reads, checked before it runs (by prefix)."""


def architecture(doc: Mapping[str, Any]) -> tuple[Loc, str, dict[str, Any]]:
    """The float base architecture a (validated) spec builds on: where its kwargs sit in the
    document, its name and its kwargs (an INT8 model's float model; a searched model's base)."""
    loc: Loc = ("kwargs",)
    while str(doc["name"]).startswith("search:"):
        doc, loc = doc["kwargs"]["base"], (*loc, "base", "kwargs")
    return loc, doc["name"], dict(doc.get("kwargs") or {})


def problems_error(problems: list[Problem], value: Any) -> ValidationError:
    """Problems as a pydantic ValidationError, each at its own location: raised inside a field
    validator, its locations extend the field's (`teacher.kwargs.weights`)."""
    return ValidationError.from_exception_data(
        "kwargs",
        [
            InitErrorDetails(
                type=PydanticCustomError("model_kwargs", "{problem}", {"problem": msg}),
                loc=loc,
                input=value,
            )
            for loc, msg in problems
        ],
    )


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def error_lines(e: ValidationError) -> list[str]:
    """Each error of a validation as `field.path: problem`."""
    lines = []
    for err in e.errors():
        where = format_loc(tuple(p for p in err["loc"] if not str(p).startswith("function-")))
        if err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"].endswith(("_type", "_parsing")):
                msg += f" (got {_short(err.get('input'))})"
        lines.append(f"{where}: {msg}" if where else msg)
    return lines


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
