from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compress.config import DataConfig
from compress.data import ImageFolderData
from compress.errors import InputError


def _folder(root: Path, modes=("L", "RGBA", "P", "RGB"), per_class=5) -> Path:
    """An ImageFolder with images in several modes and sizes 40x40."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, mode in enumerate(modes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(arr).convert(mode).save(d / f"{i}.png")
    return root


def test_any_image_mode_becomes_rgb(tmp_path):
    data = ImageFolderData(DataConfig(root=_folder(tmp_path), val_fraction=0.2))
    images, labels, _ = next(iter(data.loader("train", train=True, batch_size=8)))
    assert images.shape == (8, 3, 40, 40) and images.dtype == torch.float32
    assert data.num_classes == 4


def test_val_is_carved_from_train_reproducibly_and_disjoint(cifar_root):
    cfg = DataConfig(root=cifar_root, limit_per_class=30, test_limit_per_class=5, val_fraction=0.2)
    a, b = ImageFolderData(cfg, seed=3), ImageFolderData(cfg, seed=3)
    assert a.samples("val") == b.samples("val")
    train, val = {p for p, _ in a.samples("train")}, {p for p, _ in a.samples("val")}
    assert not train & val
    assert len(train) == 240 and len(val) == 60 and len(a.samples("test")) == 50
    assert ImageFolderData(cfg, seed=4).samples("val") != a.samples("val")


def test_memory_cache_and_disk_reads_give_the_same_batches(cifar_root):
    base = {"root": cifar_root, "limit_per_class": 4, "test_limit_per_class": 4}
    cached = ImageFolderData(DataConfig(**base))
    uncached = ImageFolderData(DataConfig(**base, cache_mb=0))
    assert cached.source("test").cached and not uncached.source("test").cached
    x1 = next(iter(cached.loader("test")))[0]
    x2 = next(iter(uncached.loader("test")))[0]
    torch.testing.assert_close(x1, x2)


def test_resize_and_crop_for_imagenet_style_inputs(tmp_path):
    data = ImageFolderData(
        DataConfig(root=_folder(tmp_path), image_size=32, augment="random_resized_crop")
    )
    x = next(iter(data.loader("train", train=True, batch_size=4)))[0]
    assert x.shape == (4, 3, 32, 32)
    assert data.input_size == (3, 32, 32)


def test_missing_split_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(InputError, match="no 'test/' folder"):
        ImageFolderData(DataConfig(root=tmp_path))
