"""A user with neither the shared CIFAR-10 nor its weights: their own ImageFolder and a timm model."""

import numpy as np
from PIL import Image

from compress.io import read_json
from tests.conftest import run_cli, write_recipe


def _image_folder(root, classes=3, per_class=8, size=(48, 40)):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
                arr[..., c] = 255  # a learnable colour cue per class
                Image.fromarray(arr).save(d / f"{i}.jpg")
    return root


def test_timm_model_on_a_users_own_image_folder(tmp_path):
    root = _image_folder(tmp_path / "data")
    recipe = {
        "name": "own",
        "data": {
            "root": "data",
            "image_size": 32,
            "augment": "flip",
            "batch_size": 8,
            "val_fraction": 0.25,
        },
        "student": {"model": "timm:mobilenetv3_small_050"},
        "stages": [
            {"type": "train", "epochs": 2, "optimizer": "adamw", "lr": 0.003},
            {"type": "export"},
            {"type": "bench", "min_iters": 5, "min_duration_s": 0, "warmup": 1},
        ],
    }
    path = write_recipe(tmp_path / "recipe.yaml", recipe)  # data: relative to the recipe
    result = run_cli("run", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = read_json(tmp_path / "out" / "report.json")
    model = {m["name"]: m for m in report["models"]}["00-train"]
    assert model["spec"] == "timm:mobilenetv3_small_050"
    assert model["test_n"] == 3 * 8 and model["latency_ms"] > 0
    assert model["onnx_max_abs_diff"] < 1e-3
    assert not (root / "train" / "c0" / "0.jpg").with_suffix(".tmp").exists()
