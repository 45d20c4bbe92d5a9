"""INT8 through onnxruntime's quantizer: `quantize_static` on the exported FP32 ONNX model.

This route needs no tracing of the PyTorch model, so it covers every architecture that exports to
ONNX. The float model is exported (BatchNorm folded by the exporter), pre-processed with
`quant_pre_process` (shape inference, graph optimisation), calibrated on real training images,
and quantized to QDQ form with per-channel signed INT8 weights. The target sets the activations:
- `onnxruntime`: unsigned 8-bit activations (U8S8), what onnxruntime's x86 integer kernels run;
- `tensorrt`: signed, symmetric 8-bit activations on the inputs of the quantized ops only, and a
  float bias, the placement NVIDIA ModelOpt's ONNX PTQ writes for TensorRT.

Placement (`all` or `measured`): `all` quantizes every op onnxruntime's quantizer supports.
`measured` starts from that and then, op group by op group (the stem conv, depthwise, pointwise
and squeeze-excite convs (any conv on a 1x1 map), other convs, the classifier, residual adds,
multiplies, sigmoids, pooling), leaves a group in float when that makes the model at least 3%
faster on onnxruntime CPU, timed against the best placement so far in alternation: on some CPUs
an integer kernel is slower than the float one (a 3-channel stem conv often is), while a float
group between integer ones costs its Q/DQ boundaries.
"""

from __future__ import annotations

import ast
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from torch import nn

from compress.errors import InputError
from compress.log import logger
from compress.models.registry import register_int8_route

Placement = Literal["all", "measured"]
# Op groups the measured placement may leave in float, tried in this order.
GROUPS = (
    "stem",
    "squeeze_excite",  # any conv on a 1x1 feature map (also a last stage at small inputs)
    "depthwise",
    "pointwise",
    "conv",
    "classifier",
    "matmul",
    "add",
    "mul",
    "sigmoid",
    "pool",
)
NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # what torch's exporter records of each node's module
# A group is left in float only when the model gets at least this much faster (timing noise).
MIN_GAIN = 0.03


@dataclass
class PlacementResult:
    """Which nodes stayed float, and the measured latencies that decided it."""

    placement: str
    reduce_range: bool = False
    excluded_groups: list[str] = field(default_factory=list)
    excluded_nodes: list[str] = field(default_factory=list)
    # Per group tried: its latency with the group in float over the best placement so far.
    trials: list[dict[str, Any]] = field(default_factory=list)
    latency_vs_fp32: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "placement": self.placement,
            "reduce_range": self.reduce_range,
            "float_groups": self.excluded_groups,
            "float_nodes": len(self.excluded_nodes),
            "placement_trials": self.trials,
            "placement_latency_vs_fp32": self.latency_vs_fp32,
        }


class _Batches:
    """onnxruntime's CalibrationDataReader over a list of image batches."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self.input_name, self.batches, self.i = input_name, batches, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.input_name: self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


def calibration_batches(loader: Iterable, batches: int) -> list[np.ndarray]:
    """The first `batches` image batches of `loader`, as float32 arrays."""
    out = []
    for i, (images, *_) in enumerate(loader):
        if i >= batches:
            break
        out.append(images.cpu().numpy().astype(np.float32))
    return out


def node_module(node: onnx.NodeProto) -> str:
    """The module path a node was exported from: torch's TorchScript exporter names nodes by
    scope (`/blocks/blocks.0/conv_dw/Conv` is `blocks.0.conv_dw`), the dynamo one records
    `pkg.torch.onnx.name_scopes`."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            try:
                scopes = [s for s in ast.literal_eval(prop.value) if isinstance(s, str) and s]
            except (ValueError, SyntaxError):
                scopes = []
            return scopes[-2] if len(scopes) > 1 else ""  # the last scope is the op itself
    # Each scope is named inside its parent: `/features/features.2/block/block.0/Conv` is
    # features.2.block.0, a child of a Sequential repeating its parent's own name.
    parts: list[str] = []
    for part in node.name.strip("/").split("/")[:-1]:
        if parts and part.startswith(parts[-1] + "."):
            parts[-1] = part
        else:
            parts.append(part)
    return ".".join(parts)


def module_nodes(model: onnx.ModelProto, modules: list[str]) -> list[str]:
    """The nodes exported from each named module (or its submodules); every name must match."""
    nodes, unmatched = [], []
    owners = {n.name: node_module(n) for n in model.graph.node}
    for module in modules:
        found = [n for n, m in owners.items() if m == module or m.startswith(module + ".")]
        if not found:
            unmatched.append(module)
        nodes += found
    if unmatched:
        raise InputError(
            f"full_precision: no ONNX node comes from module(s) {', '.join(unmatched)}; name "
            "modules as model.named_modules() does"
        )
    return nodes


def node_groups(model: onnx.ModelProto) -> dict[str, list[str]]:
    """The quantizable nodes of a (shape-inferred) float model, by the op group they belong to."""
    graph = model.graph
    weights = {i.name: list(i.dims) for i in graph.initializer}
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.value_info, *graph.input, *graph.output]
    }
    graph_inputs = {i.name for i in graph.input} - set(weights)
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for node in graph.node:
        op = node.op_type
        if op == "Conv":
            w = weights.get(node.input[1], [])
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            spatial = shapes.get(node.input[0], [])[2:]
            if node.input[0] in graph_inputs:
                group = "stem"
            elif len(w) == 4 and w[1] == 1 and attrs.get("group", 1) > 1:
                group = "depthwise"
            elif spatial and all(d == 1 for d in spatial):
                group = "squeeze_excite"  # a conv on pooled features
            elif len(w) == 4 and w[2:] == [1, 1]:
                group = "pointwise"
            else:
                group = "conv"
        else:
            group = {
                "Gemm": "classifier",
                "MatMul": "matmul",
                "Add": "add",
                "Mul": "mul",
                "Sigmoid": "sigmoid",
                "GlobalAveragePool": "pool",
                "AveragePool": "pool",
                "MaxPool": "pool",
            }.get(op, "")
        if group:
            groups[group].append(node.name)
    return {g: nodes for g, nodes in groups.items() if nodes}


def saturating_u8s8_cpu() -> bool:
    """True on an x86 CPU without VNNI, where onnxruntime's U8S8 kernels (VPMADDUBSW) can
    saturate int16 sums of full-range weights; onnxruntime advises 7-bit weights there."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "vnni" not in flags


def _quantize(
    pre: Path,
    out: Path,
    reader: _Batches,
    cache: Path,
    target: str,
    exclude: list[str],
    reduce_range: bool = False,
) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    extra: dict[str, Any] = {}
    activations = QuantType.QUInt8
    if target == "tensorrt":  # ModelOpt's configuration for TensorRT (see the module docstring)
        activations = QuantType.QInt8
        extra = {
            "ActivationSymmetric": True,
            "QuantizeBias": False,
            "AddQDQPairToWeight": True,
            "ForceQuantizeNoInputCheck": True,
            "OpTypesToExcludeOutputQuantization": ["Conv", "Gemm", "MatMul", "Add", "Mul"],
        }
    reader.rewind()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a warning per weight it keeps per tensor
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(
                str(pre),
                str(out),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range and target == "onnxruntime",
                activation_type=activations,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude or None,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options=extra,
                calibration_cache_path=str(cache),
            )
    finally:
        root.setLevel(level)
    return out


def paired_latency_ratio(
    base: Path, other: Path, batch_sizes: list[int], threads: int | None, rounds: int = 5
) -> float:
    """p50 latency of `other` over `base` on onnxruntime CPU, the mean over `batch_sizes` of the
    median paired ratio: the two are timed in alternation (`interleaved_latency`, kept sessions
    whose worker threads do not spin, else the idle session's threads slow the timed one), so
    load on the machine affects both sides of a pair alike."""
    from compress.deploy.onnxruntime_backend import interleaved_latency
    from compress.deploy.timing import BenchSettings, paired_result

    settings = BenchSettings(
        warmup=3, min_iters=10, min_duration_s=0.1, repeats=rounds, threads=threads
    )
    runs = interleaved_latency(
        {"base": base, "other": other}, batch_sizes, settings, sessions="kept"
    )
    return float(
        np.mean([paired_result(t["base"], t["other"]).median_ratio for t in runs.values()])
    )


def quantize_onnx_int8(
    float_onnx: Path,
    out: Path,
    batches: list[np.ndarray],
    target: str = "onnxruntime",
    placement: Placement = "measured",
    full_precision: list[str] | None = None,
    batch_sizes: tuple[int, ...] = (1, 32),
    threads: int | None = None,
    reduce_range: bool | None = None,
) -> PlacementResult:
    """Write the QDQ INT8 model of `float_onnx` to `out`, calibrated on `batches`.

    `reduce_range` (7-bit weights; onnxruntime target): None = where `saturating_u8s8_cpu`."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not batches:
        raise InputError("calibration_batches: no calibration images (the train split is empty)")
    if placement == "measured" and target != "onnxruntime":
        raise InputError(
            "int8_placement: measured times onnxruntime's CPU kernels; use all for "
            f"int8_target {target}"
        )
    input_name = onnx.load(str(float_onnx), load_external_data=False).graph.input[0].name
    reader = _Batches(input_name, batches)
    with tempfile.TemporaryDirectory(prefix="compress-int8-") as tmp:
        work = Path(tmp)
        pre = work / "pre.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(float_onnx), str(pre))
        model = onnx.load(str(pre))
        exclude = module_nodes(model, full_precision or [])
        cache = work / "calibration.json"
        trial = work / "trial.onnx"
        if reduce_range is None:
            reduce_range = saturating_u8s8_cpu()
        result = PlacementResult(placement, reduce_range=reduce_range and target == "onnxruntime")
        _quantize(pre, trial, reader, cache, target, exclude, reduce_range)
        if placement == "measured":
            sizes = list(batch_sizes)
            candidate = work / "candidate.onnx"
            for group, nodes in node_groups(model).items():
                _quantize(pre, candidate, reader, cache, target, [*exclude, *nodes], reduce_range)
                ratio = paired_latency_ratio(trial, candidate, sizes, threads)
                kept = ratio < 1 - MIN_GAIN
                result.trials.append({"group": group, "latency_ratio": ratio, "float": kept})
                if kept:
                    exclude = [*exclude, *nodes]
                    result.excluded_groups.append(group)
                    shutil.copyfile(candidate, trial)
            result.latency_vs_fp32 = paired_latency_ratio(pre, trial, sizes, threads)
            logger.info(
                f"int8 placement: float groups {result.excluded_groups or 'none'}; latency "
                f"{result.latency_vs_fp32:.2f}x FP32's (mean over batch {', '.join(map(str, sizes))})"
            )
        result.excluded_nodes = exclude
        onnx.checker.check_model(str(trial))
        shutil.copyfile(trial, out)
    return result


def onnx_int8_size(qdq: onnx.ModelProto, reference: onnx.ModelProto) -> dict[str, float | int]:
    """The QDQ model's stored weights (INT8 tensors, their scales, whatever stayed float) against
    the FP32 model's."""
    from onnx import numpy_helper

    def stored(model: onnx.ModelProto) -> int:
        return sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)

    int8 = sum(
        int(np.prod(i.dims))
        for i in qdq.graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2
    )
    size, fp32 = stored(qdq), stored(reference)
    producers = {o: n.op_type for n in qdq.graph.node for o in n.output}
    weighted = [n for n in qdq.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    int8_layers = sum(producers.get(n.input[1]) == "DequantizeLinear" for n in weighted)
    return {
        "int8_weights": int8,
        "int8_layers": int8_layers,  # conv/gemm/matmul layers with INT8 weights ...
        "weight_layers": len(weighted),  # ... of all of them
        "bits_per_weight": 8 * size / max(fp32 // 4, 1),
        "quantized_size_bytes": size,
        "fp32_size_bytes": fp32,
        "compression_ratio": fp32 / max(size, 1),
    }


class OnnxInt8Model(nn.Module):
    """A QDQ INT8 ONNX model run by onnxruntime behind the nn.Module interface, with the float
    model it was quantized from (for the float graph's facts). The ONNX bytes are a buffer, so
    the model saves and reloads as one safetensors file."""

    def __init__(self, float_model: nn.Module, onnx_bytes: bytes = b""):
        super().__init__()
        self.float_model = float_model.eval().requires_grad_(False)
        self.register_buffer("qdq_onnx", _bytes_tensor(onnx_bytes))
        self._session: Any = None

    def onnx_bytes(self) -> bytes:
        return self.qdq_onnx.cpu().numpy().tobytes()

    def deployed_size_bytes(self) -> int:
        return int(self.qdq_onnx.numel())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "qdq_onnx"
        if key in state_dict:  # any length: resize the buffer to the saved model's bytes
            self.qdq_onnx = torch.empty(state_dict[key].shape, dtype=torch.uint8)
            self._session = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_session"] = None  # an onnxruntime session does not copy or pickle
        return state

    def train(self, mode: bool = True) -> OnnxInt8Model:
        return super().train(False)  # an onnxruntime model only infers

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.qdq_onnx.numel() == 0:
            raise InputError("this INT8 model holds no ONNX model (it was never quantized)")
        if self._session is None:
            from compress.deploy.onnx_export import onnxruntime_session

            self._session = onnxruntime_session(self.onnx_bytes())
        name = self._session.get_inputs()[0].name
        out = self._session.run(None, {name: images.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out).to(images.device)


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
        if data
        else torch.zeros(0, dtype=torch.uint8)
    )


register_int8_route("onnxruntime", lambda model, int8: OnnxInt8Model(model))
