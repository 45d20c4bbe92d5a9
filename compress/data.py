"""ImageFolder data: splits, subsets, transforms, and the in-memory cache of decoded images.

Images are decoded once to uint8 CHW tensors (after the deterministic resize) and held in memory
when they fit the cache budget; augmentation runs on those tensors and normalisation runs on
whole batches in the collate function.

Bad data is an InputError that names the file or folder: a train class folder without images, an
image that does not decode in full. What the loader leaves out (hidden entries, files that are not
images, class folders train/ lacks) is skipped with a warning where it could be the user's data.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from compress.config import DataConfig
from compress.errors import InputError
from compress.log import logger

SPLITS = ("train", "val", "test")
_SHOWN = 10  # names listed in one message before "and N more"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(str(n) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


class ImageDecodeError(InputError):
    """An image file that does not decode. The message names the file, and stays that one line
    when a DataLoader worker re-raises it (torch rebuilds the error from the text
    'Caught ImageDecodeError in DataLoader worker process N. Original Traceback ...')."""

    def __init__(self, message: str):
        if message.startswith(f"Caught {type(self).__name__} ") and "\nOriginal " in message:
            message = message.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
        super().__init__(message)


@contextmanager
def _truncated_files_fail() -> Iterator[None]:
    """PIL decodes a truncated file without error when ImageFile.LOAD_TRUNCATED_IMAGES is set (as
    some libraries do globally); here a truncated file always fails."""
    saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _decode_problem(e: BaseException | None) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not an image file PIL can read"
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def decode_image(path: str, resize: int | None) -> torch.Tensor:
    """Read any image file as RGB uint8 CHW, its shorter side resized to `resize` if given.

    Raises ImageDecodeError naming the file when it does not decode in full: not an image,
    truncated (whatever ImageFile.LOAD_TRUNCATED_IMAGES says), unreadable or gone.
    """
    try:
        with _truncated_files_fail(), Image.open(path) as im:
            im = im.convert("RGB")
            if resize is not None and min(im.size) != resize:
                im = TF.resize(im, resize, antialias=True)
            return TF.pil_to_tensor(im)
    except Exception as e:  # any failure here is this file's
        raise ImageDecodeError(
            f"data: cannot decode {path} ({_decode_problem(e)}); replace or remove the file"
        ) from e


def _decode_all(paths: Sequence[str], resize: int | None, desc: str) -> list[torch.Tensor]:
    """Every image decoded; the files that fail are named together in one error."""
    images, failed = [], []
    for p in tqdm(paths, desc=f"decoding {desc}", unit="img", leave=False, disable=None):
        try:
            images.append(decode_image(p, resize))
        except ImageDecodeError as e:
            failed.append((p, e))
    if len(failed) == 1:
        raise failed[0][1]
    if failed:
        named = [f"{p} ({_decode_problem(e.__cause__)})" for p, e in failed]
        raise ImageDecodeError(
            f"data: {len(failed)} of {len(paths)} {desc} images do not decode; replace or remove "
            f"them: {_listing(named)}"
        )
    return images


class ImageSource:
    """Decoded images by index: held in memory when they fit `cache_bytes`, else read per access."""

    def __init__(self, paths: Sequence[str], resize: int | None, cache_bytes: int, desc: str):
        self.paths, self.resize = list(paths), resize
        first = decode_image(self.paths[0], resize)
        self.first_shape = tuple(first.shape)
        estimate = first.numel() * len(self.paths)
        self.images: list[torch.Tensor] | None = None
        if estimate <= cache_bytes:
            self.images = _decode_all(self.paths, resize, desc)

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


def _is_hidden(name: str) -> bool:
    return name.startswith(".")  # .DS_Store, ._x.jpg (macOS), .ipynb_checkpoints, .git


@dataclass
class _SplitScan:
    """One split folder as found on disk."""

    images: dict[str, list[str]] = field(default_factory=dict)  # class folder -> image files
    skipped: dict[str, Counter[str]] = field(default_factory=dict)  # class -> non-image extensions
    loose_images: int = 0  # image files directly in the split folder, in no class folder


def _scan_split(split_dir: Path) -> _SplitScan:
    """The image files of each class folder of `split_dir`, recursively and in the order of
    torchvision's make_dataset (so seeded subsets and the val carve are as before). Hidden files
    and folders are skipped silently; other files without an image extension are counted."""
    scan = _SplitScan()
    with os.scandir(split_dir) as found:
        entries = sorted(found, key=lambda e: e.name)
    for entry in entries:
        if _is_hidden(entry.name):
            continue
        if not entry.is_dir():
            scan.loose_images += entry.name.lower().endswith(IMG_EXTENSIONS)
            continue
        class_dir = os.path.join(str(split_dir), entry.name)
        files, skipped = [], Counter()
        for root, _, names in sorted(os.walk(class_dir, followlinks=True)):
            if any(_is_hidden(part) for part in Path(os.path.relpath(root, class_dir)).parts):
                continue
            for name in sorted(names):
                if _is_hidden(name):
                    continue
                if name.lower().endswith(IMG_EXTENSIONS):
                    files.append(os.path.join(root, name))
                else:
                    skipped[os.path.splitext(name)[1].lower() or "(no extension)"] += 1
        scan.images[entry.name], scan.skipped[entry.name] = files, skipped
    return scan


def _train_classes(train_dir: Path, scan: _SplitScan) -> list[str]:
    """The class names: every class folder of train/, each of which must hold images."""
    if not scan.images:
        loose = scan.loose_images
        raise InputError(
            f"data.root: {train_dir} has no class folders (expected ImageFolder layout: "
            "root/train/<class>/*.jpg)"
            + (f"; its {loose} images must go into one subfolder per class" if loose else "")
        )
    empty = [c for c, files in scan.images.items() if not files]
    if empty:

        def named(c: str) -> str:
            others = sorted(scan.skipped[c])
            return f"{train_dir / c}" + (f" (only {', '.join(others)} files)" if others else "")

        raise InputError(
            f"data: {_count(len(empty), 'class folder')} of {train_dir} without images: "
            f"{_listing([named(c) for c in empty])}; every folder in train/ is a class, so add "
            f"images ({', '.join(IMG_EXTENSIONS)}) or remove the folder"
        )
    return sorted(scan.images)


def _warn_skipped(split_dir: Path, scan: _SplitScan) -> None:
    skipped = sum(scan.skipped.values(), Counter())
    if skipped:
        kinds = ", ".join(f"{ext}: {n}" for ext, n in sorted(skipped.items()))
        logger.warning(
            f"data: skipped {_count(skipped.total(), 'file')} in {split_dir} that are not "
            f"images ({kinds}); images are {', '.join(IMG_EXTENSIONS)}"
        )
    if scan.loose_images and scan.images:
        logger.warning(
            f"data: {_count(scan.loose_images, 'image')} directly in {split_dir}, in no class "
            "folder, not used"
        )


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
    """The data of one recipe: `root/train`, `root/test` and optional `root/val` in ImageFolder layout.

    The folders are listed and checked when it is built: bad input is an InputError then, and
    splits that lack classes or hold files the loader skips are logged as warnings.
    """

    def __init__(self, cfg: DataConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed
        self.root = Path(cfg.root)
        for split in ("train", "test"):
            if not (self.root / split).is_dir():
                raise InputError(
                    f"data.root: {self.root} has no '{split}/' folder "
                    "(expected ImageFolder layout: root/train/<class>/*.jpg, root/test/<class>/*.jpg)"
                )
        scans = {s: _scan_split(self.root / s) for s in SPLITS if (self.root / s).is_dir()}
        self.classes = _train_classes(self.root / "train", scans["train"])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self._samples = self._select(scans)
        self._sources: dict[str, ImageSource] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def samples(self, split: str) -> list[tuple[str, int]]:
        """(path, label) of every image the split uses, after limits and the val carve."""
        return self._samples[split]

    def _select(self, scans: dict[str, _SplitScan]) -> dict[str, list[tuple[str, int]]]:
        def labelled(split: str) -> list[tuple[str, int]]:
            images = scans[split].images
            return [(p, i) for c, i in self.class_to_idx.items() for p in images.get(c, [])]

        cfg = self.cfg
        train = _subset_per_class(labelled("train"), cfg.limit_per_class, self.seed)
        if "val" in scans:
            val = _subset_per_class(labelled("val"), cfg.limit_per_class, self.seed)
        else:
            train, val = _carve_val(train, cfg.val_fraction, self.seed)
        test = _subset_per_class(labelled("test"), cfg.test_limit_per_class, self.seed)
        out = {"train": train, "val": val, "test": test}
        for split, scan in scans.items():
            self._check_split(split, scan, out[split])
        for split, samples in out.items():
            counts = Counter(label for _, label in samples)
            missing = [c for c, i in self.class_to_idx.items() if not counts[i]]
            if samples and missing:
                logger.warning(
                    f"data: the {split} split has no images of {len(missing)} of the "
                    f"{self.num_classes} classes ({_listing(missing)}); it covers the other classes"
                )
        return out

    def _check_split(self, split: str, scan: _SplitScan, samples: list) -> None:
        split_dir = self.root / split
        _warn_skipped(split_dir, scan)
        extra = [c for c, files in scan.images.items() if c not in self.class_to_idx and files]
        if extra and samples:
            logger.warning(
                f"data: {split_dir} has class folders that train/ has not, not used: "
                + _listing([f"{c} ({len(scan.images[c])} images)" for c in extra])
            )
        if not samples and split == "val":
            logger.warning(
                f"data: {split_dir} holds no images of the train classes, so the val split is "
                "empty (remove the folder to carve val out of train/ with data.val_fraction)"
            )
        if not samples and split == "test":
            hint = ""
            if scan.loose_images and not scan.images:
                hint = f"; its {scan.loose_images} images must go into one subfolder per class"
            elif extra:
                hint = f"; its class folders ({_listing(extra)}) are none of train's"
            raise InputError(f"data.root: no images of the train classes under {split_dir}{hint}")

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images used per class in each split, after limits and the val carve:
        `{"train": {"cat": 45, ...}, "val": {...}, "test": {...}}`. Every split lists every
        class (train's class folders, in label order), with 0 where it has no images of one."""
        out = {}
        for split in SPLITS:
            counts = Counter(label for _, label in self.samples(split))
            out[split] = {c: counts[i] for c, i in self.class_to_idx.items()}
        return out

    def split_fingerprints(self) -> dict[str, str]:
        """A 16-hex-digit digest per split ("train", "val", "test") of the images it uses: each
        file's path relative to data.root, label, size and modification time (ns), sorted by path.

        It changes when a used file is added, removed, renamed or moved, changes size or is
        touched (its mtime changes, even with the same bytes), and when a class is added to or
        removed from train/ (labels shift) or the selection changes (limits, val carve, seed). It
        reads no image bytes, so new content with the same size and mtime goes unseen, and files
        the split does not use (beyond a limit, skipped) do not count.
        """
        out = {}
        start = len(os.path.join(str(self.root), ""))  # sample paths all begin with data.root/
        for split in SPLITS:
            rows = []
            for path, label in self.samples(split):
                try:
                    st = os.stat(path)
                except OSError as e:
                    raise InputError(f"data: cannot read {path} ({_decode_problem(e)})") from e
                rows.append(f"{path[start:]}\t{label}\t{st.st_size}\t{st.st_mtime_ns}")
            rows.sort()
            out[split] = hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]
        return out

    def source(self, split: str) -> ImageSource:
        if split not in self._sources:
            paths = [p for p, _ in self.samples(split)]
            if not paths:
                if split == "val" and (self.root / "val").is_dir():
                    raise InputError(
                        f"data: {self.root / 'val'} holds no images of the train classes (remove "
                        "it to carve the val split out of train/ with data.val_fraction)"
                    )
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
