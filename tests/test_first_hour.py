"""What a new user meets in the first hour: resume that does what it says, finetune's own exports accepted,
which model is used and how far along it is, the report, help text and messages without a wrong word."""

import errno
import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from finetune.cli import app

runner = CliRunner()
COMMANDS = ("train", "predict", "evaluate", "export", "check", "lr-find", "tune")


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


@pytest.mark.slow
def test_resume_takes_the_runs_settings_and_extends_a_finished_run(tiny_data, in_tmp):
    r = invoke("train", tiny_data, "--mode", "finetune", "--weights", "none", "--epochs", "2", "-b", "8", "--lr", "0.01",
               "-o", "r", "-q")
    assert r.exit_code == 0, r.output
    r = invoke("train", "--resume", "r")  # finished: nothing to do is not a success
    assert r.exit_code == 2 and "already completed 2 of its 2 epochs; give --epochs larger than 2" in r.stderr
    r = invoke("train", "--resume", "r", "--model", "alexnet")
    assert r.exit_code == 2 and "--model alexnet differs from that run's 'resnet18'" in r.stderr
    r = invoke("train", "--resume", "r", "--epochs", "4")  # no DATA, no --model: the run's own settings
    assert r.exit_code == 0, r.output
    assert "resuming at epoch 3 of 4" in r.stderr and "extends the 2-epoch run" in r.stderr
    rows = [line.split(",") for line in (in_tmp / "r" / "metrics.csv").read_text().splitlines()[1:]]
    lrs = [float(row[5]) for row in rows]
    assert [int(row[0]) for row in rows] == [1, 2, 3, 4]
    # cosine over 4 epochs from epoch 3 on: 0.01 * (1 + cos(pi * 2/4)) / 2, then (1 + cos(3pi/4)) / 2
    assert lrs[2:] == pytest.approx([0.005, 0.01 * (1 - 0.5 ** 0.5) / 2], rel=1e-4)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", pytest.param(".onnx", marks=pytest.mark.slow)])
def test_predict_and_evaluate_accept_every_export_with_the_checkpoints_results(trained_model, tiny_data, tmp_path,
                                                                               suffix):
    exported = tmp_path / f"model{suffix}"
    assert invoke("export", exported, "-m", trained_model).exit_code == 0
    base = json.loads(invoke("evaluate", tiny_data, "-m", trained_model, "--json").stdout)
    r = invoke("evaluate", tiny_data, "-m", exported, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["confusion_matrix"] == base["confusion_matrix"]
    assert f"model {exported} (resnet18, 2 classes" in r.stderr
    p1 = json.loads(invoke("predict", tiny_data / "val", "-m", trained_model, "--json").stdout)
    p2 = json.loads(invoke("predict", tiny_data / "val", "-m", exported, "--json").stdout)
    assert [[c["class"] for c in x["predictions"]] for x in p1] == [[c["class"] for c in x["predictions"]] for x in p2]


def test_predict_names_the_model_it_used(trained_model, tiny_data, in_tmp):
    r = invoke("predict", tiny_data / "val", "-m", trained_model)
    assert re.search(r"model .*best\.pt \(resnet18, 2 classes, val accuracy \d+\.\d%, runtime torch\)", r.stderr)
    (in_tmp / "runs").mkdir()
    (in_tmp / "runs" / "latest.json").write_text(json.dumps({"model": str(trained_model)}))
    r = invoke("predict", tiny_data / "val")
    assert "the latest run's, from runs/latest.json (-m chooses another)" in r.stderr
    r = invoke("predict", tiny_data / "val", "-q")
    assert "model" not in r.stderr


@pytest.mark.slow
def test_the_report_holds_what_results_json_holds(tiny_data, tmp_path, in_tmp):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "train" / "ants" / "broken.jpg").write_bytes(b"<html>")
    r = invoke("train", data, "--weights", "none", "--epochs", "1", "-b", "8", "-o", "r", "-q")
    assert r.exit_code == 0, r.output
    results = json.loads((in_tmp / "r" / "results.json").read_text())
    page = (in_tmp / "r" / "report.html").read_text()
    assert "Per class (validation)" in page and "95 % interval" in page and "macro average" in page
    assert "broken.jpg" in page and "Skipped files (1)" in page
    assert all(w["path"] in page for w in results["wrong"]) and all("/" in w["path"] for w in results["wrong"])
    settings = dict(re.findall(r'<tr><td class="text">(\w+)</td><td>([^<]*)</td></tr>', page))
    config = json.loads((in_tmp / "r" / "config.json").read_text())
    assert float(settings["lr"]) == pytest.approx(config["lr_used"])  # what was used, not "null"
    assert settings["amp"] == config["precision"] != "true"  # what --amp did on this machine, not "true"
    assert "lr_used" not in settings


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_no_type_placeholders(command):
    r = invoke(command, "--help", env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for junk in ("<bool>", "<str>", "<int>", "<float>", "<list[str]>", "{data}", "{OUT}", "{paths}"):
        assert junk not in r.stdout, junk


def test_train_help_groups_its_options():
    r = invoke("train", "--help", env={"COLUMNS": "200"})
    panels = re.findall(r"╭─ (\w+) ", r.stdout)
    assert panels == ["Arguments", "Options", "Data", "Model", "Optimisation", "Checks", "Performance", "Output"]
    assert "channels_last memory format (faster convolutions on CUDA and CPU)" in r.stdout


def test_check_counts_add_up(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "train" / "ants" / "x.gif").write_bytes(b"GIF89a")
    r = invoke("check", data)
    assert "18 files: 17 usable images, 1 skipped" not in r.stderr  # a listing never says 17 usable of 17
    assert "19 files: 18 usable images, 1 skipped" in r.stderr


def test_export_on_a_full_disk_names_what_export_accepts(trained_model, tmp_path, monkeypatch):
    from finetune.formats import export

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setitem(export._WRITERS, ".pt", full)
    r = invoke("export", tmp_path / "m.pt", "-m", trained_model)
    assert r.exit_code == 5 and "the disk is full" in r.stderr and "choose another OUT path" in r.stderr
    assert " -o" not in r.stderr and "(-o)" not in r.stderr
