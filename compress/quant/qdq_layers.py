"""The quantized layers of a Q/DQ ONNX model, and the same model with some of them back in float.

A quantized layer is a Conv, Gemm or MatMul whose weight comes through a DequantizeLinear. Putting
it back in float rewires only that node: each input that arrives through DequantizeLinear is
replaced by the float tensor behind it (the QuantizeLinear's input for an activation, clipped to
the quantizer's range in models from onnxruntime's quantizer, which folds Relu and Clip into it;
the float weight for a parameter), and what no longer feeds anything is pruned. The rest of the graph keeps
its Q/DQ nodes, so the edited model is exactly what deploys: onnxruntime runs the layer with its
float kernel, and TensorRT builds it in FP16 or FP32 (whichever the engine allows) since no Q/DQ
pins it to INT8. Both onnxruntime's quantizer and Brevitas write this form.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from compress.quant.ort_int8 import node_module

ORT_QUANTIZER = "onnx.quantize"  # the producer_name onnxruntime's quantizer writes
LAYER_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
# Nodes between a QuantizeLinear and its DequantizeLinear that only restrict the integer range.
_PASS_THROUGH = ("Clip", "Cast")


@dataclass(frozen=True)
class QuantLayer:
    """A quantized conv/linear layer: its ONNX node, the module it came from, its op and size."""

    node: str
    module: str
    op_type: str
    weights: int

    def to_dict(self) -> dict[str, str | int]:
        return asdict(self)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in graph.node for out in n.output}


def quantized_layers(
    model: onnx.ModelProto, reference: onnx.ModelProto | None = None
) -> list[QuantLayer]:
    """Every conv/linear node whose weight is dequantized from integers, in graph order.

    Module names come from the node names, or from `reference` (the FP32 export of the same
    model) where every one of its conv/linear nodes is quantized: the i-th layer is then its i-th
    (Brevitas renames the modules it traces: `layer1.0.conv1` becomes `layer1_0_conv1`)."""
    graph = model.graph
    producers = _producers(graph)
    inits = {i.name: i for i in graph.initializer}
    layers = []
    for node in graph.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        source = _float_source(dq, producers)
        init = inits.get(source) or inits.get(dq.input[0])
        weights = int(np.prod(init.dims)) if init is not None else 0
        layers.append(QuantLayer(node.name, node_module(node), node.op_type, weights))
    if reference is not None:
        originals = [n for n in reference.graph.node if n.op_type in LAYER_OPS]
        same = [n.op_type for n in originals] == [layer.op_type for layer in layers]
        if same and any(
            node_module(n) != layer.module for n, layer in zip(originals, layers, strict=True)
        ):
            layers = [
                QuantLayer(layer.node, node_module(n), layer.op_type, layer.weights)
                for n, layer in zip(originals, layers, strict=True)
            ]
    return layers


def _quantizer(dq: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    """The QuantizeLinear whose integers a DequantizeLinear reads, if one made them."""
    up = producers.get(dq.input[0])
    while up is not None and up.op_type in _PASS_THROUGH:
        up = producers.get(up.input[0])
    return up if up is not None and up.op_type == "QuantizeLinear" else None


def _float_source(dq: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> str | None:
    """The float tensor a DequantizeLinear reproduces, when a QuantizeLinear made its input."""
    q = _quantizer(dq, producers)
    return None if q is None else q.input[0]


_INT_RANGE = {
    onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT16: (0, 65535),
    onnx.TensorProto.INT16: (-32768, 32767),
}


def _saturated(
    q: onnx.NodeProto,
    graph: onnx.GraphProto,
    inits: dict[str, onnx.TensorProto],
    done: dict[str, str],
) -> str:
    """The float input of `q` clipped to the range `q` can represent, without its rounding.

    onnxruntime's quantizer drops a Relu or Clip whose range the QuantizeLinear's saturation
    already gives (a uint8 zero point of 0 is a Relu), so the tensor before its QuantizeLinear
    may lack an activation; the Clip puts it back. Its MinMax calibration makes that range the one
    observed, so the clip costs the float layer little else. Per-channel activations are taken as
    they are."""
    source = q.input[0]
    if source in done:
        return done[source]
    scale = inits.get(q.input[1])
    zero = inits.get(q.input[2]) if len(q.input) > 2 and q.input[2] else None
    if scale is None or int(np.prod(scale.dims)) != 1:
        return source
    s = float(numpy_helper.to_array(scale).reshape(-1)[0])
    zp = 0.0 if zero is None else float(numpy_helper.to_array(zero).reshape(-1)[0])
    qmin, qmax = _INT_RANGE.get(zero.data_type if zero is not None else onnx.TensorProto.UINT8)
    out = f"{source}_saturated"
    lo, hi = f"{out}_min", f"{out}_max"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array((qmin - zp) * s, dtype=np.float32), lo),
            numpy_helper.from_array(np.array((qmax - zp) * s, dtype=np.float32), hi),
        ]
    )
    clip = onnx.helper.make_node("Clip", [source, lo, hi], [out], name=out)
    graph.node.insert(list(graph.node).index(q) + 1, clip)  # its input exists from here on
    done[source] = out
    return out


def _dequantized(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    """The float values of a DequantizeLinear of constant integers: (q - zero_point) * scale."""
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zero = (
        numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64)
        if len(dq.input) > 2 and dq.input[2]
        else np.zeros_like(scale)
    )
    if scale.ndim == 1 and scale.size > 1:  # per channel, along `axis`
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)


def with_float_layers(
    model: onnx.ModelProto,
    nodes: list[str] | set[str],
    float_weights: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A copy of the Q/DQ `model` in which the named layer nodes run in float.

    `float_weights` (initializer name -> array, e.g. the FP32 model the Q/DQ one was quantized
    from) supplies a layer's original float weights where the quantizer kept the name (it writes
    `W_quantized` for `W`); otherwise a weight is the dequantized integers."""
    wanted = set(nodes)
    out = copy.deepcopy(model)
    graph = out.graph
    producers = _producers(graph)
    inits = {i.name: i for i in graph.initializer}
    known = {n.name for n in graph.node}
    missing = sorted(wanted - known)
    if missing:
        raise KeyError(f"no node named {', '.join(missing)}")
    added: dict[str, onnx.TensorProto] = {}
    clipped: dict[str, str] = {}
    # onnxruntime's quantizer folds Relu/Clip into QuantizeLinear; exporters that keep every
    # activation explicit (Brevitas, torch) need the tensor as it is.
    saturate = model.producer_name == ORT_QUANTIZER
    for node in list(graph.node):
        if node.name not in wanted:
            continue
        for i, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = _quantizer(dq, producers)
            if q is not None:
                node.input[i] = _saturated(q, graph, inits, clipped) if saturate else q.input[0]
                continue
            if dq.input[0] not in inits:
                continue  # integers computed at run time: leave the node's input as it is
            stem = dq.input[0].removesuffix("_quantized")
            values = (float_weights or {}).get(stem)
            expected = tuple(inits[dq.input[0]].dims)
            if values is None or tuple(values.shape) != expected:
                values = _dequantized(dq, inits)
            float_name = f"{stem}_float"
            if float_name not in added:
                added[float_name] = numpy_helper.from_array(values.astype(np.float32), float_name)
            node.input[i] = float_name
    graph.initializer.extend(added.values())
    _prune(graph)
    return out


def _prune(graph: onnx.GraphProto) -> None:
    """Remove the nodes whose outputs nothing reads, then the initializers nothing reads."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def float_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The float initializers of a (float) model by name."""
    return {
        i.name: numpy_helper.to_array(i)
        for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT
    }
