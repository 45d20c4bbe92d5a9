"""Deployment latency: the teacher and the shipped recipes' students on every backend here.

Latency p50/p90/p99 at batch 1 and throughput at batch 32 for each model on onnxruntime CPU, and
where present onnxruntime CUDA and TensorRT FP32/FP16/INT8, with speed-ups against the teacher on
the same backend. A recipe's student is the final model of its run in `runs/<recipe name>` (run
the recipe first), as that run's export stage wrote it; without one, the quick start's student is
the pretrained ResNet-20 it starts from. Every other ONNX file comes from a small recipe run: the
export stage, and for TensorRT INT8 first the quantize stage's ptq_int8 for the tensorrt target
(signed INT8 activations, calibrated on 256 training images); an INT8 student runs as its own Q/DQ
model on every backend.
Per batch size, every (model, backend, precision) is timed in rounds, one timed run of each per
round in turn (`compress.deploy.timing.interleave`, the order reversed every other round); a row's
statistics are the medians over its rounds, and each speed-up is the median of the per-round
ratios, with its spread and `reliable` under `paired` (a warning line, and `unreliable`, where the
spread is not smaller than the effect).
Last stdout line: JSON with `rows` (model, backend, precision, batch_size, p50/p90/p99, throughput)
and `device`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmarks._common import (
    REPO,
    SHARED,
    open_run,
    quickstart_models,
    record_paired,
    require,
    run_recipe,
    save,
)
from compress.deploy.backends import bench
from compress.deploy.timing import BenchSettings, cpu_name, interleave, paired_result
from compress.stages.quantize import INT8_METHODS

# The accuracy gates are off: these runs only make the ONNX files timed here (100 test images).
EXPORT = {
    "type": "export",
    "int8_max_drop": 100,
    "int8_accuracy_tolerance": 100,
    "speedup_batch_sizes": None,
}
TENSORRT_INT8 = {
    "type": "quantize",
    "method": "ptq_int8",
    "int8_target": "tensorrt",
    "calibration_batches": 8,  # of 32 training images
}


@dataclass
class Model:
    student: dict  # the recipe `student` mapping that builds it
    source: str
    int8: bool = False  # already INT8: its Q/DQ model runs on every backend
    onnx: Path | None = None  # its ONNX file where a run's export stage wrote it


def export_run(model: Model, out: Path, int8: bool = False) -> Path:
    """`model` through the export stage (with `int8`, through the quantize stage's TensorRT-shaped
    ptq_int8 first) in a run folder `out`; the ONNX file it wrote."""
    data = {
        "root": str(require(SHARED / "data" / "cifar10")),
        "limit_per_class": 32,
        "val_fraction": 0.0,
        "test_limit_per_class": 10,
        "augment": "none",
        "batch_size": 32,
    }
    stages = [TENSORRT_INT8, EXPORT] if int8 else [EXPORT]
    recipe = {"name": "deploy-latency", "data": data, "student": model.student, "stages": stages}
    run, _ = run_recipe(recipe, out)
    return run.stage(type="export").file("model.onnx")


@dataclass
class Entry:
    """One (model, backend, precision) timed, and its results by batch size, one per round."""

    model: str
    backend: str  # the registry's name
    label: str  # backend, with the onnxruntime provider
    precision: str
    options: dict
    path: Path
    results: dict[int, list[dict]] = field(default_factory=dict)

    def measure(self, batch_size: int) -> Callable[[], float]:
        """One timed run (`repeats: 1`) at `batch_size`; returns its p50 ms. A TensorRT engine
        built from ONNX in the first round is reused by the later ones."""
        path = self.path

        def run() -> float:
            nonlocal path
            options = {**self.options, "repeats": 1}
            r = bench(path, self.backend, options, [batch_size])[0]
            engine = r.get("flags", {}).get("engine")
            if path.suffix == ".onnx" and engine:
                path = Path(engine)
            self.results.setdefault(batch_size, []).append(r)
            return r["p50_ms"]

        return run

    def row(self, batch_size: int) -> dict:
        runs = self.results[batch_size]
        median = {
            k: statistics.median(r[k] for r in runs)
            for k in ("p50_ms", "p90_ms", "p99_ms", "throughput_ips", "cv")
        }
        return {
            "model": self.model,
            "backend": self.label,
            "precision": self.precision,
            "batch_size": batch_size,
            **median,
            "rounds": len(runs),
            "run_p50_ms": [r["p50_ms"] for r in runs],
            "timed": runs[0]["timed"],
        }


def timed_rows(entries: list[Entry], batch_sizes: list[int], rounds: int) -> list[dict]:
    """Time every entry in alternation, `rounds` rounds per batch size; one row per entry and
    batch size (statistics: medians over the rounds)."""
    rows = []
    for b in batch_sizes:
        interleave({i: e.measure(b) for i, e in enumerate(entries)}, rounds)
        for e in entries:
            rows.append(e.row(b))
            r = rows[-1]
            print(
                f"{r['model']:<26} {r['backend']:<18} {r['precision']} batch {b:>2}: "
                f"p50 {r['p50_ms']:.3f} ms  p90 {r['p90_ms']:.3f}  p99 {r['p99_ms']:.3f}  "
                f"{r['throughput_ips']:.0f} img/s",
                flush=True,
            )
    return rows


def speedups(result: dict, rows: list[dict]) -> None:
    """Each row's speed-up over the FP32 teacher on the same backend, and the GPU goal (an INT8
    student on TensorRT against the FP32 teacher on onnxruntime CUDA), paired round by round."""
    teacher = {
        (r["backend"], r["batch_size"]): r
        for r in rows
        if r["model"] == "teacher" and r["precision"] == "fp32"
    }

    def paired(r: dict, base: dict, key: str, what: str) -> float:
        return record_paired(result, key, paired_result(r["run_p50_ms"], base["run_p50_ms"]), what)

    for r in rows:
        name = f"{r['model']} {r['backend']} {r['precision']} b{r['batch_size']}"
        base = teacher[(r["backend"], r["batch_size"])]
        if r is not base:
            what = f"{name}: speed-up over the FP32 teacher"
            r["speedup_vs_teacher_fp32"] = paired(r, base, f"{name} vs teacher fp32", what)
        else:
            r["speedup_vs_teacher_fp32"] = 1.0
    goal = [
        r
        for r in rows
        if r["precision"] == "int8" and r["model"] != "teacher" and r["batch_size"] == 1
    ]
    if goal and ("onnxruntime-cuda", 1) in teacher:
        base = teacher[("onnxruntime-cuda", 1)]
        result["int8_student_vs_teacher_onnxruntime_cuda"] = {
            r["model"]: paired(
                r,
                base,
                f"{r['model']} {r['backend']} int8 b1 vs teacher onnxruntime-cuda fp32",
                f"{r['model']} {r['backend']} INT8: speed-up over the FP32 teacher on "
                "onnxruntime CUDA",
            )
            for r in goal
        }


def shipped_students(runs: Path) -> dict[str, Model]:
    """Each shipped recipe's final model from its run folder (when that run made one)."""
    out = {}
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        name = yaml.safe_load(recipe.read_text())["name"]
        run = open_run(runs / name)
        made = run.final_stage if run is not None else None
        if made is None:
            continue
        entry = run.models[made.model_name]
        exported = [
            s
            for s in run.stages
            if s.type == "export" and s.status == "done" and s.model_name == made.model_name
        ]
        out[f"{name} student"] = Model(
            {"model": str(made.model_path)},
            str(made.model_path),
            int8=entry.get("quantization") in INT8_METHODS,
            onnx=exported[-1].file("model.onnx") if exported else None,
        )
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=Path, default=REPO / "runs", help="folder holding recipe runs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--min-duration", type=float, default=3.0, help="seconds per timed run")
    args = p.parse_args()
    settings = BenchSettings(
        warmup=20, min_iters=200, min_duration_s=args.min_duration, repeats=3, threads=args.threads
    )
    teacher, student = (Model(*m) for m in quickstart_models(args.runs / "quickstart").values())
    models = {"teacher": teacher, **shipped_students(args.runs)}
    models.setdefault("quickstart student", student)
    available = backends()
    sources = {name: model.source for name, model in models.items()}
    result = {
        "benchmark": "deploy_latency",
        "device": {"cpu": cpu_name()},
        "settings": settings.__dict__,
        "sources": sources,
    }
    with tempfile.TemporaryDirectory() as tmp:
        entries = []
        for i, (name, model) in enumerate(models.items()):
            onnx = model.onnx or export_run(model, Path(tmp) / f"m{i}")
            int8_onnx = onnx if model.int8 else None
            for backend, precision, options in available:
                path = onnx
                if precision == "int8":
                    int8_onnx = int8_onnx or export_run(model, Path(tmp) / f"m{i}-int8", int8=True)
                    path = int8_onnx
                label = backend + (f"-{options['provider']}" if "provider" in options else "")
                given = {**settings.model_dump(exclude_unset=True), **options}
                entries.append(Entry(name, backend, label, precision, given, path))
        rows = timed_rows(entries, [1, 32], settings.repeats)
    result["device"]["backends"] = sorted({r["backend"] for r in rows})
    result["rows"] = rows
    speedups(result, rows)
    save("deploy_latency", result)


if __name__ == "__main__":
    main()
