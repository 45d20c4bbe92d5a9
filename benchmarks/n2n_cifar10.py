"""N2N structural search on CIFAR-10 with the shared cifar_resnet56 teacher.

In one run and at the same candidate budget (`--updates` x `--rollouts` per phase):
- N2N search (policy gradient) against random search over the same action space, two seeds each;
- inherited-weight candidates against re-initialised ones (N2N's children), compared on the
  architectures both runs evaluated (the removal phase's first update is the same for one seed);
- the best N2N student (first seed) distilled for `--final-epochs`, against the teacher fine-tuned
  with the same stage on the same images, both measured on the test split.
`candidate_images_vs_paper` is the images one candidate trains on here over the original's
5 epochs of the full 50,000-image CIFAR-10 train set (that 5-epoch training is not run here).
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks._common import SHARED, require, save
from compress.io import read_json
from compress.pipeline import Pipeline
from compress.recipe import parse_recipe

PAPER_CANDIDATE_IMAGES = 5 * 50_000


def run_recipe(recipe: dict, out: Path) -> tuple[dict, float]:
    t0 = time.perf_counter()
    report = Pipeline(parse_recipe(recipe), out).run()
    return report, time.perf_counter() - t0


def search_metrics(report: dict) -> dict:
    return next(s for s in report["stages"] if s["type"] == "search")["metrics"]


def history(out: Path) -> dict[str, dict]:
    import json

    path = next(out.glob("*-search")) / "history.jsonl"
    return {r["key"]: r for r in map(json.loads, path.read_text().splitlines())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--per-class", type=int, default=500, help="train images per class")
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--updates", type=int, default=2, help="policy updates per phase")
    p.add_argument("--rollouts", type=int, default=3, help="candidates per update")
    p.add_argument("--candidate-steps", type=int, default=20)
    p.add_argument("--candidate-batch-size", type=int, default=64)
    p.add_argument("--candidate-images", type=int, default=2000)
    p.add_argument("--val-images", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--final-epochs", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="keep the runs here")
    args = p.parse_args()
    t_start = time.perf_counter()
    weights = require(SHARED / "weights" / "cifar_resnet") / "resnet56-4bfd9763.th"
    teacher = {"model": "cifar_resnet56", "weights": str(weights)}
    data = {
        "root": str(require(SHARED / "data" / "cifar10")),
        "limit_per_class": args.per_class,
        "test_limit_per_class": args.test_per_class,
        "augment": "none",  # deterministic: teacher logits computed once
    }
    search = {
        "type": "search",
        "updates": args.updates,
        "rollouts": args.rollouts,
        "candidate_steps": args.candidate_steps,
        "candidate_batch_size": args.candidate_batch_size,
        "candidate_images": args.candidate_images,
        "val_images": args.val_images,
    }
    final = {"type": "distill", "epochs": args.final_epochs, "lr": 0.02, "warmup_epochs": 0.1}

    def recipe(name: str, seed: int, stages: list[dict]) -> dict:
        return {
            "name": name,
            "seed": seed,
            "data": data,
            "teacher": teacher,
            "student": teacher,
            "stages": stages,
        }

    root = args.out or Path(tempfile.mkdtemp(prefix="n2n-"))
    runs: dict[str, list[dict]] = {"policy_gradient": [], "random": []}
    for strategy in runs:
        for seed in args.seeds:
            stages = [{**search, "strategy": strategy}]
            if strategy == "policy_gradient" and seed == args.seeds[0]:
                stages.append(final)
            out = root / f"{strategy}-{seed}"
            report, wall = run_recipe(recipe(f"{strategy}-{seed}", seed, stages), out)
            m = search_metrics(report)
            models = {x["name"]: x for x in report["models"]}
            search_model = next(x for x in report["models"] if x["name"].endswith("-search"))
            row = {
                "seed": seed,
                "best_reward": m["best_reward"],
                "best_val_top1": m["best_val_top1"],
                "best_params": m["best_params"],
                "compression": models["teacher"]["params"] / m["best_params"],
                "search_test_top1": search_model["top1"],
                "candidates": m["candidates_evaluated"],
                "candidate_eval_s": m["candidate_eval_s"],
                "wall_s": wall,
                "run": str(out),
            }
            if len(stages) > 1:
                row["final_test_top1"] = models["01-distill"]["top1"]
                row["final_params"] = models["01-distill"]["params"]
                row["teacher_test_top1"] = models["teacher"]["top1"]
                row["teacher_params"] = models["teacher"]["params"]
            runs[strategy].append(row)
            print(strategy, row, flush=True)

    # Inherited weights against N2N's re-initialised children, on the same architectures
    seed = args.seeds[0]
    reinit_out = root / f"reinit-{seed}"
    _, reinit_wall = run_recipe(
        recipe(f"reinit-{seed}", seed, [{**search, "reinit": True, "mode": "removal"}]),
        reinit_out,
    )
    inherited = history(root / f"policy_gradient-{seed}")
    reinit = history(reinit_out)
    common = sorted(set(inherited) & set(reinit))
    pairs = [(inherited[k]["val_top1"], reinit[k]["val_top1"]) for k in common]

    # The teacher fine-tuned with the same final stage on the same images
    tuned, _ = run_recipe(recipe("teacher-tuned", seed, [final]), root / "teacher-tuned")
    teacher_tuned_top1 = tuned["models"][-1]["top1"]

    n2n, rnd = runs["policy_gradient"], runs["random"]
    first = n2n[0]
    stage = read_json(next((root / f"policy_gradient-{seed}").glob("*-search")) / "stage.json")
    candidate_images = stage["metrics"]["candidate_train_images"]
    result = {
        "budget": {
            k: getattr(args, k)
            for k in (
                "per_class",
                "test_per_class",
                "updates",
                "rollouts",
                "candidate_steps",
                "candidate_batch_size",
                "candidate_images",
                "val_images",
                "seeds",
                "final_epochs",
            )
        },
        "n2n": n2n,
        "random": rnd,
        "n2n_best_reward": max(r["best_reward"] for r in n2n),
        "random_best_reward": max(r["best_reward"] for r in rnd),
        "n2n_mean_best_reward": sum(r["best_reward"] for r in n2n) / len(n2n),
        "random_mean_best_reward": sum(r["best_reward"] for r in rnd) / len(rnd),
        "teacher_params": first["teacher_params"],
        "student_params": first["final_params"],
        "params_ratio": first["teacher_params"] / first["final_params"],
        "teacher_test_top1_pretrained": first["teacher_test_top1"],
        "teacher_test_top1": teacher_tuned_top1,  # fine-tuned with the student's final budget
        "student_test_top1": first["final_test_top1"],
        "inherited_vs_reinit": {
            "architectures": len(common),
            "inherited_mean_val_top1": sum(a for a, _ in pairs) / max(1, len(pairs)),
            "reinit_mean_val_top1": sum(b for _, b in pairs) / max(1, len(pairs)),
            "reinit_wall_s": reinit_wall,
        },
        "candidate_train_images": candidate_images,
        "candidate_images_vs_paper": candidate_images / PAPER_CANDIDATE_IMAGES,
        "wall_s": time.perf_counter() - t_start,
    }
    save("n2n_cifar10", result)


if __name__ == "__main__":
    main()
