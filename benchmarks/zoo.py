"""INT8 on the timm/torchvision edge families and the CIFAR ResNets: compress's ptq_int8 against
onnxruntime's own quantizer on the same FP32 network.

For each architecture: a short real training on the shared CIFAR-10 (`--epochs` over
`--per-class` images per class; the CIFAR ResNets start from their pretrained weights), run as a
recipe (train, quantize ptq_int8 with measured placement, export); the FP32 model is trained
once. Then, from that FP32 ONNX model (the quantize stage's `float.onnx`): onnxruntime's
`quantize_static` with its documented CPU settings (QDQ, per-channel int8 weights, uint8
activations, after `quant_pre_process`, calibrated on the same images). All three are scored on
the same test images and timed at batch 1 and 32 in one process, in alternation (onnxruntime CPU):
`--rounds` rounds of one timed run of each model, and each speed-up the median of the per-round
ratios, with its spread and `reliable` under the row's `paired` (a warning line, and the row's
`unreliable`, where the spread is not smaller than the effect).
Where INT8 is not faster, `why` gives the kernels' measured time by op type (onnxruntime's
profiler) for the FP32 and the compress model at batch 32.

Last stdout line: JSON with one row per architecture; also results/zoo.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import onnx
import torch

from benchmarks._common import (
    record_paired,
    run_recipe,
    save,
    student_for,
    train_then_ptq_recipe,
)
from compress.api import as_recipe
from compress.data import ImageFolderData
from compress.deploy.onnx_export import OnnxRuntimeModel
from compress.deploy.onnxruntime_backend import interleaved_latency
from compress.deploy.timing import BenchSettings, cpu_name, default_threads, paired_result
from compress.evaluation import evaluate
from compress.quant.ort_int8 import calibration_batches, onnx_int8_size, saturating_u8s8_cpu

ARCHITECTURES = [
    "cifar_resnet20",
    "cifar_resnet56",
    "timm:resnet18",
    "timm:resnet18d",
    "torchvision:resnet18",
    "timm:mobilenetv2_050",
    "torchvision:mobilenet_v2",
    "timm:mobilenetv3_small_100",
    "torchvision:mobilenet_v3_small",
    "timm:mobilenetv4_conv_small",
    "timm:efficientnet_b0",
    "timm:efficientnet_lite0",
    "timm:regnetx_002",
    "torchvision:regnet_x_400mf",
    "timm:convnext_atto",
    "torchvision:shufflenet_v2_x0_5",
    "timm:ghostnet_100",
    "torchvision:mnasnet0_5",
    "timm:repvgg_a0",
    "timm:rexnet_100",
    "timm:lcnet_050",
    "timm:mobilevit_xxs",
    "timm:efficientvit_b0",
]


def recipe_for(arch: str, args: argparse.Namespace) -> dict:
    return train_then_ptq_recipe("zoo", student_for(arch), args, placement="measured")


def ort_quantize_static(float_onnx: Path, out: Path, batches: list) -> Path:
    """onnxruntime's quantizer as its docs set it up for CPU: pre-process, then QDQ with
    per-channel int8 weights and uint8 activations (MinMax calibration)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(float_onnx), str(pre))

    class Reader:
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            batch = next(self.it, None)
            return None if batch is None else {"input": batch}

    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return out


def op_type_ms(path: Path, batch: int, threads: int, runs: int = 20) -> dict[str, float]:
    """Kernel time per op type (ms per run) from onnxruntime's profiler, largest first."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.enable_profiling = threads, True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "compress-zoo-profile")
    profiled = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inp = profiled.get_inputs()[0]
    shape = [batch] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
    x = {inp.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    for _ in range(runs):
        profiled.run(None, x)
    profile = Path(profiled.end_profiling())
    times: dict[str, float] = defaultdict(float)
    for event in json.loads(profile.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
    profile.unlink(missing_ok=True)
    return dict(sorted(((k, round(v, 3)) for k, v in times.items()), key=lambda kv: -kv[1]))


def run_arch(arch: str, args: argparse.Namespace, work: Path, threads: int) -> dict:
    t0 = time.perf_counter()
    out = work / arch.replace(":", "_")
    recipe = as_recipe(recipe_for(arch, args))
    run, _ = run_recipe(recipe, out)
    quantize = run.stage(type="quantize")
    paths = {
        "fp32": quantize.file("float.onnx"),  # the FP32 model the quantize stage started from
        "compress": run.stage(type="export").file("model.onnx"),
        "onnxruntime": out / "ort_quantize_static.onnx",
    }
    data = ImageFolderData(recipe.data, args.seed)
    batches = calibration_batches(
        data.loader("train", train=False, batch_size=64), args.calibration_batches
    )
    ort_quantize_static(paths["fp32"], paths["onnxruntime"], batches)
    test = data.loader("test")
    top1 = {
        k: evaluate(OnnxRuntimeModel(p, threads), test, torch.device("cpu"), desc=k)["top1"]
        for k, p in paths.items()
    }
    settings = BenchSettings(
        warmup=5, min_iters=20, min_duration_s=0.5, repeats=args.rounds, threads=threads
    )
    runs = interleaved_latency(paths, [1, 32], settings)
    p50 = {b: {k: statistics.median(v) for k, v in by.items()} for b, by in runs.items()}
    fp32_graph = onnx.load(str(paths["fp32"]))
    layers = {}
    for k in ("compress", "onnxruntime"):
        size = onnx_int8_size(onnx.load(str(paths[k])), fp32_graph)
        layers[k] = f"{size['int8_layers']}/{size['weight_layers']}"
    row = {"arch": arch, "top1": top1, "ptq_drop": top1["fp32"] - top1["compress"], "p50_ms": p50}
    speedup: dict[str, dict[str, float]] = {"compress": {}, "onnxruntime": {}}
    versus: dict[str, float] = {}
    for b, by in runs.items():  # a speed-up over X: X's time over this model's, per round
        for k in speedup:
            speedup[k][b] = record_paired(
                row,
                f"{k}_vs_fp32_b{b}",
                paired_result(by[k], by["fp32"]),
                f"{arch}: {k} INT8 speed-up over FP32 at batch {b}",
            )
        versus[b] = record_paired(
            row,
            f"compress_vs_onnxruntime_b{b}",
            paired_result(by["compress"], by["onnxruntime"]),
            f"{arch}: compress INT8 speed-up over onnxruntime's at batch {b}",
        )
    row |= {
        "speedup_vs_fp32": speedup,
        "compress_vs_onnxruntime": versus,
        "int8_layers": layers,
        "float_groups": quantize.metrics.get("float_groups"),
        "reduce_range": quantize.metrics.get("reduce_range"),
        "placement_trials": quantize.metrics.get("placement_trials"),
        "wall_s": time.perf_counter() - t0,
    }
    if min(speedup["compress"].values()) < 1.3:
        row["why"] = {
            "fp32_ms_by_op_batch32": op_type_ms(paths["fp32"], 32, threads),
            "compress_ms_by_op_batch32": op_type_ms(paths["compress"], 32, threads),
        }
    return row


def why(row: dict) -> str:
    """Where the time goes at batch 32, from the measured kernel times: the total and the two
    costliest op types of the compress INT8 model and of the FP32 one."""
    if "why" not in row:
        return ""

    def summary(times: dict[str, float]) -> str:
        top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(times.items())[:2])
        return f"{sum(times.values()):.1f} ms ({top})"

    int8, fp32 = row["why"]["compress_ms_by_op_batch32"], row["why"]["fp32_ms_by_op_batch32"]
    return f"INT8 {summary(int8)}; FP32 {summary(fp32)}"


def speedup_cell(row: dict, k: str, b: str) -> str:
    """`k`'s speed-up over FP32 at batch `b`, marked * when it is not reliable."""
    mark = "*" if f"{k}_vs_fp32_b{b}" in row.get("unreliable", []) else ""
    return f"{row['speedup_vs_fp32'][k][b]:.2f}x{mark}"


def table(result: dict) -> str:
    """The results as a markdown table; a speed-up marked * is not reliable (`paired`)."""
    lines = [
        "| model | top-1 FP32 | compress | ORT | INT8 layers compress / ORT | speed-up b1 "
        "compress / ORT | speed-up b32 compress / ORT | float groups | where INT8 time goes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['arch']} | failed: {row['error']} ||||||||")
            continue
        t, layers = row["top1"], row.get("int8_layers", {})
        x = functools.partial(speedup_cell, row)
        lines.append(
            f"| {row['arch']} | {t['fp32']:.1f} | {t['compress']:.1f} | {t['onnxruntime']:.1f} | "
            f"{layers.get('compress', '')} / {layers.get('onnxruntime', '')} | "
            f"{x('compress', '1')} / {x('onnxruntime', '1')} | "
            f"{x('compress', '32')} / {x('onnxruntime', '32')} | "
            f"{', '.join(row['float_groups'] or []) or '–'} | {why(row)} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", type=Path, help="print a results file as a markdown table, and exit")
    p.add_argument("--archs", nargs="+", default=ARCHITECTURES)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None, help="run folders (default: a temp dir)")
    p.add_argument("--name", default="zoo")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    threads = default_threads()
    rows = []
    with tempfile.TemporaryDirectory(prefix="compress-zoo-") as tmp:
        work = args.work or Path(tmp)
        for arch in args.archs:
            try:
                rows.append(run_arch(arch, args, work, threads))
            except Exception as e:  # noqa: BLE001 - a failed architecture is a result too
                rows.append({"arch": arch, "error": f"{type(e).__name__}: {e}"})
            row = rows[-1]
            if "error" in row:
                print(f"{arch}: FAILED {row['error']}", flush=True)
            else:
                s = row["speedup_vs_fp32"]
                print(
                    f"{arch}: top-1 fp32 {row['top1']['fp32']:.1f} compress "
                    f"{row['top1']['compress']:.1f} ort {row['top1']['onnxruntime']:.1f}; "
                    f"speed-up b1 {s['compress']['1']:.2f}x (ort {s['onnxruntime']['1']:.2f}x), "
                    f"b32 {s['compress']['32']:.2f}x (ort {s['onnxruntime']['32']:.2f}x); "
                    f"INT8 layers {row['int8_layers']}; float groups {row['float_groups']}",
                    flush=True,
                )
    save(
        args.name,
        {
            "benchmark": "zoo",
            "date": time.strftime("%Y-%m-%d"),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "cpu": cpu_name(),
            "threads": threads,
            "saturating_u8s8_cpu": saturating_u8s8_cpu(),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
