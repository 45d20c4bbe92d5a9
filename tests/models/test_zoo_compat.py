"""The architectures users bring (timm and torchvision edge families, 32 px, random init): each
distils as a student, exports to float ONNX with parity, quantizes with ptq_int8 into a Q/DQ ONNX
model that passes the onnxruntime accuracy gate and measures like any other model, and, where the
search supports its family, yields a search candidate that trains a step."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch

from compress.errors import InputError
from compress.models import create_model
from compress.pipeline import Pipeline
from compress.recipe import parse_recipe
from compress.search.surgery import Candidate, build_candidate
from compress.search.units import find_units

SIZE = (3, 32, 32)
ARCHITECTURES = [
    "timm:resnet18",
    "timm:resnet18d",
    "timm:mobilenetv2_050",
    "timm:mobilenetv3_small_050",
    "timm:efficientnet_lite0",
    "timm:regnetx_002",
    "timm:convnext_atto",
    "timm:ghostnet_100",
    "timm:repvgg_a0",
    "timm:lcnet_050",
    "torchvision:mobilenet_v3_small",
    "torchvision:shufflenet_v2_x0_5",
    "torchvision:mnasnet0_5",
    "torchvision:regnet_x_400mf",
]
# Families the search cannot act on: refused outright (no unit of a supported kind), or units
# found of which none is removable or shrinkable (the search stage says so, naming the families).
REFUSED = {"timm:repvgg_a0"}
INERT = {"timm:ghostnet_100", "timm:lcnet_050"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architecture_distils_exports_quantizes_and_measures(arch, tiny_image_folder, tmp_path):
    recipe = {
        "name": "zoo",
        "seed": 0,
        "data": {"root": str(tiny_image_folder), "batch_size": 16, "augment": "none"},
        "teacher": {"model": "cifar_resnet20"},
        "student": {"model": arch},
        "stages": [
            {"type": "distill", "epochs": 1, "optimizer": "adamw", "lr": 1e-3},
            {"type": "export", "dynamo": False},
            {
                "type": "quantize",
                "method": "ptq_int8",
                "int8_placement": "all",
                "calibration_batches": 2,
            },
            {"type": "eval"},
            # 24 test images: one image is 4.2 points, so the gate allows 5 images
            {
                "type": "export",
                "name": "export-int8",
                "int8_max_drop": 21,
                "speedup_batch_sizes": None,
            },
        ],
    }
    report = Pipeline(parse_recipe(recipe), tmp_path / "run").run()
    assert report["status"] == "complete"
    stages = {s["label"]: s for s in report["stages"]}
    float_export = stages["export"]["metrics"]
    assert float_export["max_abs_diff"] <= float_export["tolerance"]
    assert float_export["top1_agreement"] >= 0.9

    quantize = stages["quantize"]["metrics"]
    assert quantize["int8_route"] == "onnxruntime" and quantize["int8_weights"] > 0
    int8_export = stages["export-int8"]["metrics"]
    assert int8_export["onnx_form"] == "qdq-int8"
    assert int8_export["int8_top1_drop"] <= 21
    qdq = onnx.load(str(tmp_path / "run" / "04-export-int8" / "model.onnx"))
    ops = Counter(n.op_type for n in qdq.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]

    models = {m["name"]: m for m in report["models"]}
    fp32, int8 = models["00-distill"], models["02-quantize"]
    assert int8["flops"] == fp32["flops"] > 0  # the float graph's FLOPs
    assert int8["params"] == fp32["params"]
    assert 0 < int8["size_bytes"] < fp32["size_bytes"] / 2  # the Q/DQ file, INT8 weights
    assert int8["top1"] == int8_export["onnx_test_top1"]  # eval ran the same Q/DQ model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_search_candidate_of_each_family_trains_a_step(arch):
    torch.manual_seed(0)
    model, _ = create_model(arch, num_classes=4)
    if arch in REFUSED:
        with pytest.raises(InputError, match="supported: residual blocks"):
            find_units(model.eval(), SIZE)
        return
    units = find_units(model.eval(), SIZE)
    if arch in INERT:
        assert units and not any(u.removable or u.shrinkable for u in units)
        return
    shrinkable = next(u for u in units if u.shrinkable)
    removable = [u.name for u in units if u.removable and u.name != shrinkable.name][:1]
    student = build_candidate(model, units, Candidate.make(removable, {shrinkable.name: 0.5}), SIZE)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in student.state_dict().items()} != shapes  # a cut happened
    student.train()
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3)
    images, labels = torch.randn(16, *SIZE), torch.randint(0, 4, (16,))
    loss = torch.nn.functional.cross_entropy(student(images), labels)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert student.eval()(images[:2]).shape == (2, 4)
