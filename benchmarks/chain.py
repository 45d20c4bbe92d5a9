"""The whole chain, and the accuracy-budget fallback against the usual manual choices.

`--part chain` runs recipes/chain_cifar10.yaml (adapt the teacher, search, distil, INT8 QAT with
`max_accuracy_drop`, export, bench) as shipped, or with `--full` on the whole train split,
augmented, with longer schedules and PTQ within 0.25 points (docs/chain.md#budgets), and reports its goals against the adapted teacher on the test split: the INT8
student's ONNX file against the FP32 teacher's, the paired onnxruntime CPU speed-up at batch 1
and 32 (the bench stage's `speedup_vs_teacher`), and the top-1 gap.

`--part fallback` trains one architecture briefly (timm's MobileNetV3-Large by default; the CIFAR
ResNets start from their pretrained weights), quantizes it with `ptq_int8` on few calibration
images (one batch of 4 by default; every supported op INT8), and then chooses the float
layers that bring its validation top-1 within `--budget` (held with `--margin-se` standard
errors to spare, as the stage's `budget_margin_se`) three ways, each the smallest number of
layers that meets the budget on the same validation images:
- compress: the sensitivity ranking (`max_accuracy_drop`'s choice);
- compress_solo_costs: the same ranking with each unit priced alone, as if no two adjacent
  float units shared their Q/DQ and layout conversions;
- random: layers in a random order (`--random-seeds` orders; the median count is reported);
- first_last: the first and the last layers, then the second and the second-to-last, and so on
  (the usual manual rule of keeping the stem and the classifier in float).
Each is also scored with as many float layers as compress's choice. All of them, the FP32 and
the all-INT8 models are scored on the test split and timed against FP32 in alternation at batch 1
and 32 (`--rounds` rounds, the speed-up the median of the per-round ratios).

`--part ceiling` asks what speed-up over the FP32 teacher each search mode can reach at all: it
cuts students from the chain's teacher (ResNet-56) without training them (latency does not
depend on the weights' values), shrink-only ones with every block at one width scale and
removal-only ones with the first blocks of each stage kept, quantizes each to INT8 (onnxruntime
Q/DQ, every op) and times it against the FP32 teacher in alternation at batch 1 and 32.

Last stdout line: JSON; also results/chain.json, results/chain_fallback.json or
results/chain_ceiling.json (`--name`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from benchmarks._common import (
    REPO,
    SHARED,
    record_paired,
    require,
    run_recipe,
    save,
    student_for,
    train_then_ptq_recipe,
)

FULL = [  # the full configuration: every training image, augmented, longer schedules
    "data.limit_per_class=null",
    "data.augment=crop_flip",  # the teacher then runs on each augmented batch
    "stages.0.epochs=4",
    "stages.2.epochs=30",
    "stages.2.lr=0.05",
    "stages.3.method=ptq_int8",  # all-float is then the distilled student itself
    "stages.3.max_accuracy_drop=0.25",  # the goal's 1.5 points: distillation's gap, then INT8's
]


def chain(args: argparse.Namespace) -> dict:
    overrides = [f"data.root={require(SHARED / 'data' / 'cifar10')}"]
    overrides.append(f"teacher.weights={SHARED / 'weights/cifar_resnet/resnet56-4bfd9763.th'}")
    overrides += (FULL if args.full else []) + args.set
    out = Path(args.out or tempfile.mkdtemp(prefix="compress-chain-"))
    run, wall = run_recipe(REPO / "recipes" / "chain_cifar10.yaml", out, overrides)
    adapted = run.stage(type="adapt_teacher")
    teacher = run.models[f"{adapted.dir.name} teacher"]  # the teacher every stage learned from
    export = run.stage(type="export")
    bench = run.stage(type="bench")
    quantize = run.stage(type="quantize")
    student_bytes = export.file("model.onnx").stat().st_size
    teacher_bytes = bench.file("teacher.onnx").stat().st_size
    speedup = bench.metrics["speedup_vs_teacher"]
    top1 = export.metrics["onnx_test_top1"]
    result = {
        "benchmark": "chain",
        "date": time.strftime("%Y-%m-%d"),
        "configuration": "full" if args.full else "shipped",
        "overrides": overrides,
        "wall_s": wall,  # this call's: a run folder that holds the run is read, not rerun
        "stage_wall_s": {s.label: s.wall_time_s for s in run.stages},
        "run_wall_s": sum(s.wall_time_s or 0 for s in run.stages),
        "pretrained_teacher_test_top1": run.models["teacher"]["top1"],
        "teacher_test_top1": teacher["top1"],  # the adapted teacher, on the whole test split
        "teacher_params": teacher["params"],
        "student_params": run.model(type="distill")["params"],
        "student_float_test_top1": run.model(type="distill")["top1"],
        "student_int8_test_top1": top1,
        "test_images": sum(run.report["data"]["class_counts"]["test"].values()),
        "top1_gap_points": teacher["top1"] - top1,
        "teacher_fp32_onnx_bytes": teacher_bytes,
        "student_int8_onnx_bytes": student_bytes,
        "size_ratio": teacher_bytes / student_bytes,
        "speedup_vs_teacher": {b: s["median_ratio"] for b, s in speedup.items()},
        "speedup_paired": speedup,
        "float_layers": quantize.metrics.get("float_modules"),
        "val_top1_drop": quantize.metrics.get("val_top1_drop"),
        "int8_speedup_vs_fp32_student": export.metrics.get("int8_speedup", {}).get("speedup"),
    }
    result["goals"] = {
        "size_10x": result["size_ratio"] >= 10,
        "speed_3x_b1": result["speedup_vs_teacher"].get("1", 0) >= 3,
        "speed_3x_b32": result["speedup_vs_teacher"].get("32", 0) >= 3,
        "top1_within_1.5": result["top1_gap_points"] <= 1.5,
    }
    return result


def first_last(nodes: list[str]) -> list[str]:
    """First, last, second, second-to-last, ...: the manual rule, extended one layer at a time."""
    out, lo, hi = [], 0, len(nodes) - 1
    while lo <= hi:
        out.append(nodes[lo])
        if hi != lo:
            out.append(nodes[hi])
        lo, hi = lo + 1, hi - 1
    return out


def fallback(args: argparse.Namespace) -> dict:
    from compress.api import as_recipe
    from compress.data import ImageFolderData
    from compress.deploy.onnxruntime_backend import interleaved_latency
    from compress.deploy.timing import BenchSettings, paired_result
    from compress.quant.qdq_layers import float_reference, with_float_layers, with_node_names
    from compress.quant.sensitivity import (
        budget_drop,
        onnx_logits,
        rank_units,
        run_sensitivity,
        shortest_prefix,
        top1_percent,
        validation_set,
    )

    recipe = as_recipe(train_then_ptq_recipe("fallback", student_for(args.arch), args, "all"))
    out = Path(args.out or tempfile.mkdtemp(prefix="compress-fallback-"))
    run, wall = run_recipe(recipe, out)
    quantize = run.stage(type="quantize")
    qdq = with_node_names(onnx.load_from_string(quantize.load_model()[0].onnx_bytes()))
    reference = onnx.load(str(quantize.file("float.onnx")))
    fp32 = float_reference(qdq, reference)
    data = ImageFolderData(recipe.data, recipe.seed)
    t0 = time.perf_counter()
    val = validation_set(reference, data, args.val_images)
    analysis, _ = run_sensitivity(
        qdq,
        reference,
        val,
        "speed",
        args.budget,
        fp32,
        out / "sensitivity",
        margin_se=args.margin_se,
    )
    seconds = time.perf_counter() - t0
    y = val.labels
    float_correct = val.reference_correct

    def scores_of(nodes: list[str]):
        return val.score(with_float_layers(qdq, nodes, fp32) if nodes else qdq)

    def drop_of(nodes: list[str]) -> float:  # every method held to the budget the same way
        return budget_drop(float_correct, scores_of(nodes), args.margin_se)

    nodes = [r.layer.node for r in analysis.layers]  # graph order
    k = len(analysis.chosen)
    solo = copy.deepcopy(analysis.layers)  # the ranking without the adjacent pairs' costs
    rank_units(solo, "speed")
    orders = {
        "compress": analysis.order(),
        "compress_solo_costs": [r.layer.node for r in sorted(solo, key=lambda r: r.rank)],
        "first_last": first_last(nodes),
    }
    for seed in range(args.random_seeds):
        orders[f"random{seed}"] = list(np.random.default_rng(seed).permutation(nodes))
    choices: dict[str, dict] = {}
    for name, order in orders.items():
        needed, _ = shortest_prefix(order, drop_of, args.budget)
        choices[name] = {
            "float_layers_needed": needed if needed <= len(order) else None,
            "val_drop_with_compress_count": analysis.float_top1 - scores_of(order[:k]).top1,
            "layers": list(order[: min(needed, len(order))]),
        }
    test_x, test_y = [], []
    for images, labels, *_ in data.loader("test"):
        test_x.append(images.numpy().astype(np.float32))
        test_y.append(labels.numpy())
    tx, ty = np.concatenate(test_x), np.concatenate(test_y)
    models = {"fp32": reference, "int8": qdq}
    for name, choice in choices.items():
        if choice["float_layers_needed"] is not None:
            models[name] = with_float_layers(qdq, choice["layers"], fp32)
    fp32_test = top1_percent(onnx_logits(reference, tx), ty)
    result: dict = {
        "benchmark": "chain_fallback",
        "date": time.strftime("%Y-%m-%d"),
        "arch": args.arch,
        "settings": {k: v for k, v in vars(args).items() if k not in ("part", "set", "out")},
        "train_and_ptq_wall_s": wall,
        "sensitivity_seconds": seconds,
        "quantized_layers": len(nodes),
        "val_images": len(y),
        "test_images": len(ty),
        "fp32_val_top1": analysis.float_top1,
        "int8_val_drop": analysis.int8_drop,
        "fp32_test_top1": fp32_test,
        "test_drop": {
            name: fp32_test - top1_percent(onnx_logits(m, tx), ty) for name, m in models.items()
        },
        "float_layers_needed": {n: c["float_layers_needed"] for n, c in choices.items()},
        "val_drop_with_compress_count": {
            n: c["val_drop_with_compress_count"] for n, c in choices.items()
        },
        "compress_float_modules": [r.layer.module for r in analysis.layers if r.float],
        "sensitivity": analysis.to_dict(),  # every unit's drop, KL and speed cost
    }
    random = [c for n, c in result["float_layers_needed"].items() if n.startswith("random")]
    result["random_needed_median"] = (
        statistics.median([len(nodes) + 1 if c is None else c for c in random]) if random else None
    )
    with tempfile.TemporaryDirectory(prefix="compress-fallback-") as tmp:
        paths = {}
        for name, model in models.items():
            paths[name] = Path(tmp) / f"{name}.onnx"
            onnx.save(model, str(paths[name]))
        settings = BenchSettings(warmup=3, min_iters=10, min_duration_s=0.2, repeats=args.rounds)
        runs = interleaved_latency(paths, [1, 32], settings, sessions="kept")
    speedup: dict[str, dict[str, float]] = {}
    for b, by in runs.items():
        for name in models:
            if name != "fp32":
                paired = paired_result(by[name], by["fp32"])
                key = f"{name}_b{b}"
                speedup.setdefault(name, {})[b] = record_paired(result, key, paired)
    result["speedup_vs_fp32"] = speedup
    result["speedup_kept"] = {  # the share of the all-INT8 model's speed-up over FP32 kept
        name: {b: speedup[name][b] / speedup["int8"][b] for b in speedup["int8"]}
        for name in speedup
        if name != "int8"
    }
    return result


CEILING_SCALES = (0.25, 0.5)  # shrink-only: every block at this width scale
CEILING_KEEP = (2, 3, 4)  # removal-only: the first blocks of each stage kept


def ceiling(args: argparse.Namespace) -> dict:
    from compress.deploy.onnx_export import export_onnx
    from compress.deploy.onnxruntime_backend import interleaved_latency
    from compress.deploy.timing import BenchSettings, paired_result
    from compress.evaluation import count_flops, count_params
    from compress.models import ModelSpec, build_model
    from compress.quant.ort_int8 import quantize_onnx_int8
    from compress.search.build import build_student
    from compress.search.units import find_units

    size = (3, 32, 32)
    spec = ModelSpec("cifar_resnet56", {})
    teacher = build_model(spec).eval()
    names = [u.name for u in find_units(teacher, size)]
    candidates: dict[str, dict] = {
        f"shrink_{s}": {"scales": dict.fromkeys(names, s)} for s in CEILING_SCALES
    }
    for keep in CEILING_KEEP:  # block names end in their index within the stage
        removed = [n for n in names if int(n.rsplit(".", 1)[1]) >= keep]
        candidates[f"removal_keep{keep}"] = {"removed": removed}
    calibration = [np.random.default_rng(0).random((16, *size), dtype=np.float32)]
    result: dict = {
        "benchmark": "chain_ceiling",
        "date": time.strftime("%Y-%m-%d"),
        "teacher": spec.name,
        "teacher_params": count_params(teacher),
        "teacher_flops": count_flops(teacher, size),
        "params_budget": count_params(teacher) // 3,
        "students": {},
    }
    with tempfile.TemporaryDirectory(prefix="compress-ceiling-") as tmp:
        paths = {"teacher": export_onnx(teacher, Path(tmp) / "teacher.onnx", size)}
        for name, candidate in candidates.items():
            student, _ = build_student(teacher, spec, candidate, size)
            fp32 = export_onnx(student, Path(tmp) / f"{name}.onnx", size)
            paths[name] = Path(tmp) / f"{name}_int8.onnx"
            quantize_onnx_int8(fp32, paths[name], calibration, placement="all")
            result["students"][name] = {
                **candidate,
                "params": count_params(student),
                "flops": count_flops(student, size),
            }
        settings = BenchSettings(warmup=3, min_iters=10, min_duration_s=0.2, repeats=args.rounds)
        runs = interleaved_latency(paths, [1, 32], settings, sessions="kept")
    for b, by in runs.items():
        for name, entry in result["students"].items():
            paired = paired_result(by[name], by["teacher"])  # teacher / student: the speed-up
            speedup = record_paired(result, f"{name}_b{b}", paired)
            entry.setdefault("int8_speedup_vs_fp32_teacher", {})[b] = speedup
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["chain", "fallback", "ceiling"], default="chain")
    p.add_argument("--full", action="store_true", help="chain: the full configuration")
    p.add_argument("--set", action="append", default=[], help="chain: a recipe override")
    p.add_argument("--out", help="run folder (default: a temporary one)")
    p.add_argument("--name", help="result file name (default: chain or chain_fallback)")
    p.add_argument("--arch", default="timm:mobilenetv3_large_100", help="fallback: the model")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--per-class", type=int, default=1000, help="train (+val) images per class")
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--calibration-batches", type=int, default=1)
    p.add_argument(
        "--calibration-batch-size", type=int, default=4, help="images per calibration batch"
    )
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--budget", type=float, default=0.5, help="top-1 points")
    p.add_argument(
        "--margin-se", type=float, default=1.0, help="fallback: the stage's budget_margin_se"
    )
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.part == "chain":
        save(args.name or "chain", chain(args))
    elif args.part == "ceiling":
        save(args.name or "chain_ceiling", ceiling(args))
    else:
        save(args.name or "chain_fallback", fallback(args))


if __name__ == "__main__":
    main()
