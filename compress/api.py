"""The Python API: what `compress` commands do, as functions for notebooks and scripts.

    import compress

    report = compress.run("recipes/quickstart.yaml", out="runs/qs", overrides=["stages.1.epochs=1"])
    run = compress.RunFolder("runs/qs")
    student, spec = run.stage(type="distill").load_model()

Every function raises `compress.InputError` with a message naming the field, file or model for
input it cannot use; the command line prints that message and exits 2.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from compress.config import DataConfig, validation_problems
from compress.errors import InputError
from compress.recipe import Recipe, apply_override, load_recipe, parse_recipe

RecipeLike = Recipe | dict[str, Any] | str | Path


def as_recipe(
    recipe: RecipeLike, overrides: Sequence[str] = (), base_dir: Path | str = "."
) -> Recipe:
    """A validated recipe from a file path, a mapping (relative paths from `base_dir`) or a Recipe,
    with `--set`-style overrides (`"stages.1.epochs=3"`) applied."""
    if isinstance(recipe, str | Path):
        return load_recipe(recipe, tuple(overrides))
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        recipe = recipe.model_dump(mode="json")
    if not isinstance(recipe, dict):
        raise InputError(f"recipe: expected a path, a mapping or a Recipe (got {type(recipe)})")
    raw = copy.deepcopy(recipe)
    for assignment in overrides:
        apply_override(raw, assignment)
    return parse_recipe(raw, base_dir=base_dir)


def preflight_warnings(recipe: Recipe) -> list[str]:
    """Problems the run will hit on this machine (e.g. CUDA or TensorRT asked for but missing)."""
    import torch

    warnings = []
    if recipe.device == "cuda" and not torch.cuda.is_available():
        warnings.append("device: cuda, but this machine has no CUDA device (use auto or cpu)")
    return warnings + [
        f"stages[{i}] ({stage.type}): {w}"
        for i, stage in enumerate(recipe.stages)
        for w in getattr(stage, "preflight_warnings", list)()
    ]


def run(
    recipe: RecipeLike,
    out: Path | str | None = None,
    overrides: Sequence[str] = (),
    fresh: bool = False,
) -> dict[str, Any]:
    """Run a recipe into `out` (default `runs/<name>`) and return its report (report.json's content).

    A run folder that holds an earlier run of the same recipe resumes it: finished stages are
    skipped; `fresh=True` discards them.
    """
    from compress.log import logger
    from compress.pipeline import Pipeline

    recipe = as_recipe(recipe, overrides)
    for warning in preflight_warnings(recipe):
        logger.warning(warning)
    out = Path(out) if out is not None else Path("runs") / recipe.name
    pipeline = Pipeline(recipe, out, fresh=fresh)
    report = pipeline.run()
    if pipeline.dist.is_main:
        logger.info(f"run complete: {out}/report.json, {out}/report.md, {out}/pareto.png")
        for m in report["models"]:
            top1 = m.get("top1")
            logger.info(
                f"  {m['name']:<16} top1 {'-' if top1 is None else f'{top1:.2f}%'}"
                f"  params {m.get('params', 0):,}"
            )
    return report


def evaluate_model(
    model: nn.Module | str,
    data: DataConfig | dict[str, Any] | Path | str,
    split: str = "test",
    weights: Path | str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Top-1/top-5 of a model (a module, or a spec such as `timm:resnet18` or a saved file) on an
    ImageFolder split; `data` is a folder or a `data` recipe section."""
    from compress.evaluation import evaluate
    from compress.models import create_model
    from compress.pipeline import resolve_device

    loaded = _image_folder(data)
    if split not in ("train", "val", "test"):
        raise InputError(f"split: expected train, val or test (got {split!r})")
    if isinstance(model, str):
        weights = Path(weights) if weights is not None else None
        model = create_model(model, weights=weights, num_classes=loaded.num_classes)[0]
    result = evaluate(model.eval(), loaded.loader(split), resolve_device(device), desc="eval")
    return {"split": split, **result}


def sensitivity(
    model: nn.Module | str,
    data: DataConfig | dict[str, Any] | Path | str,
    out: Path | str = "sensitivity",
    weights: Path | str | None = None,
    max_drop: float | None = None,
    images: int = 1000,
    calibration_batches: int = 16,
    target: str = "onnxruntime",
    ranking: str | None = None,
    margin_se: float = 0.0,
) -> dict[str, Any]:
    """Per-layer INT8 sensitivity of a model on the validation split of `data` (carved from
    train/ as in a recipe when there is no val/), on the Q/DQ model in onnxruntime.

    A float model is quantized first (onnxruntime's quantizer, every supported op INT8,
    calibrated on `calibration_batches` training batches); an INT8 model file written by a run is
    analysed as it is. Writes sensitivity.json and sensitivity.png to `out`; with `max_drop`,
    also `model.int8.onnx`, the Q/DQ model with the fewest float layers that meet it (with
    `margin_se` standard errors to spare, as the quantize stage's `budget_margin_se`).
    Returns sensitivity.json's content."""
    import tempfile

    import onnx

    from compress.deploy.onnx_export import export_float_reference
    from compress.errors import StageFailed
    from compress.io import atomic_path
    from compress.models import create_model
    from compress.quant.ort_int8 import OnnxInt8Model, quantize_onnx_int8
    from compress.quant.ort_int8 import calibration_batches as first_batches
    from compress.quant.qdq_layers import float_reference
    from compress.quant.sensitivity import BudgetUnreachable, run_sensitivity, validation_set

    if target not in ("onnxruntime", "tensorrt"):
        raise InputError(f"target: expected onnxruntime or tensorrt (got {target!r})")
    if ranking is None:
        ranking = "speed" if target == "onnxruntime" else "accuracy"
    if ranking not in ("speed", "accuracy") or (ranking == "speed" and target == "tensorrt"):
        raise InputError(
            f"ranking: speed (onnxruntime target) or accuracy (got {ranking!r} for {target})"
        )
    if max_drop is not None and not 0 <= max_drop <= 100:
        raise InputError(f"max_drop: expected 0 to 100 points of top-1 (got {max_drop})")
    if not 0 <= margin_se <= 5:
        raise InputError(f"margin_se: expected 0 to 5 standard errors (got {margin_se})")
    if images <= 0 or calibration_batches <= 0:
        raise InputError("images and calibration_batches must be > 0")
    loaded = _image_folder(data)
    if isinstance(model, str):
        weights = Path(weights) if weights is not None else None
        model = create_model(model, weights=weights, num_classes=loaded.num_classes)[0]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; name a folder for sensitivity.json")
    with tempfile.TemporaryDirectory(prefix="compress-sensitivity-") as tmp:
        float_model = model.float_model if isinstance(model, OnnxInt8Model) else model.eval()
        reference_path = export_float_reference(
            float_model, Path(tmp) / "float.onnx", loaded.input_size
        )
        reference = onnx.load(str(reference_path))
        if isinstance(model, OnnxInt8Model):
            qdq, fp32 = onnx.load_from_string(model.onnx_bytes()), None
        else:
            batches = first_batches(loaded.loader("train"), calibration_batches)
            qdq_path = Path(tmp) / "int8.onnx"
            quantize_onnx_int8(reference_path, qdq_path, batches, target, "all")
            qdq = onnx.load(str(qdq_path))
            fp32 = float_reference(qdq, reference)
        note = "tensorrt target: float layers build in FP16 or FP32" if target == "tensorrt" else ""
        try:
            analysis, chosen = run_sensitivity(
                qdq,
                reference,
                validation_set(reference, loaded, images),
                ranking,
                max_drop,
                fp32,
                out,
                note,
                margin_se=margin_se,
            )
        except BudgetUnreachable as e:
            raise StageFailed(
                f"{e} (each layer's sensitivity: {out / 'sensitivity.json'})"
            ) from None
    if max_drop is not None:
        with atomic_path(out / "model.int8.onnx") as tmp_path:
            onnx.save(chosen, str(tmp_path))
    return analysis.to_dict()


def _image_folder(data: DataConfig | dict[str, Any] | Path | str):
    """The ImageFolderData of a folder, a `data` recipe section or a DataConfig."""
    from compress.data import ImageFolderData

    if not isinstance(data, DataConfig):
        raw = {"root": data} if isinstance(data, str | Path) else dict(data)
        try:
            data = DataConfig.model_validate(raw)
        except ValidationError as e:
            raise InputError("; ".join(validation_problems(e, ("data",)))) from None
    return ImageFolderData(data)


def export(
    model: nn.Module,
    path: Path | str,
    input_size: tuple[int, int, int] = (3, 32, 32),
    dynamo: bool = True,
) -> dict[str, Any]:
    """Export a float model to ONNX and check it against PyTorch on random inputs with onnxruntime.

    Returns the file, its size and the largest absolute output difference.
    """
    from compress.deploy.onnx_export import check_parity, export_onnx

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; name the ONNX file to write, e.g. model.onnx")
    model = model.eval()
    export_onnx(model, path, tuple(input_size), dynamo=dynamo)
    parity = check_parity(model, path, torch.randn(8, *input_size))
    return {"path": str(path), "size_bytes": path.stat().st_size, **parity}


def render_report(run_dir: Path | str) -> tuple[Path, Path]:
    """Write report.md and pareto.png of a run folder from its report.json."""
    from compress.report import render

    return render(run_dir)
