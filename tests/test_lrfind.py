"""The learning-rate range test."""

import json

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import FinetuneError
from finetune.training.lrfind import suggest


def test_suggestion_is_a_tenth_of_the_lowest_loss_lr():
    lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    losses = [0.70, 0.69, 0.50, 0.40, 2.0]
    assert suggest(lrs, losses) == (pytest.approx(1e-3), 1e-2)
    with pytest.raises(FinetuneError):
        suggest([], [])


def test_cli_writes_plot_and_json_and_prints_the_suggestion(tiny_data, in_tmp):
    r = CliRunner().invoke(app, ["lr-find", str(tiny_data), "--weights", "none", "--steps", "12", "-b", "4",
                                 "--mode", "feature-extract", "--end-lr", "100", "-o", str(in_tmp / "lr")])
    assert r.exit_code == 0, r.output
    data = json.loads((in_tmp / "lr" / "lr_find.json").read_text())
    lrs = data["lrs"]
    assert 2 <= len(lrs) <= 12 and lrs[0] == pytest.approx(1e-7) and lrs == sorted(lrs)
    assert float(r.stdout) == pytest.approx(data["suggestion"], rel=1e-2)
    assert data["suggestion"] == pytest.approx(data["min_loss_lr"] / 10)
    assert (in_tmp / "lr" / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "--lr" in r.stderr


def test_cli_shows_the_steps_and_suggests_the_full_command(tiny_data, in_tmp, monkeypatch):
    from finetune.cli.views import TrainView

    steps = []
    monkeypatch.setattr(TrainView, "on_lr_find_step", lambda self, step, lr, loss: steps.append(step))
    r = CliRunner().invoke(app, ["lr-find", str(tiny_data), "--weights", "none", "--steps", "6", "-b", "4",
                                 "--mode", "feature-extract", "--optimizer", "adamw", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert steps and steps == list(range(1, len(steps) + 1))  # the progress reached the screen, step by step
    command = r.stderr.split("train with: ")[1].split()
    assert command[:3] == ["finetune", "train", str(tiny_data)]
    for pair in (["--weights", "none"], ["--mode", "feature-extract"], ["--optimizer", "adamw"], ["--seed", "3"],
                 ["--batch-size", "4"]):
        assert " ".join(pair) in " ".join(command), pair  # every option the search used, not only --model
    assert "--steps" not in command and command[-2] == "--lr"
