"""ImageFolder data: splits, subsets, transforms, and the in-memory cache of decoded images.

Images are decoded once to uint8 CHW tensors (after the deterministic resize) and held in memory
when they fit the cache budget; augmentation runs on those tensors and normalisation runs on
whole batches in the collate function.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from compress.config import DataConfig
from compress.errors import InputError


def decode_image(path: str, resize: int | None) -> torch.Tensor:
    """Read any image file as RGB uint8 CHW, its shorter side resized to `resize` if given."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if resize is not None and min(im.size) != resize:
            im = TF.resize(im, resize, antialias=True)
        return TF.pil_to_tensor(im)


class ImageSource:
    """Decoded images by index: held in memory when they fit `cache_bytes`, else read per access."""

    def __init__(self, paths: Sequence[str], resize: int | None, cache_bytes: int, desc: str):
        self.paths, self.resize = list(paths), resize
        first = decode_image(self.paths[0], resize)
        self.first_shape = tuple(first.shape)
        estimate = first.numel() * len(self.paths)
        self.images: list[torch.Tensor] | None = None
        if estimate <= cache_bytes:
            self.images = [
                decode_image(p, resize)
                for p in tqdm(
                    self.paths, desc=f"decoding {desc}", unit="img", leave=False, disable=None
                )
            ]

    @property
    def cached(self) -> bool:
        return self.images is not None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.images is not None:
            return self.images[i]
        return decode_image(self.paths[i], self.resize)


class ImageDataset(Dataset):
    """(uint8 image after `transform`, label, index) triples; the index keys per-sample caches."""

    def __init__(self, source: ImageSource, labels: Sequence[int], transform: v2.Transform):
        self.source, self.labels, self.transform = source, list(labels), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.transform(self.source[i]), self.labels[i], i


@dataclass
class NormalizeCollate:
    """Stack uint8 images and normalise the whole batch at once."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, batch: list[tuple[torch.Tensor, int, int]]):
        images = torch.stack([b[0] for b in batch]).float().div_(255)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        images = images.sub_(mean).div_(std)
        labels = torch.tensor([b[1] for b in batch])
        indices = torch.tensor([b[2] for b in batch])
        return images, labels, indices


def _subset_per_class(samples: list[tuple[str, int]], per_class: int | None, seed: int):
    if per_class is None:
        return samples
    by_class: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for s in samples:
        by_class[s[1]].append(s)
    rng = random.Random(seed)
    out = []
    for label in sorted(by_class):
        items = by_class[label]
        out.extend(sorted(rng.sample(items, min(per_class, len(items)))))
    return out


def _carve_val(samples: list[tuple[str, int]], fraction: float, seed: int):
    """Split `samples` into (train, val), stratified by class, reproducibly for a given seed."""
    by_class: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for s in samples:
        by_class[s[1]].append(s)
    rng = random.Random(seed + 1)
    train, val = [], []
    for label in sorted(by_class):
        items = list(by_class[label])
        rng.shuffle(items)
        n_val = round(len(items) * fraction)
        val.extend(sorted(items[:n_val]))
        train.extend(sorted(items[n_val:]))
    return train, val


class ImageFolderData:
    """The data of one recipe: `root/train`, `root/test` and optional `root/val` in ImageFolder layout."""

    def __init__(self, cfg: DataConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed
        self.root = Path(cfg.root)
        for split in ("train", "test"):
            if not (self.root / split).is_dir():
                raise InputError(
                    f"data.root: {self.root} has no '{split}/' folder "
                    "(expected ImageFolder layout: root/train/<class>/*.jpg, root/test/<class>/*.jpg)"
                )
        self.classes, self.class_to_idx = find_classes(str(self.root / "train"))
        self._samples: dict[str, list[tuple[str, int]]] | None = None
        self._sources: dict[str, ImageSource] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def samples(self, split: str) -> list[tuple[str, int]]:
        if self._samples is None:
            self._samples = self._list_samples()
        return self._samples[split]

    def _list_samples(self) -> dict[str, list[tuple[str, int]]]:
        def scan(split: str) -> list[tuple[str, int]]:
            return make_dataset(
                str(self.root / split), self.class_to_idx, IMG_EXTENSIONS, allow_empty=True
            )

        cfg = self.cfg
        train = _subset_per_class(scan("train"), cfg.limit_per_class, self.seed)
        if (self.root / "val").is_dir():
            val = _subset_per_class(scan("val"), cfg.limit_per_class, self.seed)
        else:
            train, val = _carve_val(train, cfg.val_fraction, self.seed)
        test = _subset_per_class(scan("test"), cfg.test_limit_per_class, self.seed)
        out = {"train": train, "val": val, "test": test}
        for split in ("train", "test"):
            if not out[split]:
                raise InputError(f"data.root: no images found under {self.root / split}")
        return out

    def source(self, split: str) -> ImageSource:
        if split not in self._sources:
            paths = [p for p, _ in self.samples(split)]
            if not paths:
                raise InputError(f"data: the '{split}' split is empty (set data.val_fraction > 0)")
            cache_bytes = self.cfg.cache_mb * 2**20
            self._sources[split] = ImageSource(paths, self.resize, cache_bytes, split)
        return self._sources[split]

    @property
    def resize(self) -> int | None:
        cfg = self.cfg
        if cfg.resize is not None:
            return cfg.resize
        if cfg.image_size is None:
            return None
        # ImageNet convention: resize to size/0.875 then centre-crop; small images are used whole.
        return cfg.image_size if cfg.image_size < 64 else round(cfg.image_size / 0.875)

    @property
    def image_size(self) -> int:
        if self.cfg.image_size is not None:
            return self.cfg.image_size
        c, h, w = self.source("test").first_shape
        if h != w:
            raise InputError(
                f"data.image_size: images in {self.root} are {h}x{w}, not square; set data.image_size"
            )
        return h

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def transform(self, train: bool) -> v2.Transform:
        cfg, size = self.cfg, self.image_size
        eval_ops: list[v2.Transform] = [v2.CenterCrop(size)]
        if not train or cfg.augment == "none":
            return v2.Compose(eval_ops)
        if cfg.augment == "flip":
            return v2.Compose([*eval_ops, v2.RandomHorizontalFlip()])
        if cfg.augment == "crop_flip":
            return v2.Compose(
                [
                    *eval_ops,
                    v2.RandomCrop(size, padding=cfg.crop_padding),
                    v2.RandomHorizontalFlip(),
                ]
            )
        return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])

    def deterministic_train_transform(self) -> bool:
        return self.cfg.augment == "none"

    @property
    def collate(self) -> NormalizeCollate:
        return NormalizeCollate(tuple(self.cfg.mean), tuple(self.cfg.std))

    def dataset(self, split: str, train: bool = False) -> ImageDataset:
        labels = [label for _, label in self.samples(split)]
        return ImageDataset(self.source(split), labels, self.transform(train))

    def loader(
        self,
        split: str,
        train: bool = False,
        batch_size: int | None = None,
        sampler: Sampler | None = None,
        indices: Sequence[int] | None = None,
    ) -> DataLoader:
        """Batches of `split` (only the samples at `indices` when given; each keeps its index)."""
        cfg = self.cfg
        dataset: Dataset = self.dataset(split, train)
        if indices is not None:
            dataset = Subset(dataset, list(indices))
        batch_size = batch_size or (cfg.batch_size if train else cfg.eval_batch_size)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train and len(dataset) > batch_size,  # no tiny last batch in training
            num_workers=cfg.num_workers,
            collate_fn=self.collate,
            generator=generator,
            persistent_workers=cfg.num_workers > 0,
        )
