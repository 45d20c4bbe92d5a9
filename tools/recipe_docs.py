"""Generate recipes/README.md from the recipe schema: `python tools/recipe_docs.py`.

A test checks the file is current, so every field the schema takes is documented.
"""

from __future__ import annotations

import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, BeforeValidator
from pydantic_core import PydanticUndefined

REPO = Path(__file__).resolve().parents[1]

INTRO = """\
# Recipe reference

A recipe is one YAML file: the data, a fixed teacher, the student the stages start from, and an
ordered list of stages. Each stage's output model is the next stage's input; the teacher never
changes. `compress validate RECIPE` checks a recipe and prints it resolved; `compress run RECIPE
--set stages.1.epochs=3` overrides any value (validated like the file).

- Unknown keys, wrong types and impossible values are errors that name the field
  (`stages[1].temperature: must be > 0 (got 0)`).
- Relative paths are relative to the recipe file's folder.
- `${VAR}` and `${VAR:-default}` in any string are replaced from the environment; the shipped
  recipes use `COMPRESS_DATA` (the ImageFolder root) and `COMPRESS_WEIGHTS` (the folder holding
  the CIFAR ResNet checkpoints).
- A model is `cifar_resnet{20,32,44,56,110}`, `timm:NAME`, `torchvision:NAME` (built with random
  weights, never downloaded; give `weights:` to load a local checkpoint), or the path of a
  `model.safetensors` that compress saved. `num_classes` defaults to the data's class count.

This file is generated from the schema by `python tools/recipe_docs.py`; do not edit it by hand.
"""


def _type_name(annotation) -> str:
    """A field's type as a reader knows it: path validators (recipe-relative, must exist) hidden."""
    if get_origin(annotation) is Annotated and any(
        isinstance(m, BeforeValidator | AfterValidator) for m in annotation.__metadata__
    ):
        return _type_name(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return " \\| ".join(
            "None" if a is type(None) else _type_name(a) for a in get_args(annotation)
        )
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    for prefix in ("typing.", "pathlib.", "compress.recipe.", "compress.config."):
        text = text.replace(prefix, "")
    text = text.replace("NoneType", "null")
    text = re.sub(r"Annotated\[(\w+), Gt\(gt=(\d+)\)\]", r"\1 > \2", text)
    return text.replace("|", "\\|")


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is None:
        return "null"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value}`"


def table(model: type[BaseModel], skip: tuple[str, ...] = ()) -> str:
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        lines.append(
            f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | "
            f"{field.description or ''} |"
        )
    return "\n".join(lines)


def render() -> str:
    from compress.config import DataConfig, ModelConfig, TrackingConfig
    from compress.recipe import Recipe
    from compress.stages import STAGES

    parts = [INTRO]
    parts += ["## Top level", "", table(Recipe), ""]
    parts += ["## `data`", "", (DataConfig.__doc__ or "").strip(), "", table(DataConfig), ""]
    parts += [
        "## `teacher`, `student`",
        "",
        (ModelConfig.__doc__ or "").strip() + " A plain string is shorthand for `{model: ...}`.",
        "",
        table(ModelConfig),
        "",
    ]
    doc = inspect.cleandoc(TrackingConfig.__doc__ or "")
    parts += ["## `tracking`", "", doc, "", table(TrackingConfig), ""]
    parts += [
        "## Stages",
        "",
        "Every stage has `type` and an optional `name` (its folder suffix).",
        "",
    ]
    for name, stage in STAGES.items():
        doc = typing.cast(str, stage.config.__doc__ or "").strip()
        parts += [f"### `{name}`", "", doc, "", table(stage.config, skip=("type", "name")), ""]
    return "\n".join(parts)


def main() -> int:
    out = REPO / "recipes" / "README.md"
    out.write_text(render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
