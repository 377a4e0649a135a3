"""Random search: samples inside the ranges, reproducible, coarse then narrowed; diverged trials recorded."""

import json
import math
import random
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from finetune import tune as U
from finetune.cli import app
from finetune.config import MODES, TrainConfig, load_config
from finetune.errors import DivergedError, FinetuneError

runner = CliRunner()


def test_samples_are_inside_the_ranges_distinct_and_seeded():
    space, rng = U.Space(), random.Random(7)
    samples = [space.sample(rng) for _ in range(60)]
    for s in samples:
        low, high = U.LR_RANGE[s["optimizer"]]
        assert low <= s["lr"] <= high * 1.001 and U.WEIGHT_DECAY_RANGE[0] <= s["weight_decay"] <= 1.001e-2
        assert 0 <= s["dropout"] <= 0.5 and s["batch_size"] in U.BATCH_SIZES and s["mode"] in MODES
    assert len({json.dumps(s, sort_keys=True) for s in samples}) == 60  # random, not a grid
    rng_a, rng_b = random.Random(3), random.Random(3)
    assert [space.sample(rng_a) for _ in range(5)] == [space.sample(rng_b) for _ in range(5)]
    # log-uniform: about as many lrs per decade in the low decades as in the high ones
    sgd_only = U.Space(optimizer=("sgd",))
    lrs = [math.log10(sgd_only.sample(rng)["lr"]) for _ in range(400)]  # 1e-4..1e-1: midpoint 10^-2.5
    assert 0.4 < sum(x < -2.5 for x in lrs) / len(lrs) < 0.6


def test_narrowed_space_surrounds_the_best_trials():
    best = [{"lr": 0.01, "weight_decay": 1e-4, "dropout": 0.2, "batch_size": 32, "augment": "light",
             "optimizer": "sgd", "mode": "finetune"},
            {"lr": 0.02, "weight_decay": 3e-4, "dropout": 0.3, "batch_size": 64, "augment": "light",
             "optimizer": "sgd", "mode": "finetune"}]
    s = U.Space().narrowed(best)
    assert list(s.lr) == ["sgd"] and s.lr["sgd"] == pytest.approx((0.005, 0.04)) and s.optimizer == ("sgd",)
    assert s.weight_decay == pytest.approx((5e-5, 6e-4)) and s.dropout == pytest.approx((0.1, 0.4))
    assert s.batch_size == (32, 64) and s.augment == ("light",) and s.mode == ("finetune",)


def _fake_run(cfg):
    """Accuracy peaks at lr 0.01; lrs above 0.05 diverge, as a real too-high rate would."""
    if cfg.lr > 0.05:
        raise DivergedError(f"training diverged: loss is nan at epoch 1, step 1 (lr {cfg.lr})")
    return SimpleNamespace(best_val_acc=1 - abs(math.log10(cfg.lr) + 2) / 10, best_epoch=cfg.epochs)


def test_search_records_every_trial_and_narrows_stage_two(tmp_path):
    base = TrainConfig(data=str(tmp_path), weights="none")
    events = []
    r = U.run_search(base, tmp_path / "t", trials=20, coarse_epochs=1, fine_epochs=4, seed=1,
                     space=U.Space(optimizer=("sgd",)), run=_fake_run, emit=lambda e, **k: events.append((e, k)))
    rows = json.loads((tmp_path / "t" / "trials.json").read_text())
    assert len(rows) == 20 and [row["trial"] for row in rows] == list(range(1, 21))
    assert {row["stage"] for row in rows} == {1, 2} and sum(row["stage"] == 1 for row in rows) == 14
    assert all(row["epochs"] == (1 if row["stage"] == 1 else 4) for row in rows)
    diverged = [row for row in rows if row["status"] == "diverged"]
    assert diverged and all(row["lr"] > 0.05 and "diverged" in row["error"] for row in diverged)
    stage1 = sorted((row for row in rows if row["stage"] == 1 and row["status"] == "ok"),
                    key=lambda row: -row["val_acc"])[:U.TOP]
    low, high = min(row["lr"] for row in stage1) / 2, max(row["lr"] for row in stage1) * 2
    assert all(low <= row["lr"] <= high * 1.001 for row in rows if row["stage"] == 2)
    assert [k["around"] for e, k in events if e == "stage"] == [[row["trial"] for row in stage1]]
    assert (tmp_path / "t" / "trials.csv").read_text().splitlines()[0].startswith("trial,stage,epochs,lr")
    best = json.loads(r.best_config.read_text())
    assert best["trial"] == r.best.number and best["val_acc"] == max(row["val_acc"] or 0 for row in rows)
    settings = load_config(r.best_config)
    assert settings["lr"] == r.best.params["lr"] and settings["epochs"] == r.best.epochs
    assert "data" not in settings and "output" not in settings

    again = U.run_search(base, tmp_path / "t2", trials=20, coarse_epochs=1, fine_epochs=4, seed=1,
                         space=U.Space(optimizer=("sgd",)), run=_fake_run)
    assert [t.params for t in again.trials] == [t.params for t in r.trials]  # reproducible with a seed


def test_budget_and_bad_config_files(tmp_path):
    base = TrainConfig(data=str(tmp_path), weights="none")
    r = U.run_search(base, tmp_path / "t", trials=5, budget=1e-9, run=_fake_run)
    assert r.stopped_by_budget and not r.trials and r.best is None
    (tmp_path / "bad.json").write_text('{"settings": {"lr": 0.1, "colour": "red"}}')
    with pytest.raises(FinetuneError, match="unknown setting.*colour"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "notjson.json").write_text("lr=0.1")
    with pytest.raises(FinetuneError, match="not JSON"):
        load_config(tmp_path / "notjson.json")


@pytest.mark.slow
def test_cli_tune_then_train_with_its_config(tiny_data, tmp_path):
    out = tmp_path / "search"
    r = runner.invoke(app, ["tune", str(tiny_data), "--weights", "none", "--trials", "3", "--coarse-epochs", "1",
                            "--fine-epochs", "2", "--mode", "feature-extract", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out / "best.json")
    assert len(json.loads((out / "trials.json").read_text())) == 3
    settings = json.loads((out / "best.json").read_text())["settings"]
    r = runner.invoke(app, ["train", str(tiny_data), "--config", str(out / "best.json"), "--epochs", "1",
                            "-o", str(tmp_path / "run"), "-q"])
    assert r.exit_code == 0, r.output
    used = json.loads((tmp_path / "run" / "config.json").read_text())
    for key in ("lr", "weight_decay", "dropout", "batch_size", "augment", "optimizer", "mode", "weights"):
        assert used[key] == settings[key], key
    assert used["epochs"] == 1  # the command line wins over the file
