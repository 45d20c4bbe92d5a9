"""Per-layer INT8 sensitivity and the accuracy budget: layers back in float in the Q/DQ graph,
the bisection, the quantize stage's `max_accuracy_drop`, and `compress sensitivity`."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from compress.errors import InputError
from compress.models import ModelSpec, build_model, load_model
from compress.quant.ort_int8 import quantize_onnx_int8
from compress.quant.qdq_layers import (
    QuantLayer,
    adjacent_units,
    float_reference,
    quantized_layers,
    with_float_layers,
    with_node_names,
)
from compress.quant.sensitivity import (
    LayerRecord,
    Scores,
    budget_drop,
    mean_kl,
    onnx_logits,
    rank_units,
    report_lines,
    shortest_prefix,
)
from tests.conftest import run_cli, write_recipe


@pytest.fixture(scope="module")
def resnet20_int8(resnet20):
    """cifar_resnet20 (random init, BatchNorm statistics from real images), its FP32 ONNX export,
    its all-INT8 Q/DQ model and the real images it was calibrated on."""
    model, path, batches = resnet20
    int8 = path.with_name("int8.onnx")
    quantize_onnx_int8(path, int8, batches, placement="all")
    return model, onnx.load(str(path)), onnx.load(str(int8)), np.concatenate(batches)


def test_every_layer_back_in_float_rejoins_the_fp32_model(resnet20_int8):
    model, reference, qdq, images = resnet20_int8
    layers = quantized_layers(qdq)
    modules = {
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    }
    # every conv/linear, named as PyTorch does, and the residual adds and the pooling between them
    assert {layer.module for layer in layers if layer.weights} == modules
    assert {layer.op_type for layer in layers if not layer.weights} == {"Add", "GlobalAveragePool"}
    fp32 = onnx_logits(reference, images)
    int8_kl = mean_kl(fp32, onnx_logits(qdq, images))
    all_float = with_float_layers(
        qdq, [layer.node for layer in layers], float_reference(qdq, reference)
    )
    onnx.checker.check_model(all_float)
    assert quantized_layers(all_float) == []
    # Everything is float again, the ops that only move values included (the shortcut's Slice
    # and Pad, the Flatten before the classifier): no quantized activation is left, the Relus
    # onnxruntime's quantizer folded into its QuantizeLinears are back (19 of them), and the
    # model computes the FP32 logits.
    assert len(float_reference(qdq, reference).activations) == 19
    left = [n.op_type for n in all_float.graph.node if n.op_type.endswith("QuantizeLinear")]
    assert left == []
    np.testing.assert_allclose(onnx_logits(all_float, images), fp32, rtol=1e-4, atol=1e-4)
    assert int8_kl > 1e-4  # while the all-INT8 model does not


def test_one_layer_in_float_gets_its_fp32_weights_and_the_rest_stay_int8(resnet20_int8):
    model, reference, qdq, images = resnet20_int8
    layers = quantized_layers(qdq)
    target = [layer for layer in layers if layer.weights][3]
    edited = with_float_layers(qdq, [target.node], float_reference(qdq, reference))
    assert [layer.node for layer in quantized_layers(edited)] == [
        layer.node for layer in layers if layer.node != target.node
    ]
    node = next(n for n in edited.graph.node if n.name == target.node)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in edited.graph.initializer}
    fp32 = float_reference(qdq, reference).weights  # BatchNorm folded in, as exported
    stem = node.input[1].removesuffix("_float")
    np.testing.assert_array_equal(inits[node.input[1]], fp32[stem])
    assert np.isfinite(onnx_logits(edited, images)).all()
    with pytest.raises(KeyError, match="no node named"):
        with_float_layers(qdq, ["/not/a/node"])


def test_nodes_without_names_are_told_apart(resnet20_int8):
    _, _, qdq, images = resnet20_int8
    unnamed = onnx.ModelProto()
    unnamed.CopyFrom(qdq)
    for node in unnamed.graph.node:  # as some exporters leave them
        node.name = ""
    with pytest.raises(KeyError, match="without a name"):
        with_float_layers(unnamed, [""])
    named = with_node_names(unnamed)
    layers = quantized_layers(named)
    assert len({layer.node for layer in layers}) == len(layers) == len(quantized_layers(qdq))
    edited = with_float_layers(named, [layers[0].node])
    assert len(quantized_layers(edited)) == len(layers) - 1
    np.testing.assert_array_equal(onnx_logits(named, images), onnx_logits(qdq, images))


def test_adjacent_units_follow_the_data_path_through_q_dq(resnet20_int8):
    """Units that read each other's output through Q/DQ (and a Relu that onnxruntime's quantizer
    folded into it) pair up; the stem and the classifier do not."""
    _, _, qdq, _ = resnet20_int8
    layers = quantized_layers(qdq)
    by_module = {}
    for layer in layers:
        by_module.setdefault(layer.module, layer.node)
    pairs = set(adjacent_units(qdq, layers))
    conv = "/layer1/layer1.0/conv1/Conv", "/layer1/layer1.0/conv2/Conv"
    assert {by_module["layer1.0.conv1"], by_module["layer1.0.conv2"]} == set(conv)
    assert conv in pairs  # conv1 -> Relu (folded) -> Q -> DQ -> conv2
    assert (by_module["conv1"], by_module["layer1.0.conv1"]) in pairs
    adds = [layer.node for layer in layers if layer.op_type == "Add"]
    assert any((by_module["layer1.0.conv2"], a) in pairs for a in adds)  # into the residual add
    assert not any(by_module["linear"] in pair and by_module["conv1"] in pair for pair in pairs)
    assert all(a != b for a, b in pairs)


def _record(node: str, kl: float, cost: float) -> LayerRecord:
    return LayerRecord(QuantLayer(node, node, "Conv", 1), 0.0, 0.0, 0.0, kl, cost=cost)


def test_speed_ranking_gathers_adjacent_units_into_one_float_region():
    """Alone, C is worth more per unit of cost than B; next to A (already float), B costs less
    than a fifth of its own cost, so it comes second."""
    records = [_record("A", 1.0, 0.05), _record("B", 0.5, 0.05), _record("C", 0.55, 0.05)]
    records.append(_record("D", -0.01, 0.01))  # recovers nothing alone: last
    rank_units(records, "speed")
    assert [r.layer.node for r in sorted(records, key=lambda r: r.rank)] == ["A", "C", "B", "D"]
    rank_units(records, "speed", {("A", "B"): 0.06})  # together: 0.06, not 0.10
    assert [r.layer.node for r in sorted(records, key=lambda r: r.rank)] == ["A", "B", "C", "D"]
    assert records[1].marginal_cost == pytest.approx(0.01)
    rank_units(records, "accuracy", {("A", "B"): 0.06})  # accuracy alone ignores speed
    assert [r.layer.node for r in sorted(records, key=lambda r: r.rank)] == ["A", "C", "B", "D"]


def test_a_budget_that_floats_most_of_the_model_says_to_calibrate_or_train_instead():
    layers = [
        {"node": f"n{i}", "module": f"m{i}", "float": i < 7, "rank": i, "top1_drop": 0.1}
        for i in range(10)
    ]
    doc = {"budget_top1_drop": 0.5, "layers": layers, "latency_vs_int8": 1.3}
    text = "\n".join(report_lines(doc))
    assert "7 of 10 quantized layers and ops had to go back to float (latency 1.30x" in text
    assert "calibration_batches" in text and "qat_int8" in text
    for layer in layers[5:]:  # half in float: no warning
        layer["float"] = False
    assert "had to go back" not in "\n".join(report_lines(doc))
    assert "standard errors" not in "\n".join(report_lines(doc))
    doc["budget_margin_se"] = 1.0  # report.md says how the budget was held
    assert "held with 1.0 standard errors to spare." in "\n".join(report_lines(doc))


def test_shortest_prefix_finds_the_first_prefix_within_the_budget():
    order = [f"layer{i}" for i in range(40)]
    calls = []

    def drop_of(nodes):  # each of the first 13 layers recovers a tenth of a point
        calls.append(len(nodes))
        return 2.0 - 0.1 * min(len(nodes), 13)

    k, seen = shortest_prefix(order, drop_of, budget=1.0)
    assert k == 10 and seen[k] <= 1.0 and seen[k - 1] > 1.0
    assert len(calls) <= 2 + 2 * int(np.ceil(np.log2(k)))  # galloping: about 2 log2 k
    assert shortest_prefix(order, drop_of, budget=0.5)[0] == len(order) + 1  # never reached
    assert shortest_prefix(order, drop_of, budget=2.0)[0] == 0


def test_budget_margin_adds_standard_errors_of_the_paired_difference():
    """400 images: the float model is right on 300; the quantized one loses 8 of them and gains
    4 others. The drop is 1 point; the paired difference (+1 on 8 images, -1 on 4) has a
    standard deviation of 0.1731, so one standard error is 0.87 points."""
    float_correct = np.zeros(400, dtype=bool)
    float_correct[:300] = True
    correct = float_correct.copy()
    correct[:8], correct[300:304] = False, True
    scores = Scores(top1=100 * correct.mean(), kl=0.0, correct=correct)
    assert budget_drop(float_correct, scores) == pytest.approx(1.0)
    diff = float_correct.astype(float) - correct
    se = 100 * diff.std(ddof=1) / np.sqrt(400)
    assert se == pytest.approx(0.8657, abs=1e-4)
    assert budget_drop(float_correct, scores, 1.0) == pytest.approx(1.0 + se)
    assert budget_drop(float_correct, scores, 2.0) == pytest.approx(1.0 + 2 * se)
    same = Scores(top1=75.0, kl=0.0, correct=float_correct.copy())
    assert budget_drop(float_correct, same, 1.0) == 0.0  # no image changes: no doubt either


def test_shortest_prefix_is_not_sent_past_a_short_prefix_by_a_noisy_long_one():
    """A top-1 on a few hundred images moves by whole images: here 10 layers meet the budget,
    and one longer prefix misses it by a few images. A bisection over all 140 layers tests 35
    first and ends at 36; the search up from short prefixes ends at 10."""
    order = [f"unit{i}" for i in range(140)]

    def drop_of(nodes):
        k = len(nodes)
        return 0.7 if k == 35 else max(0.0, 1.6 - 0.12 * k)

    assert shortest_prefix(order, drop_of, budget=0.5)[0] == 10


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"method": "ptq_int8", "max_accuracy_drop": -0.5}, "max_accuracy_drop"),
        ({"method": "quantized_distillation", "max_accuracy_drop": 0.5}, "needs method ptq_int8"),
        (
            {
                "method": "ptq_int8",
                "int8_target": "tensorrt",
                "int8_placement": "all",
                "max_accuracy_drop": 0.5,
                "sensitivity_ranking": "speed",
            },
            "sensitivity_ranking",
        ),
    ],
)
def test_impossible_budgets_are_refused_at_validation(tiny_image_folder, stage, message):
    from compress.api import as_recipe

    recipe = {
        "name": "bad",
        "data": {"root": str(tiny_image_folder)},
        "student": "cifar_resnet20",
        "stages": [{"type": "quantize", **stage}],
    }
    with pytest.raises(InputError, match=message) as e:
        as_recipe(recipe)
    assert "stages.0" in str(e.value) or "stages[0]" in str(e.value)


def _budget_recipe(cifar_root, resnet20_weights, budget: float) -> dict:
    """ptq_int8 of the pretrained ResNet-20 calibrated on 8 images (so INT8 loses accuracy) with a
    top-1 budget on a 200-image validation split; the export gate is left wide open."""
    return {
        "name": "budget",
        "seed": 0,
        "data": {
            "root": str(cifar_root),
            "limit_per_class": 40,
            "test_limit_per_class": 10,
            "val_fraction": 0.5,
            "augment": "none",
            "batch_size": 8,
        },
        "student": {"model": "cifar_resnet20", "weights": str(resnet20_weights)},
        "stages": [
            {
                "type": "quantize",
                "method": "ptq_int8",
                "int8_placement": "all",
                "calibration_batches": 1,
                "max_accuracy_drop": budget,
            },
            {"type": "export", "int8_max_drop": 100, "speedup_batch_sizes": None},
        ],
    }


@pytest.mark.slow
def test_budget_returns_the_fewest_layers_to_float_and_the_model_deploys(
    tmp_path, cifar_root, resnet20_weights
):
    import compress

    report = compress.run(_budget_recipe(cifar_root, resnet20_weights, 0.5), out=tmp_path / "run")
    stage = tmp_path / "run" / "00-quantize"
    doc = json.loads((stage / "sensitivity.json").read_text())
    assert doc["split"] == "val" and doc["images"] == 200
    assert sum(r["op_type"] == "Conv" for r in doc["layers"]) == 19  # and the linear, adds, pool
    assert len(doc["layers"]) > 20 and (stage / "sensitivity.png").stat().st_size > 0
    assert doc["int8_top1_drop"] > 0.5  # 8 calibration images: plain PTQ misses the budget ...
    assert doc["final_top1_drop"] <= 0.5  # ... and the float layers bring it within
    chosen = doc["float_layers"]
    assert 0 < len(chosen) < len(doc["layers"])
    ranks = {r["node"]: r["rank"] for r in doc["layers"]}
    assert sorted(ranks[n] for n in chosen) == list(range(len(chosen)))  # a prefix of the ranking
    # the smallest prefix evaluated that meets the budget is the one taken
    passing = [e["float_layers"] for e in doc["evaluations"] if e["top1_drop"] <= 0.5]
    assert min(passing) == len(chosen)
    # the saved model is that Q/DQ model: exactly the chosen layers run in float
    model, spec = load_model(stage / "model.safetensors")
    export = json.loads((tmp_path / "run" / "01-export" / "stage.json").read_text())["metrics"]
    assert export["int8_route"] == spec.int8["quantized_by"] == "onnxruntime"
    qdq = onnx.load_from_string(model.onnx_bytes())
    int8_nodes = {layer.node for layer in quantized_layers(qdq)}
    assert int8_nodes.isdisjoint(chosen) and len(int8_nodes) == len(doc["layers"]) - len(chosen)
    float_convs = sum(r["float"] and r["weights"] > 0 for r in doc["layers"])
    entry = next(m for m in report["models"] if m["name"] == "00-quantize")
    assert entry["float_layers"] == len(chosen) and entry["int8_layers"] == 20 - float_convs
    report_md = (tmp_path / "run" / "report.md").read_text()
    assert "### Mixed precision: quantize" in report_md
    assert f"`{chosen[0]}`" in report_md and "00-quantize/sensitivity.png" in report_md


@pytest.mark.slow
def test_a_budget_not_even_all_float_meets_fails_and_keeps_the_analysis(
    tmp_path, cifar_root, resnet20_weights
):
    """Every unit back in float is the FP32 model again after PTQ, so only QAT, whose training
    moves the weights themselves (here at a harmful lr), can miss a budget that way."""
    recipe = _budget_recipe(cifar_root, resnet20_weights, 0.0)
    recipe["stages"][0].update(method="qat_int8", distill_from="input", epochs=1, lr=0.2)
    result = run_cli(
        "run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(tmp_path / "run")
    )
    assert result.returncode == 1, result.stderr
    assert "stages[0].max_accuracy_drop 0.0" in result.stderr
    assert "quantized layers and ops in float, so no mix meets it" in result.stderr
    assert "the trained weights score" in result.stderr  # the advice names QAT's own loss
    assert "Traceback" not in result.stderr
    doc = json.loads((tmp_path / "run" / "00-quantize" / "sensitivity.json").read_text())
    assert len(doc["layers"]) > 20 and doc["float_layers"] == []


def test_sensitivity_command_on_a_model_the_user_brings(tmp_path, tiny_image_folder):
    out = tmp_path / "sens"
    result = run_cli(
        "sensitivity",
        "torchvision:mobilenet_v3_small",
        "--data",
        str(tiny_image_folder),
        "--out",
        str(out),
        "--calibration-batches",
        "1",
        "--ranking",
        "accuracy",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc == json.loads((out / "sensitivity.json").read_text())
    assert (out / "sensitivity.png").stat().st_size > 0
    model = build_model(ModelSpec("torchvision:mobilenet_v3_small", {"num_classes": 3}))
    convs = {
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    }
    modules = [r["module"] for r in doc["layers"] if r["weights"]]
    assert set(modules) <= convs and len(modules) > 40  # depthwise, SE and pointwise convs too
    ops = {r["op_type"] for r in doc["layers"] if not r["weights"]}
    assert {"Mul", "HardSigmoid"} <= ops  # squeeze-excite and hard-swish arithmetic
    assert sorted(r["rank"] for r in doc["layers"]) == list(range(len(doc["layers"])))
    bad = run_cli(
        "sensitivity", "cifar_resnet20", "--data", str(tiny_image_folder), "--max-drop", "-1"
    )
    assert bad.returncode == 2 and "max_drop" in bad.stderr and "Traceback" not in bad.stderr
    data = str(tiny_image_folder)
    bad = run_cli("sensitivity", "cifar_resnet20", "--data", data, "--margin-se", "-1")
    assert bad.returncode == 2 and "margin_se" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_qat_model_is_analysed_as_its_qdq_export_with_the_modules_names(
    tmp_path, cifar_root, resnet20_weights
):
    import compress
    from compress.quant.ort_int8 import OnnxInt8Model

    recipe = _budget_recipe(cifar_root, resnet20_weights, 1.0)
    recipe["stages"][0] = {
        "type": "quantize",
        "method": "qat_int8",
        "distill_from": "input",
        "epochs": 1,
        "calibration_batches": 2,
        "max_accuracy_drop": 1.0,
    }
    compress.run(recipe, out=tmp_path / "run")
    stage = tmp_path / "run" / "00-quantize"
    doc = json.loads((stage / "sensitivity.json").read_text())
    model, spec = load_model(stage / "model.safetensors")
    assert isinstance(model, OnnxInt8Model) and spec.int8["route"] == "onnxruntime"
    export = json.loads((tmp_path / "run" / "01-export" / "stage.json").read_text())["metrics"]
    assert spec.int8["quantized_by"] == export["int8_route"] == "brevitas"  # run by onnxruntime
    convs = [
        n
        for n, m in model.float_model.named_modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    assert [r["module"] for r in doc["layers"] if r["weights"]] == convs  # not Brevitas' names
    assert doc["final_top1_drop"] <= 1.0
