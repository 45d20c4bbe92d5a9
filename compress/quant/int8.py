"""Deployable INT8 through Brevitas graph quantization, in the form onnxruntime and TensorRT run.

The float model is traced with torch.fx, BatchNorm is folded into the preceding convolutions, and
every conv/linear gets symmetric per-channel INT8 weights (zero point 0) and an INT32 bias; every
activation that feeds one is quantized per tensor. The target decides the activations' sign:
- `onnxruntime`: unsigned 8-bit after ReLU, signed elsewhere. onnxruntime's CPU kernels are fast
  for U8S8 (uint8 activations, int8 weights) and slower than FP32 for S8S8.
- `tensorrt`: signed 8-bit everywhere, the only activation type TensorRT's Q/DQ accepts.
Weights use the full signed range, so the Q/DQ export needs no Clip nodes.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from compress.errors import InputError
from compress.models.registry import register_int8_route

Int8Target = Literal["onnxruntime", "tensorrt"]
INT8_OPSET = 13


def quantize_int8(model: nn.Module, target: Int8Target, input_size: tuple[int, int, int]):
    """A quantized copy of `model` (a Brevitas fx GraphModule), with every quantizer initialised.

    Its scales are placeholders until `calibrate` (or a state dict saved from a calibrated model)
    sets them.
    """
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.graph.quantize import (
        COMPUTE_LAYER_MAP,
        QUANT_ACT_MAP,
        UNSIGNED_ACT_TUPLE,
        preprocess_for_quantize,
        quantize,
    )
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat

    weight_quant = Int8WeightPerChannelFloat.let(narrow_range=False)
    layer_map = dict(COMPUTE_LAYER_MAP)
    for kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear):
        layer, options = layer_map[kind]
        layer_map[kind] = (layer, {**options, "weight_quant": weight_quant})
    act_map, unsigned = dict(QUANT_ACT_MAP), UNSIGNED_ACT_TUPLE
    if target == "tensorrt":
        for kind, (layer, options) in QUANT_ACT_MAP.items():
            act_map[kind] = (layer, {**options, "act_quant": Int8ActPerTensorFloat})
        unsigned = ()
    float_model = copy.deepcopy(model).eval().cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            traced = preprocess_for_quantize(float_model, relu6_to_relu=False)
            quantized = quantize(
                traced,
                compute_layer_map=layer_map,
                quant_act_map=act_map,
                unsigned_act_tuple=unsigned,
            )
        except Exception as e:  # noqa: BLE001 - tracing fails in many ways; all mean the same
            raise Int8Unsupported(
                f"INT8 quantization (Brevitas) needs a model torch.fx can trace; "
                f"{type(model).__name__} failed ({type(e).__name__}: {e})"
            ) from None
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(2, *input_size, generator=generator)
        with torch.no_grad(), calibration_mode(quantized):
            run_located(quantized, example, type(model).__name__, "calibration")
    return quantized.eval()


class Int8Unsupported(InputError):
    """Brevitas cannot quantize (or export) this model; the message names the op that stopped it."""


class _ModuleStack:
    """The modules running at each moment of a forward pass (innermost last), by forward hooks."""

    def __init__(self, model: nn.Module):
        self.stack: list[tuple[str, nn.Module]] = []
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str):
        def hook(module, args):
            self.stack.append((name, module))

        return hook

    def _leave(self, module, args, output):
        if self.stack:
            self.stack.pop()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _failing_node(graph_module: nn.Module, call) -> str | None:
    """The fx node of `graph_module` whose execution raises when `call()` runs it again, e.g.
    `call_method chunk(stage2_0_cat, 2)`; None when it is no fx graph or nothing raises."""
    if not hasattr(graph_module, "graph"):
        return None
    if type(graph_module).__module__.startswith("brevitas"):  # Brevitas' backported torch.fx
        from brevitas.backport.fx.interpreter import Interpreter
    else:
        from torch.fx import Interpreter

    class Locator(Interpreter):
        failed: str | None = None

        def run_node(self, n):
            try:
                return super().run_node(n)
            except Exception:
                if self.failed is None:
                    target = getattr(n.target, "__name__", n.target)
                    args = ", ".join(str(a) for a in n.args)
                    self.failed = f"{n.op} {target}({args})"
                raise

    locator = Locator(graph_module)
    graph_module.forward = locator.run  # the instance attribute shadows the generated forward
    try:
        call()
    except Exception:  # noqa: BLE001 - the failure is what we look for
        pass
    finally:
        del graph_module.forward
    return locator.failed


def run_located(
    model: nn.Module, example: torch.Tensor, model_name: str, what: str, fn=None
) -> Any:
    """Run `fn()` (default: `model(example)`); if it raises, raise Int8Unsupported naming the
    module (path and type) or the graph op that was running."""
    call = fn if fn is not None else (lambda: model(example))
    stack = _ModuleStack(model)
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - Brevitas fails on unsupported ops in many ways
        where = None
        inner = [(n, m) for n, m in stack.stack if n]
        if inner:
            name, module = inner[-1]
            where = f"module {name} ({type(module).__name__})"
        else:
            stack.close()
            node = _failing_node(model, call)
            where = node and f"op {node}"
        raise Int8Unsupported(
            f"INT8 quantization (Brevitas) of {model_name} failed in {what} at "
            f"{where or 'an unknown op'}: {type(e).__name__}: {e}"
        ) from None
    finally:
        stack.close()


@torch.no_grad()
def calibrate(model: nn.Module, loader, device: torch.device, batches: int) -> int:
    """Set activation scales from `batches` batches of `loader`; returns the images seen."""
    from brevitas.graph.calibrate import calibration_mode

    model.eval().to(device)
    seen = 0
    with calibration_mode(model):
        for i, (images, *_) in enumerate(loader):
            if i >= batches:
                break
            model(images.to(device))
            seen += images.shape[0]
    return seen


def is_int8(model: nn.Module) -> bool:
    """True when `model` holds Brevitas quantized layers."""
    try:
        from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
    except ImportError:
        return False
    return any(isinstance(m, QuantWeightBiasInputOutputLayer) for m in model.modules())


def int8_size(model: nn.Module) -> dict[str, float | int]:
    """Bytes of the INT8 weights with their per-channel scales, against FP32 for all parameters;
    and, as Polino et al. count sizes, the mean Huffman code length of the INT8 values."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    from compress.quant.size import huffman_mean_bits

    layers = [m for m in model.modules() if isinstance(m, QuantWeightBiasInputOutputLayer)]
    with torch.no_grad():
        huffman = huffman_mean_bits(m.quant_weight().int() for m in layers)
    weights = sum(m.weight.numel() for m in layers)
    channels = sum(m.weight.shape[0] for m in layers)
    biases = sum(m.bias.numel() for m in layers if m.bias is not None)
    quantized = {id(m.weight) for m in layers} | {id(m.bias) for m in layers if m.bias is not None}
    # What stays float: parameters of no quantized layer (activation scales included).
    other = sum(p.numel() for p in model.parameters() if id(p) not in quantized)
    total_params = weights + biases + other
    size = weights + 4 * channels + 4 * biases + 4 * other
    scale_bits = 32 * channels / max(weights, 1)
    return {
        "int8_weights": weights,
        "bits_per_weight": 8 + scale_bits,
        "huffman_bits_per_weight": huffman + scale_bits,
        "quantized_size_bytes": size,
        "fp32_size_bytes": 4 * total_params,
        "compression_ratio": 4 * total_params / max(size, 1),
    }


def export_int8_onnx(model: nn.Module, path: Path, input_size: tuple[int, int, int]) -> Path:
    """Write the Q/DQ (QCDQ) ONNX model of a quantized model, with a dynamic batch axis and
    short tensor names (`compact_tensor_names`)."""
    import onnx
    from brevitas.export import export_onnx_qcdq

    from compress.deploy.onnx_export import checked_onnx_file, compact_tensor_names

    with checked_onnx_file(path) as onnx_path:
        # The dynamo route rejects quantized (INT32) bias; the TorchScript one exports it.
        example = torch.zeros(2, *input_size)
        run_located(
            model.eval().cpu(),
            example,
            type(model).__name__,
            "Q/DQ ONNX export",
            lambda: export_onnx_qcdq(
                model,
                example,
                export_path=str(onnx_path),
                dynamo=False,
                opset_version=INT8_OPSET,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            ),
        )
        onnx.save(compact_tensor_names(onnx.load(str(onnx_path))), str(onnx_path))
    return path


register_int8_route(
    "brevitas",
    lambda model, int8: quantize_int8(model, int8["target"], tuple(int8["input_size"])),
)
