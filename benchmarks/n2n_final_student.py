"""The searched student's final distillation, against the teacher fine-tuned with the same budget.

The search's goal after its final `distill` stage: a student with at least 3x fewer parameters than
cifar_resnet56 within 1.5 points of the teacher's test top-1, the teacher fine-tuned on the same
training images with the same budget. This script takes a searched architecture (default: the
first N2N seed's best candidate in results/n2n_cifar10.json), builds it with the teacher's weights
as the search does, and in one run:
1. fine-tunes the teacher with cross-entropy (the `train` stage) for `--epochs`: the reference,
   and the teacher of step 2 (the pretrained teacher is weaker on the JPEG images than either
   model becomes, so distilling from it caps the student);
2. distils the student from that fine-tuned teacher with the same images, epochs and schedule;
3. with `--pretrained-teacher`, also distils it from the pretrained teacher (the earlier recipe).
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


def final_student(
    base: dict, student_file: Path, stage: dict, root: Path, pretrained_teacher: bool = False
) -> dict:
    """Fine-tune the teacher (cross-entropy), then distil the student from it with `stage`.

    `base` is a recipe without name, student and stages; `stage` a distill stage's fields.
    """
    ce_stage = {k: v for k, v in stage.items() if k != "type"} | {"type": "train"}
    tuned, tuned_wall = run_recipe(
        {**base, "name": "teacher-tuned", "student": base["teacher"], "stages": [ce_stage]},
        root / "teacher-tuned",
    )
    tuned_file = next((root / "teacher-tuned").glob("*-train")) / "model.safetensors"
    student_recipe = {**base, "student": {"model": str(student_file)}, "stages": [stage]}
    report, wall = run_recipe(
        {**student_recipe, "name": "student", "teacher": {"model": str(tuned_file)}},
        root / "student",
    )
    pretrained = {x["name"]: x for x in tuned["models"]}["teacher"]
    teacher_top1 = tuned["models"][-1]["top1"]
    student = report["models"][-1]
    result = {
        "teacher_params": pretrained["params"],
        "student_params": student["params"],
        "params_ratio": pretrained["params"] / student["params"],
        "teacher_test_top1_pretrained": pretrained["top1"],
        "teacher_test_top1": teacher_top1,  # fine-tuned with the student's images and budget
        "student_test_top1": student["top1"],
        "student_gap_points": teacher_top1 - student["top1"],
        "wall_s": {"teacher": tuned_wall, "student": wall},
    }
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
    search = json.loads(require(args.search_results).read_text())
    candidate = search["n2n"][0]["best_candidate"]
    root = args.out or Path(tempfile.mkdtemp(prefix="n2n-final-"))
    root.mkdir(parents=True, exist_ok=True)
    student_file = inherited_candidate(teacher, candidate, root / "inherited-candidate.safetensors")
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
        },
        "search_results": args.search_results.name,
        "candidate": candidate,
        **final_student(base, student_file, stage, root, args.pretrained_teacher),
    }
    result["total_wall_s"] = time.perf_counter() - t_start
    save("n2n_final_student", result)


if __name__ == "__main__":
    main()
