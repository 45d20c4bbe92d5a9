"""Run a recipe: stages in order, one folder each, resumable, with report.json kept current.

A stage is skipped when its folder holds a finished `stage.json` whose key matches; the key hashes
the stage's config with the key of everything before it (data, models, seed, earlier stages).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from compress.config import ModelConfig
from compress.data import ImageFolderData
from compress.errors import InputError
from compress.evaluation import count_flops, count_params, evaluate
from compress.io import content_digest, read_json_if_intact, write_json, write_text
from compress.log import logger, setup_logging
from compress.models import (
    ModelSpec,
    build_model,
    create_model,
    float_spec,
    load_model,
    save_model,
)
from compress.recipe import Recipe
from compress.report import RunReport
from compress.run_lock import LOCK_FILE, RunLock
from compress.runs import (
    MODEL_FILE,
    RECIPE_FILE,
    RUN_MARKER,
    STAGE_STATE,
    TEACHER_FILE,
    stage_folder,
)
from compress.stages import STAGES, StageContext
from compress.train.distributed import DistInfo, barrier, broadcast, init_distributed

SCRATCH_FILES = ("checkpoint.pt", "teacher_logits.pt")


def resolve_device(preference: str) -> torch.device:
    import os

    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InputError(
                "device: cuda requested but no CUDA device is available (use auto or cpu)"
            )
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _clear_folder(folder: Path, keep: tuple[str, ...]) -> None:
    """Delete everything in `folder` but the names in `keep` (the folder may be a symlink)."""
    for entry in folder.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_identity(cfg: ModelConfig | None) -> Any:
    """A model config plus the content hashes of the files it reads: a replaced file re-runs, one
    touched, remounted or copied over with the same bytes does not."""
    if cfg is None:
        return None
    hashes = [
        content_digest(p) for p in (cfg.weights, Path(cfg.model)) if p is not None and p.is_file()
    ]
    return [cfg.model_dump(mode="json"), hashes]


def model_facts(
    model: nn.Module, input_size: tuple[int, int, int], spec: ModelSpec | None = None
) -> dict[str, Any]:
    """Parameters, bytes and FLOPs; an INT8 model's FLOPs are its float graph's, and its size
    what it deploys as where it says (an onnxruntime INT8 model: its ONNX file)."""
    deployed = getattr(model, "deployed_size_bytes", None)
    size = deployed() if deployed else sum(t.nbytes for t in model.state_dict().values())
    float_model = model
    if spec is not None and spec.int8 is not None:
        float_model = build_model(float_spec(spec))
    return {
        "params": count_params(model),
        "size_bytes": size,
        "flops": count_flops(float_model, input_size),
    }


class Pipeline:
    """One run of a recipe into `out_dir`."""

    def __init__(self, recipe: Recipe, out_dir: Path, fresh: bool = False):
        self.recipe, self.out_dir = recipe, Path(out_dir)
        self.device = resolve_device(recipe.device)
        self.dist: DistInfo = init_distributed(self.device)
        self._lock: RunLock | None = None
        self._prepare_dir(fresh)
        try:
            seed_everything(recipe.seed)
            self.data = ImageFolderData(recipe.data, recipe.seed)
            self._teacher: nn.Module | None = None
            self._teacher_spec: ModelSpec | None = None
            self._teacher_file: Path | None = None  # set once a stage has adapted the teacher
            self.report = RunReport(self.out_dir, recipe.name, writer=self.dist.is_main)
        except BaseException:
            self.close()
            raise

    def _prepare_dir(self, fresh: bool) -> None:
        """Check and lock the run folder (rank 0), then clear it (`fresh`) or tidy it."""
        out = self.out_dir
        if self.dist.is_main:
            if out.exists() and not out.is_dir():
                raise InputError(f"--out {out}: is a file, not a folder; choose another --out")
            if out.is_dir() and any(out.iterdir()) and not (out / RUN_MARKER).exists():
                raise InputError(
                    f"--out {out}: folder exists and is not a compress run; choose another folder"
                )
            try:
                out.mkdir(parents=True, exist_ok=True)
                self._lock = RunLock(out)
                self._lock.acquire()
            except OSError as e:
                raise InputError(f"--out {out}: cannot write there ({e.strerror})") from None
            try:
                if fresh:
                    _clear_folder(out, keep=(LOCK_FILE,))
                for orphan in out.rglob(".*.tmp"):  # left by a write that was killed
                    orphan.unlink(missing_ok=True)
                (out / RUN_MARKER).touch()
                setup_logging(out / "run.log")
                resolved = self.recipe.model_dump(mode="json", exclude_none=False)
                write_text(out / RECIPE_FILE, yaml.safe_dump(resolved, sort_keys=False))
            except BaseException:
                self.close()
                raise
        barrier(self.dist)

    def close(self) -> None:
        """Release the run folder's lock (done by `run`)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------ models

    def teacher(self) -> nn.Module:
        """The recipe's teacher, or the latest adapted one, in eval mode with gradients off."""
        return self._teacher_and_spec()[0]

    def _teacher_and_spec(self) -> tuple[nn.Module, ModelSpec]:
        if self._teacher is None:
            assert self.recipe.teacher is not None
            cfg = self.recipe.teacher
            if self._teacher_file is not None:
                model, self._teacher_spec = load_model(self._teacher_file)
            else:
                model, self._teacher_spec = create_model(
                    cfg.model, cfg.kwargs, cfg.weights, self.data.num_classes
                )
            model.eval().requires_grad_(False)
            self._teacher = model.to(self.device)
        assert self._teacher_spec is not None
        return self._teacher, self._teacher_spec

    def _measure(
        self, model: nn.Module, label: str, spec: ModelSpec | None = None
    ) -> dict[str, Any]:
        """Facts and test accuracy of a model (rank 0 only)."""
        facts = model_facts(model.cpu(), self.data.input_size, spec)
        test = evaluate(model, self.data.loader("test"), self.device, desc=f"test {label}")
        return {**facts, "top1": test["top1"], "top5": test["top5"], "test_n": test["n"]}

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        """Run every stage not already finished; report.json says `failed` if one raises."""
        try:
            return self._run()
        except BaseException as e:
            self.report.fail(f"{type(e).__name__}: {e}")
            with contextlib.suppress(OSError):  # e.g. the disk is full: keep the first error
                self.report.write()
            raise
        finally:
            self.close()

    def _run(self) -> dict[str, Any]:
        recipe, data = self.recipe, self.data
        # The images each split uses (names, sizes, mtimes): changed data re-runs what it feeds.
        splits = data.split_fingerprints()
        teacher_key = digest(
            recipe.data.model_dump(mode="json"), model_identity(recipe.teacher), splits["test"]
        )
        key = digest(teacher_key, recipe.seed, model_identity(recipe.student_config()), splits)
        self.report.set_environment(self.device)
        self.report.set_data(data.class_counts(), splits)
        if recipe.teacher is not None and self.dist.is_main:
            self._teacher_entry(teacher_key)
        seed_everything(recipe.seed)
        student = recipe.student_config()
        model, spec = create_model(student.model, student.kwargs, student.weights, data.num_classes)
        current = "student"
        self.report.ensure_model(
            current, role="input", spec=spec.name, **model_facts(model, data.input_size, spec)
        )
        artifacts: dict[str, str] = {}
        self.report.write()
        for index, cfg in enumerate(recipe.stages):
            stage_type = STAGES[cfg.type]
            key = digest(key, cfg.model_dump(mode="json"))
            stage_dir = self.out_dir / stage_folder(index, cfg.label)
            state = self._finished_state(stage_dir, key)
            if state is not None:
                if self.dist.is_main:
                    logger.info(f"[{index}] {cfg.label}: done earlier, skipped")
                if stage_type.makes_model:
                    model, spec = load_model(stage_dir / MODEL_FILE)
            else:
                state, model, spec = self._run_stage(
                    index, cfg, stage_dir, key, model, spec, artifacts
                )
            artifacts.update(state.get("artifacts", {}))
            if stage_type.makes_model:
                current = stage_folder(index, cfg.label)
            if stage_type.makes == "teacher":  # later stages learn from the adapted teacher
                self._teacher_file, self._teacher = stage_dir / TEACHER_FILE, None
            self.report.record_stage(index, cfg, stage_dir, state, current)
            self.report.write()
        self.report.finish()
        if self.dist.is_main:
            self.report.render()
        self.report.write()  # last: a run that says `complete` has all its files
        barrier(self.dist)
        return self.report.data

    def _teacher_entry(self, key: str) -> None:
        path = self.out_dir / "teacher" / "metrics.json"
        cached = read_json_if_intact(path)
        if not isinstance(cached, dict) or cached.get("key") != key:
            logger.info("teacher: measuring on the test split")
            t0 = time.perf_counter()
            measured = self._measure(self.teacher(), "teacher")
            measured["wall_time_s"] = time.perf_counter() - t0
            cached = {"key": key, "metrics": measured}
            write_json(path, cached)
        assert self.recipe.teacher is not None
        self.report.ensure_model(
            "teacher", role="teacher", spec=self.recipe.teacher.model, **cached["metrics"]
        )

    def _in_run_folder(self, artifacts: dict[str, str]) -> dict[str, str]:
        """Artifact paths as recorded: relative to the run folder, so that a run resumes from any
        working directory and never picks up another run's files."""
        root = self.out_dir.resolve()
        recorded = {}
        for name, path in artifacts.items():
            resolved = Path(path).resolve()  # a file outside the run folder stays absolute
            inside = resolved.is_relative_to(root)
            recorded[name] = resolved.relative_to(root).as_posix() if inside else str(resolved)
        return recorded

    def _finished_state(self, stage_dir: Path, key: str) -> dict[str, Any] | None:
        """The stage's state if it finished with this key and its files are all there."""
        state = None
        if self.dist.is_main:
            state = read_json_if_intact(stage_dir / STAGE_STATE)
            if (
                not isinstance(state, dict)
                or state.get("status") != "done"
                or state.get("key") != key
            ):
                state = None
            elif not all((self.out_dir / p).exists() for p in state.get("artifacts", {}).values()):
                logger.info(f"{stage_dir}: files it made are missing: running it again")
                state = None
        return broadcast(self.dist, state)

    def _run_stage(self, index, cfg, stage_dir, key, model, spec, artifacts):
        stage_type = STAGES[cfg.type]
        if self.dist.is_main:
            previous = read_json_if_intact(stage_dir / STAGE_STATE)
            previous_key = previous.get("key") if isinstance(previous, dict) else None
            if previous_key != key and stage_dir.exists():  # changed or unreadable: start over
                shutil.rmtree(stage_dir)
            stage_dir.mkdir(parents=True, exist_ok=True)
            write_json(stage_dir / STAGE_STATE, {"key": key, "status": "running", "type": cfg.type})
            logger.info(f"[{index}] {cfg.label}: running")
        barrier(self.dist)
        ctx = StageContext(
            recipe=self.recipe,
            index=index,
            stage_dir=stage_dir,
            device=self.device,
            data=self.data,
            model=model,
            spec=spec,
            dist=self.dist,
            artifacts={k: str(self.out_dir / v) for k, v in artifacts.items()},
            teacher_loader=self._teacher_and_spec,
        )
        t0 = time.perf_counter()
        state: dict[str, Any] = {"key": key, "type": cfg.type, "label": cfg.label}
        made = None
        if stage_type.makes is not None or self.dist.is_main:
            try:
                result = stage_type.run(ctx, cfg)
            except Exception as e:
                if self.dist.is_main:
                    write_json(
                        stage_dir / STAGE_STATE, {**state, "status": "failed", "error": str(e)}
                    )
                raise
            made = result.model
            if made is not None and stage_type.makes_model:
                model, spec = made, result.spec or spec
            state.update(
                metrics=result.metrics,
                artifacts=self._in_run_folder(result.artifacts),
                model_metrics=result.model_metrics,
                teacher_metrics=result.teacher_metrics,
            )
        state["wall_time_s"] = time.perf_counter() - t0
        if self.dist.is_main:
            if stage_type.makes_model:
                save_model(model.cpu(), spec, stage_dir / MODEL_FILE)
                state["model"] = {"spec": spec.name, **self._measure(model, cfg.label, spec)}
            if stage_type.makes == "teacher" and made is not None:
                assert self._teacher_spec is not None  # the stage built the teacher it adapted
                save_model(made.cpu(), self._teacher_spec, stage_dir / TEACHER_FILE)
                measured = self._measure(made, f"{cfg.label} teacher")
                state["teacher_model"] = {"spec": self._teacher_spec.name, **measured}
            state["status"] = "done"
            write_json(stage_dir / STAGE_STATE, state)
            for name in SCRATCH_FILES:
                (stage_dir / name).unlink(missing_ok=True)
        state = broadcast(self.dist, state)
        barrier(self.dist)
        return state, model, spec
