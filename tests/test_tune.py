"""Optuna search: suggestions inside the ranges, TPE after random start-up trials, pruning fed per epoch, the
study resumed and grown from ROOT/study.db, diverged and interrupted trials recorded."""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest

from finetune import search as U
from finetune.config import MODES, TrainConfig
from finetune.configfile import load_config
from finetune.errors import DivergedError, FinetuneError, Interrupted, ResourceError


def test_suggestions_are_inside_the_ranges_and_log_uniform():
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7))
    space = U.Space()
    samples = [space.suggest(study.ask()) for _ in range(300)]
    for s in samples:
        low, high = U.LR_RANGE[s["optimizer"]]
        assert low <= s["lr"] <= high and U.WEIGHT_DECAY_RANGE[0] <= s["weight_decay"] <= U.WEIGHT_DECAY_RANGE[1]
        assert 0 <= s["dropout"] <= 0.5 and s["batch_size"] in U.BATCH_SIZES and s["mode"] in MODES
    sgd = [math.log10(s["lr"]) for s in samples if s["optimizer"] == "sgd"]  # 1e-4..1e-1: midpoint 10^-2.5
    assert 0.4 < sum(x < -2.5 for x in sgd) / len(sgd) < 0.6


def _fake_run(calls=None):
    """Val accuracy peaks at lr 0.01 and grows with the epochs; lrs above 0.05 diverge, as a real too-high rate
    would. Emits epoch_end per epoch, as run_training does."""
    def run(cfg, emit):
        if calls is not None:
            calls.append(cfg)
        if cfg.lr > 0.05:
            raise DivergedError(f"training diverged: loss is nan at epoch 1, step 1 (lr {cfg.lr})")
        top = 1 - abs(math.log10(cfg.lr) + 2) / 5
        history = [top * (1 - 0.5 ** e) for e in range(1, cfg.epochs + 1)]
        for e, acc in enumerate(history, 1):
            emit("epoch_end", row={"epoch": e, "val_acc": acc}, improved=True)
        return SimpleNamespace(best_val_acc=history[-1], best_epoch=cfg.epochs, best_val_map=None)  # a Run's fields
    return run


def _search(tmp_path, name="t", **kw):
    base = TrainConfig(data=str(tmp_path), weights="none")
    args = {"trials": 18, "coarse_epochs": 2, "fine_epochs": 6, "seed": 1, "space": U.Space(optimizer=("sgd",)),
            "run": _fake_run()} | kw
    return U.run_search(base, tmp_path / name, **args)


@pytest.mark.slow  # ~7 s: 25 trials through SQLite and TPE
def test_search_goes_from_random_to_tpe_prunes_and_writes_the_best(tmp_path):
    events = []
    r = _search(tmp_path, emit=lambda e, **k: events.append(e))
    rows = json.loads((tmp_path / "t" / "trials.json").read_text())
    assert [row["trial"] for row in rows] == list(range(1, 19)) and (tmp_path / "t" / "study.db").is_file()
    startup = U.startup_trials(18)
    assert [row["sampler"] for row in rows] == ["random"] * startup + ["tpe"] * (18 - startup)
    pruned = [row for row in rows if row["status"] == "pruned"]
    assert pruned and all(2 <= row["epochs_run"] < 6 for row in pruned)  # never before --coarse-epochs
    assert all(row["epochs_run"] == 6 for row in rows if row["status"] == "ok")
    diverged = [row for row in rows if row["status"] == "diverged"]
    assert all(row["lr"] > 0.05 and "diverged" in row["error"] for row in diverged)
    # TPE learned where the good rates are: its trials sit nearer lr 0.01 than the random ones
    dist = lambda rs: sorted(abs(math.log10(x["lr"]) + 2) for x in rs)[len(rs) // 2]  # noqa: E731
    assert dist([x for x in rows if x["sampler"] == "tpe"]) < dist([x for x in rows if x["sampler"] == "random"])
    ok = [row for row in rows if row["status"] == "ok"]
    best = json.loads(r.best_config.read_text())
    assert best["trial"] == r.best.number and best["val_acc"] == max(row["val_acc"] for row in ok)
    settings = load_config(r.best_config)
    assert settings["lr"] == r.best.params["lr"] and settings["epochs"] == 6 and settings["solver"] == "sgd"
    assert "data" not in settings and "output" not in settings
    assert events.count("trial_start") == 18 and "trial_epoch" in events
    first, again = _search(tmp_path, "a", trials=7), _search(tmp_path, "b", trials=7)
    assert [t.params for t in again.trials] == [t.params for t in first.trials]  # reproducible with a seed


def test_each_trial_applies_what_it_searched_and_best_json_gives_no_more(tmp_path):
    """A trial's searched settings count as typed (on a CPU, an auto plan given --lr and --epochs trains; were they
    untyped it would fit the probe and ignore them), and `train --config best.json` is given those, not every
    setting the file records (--backbone-lr-mult for a frozen backbone would be refused)."""
    from finetune.training.plan import make_plan

    calls = []
    r = _search(tmp_path, trials=3, run=_fake_run(calls), space=U.Space(optimizer=("sgd",), mode=("feature-extract",)))
    cpu = SimpleNamespace(type="cpu")
    for cfg in calls:
        assert {"lr", "epochs", "weight_decay", "batch_size", "solver"} <= set(cfg.given)
        assert f"{cfg.epochs} epochs of SGD on the head" in make_plan(cfg, cpu).why  # what it searched runs
    settings = load_config(r.best_config)
    assert "backbone_lr_mult" not in settings["given"] and "lr" in settings["given"]


def test_search_resumes_an_interrupted_study_and_grows_with_trials(tmp_path):
    calls, inner = [], _fake_run()

    def interrupted_at_4(cfg, emit):
        calls.append(cfg)
        if len(calls) == 4:
            raise Interrupted(2)
        return inner(cfg, emit)

    with pytest.raises(Interrupted):
        _search(tmp_path, trials=6, run=interrupted_at_4)
    r = _search(tmp_path, trials=6)
    assert r.resumed == 4
    statuses = [t.status for t in r.trials]
    assert statuses[3] == "interrupted" and len(r.trials) == 7 and 6 == sum(s != "interrupted" for s in statuses)
    assert json.loads((tmp_path / "t" / "trials.json").read_text())[3]["status"] == "interrupted"
    grown = _search(tmp_path, trials=9)
    assert grown.resumed == 7 and len(grown.trials) == 10
    assert [t.params for t in grown.trials[:7]] == [t.params for t in r.trials]
    assert len({json.dumps(t.params, sort_keys=True) for t in grown.trials}) == 10  # no draw repeated


def test_resuming_with_other_settings_is_refused_by_name(tmp_path):
    _search(tmp_path, trials=3)
    with pytest.raises(FinetuneError, match="holds a search with model = 'resnet18', not 'resnet50'"):
        U.run_search(TrainConfig(data=str(tmp_path), weights="none", model="resnet50"), tmp_path / "t", trials=4,
                     space=U.Space(optimizer=("sgd",)), run=_fake_run())
    with pytest.raises(FinetuneError, match="fine_epochs = 6, not 8"):
        _search(tmp_path, trials=4, fine_epochs=8)
    (tmp_path / "old" / "trial-001").mkdir(parents=True)
    with pytest.raises(FinetuneError, match="no study.db"):
        _search(tmp_path, "old", trials=2)


def test_a_trial_out_of_memory_is_recorded_and_the_search_goes_on(tmp_path):
    inner = _fake_run()

    def run(cfg, emit):
        if cfg.batch_size == 64:
            raise ResourceError("out of CPU memory at batch size 64; try -b 32")
        return inner(cfg, emit)

    r = _search(tmp_path, trials=8, run=run)
    failed = [t for t in r.trials if t.status == "failed"]
    assert len(r.trials) == 8 and failed and all(t.params["batch_size"] == 64 and "memory" in t.error for t in failed)
    assert r.best is not None and r.best.params["batch_size"] != 64


def test_budget_pruner_choice_and_bad_config_files(tmp_path):
    r = _search(tmp_path, trials=5, budget=1e-9)
    assert r.stopped_by_budget and not r.trials and r.best is None
    none = _search(tmp_path, "np", trials=8, pruner="none")
    assert all(t.status in ("ok", "diverged") for t in none.trials)
    halving = _search(tmp_path, "sh", trials=10, pruner="halving")
    assert any(t.status == "pruned" for t in halving.trials)
    with pytest.raises(FinetuneError, match="--pruner hyperband: choose one of median, halving, none"):
        _search(tmp_path, "x", pruner="hyperband")
    (tmp_path / "bad.json").write_text('{"settings": {"lr": 0.1, "colour": "red"}}')
    with pytest.raises(FinetuneError, match="unknown setting.*colour"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "notjson.json").write_text("lr=0.1")
    with pytest.raises(FinetuneError, match="not valid JSON"):
        load_config(tmp_path / "notjson.json")


def _finetune(*args):
    """`finetune ARGS` in its own process, as a user runs it (the study's SQLite, loader workers and threads live
    and end there, not in the test process)."""
    p = subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, timeout=600)
    return SimpleNamespace(exit_code=p.returncode, stdout=p.stdout, stderr=p.stderr, output=p.stdout + p.stderr)


@pytest.mark.slow
def test_cli_tune_then_train_with_its_config(tiny_data, tmp_path):
    out = tmp_path / "search"
    args = ["tune", str(tiny_data), "--weights", "none", "--trials", "3", "--coarse-epochs", "1", "--fine-epochs", "2",
            "--mode", "feature-extract", "-o", str(out)]
    r = _finetune(*args)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out / "best.json")
    assert len(json.loads((out / "trials.json").read_text())) == 3
    settings = json.loads((out / "best.json").read_text())["settings"]
    r = _finetune(*args[:5], "4", *args[6:])  # one more trial, added to the study
    assert r.exit_code == 0 and "resuming" in r.stderr and "3 of 4 trials done" in r.stderr, r.output
    assert len(json.loads((out / "trials.json").read_text())) == 4
    r = _finetune("train", str(tiny_data), "--config", str(out / "best.json"), "--epochs", "1",
                  "-o", str(tmp_path / "run"), "-q")
    assert r.exit_code == 0, r.output
    used = json.loads((tmp_path / "run" / "config.json").read_text())
    settings = json.loads((out / "best.json").read_text())["settings"]
    for key in ("lr", "weight_decay", "dropout", "batch_size", "augment", "optimizer", "mode", "weights"):
        assert used[key] == settings[key], key
    assert used["epochs"] == 1  # the command line wins over the file
