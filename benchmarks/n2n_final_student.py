"""The searched student's final distillation, against the teacher fine-tuned with the same budget.

The search's goal after its final `distill` stage: a student with at least 3x fewer parameters than
cifar_resnet56 within 1.5 points of the teacher's test top-1, the teacher fine-tuned on the same
training images with the same budget. This script takes a searched architecture (default: the
first N2N seed's best candidate in results/n2n_cifar10.json) and in one run:
1. fine-tunes the teacher with cross-entropy (the `train` stage) for `--epochs`: the reference,
   and the teacher of step 2 (the pretrained teacher is weaker on the JPEG images than either
   model becomes, so distilling from it caps the student);
2. cuts the student from that fine-tuned teacher's weights, as the n2n recipe's search does after
   `adapt_teacher` (`--inherit pretrained`: from the pretrained teacher's), and distils it from
   the fine-tuned teacher with the same images, epochs and schedule;
3. as the student's weights have then seen twice the epochs, fine-tunes the teacher for twice as
   many too; the gap is taken against the better of the two teachers;
4. with `--pretrained-teacher`, also distils the student from the pretrained teacher.
Data: the full train split (45,000 images after the validation carve-out; `--per-class` cuts it)
with crop+flip, measured on the full test split (10,000 images).
Last stdout line: one JSON object (`teacher_params`, `student_params`, `params_ratio`,
`teacher_test_top1`, `student_test_top1`, `student_gap_points`, walls).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks._common import RESULTS, SHARED, require, save
from compress.models import create_model, save_model
from compress.pipeline import Pipeline
from compress.recipe import parse_recipe
from compress.search.surgery import Candidate, build_candidate, candidate_spec
from compress.search.units import find_units

INPUT_SIZE = (3, 32, 32)
RESNET56_PARAMS = 853_018


def run_recipe(recipe: dict, out: Path) -> tuple[dict, float]:
    t0 = time.perf_counter()
    report = Pipeline(parse_recipe(recipe), out).run()
    return report, time.perf_counter() - t0


def inherited_candidate(teacher: dict, candidate: dict, out: Path) -> Path:
    """The candidate as the search builds it, before any fine-tuning: the teacher's weights."""
    if out.is_file():  # a rerun into the same folder resumes its runs
        return out
    model, spec = create_model(teacher["model"], weights=Path(teacher["weights"]))
    units = find_units(model.eval(), INPUT_SIZE)
    chosen = Candidate.make(candidate["removed"], candidate["scales"])
    student = build_candidate(model, units, chosen, INPUT_SIZE)
    return save_model(student, candidate_spec(spec, student, units, chosen, INPUT_SIZE), out)


def tune_teacher(base: dict, stage: dict, root: Path, epochs: int) -> tuple[dict, Path, float]:
    """The teacher fine-tuned with cross-entropy (the `train` stage) for `epochs`."""
    ce_stage = {k: v for k, v in stage.items() if k != "type"} | {"type": "train", "epochs": epochs}
    folder = root / ("teacher-tuned" if epochs == stage["epochs"] else f"teacher-tuned-{epochs}ep")
    report, wall = run_recipe(
        {**base, "name": folder.name, "student": base["teacher"], "stages": [ce_stage]}, folder
    )
    return report, next(folder.glob("*-train")) / "model.safetensors", wall


def searched_candidate(base: dict, tuned_file: Path, search: dict, root: Path) -> tuple[Path, dict]:
    """Run the `search` stage from the fine-tuned teacher (start_from teacher, as the n2n recipe
    does after `adapt_teacher`); its best candidate and the stage's metrics."""
    stage = {"type": "search", "start_from": "teacher", **search}
    teacher = {"model": str(tuned_file)}
    report, wall = run_recipe(
        {**base, "name": "search", "teacher": teacher, "stages": [stage]}, root / "search"
    )
    metrics = next(s for s in report["stages"] if s["type"] == "search")["metrics"]
    return next((root / "search").glob("*-search")) / "model.safetensors", {
        **metrics,
        "wall_s": wall,
    }


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
    against the best of those teachers.
    """
    tuned, tuned_file, tuned_wall = tune_teacher(base, stage, root, stage["epochs"])
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
    report, wall = run_recipe(
        {**student_recipe, "name": "student", "teacher": {"model": str(tuned_file)}},
        root / "student",
    )
    pretrained = {x["name"]: x for x in tuned["models"]}["teacher"]
    teacher_top1 = tuned["models"][-1]["top1"]
    student = report["models"][-1]
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
        other, _, other_wall = tune_teacher(base, stage, root, epochs)
        result[f"teacher_test_top1_{epochs}_epochs"] = other["models"][-1]["top1"]
        result["wall_s"][f"teacher_{epochs}_epochs"] = other_wall
        reference = max(reference, other["models"][-1]["top1"])
    result["student_gap_points"] = reference - student["top1"]
    if pretrained_teacher:
        report, wall = run_recipe(
            {**student_recipe, "name": "student-pretrained-teacher"},
            root / "student-pretrained-teacher",
        )
        result["student_test_top1_pretrained_teacher"] = report["models"][-1]["top1"]
        result["wall_s"]["student_pretrained_teacher"] = wall
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--search-results",
        type=Path,
        default=RESULTS / "n2n_cifar10.json",
        help="n2n_cifar10 results whose first N2N seed's best candidate is the student",
    )
    p.add_argument(
        "--search-mode",
        choices=["sequential", "shrink", "removal", "joint"],
        default=None,
        help="instead: run the search stage in this mode from the fine-tuned teacher (on the "
        "same data, scored on its validation split) and take its best candidate",
    )
    p.add_argument("--updates", type=int, default=6, help="search: policy updates per phase")
    p.add_argument("--rollouts", type=int, default=4, help="search: candidates per update")
    p.add_argument("--max-params", type=int, default=RESNET56_PARAMS // 3, help="search budget")
    p.add_argument(
        "--inherit",
        choices=["tuned", "pretrained"],
        default="tuned",
        help="cut the student from the fine-tuned teacher (as the n2n recipe does) or the pretrained",
    )
    p.add_argument(
        "--reference-epochs",
        type=int,
        nargs="*",
        default=[],
        help="also fine-tune the teacher this long; the gap is taken against the best teacher",
    )
    p.add_argument("--name", default="n2n_final_student", help="results/NAME.json")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--per-class", type=int, default=None, help="train+val images per class")
    p.add_argument("--test-per-class", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrained-teacher", action="store_true", help="also distil from it")
    p.add_argument("--out", type=Path, default=None, help="keep the runs here (reruns resume)")
    args = p.parse_args()
    t_start = time.perf_counter()
    weights = require(SHARED / "weights" / "cifar_resnet") / "resnet56-4bfd9763.th"
    teacher = {"model": "cifar_resnet56", "weights": str(weights)}
    candidate, search = None, None
    if args.search_mode is None:
        candidate = json.loads(require(args.search_results).read_text())["n2n"][0]["best_candidate"]
    else:
        search = {
            "mode": args.search_mode,
            "updates": args.updates,
            "rollouts": args.rollouts,
            "max_params": args.max_params,
            "candidate_steps": 30,
            "candidate_images": 5000,
            "val_images": 1000,
        }
    root = args.out or Path(tempfile.mkdtemp(prefix="n2n-final-"))
    root.mkdir(parents=True, exist_ok=True)
    base = {
        "seed": args.seed,
        "data": {
            "root": str(require(SHARED / "data" / "cifar10")),
            "limit_per_class": args.per_class,
            "test_limit_per_class": args.test_per_class,
            "augment": "crop_flip",
        },
        "teacher": teacher,
    }
    stage = {"type": "distill", "epochs": args.epochs, "lr": args.lr, "warmup_epochs": 0.5}
    result = {
        "budget": {
            "epochs": args.epochs,
            "lr": args.lr,
            "per_class": args.per_class,
            "test_per_class": args.test_per_class,
            "seed": args.seed,
            "inherit": args.inherit,
        },
        "search_results": None if search else args.search_results.name,
        **final_student(
            base,
            stage,
            root,
            candidate,
            search,
            args.inherit,
            tuple(args.reference_epochs),
            args.pretrained_teacher,
        ),
    }
    result["total_wall_s"] = time.perf_counter() - t_start
    save(args.name, result)


if __name__ == "__main__":
    main()
