"""Experiment tracking: the training loop's metrics in TensorBoard and MLflow, off by default."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compress.config import DataConfig, TrackingConfig
from compress.data import ImageFolderData
from compress.errors import InputError
from compress.pipeline import Pipeline
from compress.recipe import parse_recipe
from compress.train.distributed import DistInfo
from compress.train.hooks import TrainHooks
from compress.train.loop import TrainingConfig, fit
from compress.train.objectives import CrossEntropyObjective
from compress.train.tracking import MLFLOW_DIR, MLFLOW_RUNS, MlflowSink, TensorBoardSink


def _tensorboard_installed() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


needs_tensorboard = pytest.mark.skipif(
    not _tensorboard_installed(), reason="tensorboard is not installed"
)


def _recipe(data_root: Path, tracking: dict | None = None, epochs: int = 1) -> dict:
    recipe = {
        "name": "tracked",
        "seed": 0,
        "data": {"root": str(data_root), "batch_size": 8, "augment": "none"},
        "student": "cifar_resnet20",
        "stages": [{"type": "train", "epochs": epochs, "optimizer": "adamw", "lr": 1e-3}],
    }
    if tracking is not None:
        recipe["tracking"] = tracking
    return recipe


def _epochs(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class _Crash(Exception):
    pass


class _Interrupt(TrainHooks):
    """Stops training (as a crash would) before the forward pass of step `after` + 1."""

    def __init__(self, after: int):
        self.after, self.calls = after, 0

    def before_forward(self, model: nn.Module) -> None:
        self.calls += 1
        if self.calls > self.after:
            raise _Crash


def _tiny_fit(data: ImageFolderData, stage_dir: Path, epochs: int, sinks, hooks=None) -> None:
    """Two layers trained by the one loop on the real images."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, data.num_classes),
    )
    cfg = TrainingConfig(epochs=epochs, optimizer="adamw", lr=1e-3)
    train = data.loader("train", train=True)
    fit(
        model,
        CrossEntropyObjective(),
        train,
        None,
        cfg,
        torch.device("cpu"),
        stage_dir,
        DistInfo(),
        hooks=hooks,
        sinks=sinks,
        log_every_steps=1,
    )


@pytest.fixture()
def tiny_data(tiny_image_folder) -> ImageFolderData:
    return ImageFolderData(DataConfig(root=tiny_image_folder, augment="none", batch_size=8), 0)


# ---------------------------------------------------------------- TensorBoard


@needs_tensorboard
def test_tensorboard_holds_the_loss_of_every_logged_step(tmp_path, tiny_image_folder):
    tracking = {"tensorboard": True, "log_every_steps": 1}
    out = tmp_path / "run"
    report = Pipeline(parse_recipe(_recipe(tiny_image_folder, tracking, epochs=2)), out).run()
    assert report["status"] == "complete"

    log_dir = out / "tensorboard" / "00-train"  # `tensorboard --logdir <run>/tensorboard`
    assert list(log_dir.glob("events.out.tfevents.*"))
    scalars = _scalars(log_dir)
    epochs = _epochs(out / "00-train")
    steps = len(scalars["train/loss"]) // 2
    assert steps > 1
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 2 * steps + 1))
    assert [s for s, _ in scalars["train/lr"]] == list(range(1, 2 * steps + 1))
    assert all(v > 0 for _, v in scalars["train/loss"])
    # The epoch records of metrics.jsonl, at the step each epoch ends on.
    assert [s for s, _ in scalars["epoch/train_loss"]] == [steps, 2 * steps]
    for (_, logged), record in zip(scalars["epoch/train_loss"], epochs, strict=True):
        assert logged == pytest.approx(record["train_loss"], rel=1e-5)
    assert [v for _, v in scalars["epoch/val_top1"]] == pytest.approx(
        [r["val_top1"] for r in epochs]
    )
    assert not (out / MLFLOW_DIR).exists()


@needs_tensorboard
def test_tensorboard_after_a_resume_shows_each_step_once(tmp_path, tiny_data):
    """An interrupted stage resumes from its epoch checkpoint; what the interrupted attempt
    logged after that checkpoint is hidden, so each step has one value."""
    stage_dir, log_dir = tmp_path / "00-train", tmp_path / "tensorboard" / "00-train"
    steps = len(tiny_data.loader("train", train=True))
    sink = TensorBoardSink(log_dir)
    with pytest.raises(_Crash):
        _tiny_fit(tiny_data, stage_dir, 2, [sink], hooks=_Interrupt(steps + 2))
    sink.close(failed=True)
    assert [s for s, _ in _scalars(log_dir)["train/loss"]] == list(range(1, steps + 3))

    sink = TensorBoardSink(log_dir)
    _tiny_fit(tiny_data, stage_dir, 2, [sink])
    sink.close()
    scalars = _scalars(log_dir)
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 2 * steps + 1))
    assert [s for s, _ in scalars["epoch/train_loss"]] == [steps, 2 * steps]


# ---------------------------------------------------------------- missing packages, defaults


@pytest.mark.parametrize(
    "option, modules",
    [
        ("tensorboard", ("tensorboard", "torch.utils.tensorboard")),
        ("mlflow", ("mlflow",)),
    ],
)
def test_a_missing_extra_fails_validation_naming_the_field_and_the_install(
    monkeypatch, tiny_image_folder, option, modules
):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(InputError) as e:
        parse_recipe(_recipe(tiny_image_folder, {option: True}))
    message = str(e.value)
    assert f"tracking.{option}:" in message
    assert f"pip install 'compress[{option}]'" in message


def test_a_missing_extra_stops_the_run_before_training(monkeypatch, tmp_path, tiny_image_folder):
    """A tracking section that bypassed validation (or an extra uninstalled since) still fails
    with the same message when the training stage starts, before its first step."""
    recipe = parse_recipe(_recipe(tiny_image_folder))
    recipe.tracking = TrackingConfig.model_construct(tensorboard=True)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    with pytest.raises(InputError, match=r"tracking\.tensorboard: .*compress\[tensorboard\]"):
        Pipeline(recipe, out).run()
    assert not (out / "00-train" / "metrics.jsonl").exists()
    assert not (out / "00-train" / "checkpoint.pt").exists()
    assert not (out / "tensorboard").exists()


def test_by_default_nothing_is_tracked(tmp_path, tiny_image_folder):
    recipe = parse_recipe(_recipe(tiny_image_folder))
    assert recipe.tracking == TrackingConfig()
    assert not recipe.tracking.tensorboard and not recipe.tracking.mlflow
    out = tmp_path / "run"
    assert Pipeline(recipe, out).run()["status"] == "complete"
    assert (out / "00-train" / "metrics.jsonl").is_file()
    assert not (out / "tensorboard").exists()
    assert not (out / MLFLOW_DIR).exists()


# ---------------------------------------------------------------- MLflow


def _mlflow_client(out: Path):
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{(out / MLFLOW_DIR / 'mlflow.db').resolve()}")


def test_mlflow_logs_a_run_with_a_nested_run_per_stage(tmp_path, tiny_image_folder):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    tracking = {"mlflow": True, "log_every_steps": 1}
    out = tmp_path / "run"
    Pipeline(parse_recipe(_recipe(tiny_image_folder, tracking)), out).run()
    client = _mlflow_client(out)
    experiment = client.get_experiment_by_name("tracked")  # the recipe's name
    assert experiment is not None
    assert experiment.artifact_location.startswith((out / MLFLOW_DIR).resolve().as_uri())
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"tracked", "00-train"}
    parent, child = runs["tracked"], runs["00-train"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.status == child.info.status == "FINISHED"
    assert child.data.params["epochs"] == "1" and child.data.params["optimizer"] == "adamw"
    history = client.get_metric_history(child.info.run_id, "train/loss")
    steps = len(history)
    assert steps > 1 and sorted(m.step for m in history) == list(range(1, steps + 1))
    epoch = client.get_metric_history(child.info.run_id, "epoch/train_loss")
    assert [(m.step, m.value) for m in epoch] == [
        (steps, pytest.approx(_epochs(out / "00-train")[0]["train_loss"]))
    ]
    assert not (out / "tensorboard").exists()


def test_mlflow_resumed_stage_continues_its_run(tmp_path, tiny_data):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    stage_dir = tmp_path / "00-train"
    steps = len(tiny_data.loader("train", train=True))

    def sink() -> MlflowSink:
        return MlflowSink(tmp_path, "00-train", "tracked", params={"epochs": 2})

    first = sink()
    with pytest.raises(_Crash):
        _tiny_fit(tiny_data, stage_dir, 2, [first], hooks=_Interrupt(steps + 1))
    first.close(failed=True)
    ids = json.loads((tmp_path / MLFLOW_DIR / MLFLOW_RUNS).read_text())
    client = _mlflow_client(tmp_path)
    assert client.get_run(ids["stages"]["00-train"]).info.status == "FAILED"

    second = sink()
    _tiny_fit(tiny_data, stage_dir, 2, [second])
    second.close()
    again = json.loads((tmp_path / MLFLOW_DIR / MLFLOW_RUNS).read_text())
    assert again == ids  # the same MLflow runs, continued
    run = client.get_run(ids["stages"]["00-train"])
    assert run.info.status == "FINISHED"
    epoch = client.get_metric_history(run.info.run_id, "epoch/train_loss")
    assert sorted(m.step for m in epoch) == [steps, 2 * steps]
    assert (
        max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == 2 * steps
    )
