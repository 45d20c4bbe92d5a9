"""Experiment tracking: the training loop's metrics also go to TensorBoard and/or MLflow.

Both are optional extras, switched on in the recipe's `tracking` section. The loop hands every
sink the metrics of a step (`train/loss`, `train/lr`) and of an epoch (`epoch/<metrics.jsonl
key>`), all against the number of optimiser steps taken. Only rank 0 writes. TensorBoard and
MLflow are imported when a sink is made, so `import compress` does not load them.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.errors import InputError
from compress.io import read_json, write_json
from compress.log import logger

if TYPE_CHECKING:
    from compress.config import TrackingConfig
    from compress.train.distributed import DistInfo

TENSORBOARD_DIR = "tensorboard"  # <run>/tensorboard/<stage folder>/: one TensorBoard run a stage
MLFLOW_DIR = "mlflow"  # <run>/mlflow/: the default MLflow store and the ids of this run's runs
MLFLOW_DB = "mlflow.db"
MLFLOW_RUNS = "runs.json"

# What each sink imports, and the extra that installs it.
REQUIREMENTS = {
    "tensorboard": (("tensorboard", "torch.utils.tensorboard"), "tensorboard"),
    "mlflow": (("mlflow",), "mlflow"),
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or the module is blocked
        return False


def missing_package(option: str) -> str | None:
    """Why `tracking.<option>: true` cannot work here (a package is missing), or None."""
    modules, extra = REQUIREMENTS[option]
    if all(_importable(m) for m in modules):
        return None
    return (
        f"needs the {modules[0]} package, which is not installed: pip install 'compress[{extra}]'"
    )


def _require(option: str) -> None:
    problem = missing_package(option)
    if problem is not None:
        raise InputError(f"tracking.{option}: {problem}")


class MetricSink:
    """Where training metrics go. The loop calls `start` once before training, then `log`."""

    def start(self, step: int) -> None:
        """Training begins after `step` optimiser steps (0, or where a resumed checkpoint was)."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record `metrics` as their values after `step` optimiser steps."""
        raise NotImplementedError

    def close(self, failed: bool = False) -> None:
        """Flush and release; `failed` when training stopped on an error."""


class TensorBoardSink(MetricSink):
    """Scalars in `log_dir`, one TensorBoard run. A fresh start clears the folder; a resumed one
    hides what an interrupted attempt logged after the checkpoint it resumes from."""

    def __init__(self, log_dir: Path, flush_secs: int = 30):
        _require("tensorboard")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise InputError(
                f"tracking.tensorboard: torch.utils.tensorboard cannot be imported ({e}): "
                "pip install 'compress[tensorboard]'"
            ) from None
        self._writer_type = SummaryWriter
        self.log_dir = Path(log_dir)
        self.flush_secs = flush_secs
        self._writer: Any = None

    def _open(self, purge_step: int | None) -> None:
        self._writer = self._writer_type(
            str(self.log_dir), purge_step=purge_step, flush_secs=self.flush_secs
        )

    def start(self, step: int) -> None:
        if self._writer is not None:
            return
        if step == 0:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        # TensorBoard hides the events from `purge_step` on that an earlier file holds.
        self._open(step + 1 if step else None)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._writer is None:
            self._open(None)
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, global_step=step)

    def close(self, failed: bool = False) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_params(value, f"{name}."))
        elif value is not None:
            out[name] = str(value)[:500]  # the shortest limit of MLflow's stores
    return out


class MlflowSink(MetricSink):
    """One MLflow run per compress run, with one nested run per training stage.

    The ids are kept in `<run>/mlflow/runs.json`, so a resumed stage continues its MLflow run and
    a stage that starts over gets a new one. Without a tracking URI the store is
    `sqlite:///<run>/mlflow/mlflow.db` (artifacts beside it); nothing is sent to a server unless
    the recipe names one.
    """

    def __init__(
        self,
        run_dir: Path,
        stage: str,
        run_name: str,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        params: Mapping[str, Any] | None = None,
    ):
        _require("mlflow")
        self.local = not tracking_uri
        if self.local and not _importable("sqlalchemy"):
            raise InputError(
                "tracking.mlflow: the local MLflow store (a SQLite file in the run folder) needs "
                "the full mlflow package, not mlflow-skinny: pip install 'compress[mlflow]', or "
                "set tracking.mlflow_tracking_uri"
            )
        self.run_dir = Path(run_dir).resolve()
        self.folder = self.run_dir / MLFLOW_DIR
        self.uri = tracking_uri or f"sqlite:///{self.folder / MLFLOW_DB}"
        self.stage, self.run_name = stage, run_name
        self.experiment = experiment or run_name
        self.params = dict(params or {})
        self._client: Any = None
        self._run_id: str | None = None
        self._parent_id: str | None = None

    def _experiment_id(self, client: Any) -> str:
        found = client.get_experiment_by_name(self.experiment)
        if found is None:
            artifacts = (self.folder / "artifacts").as_uri() if self.local else None
            return client.create_experiment(self.experiment, artifact_location=artifacts)
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id

    def _existing(self, client: Any, run_id: str | None) -> str | None:
        if run_id is None:
            return None
        try:
            client.get_run(run_id)
        except Exception:  # deleted, or another store's id
            return None
        return run_id

    def start(self, step: int) -> None:
        if self._client is not None:
            return
        from mlflow.tracking import MlflowClient

        self.folder.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=self.uri)
        ids_path = self.folder / MLFLOW_RUNS
        ids = read_json(ids_path) if ids_path.is_file() else {}
        if ids.get("tracking_uri") != self.uri or ids.get("experiment") != self.experiment:
            ids = {"tracking_uri": self.uri, "experiment": self.experiment, "stages": {}}
        experiment_id = self._experiment_id(client)
        parent = self._existing(client, ids.get("run_id"))
        if parent is None:
            tags = {"compress.run_dir": str(self.run_dir)}
            parent = client.create_run(experiment_id, run_name=self.run_name, tags=tags).info.run_id
        else:
            client.update_run(parent, status="RUNNING")
        child = self._existing(client, ids["stages"].get(self.stage)) if step > 0 else None
        if child is None:  # a stage that starts over gets a new run: its old steps would mix in
            tags = {"mlflow.parentRunId": parent, "compress.stage": self.stage}
            child = client.create_run(experiment_id, run_name=self.stage, tags=tags).info.run_id
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in _flat_params(self.params).items()]
            if params:
                client.log_batch(child, params=params)
        else:
            client.update_run(child, status="RUNNING")
        ids.update(run_id=parent)
        ids["stages"][self.stage] = child
        write_json(ids_path, ids)
        self._client, self._parent_id, self._run_id = client, parent, child
        logger.info(
            f"{self.stage}: MLflow run {child} in experiment '{self.experiment}' ({self.uri})"
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._client is None:
            self.start(0)
        if self._run_id is None:  # logging failed earlier: training goes on without MLflow
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        try:
            self._client.log_batch(self._run_id, metrics=batch)
        except Exception as e:
            logger.warning(f"{self.stage}: MLflow logging failed, continuing without it: {e}")
            self._run_id = None

    def close(self, failed: bool = False) -> None:
        if self._client is None:
            return
        status = "FAILED" if failed else "FINISHED"
        try:
            for run_id in (self._run_id, self._parent_id):
                if run_id is not None:
                    self._client.set_terminated(run_id, status=status)
        except Exception as e:
            logger.warning(f"{self.stage}: could not close the MLflow run: {e}")
        self._client = self._run_id = self._parent_id = None


def build_sinks(
    cfg: TrackingConfig,
    run_dir: Path,
    stage: str,
    dist: DistInfo,
    run_name: str,
    params: Mapping[str, Any] | None = None,
) -> list[MetricSink]:
    """The sinks `cfg` switches on for the training stage in folder `run_dir/stage` (none off
    rank 0). Raises InputError naming the field when an extra is not installed."""
    if not dist.is_main:
        return []
    sinks: list[MetricSink] = []
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(Path(run_dir) / TENSORBOARD_DIR / stage))
    if cfg.mlflow:
        sinks.append(
            MlflowSink(
                run_dir,
                stage,
                run_name,
                tracking_uri=cfg.mlflow_tracking_uri,
                experiment=cfg.mlflow_experiment,
                params=params,
            )
        )
    return sinks


def close_sinks(sinks: Iterable[MetricSink], failed: bool = False) -> None:
    for sink in sinks:
        sink.close(failed=failed)
