"""ONNX export with the current torch exporter, `onnx.checker`, and onnxruntime parity on real inputs."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from compress.deploy.external_data import external_data_files
from compress.io import atomic_path

if TYPE_CHECKING:
    import onnx


@contextmanager
def checked_onnx_file(path: Path) -> Iterator[Path]:
    """A temporary .onnx path to export to; once written, `onnx.checker` passes it and it replaces
    `path` atomically (exporter warnings are silenced)."""
    import onnx

    with atomic_path(Path(path)) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_path = tmp.with_suffix(".onnx")
        try:
            yield onnx_path
            external_data_files(onnx_path)  # before the checker reads any
            onnx.checker.check_model(str(onnx_path))
            onnx_path.replace(tmp)
        finally:
            onnx_path.unlink(missing_ok=True)


def export_onnx(
    model: nn.Module,
    path: Path,
    input_size: tuple[int, int, int],
    opset: int = 20,
    dynamo: bool = True,
) -> Path:
    """Write `model` as one ONNX file with a dynamic batch axis named `batch`, then check it."""
    model = copy.deepcopy(model).eval().cpu()
    # Trace with batch 2: torch.export specialises size-1 dimensions.
    example = torch.zeros(2, *input_size)
    with checked_onnx_file(path) as onnx_path:
        if dynamo:
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: "batch"},),
                verbose=False,
            )
            program.save(str(onnx_path), external_data=False)
        else:
            torch.onnx.export(
                model,
                (example,),
                str(onnx_path),
                dynamo=False,
                opset_version=min(opset, 20),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    return path


def compact_tensor_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every tensor but the graph's inputs and outputs renamed `t0`, `t1`, ... in
    the order the graph first mentions them; node names (which name the modules) are kept.

    Exporters name tensors by scope (`/layer1/layer1.0/conv1/input_quant/export_handler/
    QuantizeLinear_output_0`), which in a small INT8 model is a fifth of the file. A graph with
    subgraphs (If, Loop) is returned unchanged."""
    import onnx

    graph = model.graph
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    ):
        return model
    keep = {v.name for v in (*graph.input, *graph.output)}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.input[:] = [short(x) for x in node.input]
        node.output[:] = [short(x) for x in node.output]
    for info in graph.value_info:
        info.name = short(info.name)
    return out


def export_float_reference(model: nn.Module, path: Path, input_size: tuple[int, int, int]) -> Path:
    """The FP32 ONNX model that INT8 quantization starts from and is compared with.

    The TorchScript exporter: a tenth of the dynamo one's time, BatchNorm folded all the same,
    and nodes named by module scope (what `full_precision` and the sensitivity report name);
    the dynamo exporter for a model the TorchScript tracer cannot take."""
    try:
        return export_onnx(model, path, input_size, opset=17, dynamo=False)
    except Exception:  # noqa: BLE001 - a model the TorchScript tracer cannot take
        return export_onnx(model, path, input_size)


def onnxruntime_session(
    path: Path | bytes, threads: int | None = None, provider: str = "cpu", spinning: bool = True
):
    """An inference session (of a file, or of a serialised model) with all graph optimisations
    and an explicit thread count. A file's external data must lie in its folder
    (`compress.deploy.external_data`).

    `provider`: `cpu`, or `cuda` for the CUDA execution provider (an error names what is missing).
    `spinning: False` stops idle worker threads from spinning, for sessions timed in alternation
    (a spinning session takes cores from the one being timed).
    """
    import onnxruntime as ort

    from compress.errors import InputError

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider"]}.get(provider)
    if providers is None:
        raise InputError(f"onnxruntime provider {provider!r}: expected cpu or cuda")
    if providers[0] not in ort.get_available_providers():
        raise InputError(
            f"onnxruntime {ort.__version__} has no {providers[0]} (available: "
            f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a CUDA host, "
            "or use provider cpu"
        )
    if not isinstance(path, bytes):
        external_data_files(path)
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=providers)


@torch.no_grad()
def check_parity(model: nn.Module, path: Path, images: torch.Tensor) -> dict[str, Any]:
    """Compare onnxruntime with PyTorch on `images`: max/mean abs diff of logits, argmax agreement."""
    model = copy.deepcopy(model).eval().cpu()
    expected = model(images).float().numpy()
    session = onnxruntime_session(path)
    name = session.get_inputs()[0].name
    got = session.run(None, {name: images.numpy().astype(np.float32)})[0]
    diff = np.abs(got - expected)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float((got.argmax(1) == expected.argmax(1)).mean()),
        "parity_samples": int(images.shape[0]),
        "max_abs_logit": float(np.abs(expected).max()),
    }


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by onnxruntime behind the nn.Module call interface, for `evaluate`."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        self.session = onnxruntime_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: images.cpu().numpy().astype(np.float32)}
        return torch.from_numpy(self.session.run(None, feed)[0])
