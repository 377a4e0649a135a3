"""--log tensorboard / mlflow: what the trackers wrote, read back with TensorBoard's own event reader and MLflow's
client on a local store; missing extras and failing trackers."""

import json
import sys

import pytest

from finetune.config import TrainConfig
from finetune.errors import UsageError
from finetune.training import run_training, tracking


def _cfg(data, tmp_path, log, **kw):
    return TrainConfig(data=str(data), weights="none", mode="feature-extract", solver="sgd", batch_size=4,
                       output=str(tmp_path / "run"), workers=1, log=log, **{"epochs": 3} | kw)


@pytest.fixture
def local_mlflow(monkeypatch):
    """MLflow's own default store, in the test's empty working folder: ./mlflow.db and ./mlruns/."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


@pytest.mark.slow  # ~10 s: MLflow creates its SQLite store (schema migrations) on first use
def test_both_trackers_record_the_run_and_read_back(tiny_data, tmp_path, local_mlflow):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    result = run_training(_cfg(tiny_data, tmp_path, "tensorboard,mlflow"), lambda e, **k: events.append((e, k)))
    history = result.history

    acc = EventAccumulator(str(result.run_dir / tracking.TENSORBOARD_DIR), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert [e.value for e in acc.Scalars("accuracy/val")] == pytest.approx([r["val_acc"] for r in history])
    assert [e.step for e in acc.Scalars("loss/train")] == [1, 2, 3]
    assert {"confusion", "wrong", "curves"} <= set(tags["images"])
    confusion = acc.Images("confusion")[0]
    assert confusion.step == result.best_epoch and confusion.width > 100 and confusion.height > 100
    assert "hparam/best_val_acc" in tags["scalars"] and "config" in " ".join(tags["tensors"])
    hp = [e for e in _plugin_events(result.run_dir) if "_hparams_/session_start_info" in e]
    assert hp, "the hyper-parameters summary is in the run's own event file"

    client = MlflowClient()  # the default store of this working folder
    assert (tmp_path / "mlflow.db").is_file()
    run_id = json.loads((result.run_dir / tracking.MLFLOW_FILE).read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["batch_size"] == "4" and run.data.params["optimizer"] == "sgd"
    assert json.loads(run.data.params["classes"]) == ["ants", "bees"]
    assert [m.value for m in client.get_metric_history(run_id, "val_acc")] == pytest.approx(
        [r["val_acc"] for r in history])
    assert run.data.metrics["best_val_acc"] == pytest.approx(result.best_val_acc)
    names = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "report")}
    assert {"best.pt", "config.json", "results.json", "metrics.csv", "report/report.html",
            "report/confusion.png"} <= names
    where = dict(next(k for e, k in events if e == "tracking")["where"])
    assert set(where) == {"tensorboard", "mlflow"} and run_id in where["mlflow"]


def _plugin_events(folder):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = []
    for f in sorted((folder / tracking.TENSORBOARD_DIR).glob("events.*")):
        for event in EventFileLoader(str(f)).Load():
            out += [v.tag for v in event.summary.value]
    return out


def test_a_missing_extra_is_named_before_any_work(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    with pytest.raises(UsageError, match=r"--log tensorboard needs the tensorboard extra .*pip install "
                                         r"'finetune\[tensorboard\]'"):
        run_training(_cfg(tiny_data, tmp_path, "tensorboard"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(UsageError, match="--log wandb: choose none or any of tensorboard, mlflow"):
        run_training(_cfg(tiny_data, tmp_path, "wandb"))


def test_a_failing_tracker_is_dropped_with_a_warning_and_the_run_goes_on(tiny_data, tmp_path, monkeypatch):
    def broken(self, row):
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(tracking.TensorBoardTracker, "epoch", broken)
    events = []
    result = run_training(_cfg(tiny_data, tmp_path, "tensorboard"), lambda e, **k: events.append((e, k)))
    failed = [k for e, k in events if e == "tracking_failed"]
    assert failed == [{"tracker": "tensorboard", "reason": "disk quota exceeded"}]
    assert result.model_path.is_file() and len(result.history) == 3


@pytest.mark.slow  # two runs
def test_overwrite_removes_the_tensorboard_folder_of_the_earlier_run(tiny_data, tmp_path):
    first = run_training(_cfg(tiny_data, tmp_path, "tensorboard", seed=1))
    old = sorted((first.run_dir / tracking.TENSORBOARD_DIR).iterdir())
    again = run_training(_cfg(tiny_data, tmp_path, "tensorboard", overwrite=True))
    now = sorted((again.run_dir / tracking.TENSORBOARD_DIR).iterdir())
    assert len(now) == 1 and now != old  # one run's events, not two runs' mixed in one folder


class _Fake:
    """A tracker that records what it is given."""

    name = "tensorboard"
    calls: list = []

    def __init__(self, cfg, resuming):
        self.calls.append(("open", resuming))

    def where(self, run_dir):
        return f"fake in {run_dir}"

    def run_config(self, run_dir, config, resumed):
        self.calls.append(("run_config", config["lr_used"], resumed))

    def epoch(self, row):
        self.calls.append(("epoch", row["epoch"]))

    def finish(self, run_dir, summary, paths, best_epoch):
        self.calls.append(("finish", sorted(paths), best_epoch))

    def close(self, status):
        self.calls.append(("close", status))


@pytest.mark.parametrize("outcome, status", [(None, "FINISHED"), (KeyboardInterrupt, "KILLED"),
                                             (RuntimeError, "FAILED")])
def test_trackers_see_the_events_and_end_as_the_run_ends(tmp_path, monkeypatch, outcome, status):
    _Fake.calls = []
    monkeypatch.setitem(tracking.TRACKERS, "tensorboard", _Fake)
    seen = []

    def run():
        with tracking.tracked(TrainConfig(data="x", log="tensorboard"), lambda e, **k: seen.append(e)) as emit:
            emit("run_config", run_dir=tmp_path, config={"lr_used": 0.01}, resumed=False)
            emit("epoch_end", row={"epoch": 1}, improved=True)
            emit("report", paths={"confusion": tmp_path / "c.png"})
            emit("finish", run_dir=tmp_path, model=tmp_path / "best.pt", summary={"best_epoch": 1})
            if outcome is not None:
                raise outcome()

    if outcome is None:
        run()
    else:
        with pytest.raises(outcome):
            run()
    assert seen == ["run_config", "tracking", "epoch_end", "report", "finish"]  # every event passed on, in order
    assert _Fake.calls == [("open", False), ("run_config", 0.01, False), ("epoch", 1), ("finish", ["confusion"], 1),
                           ("close", status)]


@pytest.mark.slow  # MLflow's store and two runs
def test_an_interrupted_run_is_killed_in_mlflow_and_resuming_continues_the_same_mlflow_run(tiny_data, tmp_path,
                                                                                           local_mlflow):
    import signal

    from mlflow.tracking import MlflowClient

    from finetune.errors import Interrupted
    from finetune.training.resume import resume_config

    epochs = []
    cfg = _cfg(tiny_data, tmp_path, "mlflow", epochs=3)
    with pytest.raises(Interrupted):
        run_training(cfg, lambda e, **k: epochs.append(1) if e == "epoch_end" else None,
                     stop=lambda: signal.SIGINT if len(epochs) >= 2 else 0)
    client = MlflowClient()
    run_id = json.loads((tmp_path / "run" / tracking.MLFLOW_FILE).read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    again, state = resume_config(tmp_path / "run", {})
    run_training(again, resume=state)
    assert json.loads((tmp_path / "run" / tracking.MLFLOW_FILE).read_text())["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [1, 2, 3]
