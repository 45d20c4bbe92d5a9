import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from compress.config import DataConfig
from compress.data import ImageDecodeError, ImageFolderData, decode_image
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


# Bad data: each case on a small copy of the tiny image folder.


@pytest.fixture()
def folder(tiny_image_folder, tmp_path) -> Path:
    """A private copy of the tiny image folder (4 classes, 12 train and 6 test images each)."""
    return Path(shutil.copytree(tiny_image_folder, tmp_path / "data"))


@pytest.fixture()
def logged() -> list[str]:
    """The messages the `compress` logger emits during the test."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    log = logging.getLogger("compress")
    log.addHandler(handler)
    yield messages
    log.removeHandler(handler)


def _class_dirs(root: Path, split: str) -> list[Path]:
    return sorted(p for p in (root / split).iterdir() if p.is_dir())


def _jpeg(path: Path, like: Path) -> Path:
    """A real JPEG at `path` with the pixels of the image `like`."""
    Image.open(like).convert("RGB").save(path, quality=90)
    return path


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_empty_train_class_folders_are_named(folder):
    (folder / "train" / "zebra").mkdir()
    (folder / "train" / "yak").mkdir()
    (folder / "train" / "yak" / "notes.txt").write_text("to do")
    with pytest.raises(InputError) as e:
        ImageFolderData(DataConfig(root=folder))
    message = str(e.value)
    assert "2 class folders" in message and "add images" in message
    assert "remove the folder" in message
    assert str(folder / "train" / "zebra") in message
    assert f"{folder / 'train' / 'yak'} (only .txt files)" in message


def test_corrupt_and_truncated_images_are_named_together_when_cached(folder):
    first, second = sorted((_class_dirs(folder, "test")[1]).iterdir())[:2]
    first.write_bytes(np.random.default_rng(0).bytes(1000))  # random bytes named .jpg
    truncated = _truncate(_jpeg(second.with_suffix(".jpg"), second))
    if truncated != second:
        second.unlink()
    data = ImageFolderData(DataConfig(root=folder))
    with pytest.raises(ImageDecodeError) as e:
        data.source("test")
    message = str(e.value)
    n = len(data.samples("test"))
    assert message.startswith(f"data: 2 of {n} test images do not decode; replace or remove them")
    assert f"{first} (not an image file PIL can read)" in message
    assert f"{truncated} (OSError:" in message


def test_truncated_image_read_in_a_loader_worker_is_one_line_naming_it(folder):
    image = sorted(_class_dirs(folder, "test")[2].iterdir())[0]
    truncated = _truncate(_jpeg(image.with_name("cut.jpg"), image))
    image.unlink()
    data = ImageFolderData(DataConfig(root=folder, cache_mb=0, num_workers=1))
    assert not data.source("test").cached
    with pytest.raises(InputError) as e:
        for _ in data.loader("test", batch_size=4):
            pass
    # torch re-raises a worker's error with the worker's traceback as its message
    assert str(e.value).startswith(f"data: cannot decode {truncated} (OSError: ")
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    # (torch then takes 5 s to stop the worker that raised: MP_STATUS_CHECK_INTERVAL)


def test_truncated_jpeg_fails_even_where_pil_is_told_to_accept_truncated_files(folder, monkeypatch):
    image = sorted(_class_dirs(folder, "train")[0].iterdir())[0]
    jpeg = _truncate(_jpeg(folder / "whole.jpg", image), keep=0.99)  # only the end is missing
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries set it
    with pytest.raises(ImageDecodeError, match="cannot decode .*whole.jpg"):
        decode_image(str(jpeg), None)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global is left as it was


def test_test_split_without_a_class_warns_and_the_counts_show_it(folder, logged):
    missing = _class_dirs(folder, "test")[1]
    shutil.rmtree(missing)
    extra = folder / "test" / "unicorn"
    shutil.copytree(_class_dirs(folder, "test")[0], extra)  # a class train/ has not
    data = ImageFolderData(DataConfig(root=folder, val_fraction=0.25))
    counts, n = data.class_counts(), data.num_classes
    assert list(counts) == ["train", "val", "test"]
    assert list(counts["test"]) == data.classes
    assert counts["test"][missing.name] == 0 and sum(counts["test"].values()) == 6 * (n - 1)
    assert set(counts["train"].values()) == {9} and set(counts["val"].values()) == {3}
    assert any(
        f"test split has no images of 1 of the {n} classes" in m and missing.name in m
        for m in logged
    )
    assert any("not used: unicorn (6 images)" in m for m in logged)


def test_split_fingerprints_change_with_the_files_a_split_uses(folder):
    config = DataConfig(root=folder, test_limit_per_class=5)  # 5 of the 6, a seeded choice

    def fingerprints() -> dict[str, str]:
        return ImageFolderData(config).split_fingerprints()

    before = fingerprints()
    assert set(before) == {"train", "val", "test"} and fingerprints() == before
    chosen = {p for p, _ in ImageFolderData(config).samples("test")}
    images = sorted(_class_dirs(folder, "test")[0].iterdir())
    used = [p for p in images if str(p) in chosen]
    unused = next(p for p in images if str(p) not in chosen)

    os.utime(unused, ns=(0, 0))  # a file the split leaves out
    assert fingerprints() == before
    changes = {
        "touched": lambda: os.utime(used[0], ns=(0, used[0].stat().st_mtime_ns + 10**9)),
        "resized": lambda: used[1].write_bytes(used[1].read_bytes() + b"\0"),
        "renamed": lambda: used[2].rename(used[2].with_name("renamed.jpg")),
        "removed": lambda: used[3].unlink(),
    }
    seen = {json.dumps(before)}
    for change in changes.values():
        change()
        after = fingerprints()
        assert after["test"] != before["test"] and after["train"] == before["train"]
        assert json.dumps(after) not in seen
        seen.add(json.dumps(after))
        before = after
    shutil.copyfile(used[0], _class_dirs(folder, "train")[0] / "added.jpg")
    after = fingerprints()
    assert after["train"] != before["train"] or after["val"] != before["val"]


def test_hidden_entries_and_other_files_are_skipped(folder, logged):
    plain = ImageFolderData(DataConfig(root=folder))
    cls = _class_dirs(folder, "train")[0]
    (folder / "train" / ".DS_Store").write_bytes(b"\0\1")
    (folder / "train" / "README.txt").write_text("split-level notes")
    (folder / "train" / ".ipynb_checkpoints").mkdir()
    (folder / "train" / ".ipynb_checkpoints" / "x.jpg").write_bytes(b"not an image")
    (cls / ".DS_Store").write_bytes(b"\0\1")
    (cls / "._0000.jpg").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS resource fork
    (cls / "README.txt").write_text("class-level notes")
    (cls / "LICENSE").write_text("CC0")
    (cls / ".thumbs").mkdir()
    (cls / ".thumbs" / "0000.jpg").write_bytes(b"not an image")
    data = ImageFolderData(DataConfig(root=folder))
    assert data.classes == plain.classes
    assert data.samples("train") == plain.samples("train")
    next(iter(data.loader("train", batch_size=8)))
    skipped = [m for m in logged if m.startswith("data: skipped 2 files")]
    assert skipped and "(no extension): 1, .txt: 1" in skipped[0]


def test_images_outside_class_folders_are_a_clear_error(folder):
    for cls in _class_dirs(folder, "test"):
        for image in cls.iterdir():
            image.rename(folder / "test" / f"{cls.name}-{image.name}")
        cls.rmdir()
    n = sum(1 for _ in (folder / "test").iterdir())
    with pytest.raises(InputError, match=f"its {n} images must go into one subfolder per class"):
        ImageFolderData(DataConfig(root=folder))
    shutil.rmtree(folder / "train")
    (folder / "train").mkdir()
    with pytest.raises(InputError, match="train has no class folders"):
        ImageFolderData(DataConfig(root=folder))
