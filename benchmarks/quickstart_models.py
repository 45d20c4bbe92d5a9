"""The quick start's teacher and student: accuracy, params, FLOPs, ONNX latency and the ratio.

The student is the quick start's distilled model when `runs/quickstart` holds one (run
`compress run recipes/quickstart.yaml` first), else the pretrained ResNet-20 it starts from.
Each model is timed alone (`latency`), and the ratio is timed in matched pairs: rounds of one
timed run of each model in alternation, the ratio the median of the per-round ratios, with its
spread and `reliable` under `paired` (a warning line, and `unreliable`, where the spread is not
smaller than the effect).
Last stdout line: JSON with both models and `latency_ratio_teacher_over_student` per batch size.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks._common import REPO, SHARED, quickstart_models, record_paired, require, save
from compress.api import export
from compress.config import DataConfig
from compress.data import ImageFolderData
from compress.deploy.backends import bench
from compress.deploy.onnxruntime_backend import interleaved_latency
from compress.deploy.timing import BenchSettings, paired_result
from compress.evaluation import evaluate
from compress.models import create_model
from compress.pipeline import model_facts


def describe(name: str, model, data: ImageFolderData, batch_sizes, threads, tmp: Path) -> dict:
    acc = evaluate(model, data.loader("test"), torch.device("cpu"), desc=name)
    facts = model_facts(model, data.input_size)
    onnx = export(model, tmp / f"{name}.onnx", data.input_size)["path"]
    options = {"threads": threads, "warmup": 20, "min_iters": 200, "min_duration_s": 5}
    latency = {
        f"batch_{r['batch_size']}": r for r in bench(onnx, "onnxruntime", options, batch_sizes)
    }
    return {
        "top1": acc["top1"],
        "top5": acc["top5"],
        "test_n": acc["n"],
        "params": facts["params"],
        "flops": facts["flops"],
        "p50_ms": {k: v["p50_ms"] for k, v in latency.items()},
        "latency": latency,
        "onnx": onnx,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", type=Path, default=REPO / "runs" / "quickstart")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--test-per-class", type=int, default=None, help="default: the full test set")
    p.add_argument("--rounds", type=int, default=5, help="paired rounds for the latency ratio")
    args = p.parse_args()
    data = ImageFolderData(
        DataConfig(
            root=require(SHARED / "data" / "cifar10"), test_limit_per_class=args.test_per_class
        )
    )
    (teacher_cfg, _), (student_cfg, student_source) = quickstart_models(args.run).values()
    teacher, student = (
        create_model(cfg["model"], weights=Path(cfg["weights"]) if "weights" in cfg else None)[0]
        for cfg in (teacher_cfg, student_cfg)
    )
    batch_sizes = (1, 32)
    settings = BenchSettings(
        warmup=20, min_iters=200, min_duration_s=2, repeats=args.rounds, threads=args.threads
    )
    with tempfile.TemporaryDirectory() as tmp:
        t = describe("teacher", teacher.eval(), data, batch_sizes, args.threads, Path(tmp))
        s = describe("student", student.eval(), data, batch_sizes, args.threads, Path(tmp))
        onnx = {"teacher": t.pop("onnx"), "student": s.pop("onnx")}
        runs = interleaved_latency(onnx, list(batch_sizes), settings)
    result = {
        "benchmark": "quickstart_models",
        "teacher": {"model": "cifar_resnet56", **t},
        "student": {"model": "cifar_resnet20", "source": student_source, **s},
        "latency_ratio_teacher_over_student": {},
        "params_ratio": t["params"] / s["params"],
        "flops_ratio": t["flops"] / s["flops"],
    }
    for b, by in runs.items():  # teacher's p50 over the student's, round by round
        paired = paired_result(by["student"], by["teacher"])
        what = f"teacher / student latency at batch {b}"
        ratio = record_paired(result, f"batch_{b}", paired, what)
        result["latency_ratio_teacher_over_student"][f"batch_{b}"] = ratio
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
