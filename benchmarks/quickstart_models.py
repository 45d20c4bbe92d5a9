"""The quick start's teacher and student: accuracy, params, FLOPs, ONNX latency and the ratio.

The student is the quick start's distilled model when `runs/quickstart` holds one (run
`compress run recipes/quickstart.yaml` first), else the pretrained ResNet-20 it starts from.
Last stdout line: JSON with both models and `latency_ratio_teacher_over_student` per batch size.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks._common import REPO, SHARED, require, save
from compress.config import DataConfig
from compress.data import ImageFolderData
from compress.deploy.bench import bench_onnxruntime
from compress.deploy.onnx_export import export_onnx
from compress.evaluation import count_flops, count_params, evaluate
from compress.models import create_model


def describe(name: str, model, data: ImageFolderData, batch_sizes, threads, tmp: Path) -> dict:
    acc = evaluate(model, data.loader("test"), torch.device("cpu"), desc=name)
    onnx = export_onnx(model, tmp / f"{name}.onnx", data.input_size)
    latency = {
        f"batch_{b}": bench_onnxruntime(
            onnx, b, threads, warmup=20, min_iters=200, min_duration_s=5
        )
        for b in batch_sizes
    }
    return {
        "top1": acc["top1"],
        "top5": acc["top5"],
        "test_n": acc["n"],
        "params": count_params(model),
        "flops": count_flops(model, data.input_size),
        "p50_ms": {k: v["p50_ms"] for k, v in latency.items()},
        "latency": latency,
    }


def quickstart_models(run: Path) -> dict[str, tuple[torch.nn.Module, str]]:
    """The quick start's teacher and student (the distilled one from `run` when present), in eval
    mode, each with where it came from."""
    weights = require(SHARED / "weights" / "cifar_resnet")
    teacher = create_model("cifar_resnet56", weights=weights / "resnet56-4bfd9763.th")[0]
    distilled = sorted(Path(run).glob("*-distill/model.safetensors"))
    if distilled:
        student, source = create_model(str(distilled[-1]))[0], str(distilled[-1])
    else:
        student = create_model("cifar_resnet20", weights=weights / "resnet20-12fca82f.th")[0]
        source = "pretrained resnet20 (no quickstart run found)"
    return {
        "teacher": (teacher.eval(), "pretrained resnet56"),
        "student": (student.eval(), source),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", type=Path, default=REPO / "runs" / "quickstart")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--test-per-class", type=int, default=None, help="default: the full test set")
    args = p.parse_args()
    data = ImageFolderData(
        DataConfig(
            root=require(SHARED / "data" / "cifar10"), test_limit_per_class=args.test_per_class
        )
    )
    (teacher, _), (student, student_source) = quickstart_models(args.run).values()
    batch_sizes = (1, 32)
    with tempfile.TemporaryDirectory() as tmp:
        t = describe("teacher", teacher.eval(), data, batch_sizes, args.threads, Path(tmp))
        s = describe("student", student.eval(), data, batch_sizes, args.threads, Path(tmp))
    result = {
        "benchmark": "quickstart_models",
        "teacher": {"model": "cifar_resnet56", **t},
        "student": {"model": "cifar_resnet20", "source": student_source, **s},
        "latency_ratio_teacher_over_student": {
            k: t["p50_ms"][k] / s["p50_ms"][k] for k in t["p50_ms"]
        },
        "params_ratio": t["params"] / s["params"],
        "flops_ratio": t["flops"] / s["flops"],
    }
    for who in ("teacher", "student"):
        r = result[who]
        print(
            f"{who}: top1 {r['top1']:.2f}%  params {r['params']:,}  FLOPs {r['flops']:,}  "
            f"p50 {r['p50_ms']}"
        )
    print(f"latency ratio teacher/student: {result['latency_ratio_teacher_over_student']}")
    save("quickstart_models", result)


if __name__ == "__main__":
    main()
