"""Trainer throughput against a plain PyTorch loop, and the in-memory data path against JPEG decoding.

Same model (cifar_resnet20), data (CIFAR-10 JPEG subset, crop+flip augmentation) and batch size for
both loops. Every comparison is made in matched pairs (`compress.deploy.timing.interleave`): per
round one run of each side, in turn (the order reversed every other round), and the result is the
median of the per-round ratios, with their spread and `reliable` (the spread smaller than the
effect) under `paired`; a comparison that is not reliable prints a warning line and is listed in
`unreliable`. The training rounds run the plain loop, the compress loop on the in-memory data and
the compress loop decoding JPEGs; the data-path rounds one pass over the cached and the JPEG data.
Last stdout line: JSON with `ratio_vs_plain_loop` and `memory_cache_speedup`.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._common import SHARED, record_paired, require, save
from compress.config import DataConfig
from compress.data import ImageFolderData
from compress.deploy.timing import interleave, paired_result
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
    p.add_argument("--repeats", type=int, default=5, help="rounds (matched pairs), at least 3")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--name", default="trainer_throughput", help="results/NAME.json")
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
    passes = interleave(
        {"jpeg": lambda: data_pass(uncached), "cached": lambda: data_pass(cached)}, args.repeats
    )

    loader = cached.loader("train", train=True)
    jpeg_loader = uncached.loader("train", train=True)
    if len(loader) < args.steps:
        raise SystemExit(f"--per-class {args.per_class} gives {len(loader)} batches < --steps")
    cfg = TrainingConfig(epochs=1, lr=0.05, max_steps_per_epoch=args.steps)

    def seeded(run):
        """`run` on a fresh cifar_resnet20 whose init is seeded by the round (alike each side)."""
        seeds = itertools.count()

        def measure() -> float:
            torch.manual_seed(next(seeds))
            return run(build_model(ModelSpec("cifar_resnet20")))

        return measure

    runs = interleave(
        {
            "plain": seeded(lambda m: plain_loop(m, loader, args.steps)),
            "compress": seeded(lambda m: compress_loop(m, loader, args.steps, cfg)),
            "compress_jpeg": seeded(lambda m: compress_loop(m, jpeg_loader, args.steps, cfg)),
        },
        args.repeats,
    )
    vs_plain = paired_result(runs["plain"], runs["compress"])
    from_cache = paired_result(runs["compress_jpeg"], runs["compress"])
    cache_pass = paired_result(passes["jpeg"], passes["cached"])
    result = {
        "benchmark": "trainer_throughput",
        "model": "cifar_resnet20",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "rounds": args.repeats,
        "threads": torch.get_num_threads(),
        "plain_loop_ips": vs_plain.a_median,
        "compress_loop_ips": vs_plain.b_median,
        "plain_runs_ips": runs["plain"],
        "compress_runs_ips": runs["compress"],
        "data_pass_cached_ips": cache_pass.b_median,
        "data_pass_jpeg_ips": cache_pass.a_median,
        "train_ips_jpeg_decoding": from_cache.a_median,
        "note": "ratios are medians of per-round ratios (compress / plain, cached / JPEG); "
        "compress_loop_ips includes fit()'s epoch checkpoint write; memory_cache_speedup is the "
        "data path alone (augment + collate, no model)",
    }
    for key, paired, what in (
        ("ratio_vs_plain_loop", vs_plain, "compress loop / plain loop throughput"),
        ("memory_cache_speedup", cache_pass, "cached / JPEG data-pass throughput"),
        ("train_speedup_from_cache", from_cache, "cached / JPEG training throughput"),
    ):
        result[key] = record_paired(result, key, paired, what)
    for k in (
        "plain_loop_ips",
        "compress_loop_ips",
        "ratio_vs_plain_loop",
        "memory_cache_speedup",
        "train_speedup_from_cache",
    ):
        spread = result["paired"][k]["spread"] if k in result["paired"] else None
        print(f"{k:>28}: {result[k]:.3f}" + (f"  (IQR {spread:.3f})" if spread is not None else ""))
    save(args.name, result)


if __name__ == "__main__":
    main()
