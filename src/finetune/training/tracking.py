"""Experiment tracking (`--log tensorboard,mlflow`) as an observer of the training events (finetune.events): the
loop emits what happened, the caller's observer sees every event, and the trackers record the few they want
(run_config, epoch_end, report, finish). The training code holds no tracker call.

TensorBoard: torch's SummaryWriter into RUN/tensorboard/ (scalars per epoch; the confusion matrix and the
most confident mistakes as images; the settings as hyper-parameters with the run's best metrics).
MLflow: params, metrics per epoch, and the model file, report and results as artifacts, through
MlflowClient to MLFLOW_TRACKING_URI, else MLflow's own default (./mlflow.db, files under ./mlruns/).
A tracker that fails during training is dropped with a warning event; the run itself goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from finetune._util import ddp as dist
from finetune._util.extras import require
from finetune._util.files import write_json_atomic
from finetune.config import TrainConfig, trackers
from finetune.errors import FinetuneError, Interrupted, ResourceError
from finetune.events import Observer, emitter

TENSORBOARD_DIR = "tensorboard"  # inside the run folder
MLFLOW_FILE = "mlflow.json"  # inside the run folder: the MLflow run a resumed run continues
SCALARS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
           "val_acc": "accuracy/val", "lr": "lr", "update_ratio_head": "update_ratio/head",
           "update_ratio_backbone": "update_ratio/backbone", "seconds": "seconds_per_epoch"}
IMAGES = ("confusion", "wrong", "curves")  # the report's pictures a tracker shows
ARTIFACTS = ("best.pt", "config.json", "results.json", "metrics.csv", "split.json")
MLFLOW_PARAM_CHARS = 6000  # MLflow refuses longer parameter values


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, cfg: TrainConfig, resuming: bool):
        require("tensorboard", "tensorboard", "--log tensorboard")
        self.writer = None
        self.config: dict = {}

    def run_config(self, run_dir: Path, config: dict, resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.config = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR)), config
        if not resumed:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def where(self, run_dir: Path) -> str:
        return f"tensorboard --logdir {run_dir / TENSORBOARD_DIR}"

    def epoch(self, row: dict) -> None:
        for key, tag in SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], row["epoch"])
        self.writer.flush()

    def finish(self, run_dir: Path, summary: dict, paths: dict, best_epoch: int) -> None:
        for name in IMAGES:
            if name in paths:
                self.writer.add_image(name, _png(paths[name]), best_epoch, dataformats="HWC")
        self._hparams(summary)
        self.writer.flush()

    def _hparams(self, summary: dict) -> None:
        """The settings and the run's best metrics in the HPARAMS tab, written into this run's own folder
        (SummaryWriter.add_hparams would start a sub-run for them)."""
        from torch.utils.tensorboard.summary import hparams

        settings = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.config.items()
                    if k not in ("classes", "preprocessing")}
        metrics = {"hparam/best_val_acc": summary["best_val_acc"], "hparam/best_val_loss": summary["best_val_loss"]}
        for part in hparams(settings, metrics):
            self.writer.file_writer.add_summary(part)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, summary["best_epoch"])

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, cfg: TrainConfig, resuming: bool):
        require("mlflow", "mlflow", "--log mlflow")
        with _quiet_mlflow():
            from mlflow.tracking import MlflowClient

            try:
                self.client = MlflowClient()
                self.run_id = self._continued(cfg) if resuming else None
                if self.run_id is None:
                    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "finetune")
                    experiment = self.client.get_experiment_by_name(name)
                    experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
                    self.run_id = self.client.create_run(experiment_id, tags={
                        "mlflow.source.name": "finetune train", "finetune.data": str(cfg.data)}).info.run_id
            except Exception as e:  # noqa: BLE001 - MLflow raises its own types for a store it cannot reach
                raise ResourceError(f"--log mlflow: cannot reach the MLflow tracking store "
                                    f"{os.environ.get('MLFLOW_TRACKING_URI') or '(default ./mlflow.db)'} "
                                    f"({_short(e)}); check MLFLOW_TRACKING_URI") from None

    def _continued(self, cfg: TrainConfig) -> str | None:
        """The MLflow run of the run folder being resumed, if it is in this store."""
        try:
            info = json.loads((Path(cfg.output) / MLFLOW_FILE).read_text(encoding="utf-8"))
            run = self.client.get_run(info["run_id"])
            self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        except Exception:  # noqa: BLE001 - no record, or a run this store does not hold: a new MLflow run
            return None

    def run_config(self, run_dir: Path, config: dict, resumed: bool) -> None:
        from mlflow.entities import Param

        write_json_atomic(run_dir / MLFLOW_FILE, {"tracking_uri": self.client.tracking_uri,
                                                  "run_id": self.run_id})
        self.client.update_run(self.run_id, name=run_dir.name)
        self.client.set_tag(self.run_id, "finetune.run_dir", str(run_dir.resolve()))
        if not resumed:  # MLflow params are write-once
            params = [Param(k, json.dumps(v, default=str)[:MLFLOW_PARAM_CHARS] if not isinstance(v, str) else
                            v[:MLFLOW_PARAM_CHARS]) for k, v in config.items()]
            for start in range(0, len(params), 100):  # log_batch takes at most 100 params
                self.client.log_batch(self.run_id, params=params[start:start + 100])

    def where(self, run_dir: Path) -> str:
        return f"run {self.run_id} in {self.client.tracking_uri}"

    def epoch(self, row: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(row[k]), now, row["epoch"]) for k in SCALARS if row.get(k) is not None]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, run_dir: Path, summary: dict, paths: dict, best_epoch: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        best = [Metric(f"best_{k}", float(summary[f"best_{k}"]), now, best_epoch) for k in ("val_acc", "val_loss")]
        self.client.log_batch(self.run_id, metrics=best)
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        for name, path in paths.items():
            self.client.log_artifact(self.run_id, str(path), "report")

    def close(self, status: str) -> None:
        with contextlib.suppress(Exception):
            self.client.set_terminated(self.run_id, status)


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker}


class Trackers(Observer):
    """The trackers as an observer of a run's events: they record the few they want. emit: where their own events
    (where they record, a tracker dropped) go."""

    def __init__(self, emit, active: list):
        self.emit, self.active = emit, active
        self.run_dir: Path | None = None
        self.paths: dict = {}

    def on_run_config(self, run_dir: Path, config: dict, resumed: bool) -> None:
        self.run_dir = Path(run_dir)
        self._each(lambda t: t.run_config(self.run_dir, config, resumed))
        self.emit("tracking", where={t.name: t.where(self.run_dir) for t in self.active})

    def on_epoch_end(self, row: dict, improved: bool) -> None:
        self._each(lambda t: t.epoch(row))

    def on_report(self, paths: dict) -> None:
        self.paths = dict(paths)

    def on_finish(self, run_dir: Path, model: Path, summary: dict) -> None:
        self._each(lambda t: t.finish(self.run_dir, summary, self.paths, summary["best_epoch"]))

    def _each(self, record) -> None:
        for tracker in list(self.active):
            try:
                with _quiet_mlflow():
                    record(tracker)
            except Exception as e:  # noqa: BLE001 - a tracker never costs the run; it is dropped with a warning
                self.active.remove(tracker)
                tracker.close("FAILED")
                self.emit("tracking_failed", tracker=tracker.name, reason=_short(e))

    def close(self, status: str) -> None:
        for tracker in self.active:
            with _quiet_mlflow():
                tracker.close(status)


@contextlib.contextmanager
def tracked(cfg: TrainConfig, emit, resuming: bool = False):
    """emit, or emit followed by the trackers cfg.log names (rank 0 only); each tracker's extra is checked and its
    store opened now, before any long work. The trackers end as the run ends: finished, killed or failed."""
    names = trackers(cfg.log)
    if not names or not dist.current().main:
        yield emit
        return
    active: list = []
    try:
        for name in names:
            active.append(TRACKERS[name](cfg, resuming))
    except FinetuneError:
        Trackers(emit, active).close("FAILED")
        raise
    observer, status = Trackers(emit, active), "FAILED"
    try:
        yield emitter(emit, observer)
        status = "FINISHED"
    except (Interrupted, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        observer.close(status)


@contextlib.contextmanager
def _quiet_mlflow():
    """MLflow and its database migrations log to stderr at INFO; the library stays silent."""
    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _png(path) -> object:
    """A picture as an HxWx3 uint8 array."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]
