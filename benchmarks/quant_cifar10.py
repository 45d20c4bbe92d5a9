"""Quantization on CIFAR-10: quantized distillation against plain QAT, and learned points.

Teacher cifar_resnet56 (shared weights); the student is the pretrained cifar_resnet20 distilled for
`--epochs` in full precision first ("fp32_distilled"); every quantized row then starts from that
student with the same budget (`--epochs` over `--per-class` images per class, no augmentation):
- quantized_distillation: KD loss (T 2, alpha 0.7) with quantized weights;
- qat_no_distillation: the same with alpha 0 (cross-entropy only), the paper's comparison;
- differentiable_quantization: learned points at 2 and 4 bits;
- ptq_int8 / qat_int8 (Brevitas, exported as Q/DQ ONNX): calibration only, and calibration plus
  `--epochs` of KD; for the onnxruntime target (uint8 activations) and, PTQ only, the TensorRT one
  (int8 activations). Each row gives PyTorch and onnxruntime test top-1; the ONNX files are then
  timed with the FP32 student's ONNX (the quantize stage's `float.onnx`) in alternation
  (onnxruntime CPU, batch 1 and 32): rounds of one timed run of each, each INT8 speed-up the
  median of the per-round ratios, with its spread and `reliable` under `paired` (a warning line,
  and `unreliable`, where the spread is not smaller than the effect).
Every row is a recipe run (distill, quantize, export stages).
Last stdout line: JSON with `rows`, `latency` and the INT8 speed-ups.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks._common import SHARED, record_paired, require, run_recipe, save
from compress.deploy.onnxruntime_backend import interleaved_latency
from compress.deploy.timing import BenchSettings, paired_result


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
        fp32, _ = run_recipe(
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
        rows.append(row("fp32_distilled", None, fp32.model(type="distill")))
        student = {"model": str(fp32.stage(type="distill").model_path)}

        def quantized(stages: list[dict], name: str):
            run, _ = run_recipe({**base, "student": student, "stages": stages}, tmp / name)
            return run

        quantize = {"type": "quantize", "epochs": args.epochs}
        for bits in args.bits:
            for method, extra in (
                ("quantized_distillation", {}),
                ("qat_no_distillation", {"alpha": 0.0}),
            ):
                run = quantized([{**quantize, "bits": bits, **extra}], f"{method}{bits}")
                rows.append(row(method, bits, run.model(type="quantize")))
        for bits in [b for b in args.bits if b <= 4]:
            stage = {**quantize, "bits": bits, "method": "differentiable_quantization"}
            run = quantized([stage], f"dq{bits}")
            rows.append(row("differentiable_quantization", bits, run.model(type="quantize")))
        onnx = {}
        # the INT8 models are timed below, all in one interleaved run, so not by the export stage
        export = {"type": "export", "speedup_batch_sizes": None}
        for method, target in (
            ("ptq_int8", "onnxruntime"),
            ("qat_int8", "onnxruntime"),
            ("ptq_int8", "tensorrt"),
        ):
            stage = {**quantize, "method": method, "int8_target": target}
            run = quantized([stage, export], f"{method}_{target}")
            if not onnx:  # the student's FP32 export, the reference the INT8 models are timed on
                onnx["fp32"] = run.stage(type="quantize").file("float.onnx")
            onnx[f"{method}_{target}"] = run.stage(type="export").file("model.onnx")
            model = run.model(type="quantize")
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
        settings = BenchSettings(min_duration_s=2.0, threads=args.threads)
        runs = interleaved_latency(onnx, [1, 32], settings)  # in alternation, paired by round
        latency = {
            name: {f"b{b}": statistics.median(runs[str(b)][name]) for b in (1, 32)} for name in onnx
        }
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
    result = {
        "benchmark": "quant_cifar10",
        "budget": {
            "per_class": args.per_class,
            "epochs": args.epochs,
            "test_images": args.test_per_class * 10,
        },
        "rows": rows,
        "latency_p50_ms": latency,
        "latency_backend": f"onnxruntime CPU, {args.threads} threads",
    }
    speedup = {}  # each INT8 model's speed-up over FP32, by batch size
    for name in (n for n in onnx if n != "fp32"):
        for b in ("1", "32"):
            paired = paired_result(runs[b][name], runs[b]["fp32"])
            what = f"{name} speed-up over FP32 at batch {b}"
            speedup[name, b] = record_paired(result, f"{name}_vs_fp32_b{b}", paired, what)
    for b in ("1", "32"):
        result[f"int8_vs_fp32_speedup_b{b}"] = speedup["qat_int8_onnxruntime", b]
    save("quant_cifar10", result)


if __name__ == "__main__":
    main()
