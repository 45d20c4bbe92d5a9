"""Training stages on a CUDA device (mixed precision on), where one is present."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from compress.io import read_json
from compress.models import create_model
from compress.pipeline import Pipeline
from compress.recipe import parse_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

VIT = {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2}


def test_train_then_scalekd_on_cuda_exports_a_cpu_student(tmp_path, cifar_root):
    data = {"root": str(cifar_root), "limit_per_class": 20, "test_limit_per_class": 10}
    teacher_run = tmp_path / "teacher"
    Pipeline(
        parse_recipe(
            {
                "name": "vit",
                "device": "cuda",
                "data": data,
                "student": {"model": "timm:vit_tiny_patch16_224", "kwargs": VIT},
                "stages": [{"type": "train", "epochs": 2, "optimizer": "adamw", "lr": 1e-3}],
            }
        ),
        teacher_run,
    ).run()
    recipe = {
        "name": "crosskd",
        "device": "cuda",
        "data": data,
        "teacher": {"model": str(teacher_run / "00-train" / "model.safetensors")},
        "student": "cifar_resnet20",
        "stages": [
            {"type": "distill", "method": "scalekd", "epochs": 2, "lr": 0.05},
            {"type": "export"},
        ],
    }
    report = Pipeline(parse_recipe(recipe), tmp_path / "run").run()
    stage = read_json(tmp_path / "run" / "00-distill" / "stage.json")
    assert report["environment"]["gpu"]
    assert stage["metrics"]["projector_params"] > 0
    log = (tmp_path / "run" / "00-distill" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["train_loss"] for line in log]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    student, _ = create_model("cifar_resnet20", num_classes=10)
    weights = load_file(str(tmp_path / "run" / "00-distill" / "model.safetensors"))
    student.load_state_dict(weights)  # exactly the student's keys: no projector left in it
    export = read_json(tmp_path / "run" / "01-export" / "stage.json")
    assert export["metrics"]["max_abs_diff"] < 1e-3
