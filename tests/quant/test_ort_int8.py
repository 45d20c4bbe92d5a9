"""INT8 through onnxruntime's quantizer: module exclusion, the TensorRT form, the measured
placement, and the model that carries its Q/DQ bytes through save and reload."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from compress.errors import InputError
from compress.models import ModelSpec, load_model, save_model
from compress.pipeline import model_facts
from compress.quant.ort_int8 import (
    GROUPS,
    OnnxInt8Model,
    node_groups,
    node_module,
    onnx_int8_size,
    quantize_onnx_int8,
)

SIZE = (3, 32, 32)


def _int8_weight_owners(qdq: onnx.ModelProto) -> set[str]:
    producers = {o: n for n in qdq.graph.node for o in n.output}
    return {
        node_module(n)
        for n in qdq.graph.node
        if n.op_type in ("Conv", "Gemm")
        and producers.get(n.input[1]) is not None
        and producers[n.input[1]].op_type == "DequantizeLinear"
    }


def test_full_precision_modules_stay_float_and_the_model_reloads(resnet20, tmp_path):
    model, path, batches = resnet20
    out = tmp_path / "int8.onnx"
    result = quantize_onnx_int8(path, out, batches, placement="all", full_precision=["layer1"])
    qdq = onnx.load(str(out))
    owners = _int8_weight_owners(qdq)
    assert owners and not any(o.startswith("layer1.") for o in owners)
    assert any(o.startswith("layer2.") for o in owners) and "conv1" in owners
    assert result.excluded_nodes and result.placement == "all"
    size = onnx_int8_size(qdq, onnx.load(str(path)))
    assert 0 < size["int8_layers"] < size["weight_layers"] == 20

    int8 = OnnxInt8Model(model, out.read_bytes())
    spec = ModelSpec(
        "cifar_resnet20",
        {"num_classes": model.linear.out_features},
        int8={"route": "onnxruntime", "target": "onnxruntime", "input_size": list(SIZE)},
    )
    reloaded, reloaded_spec = load_model(save_model(int8, spec, tmp_path / "m.safetensors"))
    assert isinstance(reloaded, OnnxInt8Model) and reloaded_spec == spec
    x = torch.from_numpy(batches[0][:4])
    torch.testing.assert_close(reloaded(x), int8(x), rtol=0, atol=0)
    float_out = model(x)
    assert (reloaded(x).argmax(1) == float_out.argmax(1)).float().mean() >= 0.5
    facts = model_facts(reloaded, SIZE, spec)
    assert facts["size_bytes"] == len(out.read_bytes())
    assert facts["flops"] == model_facts(model, SIZE)["flops"]  # the float graph's


def test_unknown_full_precision_module_is_named(resnet20, tmp_path):
    _, path, batches = resnet20
    with pytest.raises(InputError, match="full_precision: no ONNX node comes from module.*nope"):
        quantize_onnx_int8(
            path, tmp_path / "q.onnx", batches, placement="all", full_precision=["nope"]
        )


def test_tensorrt_form_is_signed_symmetric_with_float_bias(resnet20, tmp_path):
    _, path, batches = resnet20
    out = tmp_path / "trt.onnx"
    quantize_onnx_int8(path, out, batches, target="tensorrt", placement="all")
    graph = onnx.load(str(out)).graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    zero_points = [constants[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert not any(a.dtype == np.int32 for a in constants.values())  # bias stays float
    with pytest.raises(InputError, match="placement: measured"):
        quantize_onnx_int8(path, out, batches, target="tensorrt", placement="measured")


def test_measured_placement_tries_every_group_and_keeps_a_valid_model(resnet20, tmp_path):
    _, path, batches = resnet20
    out = tmp_path / "measured.onnx"
    result = quantize_onnx_int8(path, out, batches, placement="measured", batch_sizes=(1,))
    groups = list(node_groups(onnx.load(str(path))))
    assert [t["group"] for t in result.trials] == [g for g in GROUPS if g in groups]
    assert result.excluded_groups == [t["group"] for t in result.trials if t["float"]]
    assert all(t["float"] == (t["latency_ratio"] < 0.97) for t in result.trials)
    assert result.latency_vs_fp32 is not None and result.latency_vs_fp32 > 0
    onnx.checker.check_model(str(out))


def test_node_module_reads_both_exporters_names():
    torchscript = helper.make_node("Conv", ["x", "w"], ["y"], name="/blocks/blocks.0/conv_dw/Conv")
    assert node_module(torchscript) == "blocks.0.conv_dw"
    nested = "/features/features.2/block/block.0/block.0.0/Conv"  # torchvision MobileNetV3
    assert node_module(helper.make_node("Conv", ["x", "w"], ["y"], name=nested)) == (
        "features.2.block.0.0"
    )
    dynamo = helper.make_node("Conv", ["x", "w"], ["y"], name="node_Conv_12")
    entry = dynamo.metadata_props.add()
    entry.key, entry.value = "pkg.torch.onnx.name_scopes", "['', 'layer1', 'layer1.0.bn1', 'bn']"
    assert node_module(dynamo) == "layer1.0.bn1"
