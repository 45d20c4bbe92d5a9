"""The quantized layers of a Q/DQ ONNX model, and the same model with some of them back in float.

A quantized layer is a Conv, Gemm or MatMul whose weight comes through a DequantizeLinear; the
arithmetic ops between layers that read dequantized activations (residual adds, squeeze-excite
multiplies, sigmoids, pooling) can go back to float the same way. Putting one back in float
rewires only that node: each input that arrives through DequantizeLinear is
replaced by the float tensor behind it (the QuantizeLinear's input for an activation, clipped to
the quantizer's range in models from onnxruntime's quantizer, which folds Relu and Clip into it;
the float weight for a parameter), and what no longer feeds anything is pruned. The rest of the graph keeps
its Q/DQ nodes, so the edited model is exactly what deploys: onnxruntime runs the layer with its
float kernel, and TensorRT builds it in FP16 or FP32 (whichever the engine allows) since no Q/DQ
pins it to INT8. Both onnxruntime's quantizer and Brevitas write this form.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from compress.quant.ort_int8 import node_module

ORT_QUANTIZER = "onnx.quantize"  # the producer_name onnxruntime's quantizer writes
LAYER_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
# Ops that compute on a dequantized activation (pass-through ops such as MaxPool or Reshape
# only move integers, so putting them in float changes nothing).
ACTIVATION_OPS = (
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Softmax",
    "GlobalAveragePool",
    "AveragePool",
    "ReduceMean",
)
# Nodes between a QuantizeLinear and its DequantizeLinear that only restrict the integer range.
_PASS_THROUGH = ("Clip", "Cast")
# Ops that move or select values without computing new ones: a float layer that reads one of them
# on a dequantized activation gets a float copy of it on the float source.
_MOVES = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "MaxPool", "Slice", "Pad")


@dataclass(frozen=True)
class QuantLayer:
    """A quantized conv/linear layer: its ONNX node, the module it came from, its op and size."""

    node: str
    module: str
    op_type: str
    weights: int

    def to_dict(self) -> dict[str, str | int]:
        return asdict(self)


def with_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`, or a copy in which every node has a name of its own (`{op}_{index}` for a node
    that had none or shared one): layers are chosen by node name."""
    names = [n.name for n in model.graph.node]
    if all(names) and len(set(names)) == len(names):
        return model
    out = copy.deepcopy(model)
    seen: set[str] = set()
    for i, node in enumerate(out.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return out


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in graph.node for out in n.output}


def quantized_layers(
    model: onnx.ModelProto, reference: onnx.ModelProto | None = None
) -> list[QuantLayer]:
    """What can go back to float, in graph order: every conv/linear node whose weight is
    dequantized from integers, and every arithmetic op (`ACTIVATION_OPS`: residual adds, the
    multiplies and sigmoids of squeeze-excite and swish, pooling) that reads a dequantized
    activation. The latter have `weights == 0`.

    Module names come from the node names, or from `reference` (the FP32 export of the same
    model) where every one of its conv/linear nodes is quantized: the i-th layer is then its i-th
    (Brevitas renames the modules it traces: `layer1.0.conv1` becomes `layer1_0_conv1`)."""
    graph = model.graph
    producers = _producers(graph)
    inits = {i.name: i for i in graph.initializer}
    units = []
    for node in graph.node:
        if node.op_type in LAYER_OPS and len(node.input) >= 2:
            dq = producers.get(node.input[1])
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            source = _float_source(dq, producers)
            init = inits.get(source) or inits.get(dq.input[0])
            weights = int(np.prod(init.dims)) if init is not None else 0
            units.append(QuantLayer(node.name, node_module(node), node.op_type, weights))
        elif node.op_type in ACTIVATION_OPS and any(
            _quantizer(producers[i], producers) is not None
            for i in node.input
            if i in producers and producers[i].op_type == "DequantizeLinear"
        ):
            units.append(QuantLayer(node.name, node_module(node), node.op_type, 0))
    if reference is not None:
        layers = [u for u in units if u.op_type in LAYER_OPS]
        originals = [n for n in reference.graph.node if n.op_type in LAYER_OPS]
        same = [n.op_type for n in originals] == [u.op_type for u in layers]
        if same and any(node_module(n) != u.module for n, u in zip(originals, layers, strict=True)):
            renamed = {
                u.node: QuantLayer(u.node, node_module(n), u.op_type, u.weights)
                for n, u in zip(originals, layers, strict=True)
            }
            units = [renamed.get(u.node, u) for u in units]
    return units


def adjacent_units(model: onnx.ModelProto, units: list[QuantLayer]) -> list[tuple[str, str]]:
    """Pairs of units (producer node, consumer node) where the consumer reads, through a
    QuantizeLinear and DequantizeLinear, what the producer computes (possibly after float ops
    that are not units themselves, such as a Relu or a Reshape). In float together, the two share
    one float region: the Q/DQ between them, and the layout conversions around it, go."""
    graph = model.graph
    producers = _producers(graph)
    names = {u.node for u in units}
    pairs = []
    for node in graph.node:
        if node.name not in names:
            continue
        for tensor in node.input:
            dq = producers.get(tensor)
            q = (
                _quantizer(dq, producers)
                if dq is not None and dq.op_type == "DequantizeLinear"
                else None
            )
            up = producers.get(q.input[0]) if q is not None else None
            for _ in range(4):  # through a few float ops that are not units
                if (
                    up is None
                    or up.name in names
                    or up.op_type in ("QuantizeLinear", "DequantizeLinear")
                ):
                    break
                up = producers.get(up.input[0]) if up.input else None
            if up is not None and up.name in names and (up.name, node.name) not in pairs:
                pairs.append((up.name, node.name))
    return pairs


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
    source: str | None = None,
) -> str:
    """The float input of `q` (or `source`, the same values computed in float) clipped to the
    range `q` can represent, without its rounding: for a model from onnxruntime's quantizer when
    its FP32 model is not at hand.

    That quantizer drops a Relu or Clip whose range the QuantizeLinear's saturation already gives
    (a uint8 zero point of 0 is a Relu), so the tensor before its QuantizeLinear may lack an
    activation; the Clip puts it back, along with the calibrated range's clipping. Per-channel
    activations are taken as they are."""
    source = source or q.input[0]
    if source in done:
        return done[source]
    scale = inits.get(q.input[1])
    zero = inits.get(q.input[2]) if len(q.input) > 2 and q.input[2] else None
    if scale is None or int(np.prod(scale.dims)) != 1:
        return source
    s = float(numpy_helper.to_array(scale).reshape(-1)[0])
    zp = 0.0 if zero is None else float(numpy_helper.to_array(zero).reshape(-1)[0])
    qmin, qmax = _INT_RANGE.get(zero.data_type if zero is not None else onnx.TensorProto.UINT8)
    return _bounded(source, (qmin - zp) * s, (qmax - zp) * s, q, graph, done)


def _bounded(
    source: str,
    lo: float,
    hi: float,
    q: onnx.NodeProto,
    graph: onnx.GraphProto,
    done: dict[str, str],
) -> str:
    """`source` clipped to [lo, hi] by a Clip node placed right after `q` (shared by every float
    reader of `source`)."""
    if source in done:
        return done[source]
    out = f"{source}_float_range"
    names = (f"{out}_min", f"{out}_max")
    graph.initializer.extend(
        numpy_helper.from_array(np.array(v, dtype=np.float32), name)
        for v, name in zip((lo, hi), names, strict=True)
    )
    clip = onnx.helper.make_node("Clip", [source, *names], [out], name=out)
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
    model: onnx.ModelProto, nodes: list[str] | set[str], fp32: FloatReference | None = None
) -> onnx.ModelProto:
    """A copy of the Q/DQ `model` in which the named nodes run in float.

    An activation input becomes the tensor before its QuantizeLinear, with the Relu or Clip that
    `fp32` says onnxruntime's quantizer folded into it. Without `fp32`, a model from onnxruntime's
    quantizer gets the QuantizeLinear's own range instead (`_saturated`), and any other model the
    tensor as it is (Brevitas and torch keep every activation explicit). An input that ops which
    only move values (`_MOVES`: Flatten, Reshape, MaxPool, Pad, ...) made from a dequantized
    activation gets a float copy of those ops on that tensor, so a classifier behind a Flatten
    reads no quantized activation either. A weight is the FP32
    weight `fp32` holds under the quantizer's name (`W` for `W_quantized`), else the dequantized
    integers."""
    wanted = set(nodes)
    if "" in wanted:
        raise KeyError("a node without a name (name them with with_node_names)")
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
    moved: set[str] = set()
    # onnxruntime's quantizer folds Relu/Clip into QuantizeLinear; exporters that keep every
    # activation explicit (Brevitas, torch) need the tensor as it is.
    saturate = fp32 is None and model.producer_name == ORT_QUANTIZER

    def float_activation(dq: onnx.NodeProto) -> str | None:
        """The float tensor behind a dequantized activation (None: not an activation)."""
        q = _quantizer(dq, producers)
        if q is None:
            return None
        name = q.input[0]
        source = float_move(name) or name  # the quantized tensor may itself be moved integers
        if fp32 is not None and name in fp32.activations:
            return _bounded(source, *fp32.activations[name], q, graph, clipped)
        return _saturated(q, graph, inits, clipped, source) if saturate else source

    def float_move(name: str) -> str | None:
        """`name` recomputed in float where a chain of `_MOVES` made it from a dequantized
        activation: the chain copied onto the float tensor behind it (None: not such a chain)."""
        move = producers.get(name)
        if move is None or move.op_type not in _MOVES or len(move.output) != 1:
            return None
        up = producers.get(move.input[0])
        if up is None:
            return None
        source = float_activation(up) if up.op_type == "DequantizeLinear" else None
        source = source or float_move(move.input[0])
        if source is None:
            return None
        out = f"{name}_float_moved"
        if out not in moved:
            copy_ = onnx.helper.make_node(
                move.op_type, [source, *move.input[1:]], [out], name=f"{move.name}_float_moved"
            )
            copy_.attribute.extend(move.attribute)
            graph.node.insert(list(graph.node).index(move) + 1, copy_)
            moved.add(out)
        return out

    for node in list(graph.node):
        if node.name not in wanted:
            continue
        for i, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is not None and dq.op_type in _MOVES:
                node.input[i] = float_move(name) or name
                continue
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            source = float_activation(dq)
            if source is not None:
                node.input[i] = source
                continue
            if dq.input[0] not in inits:
                continue  # integers computed at run time: leave the node's input as it is
            stem = dq.input[0].removesuffix("_quantized")
            values = fp32.weights.get(stem) if fp32 is not None else None
            expected = tuple(inits[dq.input[0]].dims)
            if values is None or tuple(values.shape) != expected:
                values = _dequantized(dq, inits)
            float_name = f"{stem}_float"
            if float_name not in added:
                added[float_name] = numpy_helper.from_array(values.astype(np.float32), float_name)
            node.input[i] = float_name
    graph.initializer.extend(added.values())
    _float_outputs(graph, wanted)
    _prune(graph)
    return out


def _float_outputs(graph: onnx.GraphProto, nodes: set[str]) -> None:
    """Where a named node's output is quantized only to become a graph output (the logits), the
    graph output takes the float value: its DequantizeLinear becomes an Identity."""
    outputs = {o.name for o in graph.output}
    producers = _producers(graph)
    for i, node in enumerate(graph.node):
        if node.op_type != "DequantizeLinear" or node.output[0] not in outputs:
            continue
        q = _quantizer(node, producers)
        source = producers.get(q.input[0]) if q is not None else None
        if source is not None and source.name in nodes:
            identity = onnx.helper.make_node(
                "Identity", [q.input[0]], [node.output[0]], name=node.name
            )
            graph.node.remove(node)
            graph.node.insert(i, identity)


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


@dataclass
class FloatReference:
    """What the FP32 model the Q/DQ one was quantized from says about a layer in float: its
    weights by initializer name, and the Relu/Clip (lower, upper bound) that onnxruntime's
    quantizer folded into the QuantizeLinear after each tensor."""

    weights: dict[str, np.ndarray] = field(default_factory=dict)
    activations: dict[str, tuple[float, float]] = field(default_factory=dict)


def float_reference(
    qdq: onnx.ModelProto, reference: onnx.ModelProto, weights: bool = True
) -> FloatReference:
    """The FloatReference of `qdq` from its FP32 model `reference`. onnxruntime's quantizer keeps
    the names: a weight `W` becomes `W_quantized`, and a folded Relu leaves its output name on the
    tensor before it. `weights=False` where the names may not match (Brevitas after QAT)."""
    inits = {i.name: i for i in reference.graph.initializer}
    constants = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in reference.graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }

    def scalar(name: str, default: float) -> float:
        if not name:
            return default
        if name in inits:
            return float(numpy_helper.to_array(inits[name]).reshape(-1)[0])
        return float(constants[name].reshape(-1)[0]) if name in constants else default

    bounds: dict[str, tuple[float, float]] = {}
    for n in reference.graph.node:
        if n.op_type == "Relu":
            bounds[n.output[0]] = (0.0, float("inf"))
        elif n.op_type == "Clip":
            attrs = {a.name: a.f for a in n.attribute}  # opset < 11 keeps them as attributes
            lo = scalar(n.input[1] if len(n.input) > 1 else "", attrs.get("min", -np.inf))
            hi = scalar(n.input[2] if len(n.input) > 2 else "", attrs.get("max", np.inf))
            bounds[n.output[0]] = (lo, hi)
    producers = _producers(qdq.graph)
    folded = {
        t: b
        for t, b in bounds.items()
        if t in producers and producers[t].op_type not in ("Relu", "Clip")
    }
    kept = (
        {
            i.name: numpy_helper.to_array(i)
            for i in reference.graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT
        }
        if weights
        else {}
    )
    return FloatReference(kept, folded)
