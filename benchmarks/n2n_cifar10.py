"""N2N structural search on CIFAR-10 with the shared cifar_resnet56 teacher.

In one run and at the same candidate budget (`--updates` x `--rollouts` per phase):
- N2N search (policy gradient) against random search over the same action space, two seeds each,
  under the same parameter budget (`--max-params`, default a third of the teacher's);
- inherited-weight candidates against re-initialised ones trained on the same images, on the
  architectures both runs evaluated (the removal phase's first update is the same for one seed;
  the re-initialised run is a removal search of `--reinit-updates`, without the budget, as the
  sequential search scores its removal phase);
- the original's candidate training (re-initialised, 5 epochs over the full 45,000-image train
  split, Adam lr 5e-4, weight decay 5e-4, crop+flip, batch 200) on the best N2N architecture,
  against that candidate's own brief fine-tuning: test top-1 and images processed;
- the same architecture with the teacher's weights fine-tuned for `--budget-steps` steps (the
  default's longest is 10x fewer images than those 5 epochs of the original);
- the teacher fine-tuned with cross-entropy for `--final-epochs` (crop+flip) on the full train
  split (`--final-per-class` cuts it), the reference, and the best N2N architecture (first seed)
  cut from that fine-tuned teacher and distilled from it with the same stage, both measured on the
  full test split (`--final-test-per-class` cuts it); `benchmarks/n2n_final_student.py` runs this
  part alone, with the same recipes.
Deviation from the original's candidate training: the loss is this project's KD loss (T 4,
alpha 0.9) rather than an MSE on logits, and the schedule is cosine rather than constant.
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import (
    RESNET56_PARAMS,
    SHARED,
    add_search_mode,
    final_student,
    inherited_candidate,
    require,
    run_recipe,
    save,
)
from compress.data import ImageFolderData
from compress.errors import StageFailed
from compress.models import load_model, save_model
from compress.recipe import parse_recipe
from compress.runs import RunFolder
from compress.search import CandidateRecord, read_history
from compress.search.surgery import reinitialise

PAPER_EPOCHS = 5
PAPER_CANDIDATE_IMAGES = PAPER_EPOCHS * 50_000  # the original trains on all of CIFAR-10's train set


def history(run: RunFolder) -> dict[str, CandidateRecord]:
    """The candidates the search stage of `run` evaluated, by architecture hash."""
    return {r.key: r for r in read_history(run.stage(type="search").dir)}


def rewards(rows: list[dict]) -> list[float]:
    """Best reward of each search; -1 (an invalid candidate's reward) when none met the budget."""
    return [-1.0 if r["best_reward"] is None else r["best_reward"] for r in rows]


def reinitialised(path: Path, out: Path) -> Path:
    """The saved candidate's architecture with fresh weights (the original's children)."""
    if out.is_file():  # a rerun into the same folder resumes its runs
        return out
    model, spec = load_model(path)
    torch.manual_seed(0)
    reinitialise(model)
    return save_model(model, spec, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--per-class", type=int, default=1000, help="train+val images per class")
    p.add_argument("--test-per-class", type=int, default=300)
    p.add_argument("--updates", type=int, default=6, help="policy updates per phase")
    p.add_argument("--rollouts", type=int, default=4, help="candidates per update")
    p.add_argument("--candidate-steps", type=int, default=30)
    p.add_argument("--candidate-batch-size", type=int, default=64)
    p.add_argument("--candidate-images", type=int, default=5000)
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--max-params", type=int, default=RESNET56_PARAMS // 3)
    add_search_mode(p, "the search stage's mode for both strategies")
    p.add_argument(
        "--strategies-only",
        action="store_true",
        help="stop after N2N against random search (results/n2n_cifar10_strategies_MODE_UxR.json)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--final-epochs", type=int, default=8)
    p.add_argument(
        "--final-per-class", type=int, default=None, help="final part: train+val images per class"
    )
    p.add_argument("--final-test-per-class", type=int, default=None)
    p.add_argument(
        "--reinit-updates",
        type=int,
        default=6,
        help="updates of the re-initialised search (only architectures both runs met count)",
    )
    p.add_argument("--paper-epochs", type=int, default=PAPER_EPOCHS, help="0: skip that run")
    p.add_argument(
        "--budget-steps",
        type=int,
        nargs="*",
        default=[100, 390],
        help="fine-tuning steps of the inherited best architecture (390 x 64: 10x under 5 epochs)",
    )
    p.add_argument("--budget-lr", type=float, default=0.01)
    p.add_argument("--out", type=Path, default=None, help="keep the runs here")
    args = p.parse_args()
    t_start = time.perf_counter()
    weights = require(SHARED / "weights" / "cifar_resnet") / "resnet56-4bfd9763.th"
    teacher = {"model": "cifar_resnet56", "weights": str(weights)}
    data = {
        "root": str(require(SHARED / "data" / "cifar10")),
        "limit_per_class": args.per_class,
        "test_limit_per_class": args.test_per_class,
        "augment": "none",  # deterministic: teacher logits computed once for every candidate
    }
    search = {
        "type": "search",
        "updates": args.updates,
        "rollouts": args.rollouts,
        "candidate_steps": args.candidate_steps,
        "candidate_batch_size": args.candidate_batch_size,
        "candidate_images": args.candidate_images,
        "val_images": args.val_images,
        "max_params": args.max_params,
        "mode": args.mode,
    }
    final = {"type": "distill", "epochs": args.final_epochs, "lr": 0.02, "warmup_epochs": 0.5}

    def recipe(name: str, seed: int, stages: list[dict], student=None, **data_overrides) -> dict:
        return {
            "name": name,
            "seed": seed,
            "data": {**data, **data_overrides},
            "teacher": teacher,
            "student": student or teacher,
            "stages": stages,
        }

    root = args.out or Path(tempfile.mkdtemp(prefix="n2n-"))
    runs: dict[str, list[dict]] = {"policy_gradient": [], "random": []}
    for seed in args.seeds:  # seed-major: a stopped run has compared both strategies first
        for strategy in runs:
            out = root / f"{strategy}-{seed}"
            stages = [{**search, "strategy": strategy}]
            try:
                run, wall = run_recipe(recipe(f"{strategy}-{seed}", seed, stages), out)
            except StageFailed as e:  # no candidate within the budget: the worst outcome
                row = {"seed": seed, "best_reward": None, "error": str(e), "run": str(out)}
                runs[strategy].append(row)
                print(strategy, json.dumps(row), flush=True)
                continue
            m = run.stage(type="search").metrics
            row = {
                "seed": seed,
                "best_reward": m["best_reward"],
                "best_val_top1": m["best_val_top1"],
                "best_params": m["best_params"],
                "best_candidate": m["best_candidate"],
                "compression": m["teacher_params"] / m["best_params"],
                "search_test_top1": run.model(type="search")["top1"],
                "candidates": m["candidates_evaluated"],
                "mean_reward_per_update": m["mean_reward_per_update"],
                "candidate_eval_s": m["candidate_eval_s"],
                "wall_s": wall,
                "run": str(out),
            }
            runs[strategy].append(row)
            print(strategy, json.dumps(row), flush=True)
    n2n, rnd = runs["policy_gradient"], runs["random"]
    comparison = {
        "n2n": n2n,
        "random": rnd,
        "n2n_best_reward": max(rewards(n2n)),
        "random_best_reward": max(rewards(rnd)),
        "n2n_mean_best_reward": sum(rewards(n2n)) / len(n2n),
        "random_mean_best_reward": sum(rewards(rnd)) / len(rnd),
    }
    if args.strategies_only:
        name = f"n2n_cifar10_strategies_{args.mode}_{args.updates}x{args.rollouts}"
        budget = {k: search[k] for k in ("mode", "updates", "rollouts", "max_params")}
        save(name, {"budget": {**budget, "seeds": args.seeds}, **comparison})
        return
    seed = args.seeds[0]
    searched = RunFolder(root / f"policy_gradient-{seed}")
    best_file = searched.stage(type="search").model_path

    # Inherited weights against re-initialised children trained on the same images
    reinit_out = root / f"reinit-{seed}"
    # scored like the sequential search's removal phase: without the budget
    reinit_search = {
        **{k: v for k, v in search.items() if k != "max_params"},
        "reinit": True,
        "mode": "removal",
        "updates": min(args.updates, args.reinit_updates),
    }
    reinit_run, reinit_wall = run_recipe(
        recipe(f"reinit-{seed}", seed, [reinit_search]), reinit_out
    )
    inherited, reinit = history(searched), history(reinit_run)
    common = sorted(set(inherited) & set(reinit))
    pairs = [(inherited[k].val_top1, reinit[k].val_top1) for k in common]

    # The original's candidate training on the best N2N architecture
    paper = None
    if args.paper_epochs:
        fresh = reinitialised(best_file, root / "paper-candidate.safetensors")
        stage = {
            "type": "distill",
            "epochs": args.paper_epochs,
            "optimizer": "adamw",
            "lr": 5e-4,
            "weight_decay": 5e-4,
            "batch_size": 200,
        }
        run, wall = run_recipe(
            recipe(
                "paper-candidate",
                seed,
                [stage],
                student={"model": str(fresh)},
                limit_per_class=None,
                augment="crop_flip",
            ),
            root / "paper-candidate",
        )
        split = ImageFolderData(
            parse_recipe(recipe("n", seed, [stage])).data.model_copy(
                update={"limit_per_class": None}
            ),
            seed,
        ).samples("train")
        paper = {
            "test_top1": run.model(type="distill")["top1"],
            "epochs": args.paper_epochs,
            "train_images": args.paper_epochs * len(split),
            "wall_s": wall,
        }
        print("paper candidate training", json.dumps(paper), flush=True)

    # The same architecture with the teacher's weights, fine-tuned like a candidate but on more
    # images: how many a candidate needs to match the original's 5-epoch training
    start = inherited_candidate(
        teacher, n2n[0]["best_candidate"], root / "inherited-candidate.safetensors"
    )
    budget_curve = []
    split = ImageFolderData(parse_recipe(recipe("n", seed, [final])).data, seed).samples("train")
    for steps in args.budget_steps:
        epochs = -(-steps * args.candidate_batch_size // len(split))
        stage = {
            "type": "distill",
            "epochs": epochs,
            "max_steps_per_epoch": -(-steps // epochs),
            "batch_size": args.candidate_batch_size,
            "lr": args.budget_lr,
            "warmup_epochs": 0.1,
        }
        run, wall = run_recipe(
            recipe(
                f"inherited-{steps}",
                seed,
                [stage],
                student={"model": str(start)},
            ),
            root / f"inherited-{steps}",
        )
        point = {
            "steps": epochs * stage["max_steps_per_epoch"],
            "train_images": epochs * stage["max_steps_per_epoch"] * args.candidate_batch_size,
            "test_top1": run.model(type="distill")["top1"],
            "wall_s": wall,
        }
        point["images_vs_paper"] = point["train_images"] / PAPER_CANDIDATE_IMAGES
        budget_curve.append(point)
        print("inherited candidate", json.dumps(point), flush=True)

    # The teacher fine-tuned on the final stage's images and budget, the best architecture cut
    # from it and distilled from it with the same stage
    base = {k: v for k, v in recipe("final", seed, [final]).items() if k not in ("name", "stages")}
    base["data"] = {
        **base["data"],
        "limit_per_class": args.final_per_class,
        "test_limit_per_class": args.final_test_per_class,
        "augment": "crop_flip",
    }
    final_row = final_student(base, final, root / "final", n2n[0]["best_candidate"])
    candidate_images = searched.stage(type="search").metrics["candidate_train_images"]
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
                "max_params",
                "mode",
                "seeds",
                "final_epochs",
                "final_per_class",
                "final_test_per_class",
                "paper_epochs",
                "reinit_updates",
            )
        },
        **comparison,
        **{k: v for k, v in final_row.items() if k != "wall_s"},
        "final_wall_s": final_row["wall_s"],
        "inherited_vs_reinit": {
            "architectures": len(common),
            "inherited_mean_val_top1": sum(a for a, _ in pairs) / max(1, len(pairs)),
            "reinit_mean_val_top1": sum(b for _, b in pairs) / max(1, len(pairs)),
            "reinit_wall_s": reinit_wall,
        },
        "candidate_train_images": candidate_images,
        "candidate_images_vs_paper": candidate_images / PAPER_CANDIDATE_IMAGES,
        "best_candidate_test_top1": n2n[0]["search_test_top1"],
        "paper_candidate": paper,
        "inherited_candidate_budget_curve": budget_curve,
        "wall_s": time.perf_counter() - t_start,
    }
    save("n2n_cifar10", result)


if __name__ == "__main__":
    main()
