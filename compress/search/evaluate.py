"""Candidate evaluation: build a candidate from the start model, fine-tune it briefly with KD on
cached teacher logits, score it on a validation sample, and keep the best one's weights on disk
(each rank its own best; after every update the best of all ranks becomes BEST_FILE)."""

from __future__ import annotations

import copy
import math
import random
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from compress.data import ImageFolderData
from compress.evaluation import count_flops, count_params, evaluate
from compress.io import atomic_path, read_json, write_json
from compress.log import logger
from compress.models import ModelSpec, save_model
from compress.search.records import CandidateRecord, Evaluation
from compress.search.reward import compression, reward
from compress.search.settings import SearchSettings
from compress.search.surgery import Candidate, build_candidate, candidate_spec
from compress.search.units import Unit
from compress.train.distributed import DistInfo
from compress.train.loop import TrainingConfig, fit
from compress.train.objectives import DistillationObjective
from compress.train.teacher_logits import TeacherLogits

BEST_FILE = "best_candidate.safetensors"
BEST_INFO = "best_candidate.json"


def sample_indices(n: int, k: int | None, seed: int) -> list[int]:
    """k indices of n, reproducibly shuffled (all of them when k is None)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[: k or n])


@dataclass
class CandidateData:
    """The images candidates are fine-tuned on (`train`, the train samples at `train_indices`)
    and scored on (`val`, a sample of the validation split)."""

    train: DataLoader
    val: DataLoader
    train_indices: list[int]
    input_size: tuple[int, int, int]
    teacher_logits: TeacherLogits | None = None  # rows for `train_indices`; None: the teacher runs


def candidate_data(data: ImageFolderData, settings: SearchSettings, seed: int) -> CandidateData:
    """`candidate_images` train and `val_images` validation samples drawn with `seed`. The train
    images get the eval transform (deterministic, so the teacher's logits are computed once for
    every candidate) in shuffled order, as the split is stored class by class."""
    train_idx = sample_indices(len(data.samples("train")), settings.candidate_images, seed)
    val_idx = sample_indices(len(data.samples("val")), settings.val_images, seed)
    val = data.loader("val", indices=val_idx)
    train = data.loader(
        "train",
        train=False,
        batch_size=settings.candidate_batch_size,
        sampler=RandomSampler(range(len(train_idx))),  # drawn from the loop's seeded RNG
        indices=train_idx,
    )
    return CandidateData(train, val, train_idx, data.input_size)


def latency_ms(model: nn.Module, input_size: tuple[int, int, int]) -> float:
    """Median eager batch-1 forward time on the CPU."""
    from compress.deploy.timing import time_calls

    model = copy.deepcopy(model).cpu().eval()  # the teacher stays where it is
    x = torch.zeros(1, *input_size)
    with torch.no_grad():
        times = time_calls(lambda: model(x), warmup=3, min_iters=20, min_duration_s=0.2)
    return 1e3 * statistics.median(times)


class CandidateEvaluator:
    """Builds, fine-tunes and scores one candidate; keeps the best one's weights in `work_dir`.

    Candidates are cut from `start` (rebuilt by `start_spec`) along `units` and distilled from
    `teacher`, whose validation top-1 is `teacher_val`; `dist` tells which rank this is."""

    def __init__(
        self,
        start: nn.Module,
        start_spec: ModelSpec,
        units: list[Unit],
        teacher: nn.Module,
        teacher_val: float,
        data: CandidateData,
        settings: SearchSettings,
        device: torch.device,
        work_dir: Path,
        dist: DistInfo,
        seed: int = 0,
    ):
        self.s, self.units, self.data = settings, units, data
        self.start, self.start_spec = start.cpu().eval(), start_spec
        self.input_size = data.input_size
        self.teacher_val = teacher_val
        self.device, self.work_dir, self.dist, self.seed = device, Path(work_dir), dist, seed
        self.teacher_costs = self.costs(teacher)
        self.objective = DistillationObjective(
            teacher, settings.temperature, settings.alpha, teacher_logits=data.teacher_logits
        )
        steps_per_epoch = max(1, len(data.train))
        epochs = max(1, math.ceil(settings.candidate_steps / steps_per_epoch))
        self.training = TrainingConfig(
            epochs=epochs,
            optimizer=settings.candidate_optimizer,
            lr=settings.candidate_lr,
            batch_size=settings.candidate_batch_size,
            max_steps_per_epoch=max(1, math.ceil(settings.candidate_steps / epochs)),
        )
        self.steps = epochs * min(steps_per_epoch, self.training.max_steps_per_epoch or 1)
        info = self.work_dir / BEST_INFO
        self.best_reward = read_json(info)["reward_raw"] if info.is_file() else -math.inf

    @property
    def train_images(self) -> int:
        """Images one candidate's fine-tuning processes."""
        return self.steps * self.s.candidate_batch_size

    def costs(self, model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {
            "params": count_params(model),
            "flops": count_flops(model, self.input_size),
        }
        if self.s.cost == "latency" or self.s.max_latency_ms is not None:
            out["latency_ms"] = latency_ms(model, self.input_size)
        return out

    def __call__(self, candidate: Candidate) -> Evaluation:
        s = self.s
        try:
            model = build_candidate(
                self.start, self.units, candidate, self.input_size, s.round_to, s.reinit
            )
        except (ValueError, RuntimeError) as e:  # an architecture that does not run
            return Evaluation(reward_raw=None, error=str(e))
        costs = self.costs(model)
        if s.candidate_steps:
            work = self.work_dir / f"candidate.rank{self.dist.rank}"
            shutil.rmtree(work, ignore_errors=True)
            fit(
                model,
                self.objective,
                self.data.train,
                None,
                self.training,
                self.device,
                work,
                DistInfo(),  # under torchrun each rank fine-tunes its own candidates alone
                desc="candidate",
                seed=self.seed,
            )
            shutil.rmtree(work, ignore_errors=True)
        val = evaluate(model, self.data.val, self.device, desc="candidate val")["top1"]
        key = s.cost_key
        raw = reward(val, self.teacher_val, costs[key], self.teacher_costs[key])
        violates = (
            (s.max_params is not None and costs["params"] > s.max_params)
            or (s.max_flops is not None and costs["flops"] > s.max_flops)
            or (s.max_latency_ms is not None and costs["latency_ms"] > s.max_latency_ms)
        )
        result = Evaluation(
            **costs,
            val_top1=val,
            compression=compression(costs[key], self.teacher_costs[key]),
            reward_raw=raw,
            violates=bool(violates),
            train_images=self.train_images,
        )
        if not violates and raw > self.best_reward:  # kept until `promote` sees every rank's
            self.best_reward = raw
            spec = candidate_spec(self.start_spec, model, self.units, candidate, self.input_size)
            save_model(model.cpu(), spec, self._rank_best(self.dist.rank))
            write_json(
                self._rank_best(self.dist.rank).with_suffix(".json"), {"key": candidate.key()}
            )
        return result

    def _rank_best(self, rank: int) -> Path:
        return self.work_dir / f"best_candidate.rank{rank}.safetensors"

    def promote(self, best: CandidateRecord | None) -> None:
        """After an update: the best candidate so far (evaluated on any rank) becomes BEST_FILE."""
        if best is None:
            return
        self.best_reward = max(self.best_reward, best.reward_raw)
        info = self.work_dir / BEST_INFO
        if not self.dist.is_main or (info.is_file() and read_json(info)["key"] == best.key):
            return
        source = self._rank_best(best.rank)
        # The evaluating rank saved it, as it beat every reward that rank knew of.
        saved = source.with_suffix(".json")
        if not saved.is_file() or read_json(saved)["key"] != best.key:
            logger.warning(f"search: the weights of candidate {best.key} were not kept")
            return
        with atomic_path(self.work_dir / BEST_FILE) as tmp:
            shutil.copyfile(source, tmp)
        write_json(info, {"key": best.key, "reward_raw": best.reward_raw})

    def clean_up(self) -> None:
        """Remove every rank's kept weights (once BEST_FILE is loaded)."""
        for kept in self.work_dir.glob("best_candidate.rank*"):
            kept.unlink()
