"""Deployment latency: the teacher and the shipped recipes' students on every backend here.

Latency p50/p90/p99 at batch 1 and throughput at batch 32 for each model on onnxruntime CPU, and
where present onnxruntime CUDA and TensorRT FP32/FP16/INT8 (INT8 from compress's Q/DQ route,
calibrated on real test images), with speed-ups against the teacher on the same backend. A recipe's student is
the last stage's model in `runs/<recipe name>` (run the recipe first); without one, the quick
start's student is the pretrained ResNet-20 it starts from.
Last stdout line: JSON with `rows` (model, backend, precision, batch_size, p50/p90/p99, throughput)
and `device`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import yaml

from benchmarks._common import REPO, SHARED, require, save
from benchmarks.quickstart_models import quickstart_models
from compress.deploy.bench import BenchSettings, bench_sweep, cpu_name
from compress.deploy.onnx_export import export_onnx
from compress.models import create_model
from compress.quant.int8 import calibrate, export_int8_onnx, is_int8, quantize_int8


def int8_onnx(model, out_path: Path, calibration: torch.Tensor) -> Path:
    """`model` through compress's INT8 route shaped for TensorRT (symmetric per-channel weights,
    signed activations), calibrated on `calibration` images, as Q/DQ ONNX."""
    input_size = tuple(calibration.shape[1:])
    if not is_int8(model):
        model = quantize_int8(model, "tensorrt", input_size)
        batches = [(b,) for b in calibration.split(32)]
        calibrate(model, batches, torch.device("cpu"), len(batches))
    return export_int8_onnx(model, out_path, input_size)


def shipped_students(runs: Path) -> dict[str, tuple[object, str]]:
    """Each shipped recipe's final model from its run folder (when that run exists)."""
    out = {}
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        name = yaml.safe_load(recipe.read_text())["name"]
        models = sorted((runs / name).glob("[0-9][0-9]-*/model.safetensors"))
        if models:
            out[f"{name} student"] = (create_model(str(models[-1]))[0].eval(), str(models[-1]))
    return out


def backends() -> list[tuple[str, str, dict]]:
    """(backend, precision, options) for every backend available on this machine."""
    import onnxruntime as ort

    from compress.deploy.tensorrt import tensorrt_problem

    found = [("onnxruntime", "fp32", {"provider": "cpu"})]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        found.append(("onnxruntime", "fp32", {"provider": "cuda"}))
    if tensorrt_problem() is None:
        found += [("tensorrt", p, {"precision": p}) for p in ("fp32", "fp16", "int8")]
    return found


def calibration_images(n: int = 256) -> torch.Tensor:
    from compress.config import DataConfig
    from compress.data import ImageFolderData

    data = ImageFolderData(
        DataConfig(root=require(SHARED / "data" / "cifar10"), test_limit_per_class=n // 10)
    )
    return next(iter(data.loader("test", batch_size=n)))[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=Path, default=REPO / "runs", help="folder holding recipe runs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--min-duration", type=float, default=3.0, help="seconds per timed run")
    args = p.parse_args()
    settings = BenchSettings(20, 200, args.min_duration, 3, args.threads)
    teacher, student = quickstart_models(args.runs / "quickstart").values()
    models = {"teacher": teacher, **shipped_students(args.runs)}
    models.setdefault("quickstart student", student)
    available = backends()
    rows, sources = [], {name: source for name, (_, source) in models.items()}
    with tempfile.TemporaryDirectory() as tmp:
        calib = calibration_images() if any(p == "int8" for _, p, _ in available) else None
        for i, (name, (model, _)) in enumerate(models.items()):
            if is_int8(model):  # an INT8 student runs as its Q/DQ model on every backend
                onnx = export_int8_onnx(model, Path(tmp) / f"m{i}.onnx", (3, 32, 32))
            else:
                onnx = export_onnx(model, Path(tmp) / f"m{i}.onnx", (3, 32, 32))
            for backend, precision, options in available:
                path = onnx
                if precision == "int8" and not is_int8(model):
                    path = int8_onnx(model, Path(tmp) / f"m{i}.qdq.onnx", calib)
                label = backend + (f"-{options['provider']}" if "provider" in options else "")
                for r in bench_sweep(backend, path, [1, 32], settings, options):
                    rows.append(
                        {
                            "model": name,
                            "backend": label,
                            "precision": precision,
                            "batch_size": r["batch_size"],
                            **{k: r[k] for k in ("p50_ms", "p90_ms", "p99_ms", "throughput_ips")},
                            "cv": r["cv"],
                            "timed": r["timed"],
                        }
                    )
                    print(
                        f"{name:<26} {label:<18} {precision} batch {r['batch_size']:>2}: "
                        f"p50 {r['p50_ms']:.3f} ms  p90 {r['p90_ms']:.3f}  p99 {r['p99_ms']:.3f}  "
                        f"{r['throughput_ips']:.0f} img/s"
                    )
    teacher_rows = {
        (r["backend"], r["batch_size"]): r
        for r in rows
        if r["model"] == "teacher" and r["precision"] == "fp32"
    }
    for r in rows:
        base = teacher_rows[(r["backend"], r["batch_size"])]
        r["speedup_vs_teacher_fp32"] = base["p50_ms"] / r["p50_ms"]
    result = {
        "benchmark": "deploy_latency",
        "device": {"cpu": cpu_name(), "backends": sorted({r["backend"] for r in rows})},
        "settings": settings.__dict__,
        "sources": sources,
        "rows": rows,
    }
    goal = [
        r
        for r in rows
        if r["precision"] == "int8" and r["model"] != "teacher" and r["batch_size"] == 1
    ]
    if goal and ("onnxruntime-cuda", 1) in teacher_rows:
        result["int8_student_vs_teacher_onnxruntime_cuda"] = {
            r["model"]: teacher_rows[("onnxruntime-cuda", 1)]["p50_ms"] / r["p50_ms"] for r in goal
        }
    save("deploy_latency", result)


if __name__ == "__main__":
    main()
