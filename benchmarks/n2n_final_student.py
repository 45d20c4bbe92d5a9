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

from benchmarks._common import RESNET56_PARAMS, RESULTS, SHARED, final_student, require, save


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
