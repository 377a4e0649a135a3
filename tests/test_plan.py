"""What a run does on the machine it has and with what the user gave: --mode auto, --time-budget, and no given
option dropped in silence."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config import APPLIES, EVERY_RUN, SETTINGS, TrainConfig
from finetune.errors import UsageError
from finetune.training import run_training
from finetune.training.plan import BUDGET_EPOCH_CAP, kind, make_plan, planned_epochs

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("mode, device, budget, expected", [
    ("auto", CPU, 0, ("feature-extract", False)),  # a converged probe: seconds
    ("auto", CPU, 600, ("finetune", True)),  # the probe, then fine-tuning from it in the time left
    ("auto", CUDA, 0, ("finetune", False)),  # a GPU fine-tunes
    ("auto", CUDA, 600, ("finetune", False)),
    ("finetune", CPU, 600, ("finetune", False)),  # asked for: as asked
])
def test_the_plan_follows_the_device_and_the_budget(mode, device, budget, expected):
    plan = make_plan(TrainConfig(data="x", mode=mode, time_budget=budget), device)
    assert (plan.mode, plan.probe_first) == expected and plan.why
    assert plan.budget == (0 if plan.mode == "feature-extract" else budget)


def test_planned_epochs_fit_the_budget():
    assert planned_epochs(budget=100, elapsed=30, epoch_seconds=10, done=1, requested=20) == 8  # 7 more fit
    assert planned_epochs(budget=100, elapsed=30, epoch_seconds=10, done=1, requested=5) == 5  # never more than asked
    assert planned_epochs(budget=10, elapsed=30, epoch_seconds=10, done=1, requested=5) == 1  # over: stop there


def test_a_plan_grows_when_epochs_get_faster_and_shrinks_when_they_slow():
    from finetune.training.plan import replanned_epochs

    # 100 s budget, 30 s used after 2 epochs: at 10 s an epoch 7 more fit (9 in all); the first plan said 5
    assert replanned_epochs(5, budget=100, elapsed=30, epoch_seconds=10, done=2, cap=1000) == 9
    assert replanned_epochs(5, budget=100, elapsed=30, epoch_seconds=10, done=2, cap=8) == 8  # typed --epochs caps
    assert replanned_epochs(8, budget=100, elapsed=30, epoch_seconds=10, done=2, cap=1000) == 8  # +1: not worth it
    assert replanned_epochs(9, budget=100, elapsed=30, epoch_seconds=20, done=2, cap=1000) == 5  # slower: fewer


def test_a_budgeted_cpu_run_fits_a_probe_then_fine_tunes_from_it(tiny_data, local_weights, tmp_path):
    events = []
    cfg = TrainConfig(data=str(tiny_data), weights=str(local_weights), epochs=6, given=("epochs",), batch_size=8, time_budget=0.01,
                      output=str(tmp_path / "r"), workers=0)
    result = run_training(cfg, lambda e, **k: events.append((e, k)))
    plans = [k["why"] for e, k in events if e == "plan"]
    assert len(plans) == 1 and "probe first, then fine-tuning" in plans[0]
    (planned,) = [k for e, k in events if e == "planned"]
    assert planned["phase_epochs"] == 1 and planned["epochs"] == 2  # the budget is spent before the first epoch ends
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert result.history[0]["lr"] is None and result.history[1]["lr"] > 0  # the probe, then an SGD epoch
    assert [e for e, _ in events].count("probe") == 1
    assert "initial_loss" not in [e for e, _ in events]  # the fitted head's low loss is no fresh head's ln(classes)
    state = torch.load(tmp_path / "r" / "state.pt", weights_only=True)
    assert state["plan"]["probe_first"] and state["phases"] == [[0, 1], [1, 1]]
    # Fine-tuning from the probe keeps the BatchNorm statistics its features were made with, and moves the backbone
    # at a tenth of the head's lr.
    pretrained = torch.load(local_weights, weights_only=True)
    assert torch.equal(state["model"]["layer3.0.bn1.running_var"], pretrained["layer3.0.bn1.running_var"])
    assert not torch.equal(state["model"]["layer3.0.conv1.weight"], pretrained["layer3.0.conv1.weight"])
    assert state["config"]["backbone_lr_mult"] == 0.1 and state["plan"]["frozen_statistics"]


# A value for each setting a kind of run may not use, unlike its default.
OTHER = {"time_budget": 600.0, "epochs": 3, "lr": 0.01, "optimizer": "adamw", "momentum": 0.8, "weight_decay": 0.001, "scheduler": "step",
         "batch_size": 4, "augment": "light", "train_size": 160, "dropout": 0.2, "patience": 2, "erasing": 0.25,
         "label_smoothing": 0.1, "freeze_epochs": 1, "backbone_lr_mult": 0.1, "mixup": 0.2, "cutmix": 1.0,
         "compile": True, "sync_bn": True, "solver": "sgd"}


def test_every_setting_says_which_runs_use_it():
    """A new setting must be placed: used by every run, or by the kinds of run named in APPLIES (so that a given
    value the planned run would not use is caught)."""
    assert set(APPLIES) | set(EVERY_RUN) == set(SETTINGS) and not set(APPLIES) & set(EVERY_RUN)
    assert set(OTHER) == set(APPLIES)


@pytest.mark.parametrize("name", sorted(APPLIES))
@pytest.mark.parametrize("mode", ["auto", "finetune", "feature-extract"])
def test_a_given_setting_changes_the_run_or_is_refused(name, mode):
    """The defect class: an option accepted, then not applied. Given, each setting either makes the planned run
    one that uses it, or stops the run before any work with a message naming it."""
    if mode == "feature-extract" and name in ("mixup", "cutmix", "label_smoothing"):
        return  # refused earlier, by validate() (tested in test_augment)
    cfg = TrainConfig(data="x", mode=mode, given=(name,), **{name: OTHER[name]})
    try:
        plan = make_plan(cfg, CPU)
    except UsageError as e:
        assert str(e).startswith(f"--{name.replace('_', '-')}") and "does not use it" in str(e)
        return
    run = kind(plan.mode, cfg.solver)
    assert APPLIES[name] in {"probe": {"probe"}, "head": {"train", "head"}, "finetune": {"train", "finetune"}}[run]
    if mode == "auto" and name != "solver":
        assert plan.mode == "finetune" and plan.probe_first and f"--{name.replace('_', '-')}" in plan.why


@pytest.mark.parametrize("given, expected", [
    ({}, ("feature-extract", False)),  # nothing asked: the probe
    ({"epochs": 4}, ("finetune", True)),  # typed epochs train, from the probe
    ({"lr": 1e7, "batch_size": 4}, ("finetune", True)),
    ({"solver": "sgd"}, ("feature-extract", False)),  # an SGD head was asked for by name
    ({"weights": "none"}, ("finetune", False)),  # a probe of random features is never right
    ({"weights": "none", "time_budget": 60}, ("finetune", False)),
    ({"overfit": 50}, ("finetune", True)),  # the sanity check is of training
])
def test_auto_on_a_cpu_honours_what_was_given(given, expected):
    plan = make_plan(TrainConfig(data="x", given=tuple(given), **given), CPU)
    assert (plan.mode, plan.probe_first) == expected


def test_a_budget_plans_its_own_epochs_unless_epochs_are_given():
    assert make_plan(TrainConfig(data="x", time_budget=600), CPU).epochs == BUDGET_EPOCH_CAP  # the budget ends it
    typed = make_plan(TrainConfig(data="x", time_budget=600, given=("time_budget",)), CPU).why
    assert "auto on a CPU with --time-budget 10m: a converged" in typed  # said once, in minutes
    capped = make_plan(TrainConfig(data="x", time_budget=600, epochs=4, given=("epochs",)), CPU)
    assert capped.epochs == 4 and "at most 4 epochs" in capped.why
    assert make_plan(TrainConfig(data="x", epochs=4, given=("epochs",)), CPU).epochs == 4


def test_refusals_say_what_would_use_the_option():
    with pytest.raises(UsageError, match="--epochs: the converged linear probe .* does not use it; it applies to "
                                         "--mode finetune, or --solver sgd"):
        make_plan(TrainConfig(data="x", mode="feature-extract", epochs=4, given=("epochs",)), CPU)
    with pytest.raises(UsageError, match="--solver: fine-tuning .* does not use it"):
        make_plan(TrainConfig(data="x", mode="finetune", solver="sgd", given=("solver",)), CPU)
    with pytest.raises(UsageError, match="--freeze-epochs: feature-extract mode"):
        make_plan(TrainConfig(data="x", solver="sgd", freeze_epochs=1, given=("solver", "freeze_epochs")), CPU)


def test_typed_epochs_on_a_cpu_train_from_the_probe_and_config_json_says_so(tiny_data, local_weights, tmp_path):
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["train", str(tiny_data), "--weights", str(local_weights), "--epochs", "2",
                                      "-b", "8", "-j", "0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "with --batch-size 8 and --epochs 2" in result.output and "a converged linear probe first, then fine-tuning" in result.output
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == 3  # the probe, then the 2 epochs typed
    config = json.loads((out / "config.json").read_text())
    assert config["mode"] == "finetune" and config["epochs"] == 2 and "epochs" in config["given"]


def test_resuming_a_probe_run_with_epochs_fine_tunes_from_its_probe(tiny_data, local_weights, tmp_path):
    out = tmp_path / "r"
    first = CliRunner().invoke(app, ["train", str(tiny_data), "--weights", str(local_weights), "-j", "0", "-o",
                                     str(out)])
    assert first.exit_code == 0, first.output
    assert len((out / "metrics.csv").read_text().splitlines()) == 2  # the probe alone
    more = CliRunner().invoke(app, ["train", "--resume", str(out), "--epochs", "2", "-j", "0"])
    assert more.exit_code == 0, more.output
    assert "then 2 epochs of fine-tuning from it" in more.output
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["1", "2", "3"]
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["phases"][-1] == [1, 2] and state["plan"]["mode"] == "finetune"


def test_a_config_files_keys_are_given_but_a_run_records_only_what_its_user_gave(tmp_path):
    from finetune.configfile import given_in, load_config

    (tmp_path / "a.yaml").write_text("lr: 0.01\nseed: 3\n")
    assert given_in(load_config(tmp_path / "a.yaml")) == ("lr", "seed")
    record = dataclasses.asdict(TrainConfig(data="x", lr=0.01, given=("lr",))) | {"lr_used": 0.01}
    (tmp_path / "config.json").write_text(json.dumps(record))
    assert given_in(load_config(tmp_path / "config.json")) == ("lr",)  # not all 50 settings it records


def test_fine_tuning_from_the_probe_is_gentle_unless_told_otherwise():
    lpft = make_plan(TrainConfig(data="x", epochs=3, given=("epochs",)), CPU)
    assert lpft.frozen_statistics and lpft.backbone_lr_mult == 0.1
    told = make_plan(TrainConfig(data="x", epochs=3, backbone_lr_mult=1.0, given=("epochs", "backbone_lr_mult")), CPU)
    assert told.backbone_lr_mult is None  # the typed value stands
    outright = make_plan(TrainConfig(data="x", mode="finetune"), CPU)  # from a random head: the usual statistics
    assert not outright.frozen_statistics and outright.backbone_lr_mult is None


def test_the_recipe_follows_the_photos_and_the_run(tiny_data, tmp_path):
    from PIL import Image

    from finetune.data.dataset import find_dataset
    from finetune.data.preprocessing import Preprocessing
    from finetune.training.recipe import choose_recipe

    pre = Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3, "bilinear")
    split = find_dataset(tiny_data)  # 500x375-ish photos
    cfg = TrainConfig(data="x")
    assert choose_recipe(cfg, True, False, pre, split).augment == "standard"  # large photos, from a random head
    assert choose_recipe(cfg, True, True, pre, split).augment == "light"  # from the probe
    assert choose_recipe(cfg, False, False, pre, split).augment == "standard"  # a frozen backbone's head
    given = TrainConfig(data="x", augment="trivial", given=("augment",))
    assert choose_recipe(given, True, True, pre, split).augment == "trivial"  # as typed
    small = tmp_path / "small"
    for s in split.train + split.val:
        out = small / s.path.split("photos/")[1]
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(s.path) as img:
            img.resize((128, 96)).save(out)
    recipe = choose_recipe(cfg, True, False, pre, find_dataset(small))
    assert recipe.augment == "light" and recipe.photo_side == 96 and "small" in recipe.why


def test_train_accuracy_below_val_for_epochs_says_the_augmentation_is_too_strong(tiny_data, tmp_path, monkeypatch):
    from finetune.training import loop

    said = []
    monkeypatch.setattr(loop, "STRONG_MARGIN", -2.0)  # every epoch counts as below val: the check itself is tested
    run_training(TrainConfig(data=str(tiny_data), mode="finetune", weights="none", epochs=3, batch_size=8,
                             output=str(tmp_path / "r"), workers=0),
                 lambda e, **k: said.append(k) if e == "augmentation_strong" else None)
    assert len(said) == 1 and said[0]["epochs"] == 3 and said[0]["augment"] == "standard"
