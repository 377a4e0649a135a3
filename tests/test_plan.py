"""What a run does on the machine it has: --mode auto and --time-budget."""

import pytest
import torch

from finetune.config import TrainConfig
from finetune.training import run_training
from finetune.training.plan import make_plan, planned_epochs

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("mode, device, budget, expected", [
    ("auto", CPU, 0, ("feature-extract", False)),  # a converged probe: seconds
    ("auto", CPU, 600, ("finetune", True)),  # the probe, then fine-tuning from it in the time left
    ("auto", CUDA, 0, ("finetune", False)),  # a GPU fine-tunes
    ("auto", CUDA, 600, ("finetune", False)),
    ("finetune", CPU, 600, ("finetune", False)),  # asked for: as asked
    ("feature-extract", CPU, 600, ("feature-extract", False)),
])
def test_the_plan_follows_the_device_and_the_budget(mode, device, budget, expected):
    plan = make_plan(TrainConfig(data="x", mode=mode, time_budget=budget), device)
    assert (plan.mode, plan.probe_first) == expected and plan.why
    assert plan.budget == (0 if plan.mode == "feature-extract" else budget)


def test_planned_epochs_fit_the_budget():
    assert planned_epochs(budget=100, elapsed=30, epoch_seconds=10, done=1, requested=20) == 8  # 7 more fit
    assert planned_epochs(budget=100, elapsed=30, epoch_seconds=10, done=1, requested=5) == 5  # never more than asked
    assert planned_epochs(budget=10, elapsed=30, epoch_seconds=10, done=1, requested=5) == 1  # over: stop there


def test_a_budgeted_cpu_run_fits_a_probe_then_fine_tunes_from_it(tiny_data, tmp_path):
    events = []
    cfg = TrainConfig(data=str(tiny_data), weights="none", epochs=6, batch_size=8, time_budget=0.01,
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
