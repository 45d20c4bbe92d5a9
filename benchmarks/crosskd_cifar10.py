"""Cross-architecture distillation on CIFAR-10: a ViT teacher into a CNN student.

The teacher is the ViT of recipes/vit_teacher_cifar10.yaml (architecture and optimiser from that
file), trained here for `--teacher-epochs` on `--teacher-per-class` images per class, or any model
file saved by compress given as `--teacher` (e.g. that ViT trained once on a GPU). Every
student row then trains cifar_resnet20 from scratch with the same data (`--per-class`, crop+flip),
epochs, learning rate and seed:
- no_kd: cross-entropy only (the train stage);
- logits: Hinton KD;
- feature: KD + hint loss on the last tap pair;
- scalekd, and scalekd without each of its components (cap, dfm, tpp) in turn.
All KD rows share one logit term (`--temperature`, `--alpha`; default ScaleKD's T 1, alpha 0.5),
so the rows differ only in their feature terms. Last stdout line: JSON with `teacher_test_top1`
and `rows` (method, test_top1, train_images_per_s).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml

from benchmarks._common import REPO, SHARED, require, run_recipe, save
from compress.runs import RunFolder

TEACHER_RECIPE = REPO / "recipes" / "vit_teacher_cifar10.yaml"
SCALEKD = {"type": "distill", "method": "scalekd", "teacher_taps": [-2, "norm"]}  # the paper's
ROWS = {
    "no_kd": {"type": "train"},
    "logits": {"type": "distill"},
    "feature": {"type": "distill", "method": "feature"},
    "scalekd": SCALEKD,
    "scalekd_no_cap": {**SCALEKD, "cap": False},
    "scalekd_no_dfm": {**SCALEKD, "dfm": False},
    "scalekd_no_tpp": {**SCALEKD, "tpp": False},
}


def trained(recipe: dict, out: Path) -> tuple[RunFolder, dict, dict]:
    """Run a one-stage recipe: the run folder, the report entry of the model its stage made, and
    that stage's metrics with its `wall_s` (the stage's own time, kept across resumed runs)."""
    run, _ = run_recipe(recipe, out)
    stage_type = recipe["stages"][0]["type"]
    model = run.model(type=stage_type)
    return run, model, {**run.stage(type=stage_type).metrics, "wall_s": model["wall_time_s"]}


def train_teacher(shipped: dict, data: dict, args: argparse.Namespace, out: Path):
    """Train the shipped ViT recipe's model; its file and a summary of how it was trained."""
    train = {**shipped["stages"][0], "epochs": args.teacher_epochs}
    recipe = {
        "name": "vit-teacher",
        "data": {**data, "limit_per_class": args.teacher_per_class},
        "student": shipped["student"],
        "stages": [train],
    }
    run, model, metrics = trained(recipe, out)
    print(
        f"teacher: test top-1 {model['top1']:.2f}, {metrics['images_per_s']:.0f} train images/s",
        flush=True,
    )
    info = {
        **shipped["student"],
        "epochs": args.teacher_epochs,
        "train_images_per_s": metrics["images_per_s"],
        "wall_s": metrics["wall_s"],
        "train_time_s": metrics.get("train_time_s"),  # across resumes
    }
    return run.stage(type="train").model_path, info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument(
        "--teacher", type=Path, default=None, help="a trained teacher file (skips training one)"
    )
    p.add_argument("--teacher-per-class", type=int, default=None, help="default: all")
    p.add_argument("--per-class", type=int, default=1000, help="student train images per class")
    p.add_argument("--test-per-class", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=15, help="student epochs")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument(
        "--seed", type=int, default=0, help="the student rows' seed (the teacher keeps seed 0)"
    )
    p.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader workers (a GPU host wants a few)"
    )
    p.add_argument("--results-name", default="crosskd_cifar10", help="results/NAME.json")
    p.add_argument("--out", type=Path, default=None, help="keep the runs here; a rerun resumes")
    args = p.parse_args()
    shipped = yaml.safe_load(TEACHER_RECIPE.read_text())
    data = {
        "root": str(require(SHARED / "data" / "cifar10")),
        "test_limit_per_class": args.test_per_class,
        "augment": "crop_flip",
        "batch_size": 128,
        "num_workers": args.num_workers,
    }
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.out or Path(scratch)
        teacher_file, teacher_info = args.teacher, None
        if teacher_file is None:
            teacher_file, teacher_info = train_teacher(shipped, data, args, tmp / "teacher")
        base = {
            "name": "crosskd",
            "seed": args.seed,
            "data": {**data, "limit_per_class": args.per_class},
            "teacher": {"model": str(teacher_file)},
            "student": "cifar_resnet20",
        }
        budget = {"epochs": args.epochs, "lr": args.lr, "warmup_epochs": 1}
        kd = {"temperature": args.temperature, "alpha": args.alpha}
        rows = []
        for method in args.rows:
            stage = {**ROWS[method], **budget, **(kd if method != "no_kd" else {})}
            run, model, metrics = trained({**base, "stages": [stage]}, tmp / method)
            rows.append(
                {
                    "method": method,
                    "test_top1": model["top1"],
                    "train_images_per_s": metrics["images_per_s"],
                    "projector_params": metrics.get("projector_params", 0),
                    "wall_s": metrics["wall_s"],
                }
            )
            print(f"{method}: {rows[-1]}", flush=True)
    print(f"{'method':<18}{'top1':>8}{'img/s':>8}")
    for r in rows:
        print(f"{r['method']:<18}{r['test_top1']:>8.2f}{r['train_images_per_s']:>8.0f}")
    teacher = run.models["teacher"]  # measured by every row's run, on the same test images
    save(
        args.results_name,
        {
            "teacher_test_top1": teacher["top1"],
            "teacher": teacher_info or {"file": str(teacher_file)},
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "environment": run.report["environment"],
            "wall_s": sum(r["wall_s"] for r in rows) + (teacher_info or {}).get("wall_s", 0),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
