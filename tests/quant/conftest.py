"""Fixtures shared by the INT8 tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compress.deploy.onnx_export import export_onnx
from compress.models import ModelSpec, build_model

SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def resnet20(tmp_path_factory, tiny_image_folder):
    """cifar_resnet20 (random init, BatchNorm statistics from real images), its FP32 ONNX export
    and calibration batches of real images."""
    from compress.config import DataConfig
    from compress.data import ImageFolderData

    torch.manual_seed(0)
    data = ImageFolderData(DataConfig(root=tiny_image_folder, augment="none", batch_size=16), 0)
    batches = [images.numpy() for images, *_ in data.loader("train", train=False)][:2]
    model = build_model(ModelSpec("cifar_resnet20", {"num_classes": data.num_classes}))
    with torch.no_grad():  # BatchNorm statistics of real images
        model.train()(torch.from_numpy(np.concatenate(batches)))
    model.eval()
    path = tmp_path_factory.mktemp("r20") / "float.onnx"
    export_onnx(model, path, SIZE, opset=17, dynamo=False)
    return model, path, batches
