"""Trainer throughput against a plain PyTorch loop, and the in-memory data path against JPEG decoding.

Same model (cifar_resnet20), data (CIFAR-10 JPEG subset, crop+flip augmentation) and batch size for
both loops; runs alternate (plain, compress, plain, ...) and the median of each is compared.
Last stdout line: JSON with `ratio_vs_plain_loop` and `memory_cache_speedup`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._common import SHARED, require, save
from compress.config import DataConfig
from compress.data import ImageFolderData
from compress.models import ModelSpec, build_model
from compress.train.distributed import DistInfo
from compress.train.loop import TrainingConfig, fit
from compress.train.objectives import CrossEntropyObjective


def plain_loop(model, loader, steps: int) -> float:
    """The loop a person writes by hand; returns images per second."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    seen, t0 = 0, time.perf_counter()
    for step, (x, y, _) in enumerate(loader):
        if step >= steps:
            break
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += y.numel()
    return seen / (time.perf_counter() - t0)


def compress_loop(model, loader, steps: int, cfg: TrainingConfig) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fit(
            model,
            CrossEntropyObjective(),
            loader,
            None,
            cfg,
            torch.device("cpu"),
            Path(tmp),
            DistInfo(),
            desc="compress",
        )
        return steps * loader.batch_size / (time.perf_counter() - t0)


def data_pass(data: ImageFolderData) -> float:
    loader = data.loader("train", train=True)
    n, t0 = 0, time.perf_counter()
    for _, y, _ in loader:
        n += y.numel()
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--per-class", type=int, default=1200, help="train images per class")
    p.add_argument("--steps", type=int, default=80, help="training steps per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    root = require(SHARED / "data" / "cifar10")
    base = {
        "root": root,
        "limit_per_class": args.per_class,
        "val_fraction": 0.0,
        "batch_size": args.batch_size,
    }

    cached = ImageFolderData(DataConfig(**base))
    uncached = ImageFolderData(DataConfig(**base, cache_mb=0))
    cached.source("train")  # decode once, outside the timing
    cache_ips = statistics.median(data_pass(cached) for _ in range(args.repeats))
    jpeg_ips = statistics.median(data_pass(uncached) for _ in range(args.repeats))

    loader = cached.loader("train", train=True)
    if len(loader) < args.steps:
        raise SystemExit(f"--per-class {args.per_class} gives {len(loader)} batches < --steps")
    cfg = TrainingConfig(epochs=1, lr=0.05, max_steps_per_epoch=args.steps)
    plain, ours = [], []
    for r in range(args.repeats):
        torch.manual_seed(r)
        plain.append(plain_loop(build_model(ModelSpec("cifar_resnet20")), loader, args.steps))
        torch.manual_seed(r)
        ours.append(
            compress_loop(build_model(ModelSpec("cifar_resnet20")), loader, args.steps, cfg)
        )
    jpeg_train = compress_loop(
        build_model(ModelSpec("cifar_resnet20")),
        uncached.loader("train", train=True),
        args.steps,
        cfg,
    )
    result = {
        "benchmark": "trainer_throughput",
        "model": "cifar_resnet20",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "plain_loop_ips": statistics.median(plain),
        "compress_loop_ips": statistics.median(ours),
        "ratio_vs_plain_loop": statistics.median(ours) / statistics.median(plain),
        "plain_runs_ips": plain,
        "compress_runs_ips": ours,
        "data_pass_cached_ips": cache_ips,
        "data_pass_jpeg_ips": jpeg_ips,
        "memory_cache_speedup": cache_ips / jpeg_ips,
        "train_ips_jpeg_decoding": jpeg_train,
        "train_speedup_from_cache": statistics.median(ours) / jpeg_train,
        "note": "compress_loop_ips includes fit()'s epoch checkpoint write; "
        "memory_cache_speedup is the data path alone (augment + collate, no model)",
    }
    for k in (
        "plain_loop_ips",
        "compress_loop_ips",
        "ratio_vs_plain_loop",
        "memory_cache_speedup",
        "train_speedup_from_cache",
    ):
        print(f"{k:>28}: {result[k]:.3f}")
    save("trainer_throughput", result)


if __name__ == "__main__":
    main()
