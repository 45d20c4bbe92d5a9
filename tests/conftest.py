"""Shared fixtures: the real CIFAR-10 data and pretrained teachers from the shared folder.

The folder is `../shared` beside the repository, or wherever COMPRESS_SHARED points.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMPRESS_SHARED", REPO.parent / "shared"))
CIFAR = SHARED / "data" / "cifar10"
WEIGHTS = SHARED / "weights" / "cifar_resnet"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(
            f"{path} not found: set COMPRESS_SHARED to the folder holding data/ and weights/"
        )
    return path


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    return _need(CIFAR)


@pytest.fixture(scope="session")
def resnet56_weights() -> Path:
    return _need(WEIGHTS / "resnet56-4bfd9763.th")


@pytest.fixture(scope="session")
def resnet20_weights() -> Path:
    return _need(WEIGHTS / "resnet20-12fca82f.th")


def build_tiny_image_folder(root: Path, classes: int = 4, train: int = 12, test: int = 6) -> Path:
    """A small ImageFolder of real images: the first CIFAR-10 images of the first `classes`
    classes when the shared data is present, else 32x32 crops of the photographs matplotlib ships
    (one photograph per class)."""
    import shutil

    import numpy as np
    from PIL import Image

    counts = {"train": train, "test": test}
    if CIFAR.is_dir():
        for split, n in counts.items():
            for cls in sorted(p.name for p in (CIFAR / split).iterdir())[:classes]:
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                for f in sorted((CIFAR / split / cls).iterdir())[:n]:
                    shutil.copyfile(f, root / split / cls / f.name)
        return root
    import matplotlib

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    photos = [
        sample / "grace_hopper.jpg",
        sample / "Minduka_Present_Blue_Pack.png",
        sample / "logo2.png",
    ]
    rng = np.random.default_rng(0)
    for cls, photo in enumerate(photos[:classes]):
        image = np.asarray(Image.open(photo).convert("RGB"))
        for split, n in counts.items():
            (root / split / f"c{cls}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                y = rng.integers(0, image.shape[0] - 64)
                x = rng.integers(0, image.shape[1] - 64)
                crop = Image.fromarray(image[y : y + 64, x : x + 64]).resize((32, 32))
                crop.save(root / split / f"c{cls}" / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory) -> Path:
    return build_tiny_image_folder(tmp_path_factory.mktemp("tiny") / "data")


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `compress ARGS` in a fresh interpreter, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "compress", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def small_recipe_for(cifar_root: Path, teacher_weights: Path) -> dict:
    """A few-second recipe: distil on 20 images per class, evaluate, export, bench."""
    return {
        "name": "small",
        "seed": 0,
        "data": {
            "root": str(cifar_root),
            "limit_per_class": 20,
            "test_limit_per_class": 10,
            "batch_size": 50,
        },
        "teacher": {"model": "cifar_resnet56", "weights": str(teacher_weights)},
        "student": "cifar_resnet20",
        "stages": [
            {"type": "eval", "name": "eval-initial"},
            {"type": "distill", "epochs": 2, "lr": 0.05},
            {"type": "export"},
            {
                "type": "bench",
                "batch_sizes": [1, 4],
                "min_iters": 10,
                "min_duration_s": 0.1,
                "warmup": 2,
            },
        ],
    }


@pytest.fixture()
def small_recipe(cifar_root: Path, resnet56_weights: Path) -> dict:
    return small_recipe_for(cifar_root, resnet56_weights)


def search_recipe_for(cifar_root: Path, weights: Path, per_class: int, search: dict) -> dict:
    """A search on the pretrained ResNet-20 (teacher and start) over a few images per class."""
    return {
        "name": "search-small",
        "seed": 0,
        "data": {
            "root": str(cifar_root),
            "limit_per_class": per_class,
            "test_limit_per_class": 20,
            "augment": "none",
            "val_fraction": 0.25,
        },
        "teacher": {"model": "cifar_resnet20", "weights": str(weights)},
        "student": {"model": "cifar_resnet20", "weights": str(weights)},
        "stages": [{"type": "search", **search}],
    }
