"""Quantization on CIFAR-10: quantized distillation against plain QAT and PTQ, and learned points.

Teacher cifar_resnet56 (shared weights); the student is the pretrained cifar_resnet20 distilled for
`--epochs` in full precision first ("fp32_distilled"); every quantized row then starts from that
student with the same budget (`--epochs` over `--per-class` images per class, no augmentation):
- quantized_distillation: KD loss (T 2, alpha 0.7) with quantized weights;
- qat_no_distillation: the same with alpha 0 (cross-entropy only), the paper's comparison;
- ptq: the student's weights rounded to the same levels, no training;
- differentiable_quantization: learned points at 2 and 4 bits;
- ptq_int8 / qat_int8 (Brevitas, exported as Q/DQ ONNX): calibration only, and calibration plus
  `--epochs` of KD; for the onnxruntime target (uint8 activations) and, PTQ only, the TensorRT one
  (int8 activations). Each row gives PyTorch and onnxruntime test top-1; the ONNX files are then
  timed with the FP32 student's ONNX in one interleaved run (onnxruntime CPU, batch 1 and 32).
Last stdout line: JSON with `rows`, `latency` and the INT8 speed-ups.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks._common import SHARED, require, save
from compress.config import DataConfig
from compress.data import ImageFolderData
from compress.deploy.bench import bench_onnxruntime
from compress.deploy.onnx_export import export_onnx
from compress.evaluation import evaluate
from compress.models import load_model
from compress.pipeline import Pipeline
from compress.quant.size import size_report
from compress.quant.weights import WeightQuantizer
from compress.recipe import parse_recipe


def run_recipe(recipe: dict, out: Path) -> dict:
    report = Pipeline(parse_recipe(recipe), out).run()
    return report["models"][-1]


def row(method: str, bits: int | None, model: dict) -> dict:
    return {
        "method": method,
        "bits": bits,
        "test_top1": model["top1"],
        "size_bytes": model.get("compact_bytes") or model["size_bytes"],
        "size_is": "compact file" if model.get("compact_bytes") else "fp32 state dict",
        "huffman_size_bytes": model.get("quantized_size_bytes"),
        "bits_per_weight": model.get("bits_per_weight", 32.0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--per-class", type=int, default=300, help="train images per class")
    p.add_argument("--test-per-class", type=int, default=300)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads for latency")
    args = p.parse_args()
    weights = require(SHARED / "weights" / "cifar_resnet")
    data = {
        "root": str(require(SHARED / "data" / "cifar10")),
        "limit_per_class": args.per_class,
        "test_limit_per_class": args.test_per_class,
        "augment": "none",
        "batch_size": 64,
    }
    base = {
        "name": "quant",
        "data": data,
        "teacher": {"model": "cifar_resnet56", "weights": str(weights / "resnet56-4bfd9763.th")},
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp = run_recipe(
            {
                **base,
                "student": {
                    "model": "cifar_resnet20",
                    "weights": str(weights / "resnet20-12fca82f.th"),
                },
                "stages": [
                    {
                        "type": "distill",
                        "epochs": args.epochs,
                        "lr": 0.01,
                        "temperature": 2.0,
                        "alpha": 0.7,
                    }
                ],
            },
            tmp / "fp32",
        )
        rows.append(row("fp32_distilled", None, fp))
        student = {"model": str(tmp / "fp32" / "00-distill" / "model.safetensors")}
        test = ImageFolderData(DataConfig(**data)).loader("test")
        quantize = {"type": "quantize", "epochs": args.epochs}
        for bits in args.bits:
            for method, extra in (
                ("quantized_distillation", {}),
                ("qat_no_distillation", {"alpha": 0.0}),
            ):
                stage = {**quantize, "bits": bits, **extra}
                out = tmp / f"{method}{bits}"
                rows.append(
                    row(
                        method,
                        bits,
                        run_recipe({**base, "student": student, "stages": [stage]}, out),
                    )
                )
            model, _ = load_model(Path(student["model"]))
            rounder = WeightQuantizer(model, bits)
            rounder.on_train_end(model)
            size = size_report(model, rounder.codes())
            top1 = evaluate(model, test, torch.device("cpu"))["top1"]
            rows.append(
                {
                    "method": "ptq",
                    "bits": bits,
                    "test_top1": top1,
                    "size_bytes": None,
                    "size_is": "not written",
                    "huffman_size_bytes": size["quantized_size_bytes"],
                    "bits_per_weight": size["bits_per_weight"],
                }
            )
        for bits in [b for b in args.bits if b <= 4]:
            stage = {**quantize, "bits": bits, "method": "differentiable_quantization"}
            out = tmp / f"dq{bits}"
            rows.append(
                row(
                    "differentiable_quantization",
                    bits,
                    run_recipe({**base, "student": student, "stages": [stage]}, out),
                )
            )
        onnx = {"fp32": tmp / "fp32.onnx"}
        export_onnx(load_model(Path(student["model"]))[0], onnx["fp32"], (3, 32, 32))
        for method, target in (
            ("ptq_int8", "onnxruntime"),
            ("qat_int8", "onnxruntime"),
            ("ptq_int8", "tensorrt"),
        ):
            stage = {**quantize, "method": method, "int8_target": target}
            out = tmp / f"{method}_{target}"
            model = run_recipe(
                {**base, "student": student, "stages": [stage, {"type": "export"}]}, out
            )
            onnx[f"{method}_{target}"] = out / "01-export" / "model.onnx"
            rows.append(
                {
                    **row(method, 8, model),
                    "int8_target": target,
                    "onnx_test_top1": model["onnx_test_top1"],
                    "size_bytes": model["onnx_bytes"],
                    "size_is": "Q/DQ ONNX file",
                    "huffman_size_bytes": None,
                    "int8_size_bytes": model["quantized_size_bytes"],  # weights + scales
                }
            )
        latency = {name: {} for name in onnx}
        for batch in (1, 32):
            for name, path in onnx.items():  # one model after another, same conditions
                latency[name][f"b{batch}"] = bench_onnxruntime(
                    path, batch, args.threads, min_duration_s=2.0
                )["p50_ms"]
    print(f"{'method':<28}{'bits':>5}{'top1':>8}{'onnx':>8}{'bits/w':>8}{'Huffman B':>11}")
    for r in rows:
        onnx_top1 = r.get("onnx_test_top1")
        print(
            f"{r['method']:<28}{r['bits'] or 32:>5}{r['test_top1']:>8.2f}"
            f"{'' if onnx_top1 is None else f'{onnx_top1:.2f}':>8}"
            f"{r['bits_per_weight']:>8.2f}{r['huffman_size_bytes'] or 0:>11}"
        )
    for name, ms in latency.items():
        print(f"{name:<28} p50 b1 {ms['b1']:.3f} ms  b32 {ms['b32']:.3f} ms")
    qat = latency["qat_int8_onnxruntime"]
    save(
        "quant_cifar10",
        {
            "benchmark": "quant_cifar10",
            "budget": {
                "per_class": args.per_class,
                "epochs": args.epochs,
                "test_images": args.test_per_class * 10,
            },
            "rows": rows,
            "latency_p50_ms": latency,
            "latency_backend": f"onnxruntime CPU, {args.threads} threads",
            "int8_vs_fp32_speedup_b1": latency["fp32"]["b1"] / qat["b1"],
            "int8_vs_fp32_speedup_b32": latency["fp32"]["b32"] / qat["b32"],
        },
    )


if __name__ == "__main__":
    main()
