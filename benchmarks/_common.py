"""Shared bits of the benchmark scripts: where the shared data is, how a recipe is run and its run
folder read, which models the quick start compares, the N2N scripts' searched students and final
distillation, and how results are saved."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

if typing.TYPE_CHECKING:
    from compress.deploy.timing import PairedResult
    from compress.recipe import Recipe
    from compress.runs import RunFolder

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMPRESS_SHARED", REPO.parent / "shared"))
RESULTS = REPO / "benchmarks" / "results"
RESNET56_PARAMS = 853_018  # cifar_resnet56's parameters: the N2N scripts' budget is a third of it
CIFAR_INPUT_SIZE = (3, 32, 32)


def require(path: Path) -> Path:
    if not path.exists():
        sys.exit(f"{path} not found: set COMPRESS_SHARED to the folder holding data/ and weights/")
    return path


def save(name: str, result: dict) -> None:
    """Write results/NAME.json and print the result as the last line of stdout."""
    from compress.io import write_json

    write_json(RESULTS / f"{name}.json", result)
    print(json.dumps(result))


def record_paired(result: dict, key: str, paired: PairedResult, what: str | None = None) -> float:
    """Record a paired comparison (`compress.deploy.timing.paired_ratio`) in `result`: its median
    ratio, spread, n_pairs, `reliable` and values under `result["paired"][key]`, and `key` in
    `result["unreliable"]` when it is not reliable, with a warning line printed. Returns the
    median ratio."""
    result.setdefault("paired", {})[key] = paired.as_dict()
    line = paired.warning(what or key)
    if line is not None:
        print(line, flush=True)
        result.setdefault("unreliable", []).append(key)
    return paired.median_ratio


CIFAR_PRETRAINED = {
    "cifar_resnet20": "resnet20-12fca82f.th",
    "cifar_resnet56": "resnet56-4bfd9763.th",
}


def student_for(arch: str) -> dict:
    """A recipe `student` for `arch`: the CIFAR ResNets with their pretrained weights."""
    student: dict = {"model": arch}
    if arch in CIFAR_PRETRAINED:
        weights = SHARED / "weights" / "cifar_resnet" / CIFAR_PRETRAINED[arch]
        student["weights"] = str(require(weights))
    return student


def train_then_ptq_recipe(
    prefix: str, student: dict, args: argparse.Namespace, placement: str = "measured"
) -> dict:
    """A short real training of `student` on the shared CIFAR-10 (`args.epochs` with AdamW at
    `args.lr` over `args.per_class` images per class, `args.test_per_class` test images), then
    `ptq_int8` on `args.calibration_batches` batches (of `args.calibration_batch_size` images
    where given, else the data's batch size) with `placement`, and its export with the
    gate wide open (the drop is measured, not stopped at)."""
    return {
        "name": f"{prefix}-" + student["model"].replace(":", "-"),
        "seed": args.seed,
        "data": {
            "root": str(require(SHARED / "data" / "cifar10")),
            "limit_per_class": args.per_class,
            "test_limit_per_class": args.test_per_class,
            "augment": "flip",
            "batch_size": 64,
        },
        "student": student,
        "stages": [
            {"type": "train", "epochs": args.epochs, "optimizer": "adamw", "lr": args.lr},
            {
                "type": "quantize",
                "method": "ptq_int8",
                "int8_placement": placement,
                "calibration_batches": args.calibration_batches,
                "batch_size": getattr(args, "calibration_batch_size", None),
            },
            {"type": "export", "int8_max_drop": 100, "speedup_batch_sizes": None},
        ],
    }


def add_search_mode(parser: argparse.ArgumentParser, help: str) -> None:
    """`--mode`: one of the search stage's modes, as its recipe schema lists them."""
    from compress.stages.search import SearchStage

    modes = typing.get_args(SearchStage.model_fields["mode"].annotation)
    parser.add_argument("--mode", choices=modes, default="sequential", help=help)


def run_recipe(
    recipe: dict | str | Path | Recipe,
    out: Path,
    overrides: Sequence[str] = (),
    fresh: bool = False,
) -> tuple[RunFolder, float]:
    """Run a recipe (a mapping with absolute paths, a recipe file or a parsed Recipe) into `out`
    with `compress.run`, `overrides` as `--set` assignments (`"stages.1.epochs=3"`).

    A folder holding an earlier run of the same recipe resumes it (its finished stages are
    skipped); `fresh=True` starts over. Returns the run folder and the wall seconds of this call
    (a resumed run counts only what it ran again; each stage's own time is in the report).
    """
    import compress

    t0 = time.perf_counter()
    compress.run(recipe, out=out, overrides=overrides, fresh=fresh)
    return compress.RunFolder(out), time.perf_counter() - t0


def open_run(path: Path) -> RunFolder | None:
    """The run folder at `path`, or None where no run has written its report there."""
    from compress.runs import REPORT_JSON, RunFolder

    return RunFolder(path) if (Path(path) / REPORT_JSON).is_file() else None


def quickstart_models(run: Path) -> dict[str, tuple[dict, str]]:
    """The quick start's teacher and student, each as a recipe `student` mapping (absolute paths)
    with where it came from: the pretrained ResNet-56, and the distilled ResNet-20 of the quick
    start's run folder `run` when it holds one, else the pretrained ResNet-20 it starts from."""
    weights = require(SHARED / "weights" / "cifar_resnet")
    teacher = {"model": "cifar_resnet56", "weights": str(weights / "resnet56-4bfd9763.th")}
    found = open_run(run)
    distilled = [s for s in found.stages if s.type == "distill"] if found else []
    if distilled and distilled[-1].model_path.is_file():
        path = str(distilled[-1].model_path)
        student = ({"model": path}, path)
    else:
        pretrained = {"model": "cifar_resnet20", "weights": str(weights / "resnet20-12fca82f.th")}
        student = (pretrained, "pretrained resnet20 (no quickstart run found)")
    return {"teacher": (teacher, "pretrained resnet56"), "student": student}


def inherited_candidate(teacher: dict, candidate: Mapping, out: Path) -> Path:
    """The searched `candidate` (its `removed` and `scales`) cut from `teacher` (a recipe `teacher`
    mapping with `model` and `weights`) as the search builds it before any fine-tuning, with the
    teacher's weights, saved at `out`; an existing `out` is kept (a rerun resumes its runs)."""
    if out.is_file():
        return out
    from compress.models import create_model, save_model
    from compress.search import build_student

    model, spec = create_model(teacher["model"], weights=Path(teacher["weights"]))
    return save_model(*build_student(model, spec, candidate, CIFAR_INPUT_SIZE), out)


def tune_teacher(base: dict, stage: dict, root: Path, epochs: int) -> tuple[RunFolder, float]:
    """The teacher fine-tuned with cross-entropy (the `train` stage, otherwise `stage`'s fields)
    for `epochs`: its run folder under `root` and the wall seconds."""
    ce_stage = {k: v for k, v in stage.items() if k != "type"} | {"type": "train", "epochs": epochs}
    folder = root / ("teacher-tuned" if epochs == stage["epochs"] else f"teacher-tuned-{epochs}ep")
    return run_recipe(
        {**base, "name": folder.name, "student": base["teacher"], "stages": [ce_stage]}, folder
    )


def searched_candidate(base: dict, tuned_file: Path, search: dict, root: Path) -> tuple[Path, dict]:
    """Run the `search` stage from the fine-tuned teacher (start_from teacher, as the n2n recipe
    does after `adapt_teacher`); its best candidate and the stage's metrics with `wall_s`."""
    stage = {"type": "search", "start_from": "teacher", **search}
    teacher = {"model": str(tuned_file)}
    run, wall = run_recipe(
        {**base, "name": "search", "teacher": teacher, "stages": [stage]}, root / "search"
    )
    found = run.stage(type="search")
    return found.model_path, {**found.metrics, "wall_s": wall}


def final_student(
    base: dict,
    stage: dict,
    root: Path,
    candidate: dict | None = None,
    search: dict | None = None,
    inherit: str = "tuned",
    reference_epochs: tuple[int, ...] = (),
    pretrained_teacher: bool = False,
) -> dict:
    """Fine-tune the teacher (cross-entropy), then distil the student from it with `stage`.

    `base` is a recipe without name, student and stages; `stage` a distill stage's fields. The
    student is `candidate` (an architecture: removed blocks and scales) cut from the fine-tuned
    teacher (`inherit="tuned"`, as the n2n recipe's search does after `adapt_teacher`) or from the
    pretrained one, or the best candidate of a `search` stage (its fields) run from the fine-tuned
    teacher. The teacher is also fine-tuned for each of `reference_epochs`; the gap is taken
    against the best of those teachers. The runs go into folders under `root`.
    """
    tuned, tuned_wall = tune_teacher(base, stage, root, stage["epochs"])
    tuned_file = tuned.stage(type="train").model_path
    result: dict = {"inherit": inherit}
    if search is not None:
        student_file, result["search"] = searched_candidate(base, tuned_file, search, root)
        result["candidate"] = result["search"]["best_candidate"]
    else:
        assert candidate is not None
        source = base["teacher"]
        if inherit == "tuned":
            source = {"model": str(tuned_file), "weights": str(tuned_file)}
        student_file = root / f"candidate-{inherit}.safetensors"
        inherited_candidate(source, candidate, student_file)
        result["candidate"] = candidate
    student_recipe = {**base, "student": {"model": str(student_file)}, "stages": [stage]}
    run, wall = run_recipe(
        {**student_recipe, "name": "student", "teacher": {"model": str(tuned_file)}},
        root / "student",
    )
    pretrained = tuned.models["teacher"]
    teacher_top1 = tuned.model(type="train")["top1"]
    student = run.model(type=stage["type"])
    result |= {
        "teacher_params": pretrained["params"],
        "student_params": student["params"],
        "params_ratio": pretrained["params"] / student["params"],
        "teacher_test_top1_pretrained": pretrained["top1"],
        "teacher_test_top1": teacher_top1,  # fine-tuned with the student's images and budget
        "student_test_top1": student["top1"],
        "wall_s": {"teacher": tuned_wall, "student": wall},
    }
    reference = teacher_top1
    for epochs in reference_epochs:
        other, other_wall = tune_teacher(base, stage, root, epochs)
        other_top1 = other.model(type="train")["top1"]
        result[f"teacher_test_top1_{epochs}_epochs"] = other_top1
        result["wall_s"][f"teacher_{epochs}_epochs"] = other_wall
        reference = max(reference, other_top1)
    result["student_gap_points"] = reference - student["top1"]
    if pretrained_teacher:
        run, wall = run_recipe(
            {**student_recipe, "name": "student-pretrained-teacher"},
            root / "student-pretrained-teacher",
        )
        result["student_test_top1_pretrained_teacher"] = run.model(type=stage["type"])["top1"]
        result["wall_s"]["student_pretrained_teacher"] = wall
    return result
