"""Deployable INT8 (Brevitas): graph form per target, save/reload, Q/DQ ONNX parity on real data."""

import re
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from compress.deploy.onnx_export import compact_tensor_names, export_float_reference
from compress.errors import InputError
from compress.io import read_json
from compress.models import ModelSpec, build_model, create_model, load_model, save_model
from compress.quant.int8 import calibrate, export_int8_onnx, is_int8, quantize_int8
from tests.conftest import run_cli, write_recipe


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(name)


@pytest.mark.parametrize(
    "target, activation_types", [("onnxruntime", {"uint8", "int8"}), ("tensorrt", {"int8"})]
)
def test_int8_graph_form_per_target(tmp_path, target, activation_types):
    """BN folded, per-channel symmetric INT8 weights, no Clip, activation sign per target; the
    saved model reloads with the same outputs."""
    torch.manual_seed(0)
    model = build_model(ModelSpec("cifar_resnet20"))
    quantized = quantize_int8(model, target, (3, 32, 32))
    batches = [(torch.randn(8, 3, 32, 32), None) for _ in range(3)]
    assert calibrate(quantized, batches, torch.device("cpu"), batches=2) == 16
    assert is_int8(quantized) and not is_int8(model)

    path = export_int8_onnx(quantized, tmp_path / "q.onnx", (3, 32, 32))
    graph = onnx.load(str(path)).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["Conv"] == 19 and ops["Gemm"] == 1
    assert "BatchNormalization" not in ops and "Clip" not in ops
    quantize_types = {
        str(_constant(graph, n.input[2]).dtype) for n in graph.node if n.op_type == "QuantizeLinear"
    }
    assert quantize_types == activation_types
    tensors = {t for n in graph.node for t in (*n.input, *n.output) if t}
    assert tensors - {"input", "logits"} and all(  # short tensor names, module-scoped nodes
        re.fullmatch(r"t\d+", t) for t in tensors - {"input", "logits"}
    )
    assert any(n.name.startswith("/conv1/") for n in graph.node)
    weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and i.dims]
    conv_weights = [w for w in weights if len(w.dims) == 4]
    assert len(conv_weights) == 19
    for node in graph.node:  # every weight's dequantization is per output channel, zero point 0
        if node.op_type == "DequantizeLinear" and node.input[0] in {w.name for w in conv_weights}:
            scale, zero = _constant(graph, node.input[1]), _constant(graph, node.input[2])
            assert scale.ndim == 1 and scale.size > 1 and not zero.any()

    spec = ModelSpec("cifar_resnet20", int8={"target": target, "input_size": [3, 32, 32]})
    reloaded, reloaded_spec = load_model(save_model(quantized, spec, tmp_path / "m.safetensors"))
    assert reloaded_spec == spec
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x), quantized.eval()(x), rtol=0, atol=0)


def test_compact_tensor_names_keep_the_model_and_shrink_the_file(tmp_path):
    """Scope-named tensors become t0, t1, ...; inputs, outputs, node names and outputs stay."""
    import onnxruntime as ort

    torch.manual_seed(0)
    path = export_float_reference(
        build_model(ModelSpec("cifar_resnet20")), tmp_path / "f.onnx", (3, 32, 32)
    )
    model = onnx.load(str(path))
    compact = compact_tensor_names(model)
    onnx.checker.check_model(compact)
    assert [n.name for n in compact.graph.node] == [n.name for n in model.graph.node]
    assert [i.name for i in compact.graph.input] == ["input"]
    assert [o.name for o in compact.graph.output] == ["logits"]
    assert len(compact.SerializeToString()) < len(model.SerializeToString()) - 2000
    x = torch.randn(3, 3, 32, 32).numpy()
    outputs = [
        ort.InferenceSession(m.SerializeToString()).run(None, {"input": x})[0]
        for m in (model, compact)
    ]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_untraceable_model_gets_a_clear_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    with pytest.raises(InputError, match="torch.fx can trace; DataDependent"):
        quantize_int8(DataDependent(), "onnxruntime", (3, 8, 8))


def test_int8_methods_take_8_bits_only(tmp_path, small_recipe):
    small_recipe["stages"] = [{"type": "quantize", "method": "qat_int8", "epochs": 1, "bits": 4}]
    result = run_cli("validate", str(write_recipe(tmp_path / "r.yaml", small_recipe)))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "stages[0]" in result.stderr and "qat_int8 quantizes to 8 bits" in result.stderr


@pytest.mark.parametrize("method", ["ptq_int8", "qat_int8"])
def test_int8_on_cifar_keeps_accuracy_and_onnx_agrees(
    tmp_path, cifar_root, resnet56_weights, resnet20_weights, method
):
    """The pretrained ResNet-20 quantized to INT8 stays within 1.5 points of FP32 on 1,000 test
    images, and onnxruntime's Q/DQ model agrees with PyTorch's within the 1-point gate (x86 CPUs
    without VNNI saturate some of onnxruntime's U8S8 sums: 0.6 points on 1,000 images seen)."""
    recipe = {
        "name": "int8",
        "data": {
            "root": str(cifar_root),
            "limit_per_class": 12,
            "test_limit_per_class": 100,
            "augment": "none",
            "batch_size": 40,
        },
        "teacher": {"model": "cifar_resnet56", "weights": str(resnet56_weights)},
        "student": {"model": "cifar_resnet20", "weights": str(resnet20_weights)},
        "stages": [
            {"type": "eval"},
            {
                "type": "quantize",
                "method": method,
                "int8_route": "brevitas",
                "epochs": 1,
                "calibration_batches": 2,
            },
            {"type": "export"},
        ],
    }
    out = tmp_path / "out"
    result = run_cli("run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    report = read_json(out / "report.json")
    models = {m["name"]: m for m in report["models"]}
    fp32, int8 = models["student"], models["01-quantize"]
    assert int8["top1"] >= fp32["top1"] - 1.5, (fp32["top1"], int8["top1"])
    export = report["stages"][2]["metrics"]
    assert export["onnx_form"] == "qdq-int8"
    assert export["torch_test_top1"] == int8["top1"]
    assert abs(export["onnx_test_top1"] - int8["top1"]) <= 1.0
    assert 7.9 < int8["bits_per_weight"] < 8.2 and int8["compression_ratio"] > 3.5
    assert 4 < int8["huffman_bits_per_weight"] < int8["bits_per_weight"]  # peaked around zero
    assert report["stages"][1]["metrics"]["calibration_images"] == 2 * 40

    saved, spec = load_model(out / "01-quantize" / "model.safetensors")
    assert spec.int8 == {"target": "onnxruntime", "input_size": [3, 32, 32]}
    assert report["stages"][1]["metrics"]["int8_route"] == "brevitas"
    pretrained, _ = create_model("cifar_resnet20", weights=resnet20_weights)
    start = quantize_int8(pretrained, "onnxruntime", (3, 32, 32)).state_dict()
    trained = saved.state_dict()
    assert trained.keys() == start.keys()
    moved = not torch.equal(trained["layer2.0.conv1.weight"], start["layer2.0.conv1.weight"])
    assert moved == (method == "qat_int8")  # BN-folded weights: kept by PTQ, trained by QAT


def test_qat_on_an_op_brevitas_cannot_quantize_names_it_and_resumes(tmp_path, tiny_image_folder):
    """QAT on ConvNeXt (a `mul` on a quantized tensor) exits 2 naming the model and the op; the
    train stage before it keeps its result, and the fixed recipe resumes after it."""
    recipe = {
        "name": "qat-convnext",
        "data": {"root": str(tiny_image_folder), "batch_size": 16, "augment": "none"},
        "student": {"model": "timm:convnext_atto"},
        "stages": [
            {"type": "train", "epochs": 1, "optimizer": "adamw", "lr": 1e-3},
            {"type": "quantize", "method": "qat_int8", "epochs": 1, "distill_from": "input"},
        ],
    }
    out = tmp_path / "out"
    result = run_cli("run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "stages[1] (qat_int8)" in result.stderr and "ConvNeXt" in result.stderr
    assert "call_method mul(" in result.stderr
    assert read_json(out / "00-train" / "stage.json")["status"] == "done"

    recipe["stages"][1] = {"type": "quantize", "method": "ptq_int8", "int8_placement": "all"}
    result = run_cli("run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[0] train: done earlier, skipped" in (out / "run.log").read_text()
    assert "WARNING" not in result.stderr  # the quantizer's per-weight log lines stay quiet
    assert read_json(out / "01-quantize" / "stage.json")["metrics"]["int8_route"] == "onnxruntime"
