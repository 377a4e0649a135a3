"""The command line as a user meets it: train -> predict -> export, errors, help, version."""

import csv
import io
import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from finetune import __version__
from finetune.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_train_predict_export_end_to_end(tiny_data, in_tmp):
    r = invoke("train", tiny_data, "--mode", "finetune", "--weights", "none", "--epochs", "2", "-b", "8", "-j", "1")
    assert r.exit_code == 0, r.output
    run_dirs = [p for p in (in_tmp / "runs").iterdir() if p.is_dir()]
    assert len(run_dirs) == 1
    run = run_dirs[0]
    assert r.stdout.strip() == str((run / "best.pt").relative_to(in_tmp))
    for line in ("epoch 1/2", "epoch 2/2", "val loss", "best epoch", "*best"):
        assert line in r.stderr
    assert {p.name for p in run.iterdir()} == {"best.pt", "config.json", "split.json", "metrics.csv", "results.json",
                                               "state.pt", "curves.png", "confusion.png", "wrong.png", "filters.png",
                                               "reliability.png", "report.html", ".finetune.lock"}
    for png in run.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "<script" not in html
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r_["epoch"]) for r_ in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "elapsed",
                            "update_ratio_head", "update_ratio_backbone"}
    assert float(rows[0]["elapsed"]) < float(rows[1]["elapsed"])
    best = max(rows, key=lambda r_: float(r_["val_acc"]))
    meta = torch.load(run / "best.pt", weights_only=True)
    assert meta["metrics"]["val_acc"] == pytest.approx(float(best["val_acc"]), abs=1e-5)
    config = json.loads((run / "config.json").read_text())
    assert config["classes"] == ["ants", "bees"] and config["train_images"] == 12
    results = json.loads((run / "results.json").read_text())
    val = results["val_metrics"]  # the best epoch's val predictions: they must agree with metrics.csv
    assert val["accuracy"] == pytest.approx(float(best["val_acc"]), abs=1e-5)
    assert sum(map(sum, val["confusion_matrix"])) == 6 == val["images"]
    assert f"{float(best['val_acc']) * 100:.1f} %" in (run / "report.html").read_text()
    latest = json.loads((in_tmp / "runs" / "latest.json").read_text())
    assert latest["model"] == str((run / "best.pt").resolve())

    # predict with no --model: the latest run's best model
    r = invoke("predict", tiny_data / "val", "--json", "-k", "2")
    assert r.exit_code == 0, r.output
    preds = json.loads(r.stdout)
    assert len(preds) == 6
    for p in preds:
        probs = [c["probability"] for c in p["predictions"]]
        assert {c["class"] for c in p["predictions"]} == {"ants", "bees"}
        assert sum(probs) == pytest.approx(1.0, abs=1e-4) and probs[0] >= probs[1]

    r = invoke("export", in_tmp / "model.pt")
    assert r.exit_code == 0, r.output
    assert "max logit difference" in r.stderr and "top-1 agrees 6/6" in r.stderr
    assert (in_tmp / "model.pt").is_file()
    r = invoke("export", in_tmp / "quiet.pt", "--quiet")  # checked all the same; only the path is said
    assert r.exit_code == 0 and r.stderr == "" and r.stdout.strip() == str(in_tmp / "quiet.pt")


def test_train_flat_layout_with_feature_extract(flat_data, in_tmp):
    r = invoke("train", flat_data, "--weights", "none", "--epochs", "1", "--mode", "feature-extract",
               "--val-fraction", "0.25", "-o", in_tmp / "out", "-q", "--optimizer", "adamw", "--scheduler", "step",
               "--solver", "sgd",
               "--dropout", "0.3", "--augment", "light")
    assert r.exit_code == 0, r.output
    assert r.stderr == ""  # --quiet
    config = json.loads((in_tmp / "out" / "config.json").read_text())
    assert config["layout"].startswith("stratified split, 25% val")
    assert config["train_images"] == 14 and config["val_images"] == 4
    meta = torch.load(in_tmp / "out" / "best.pt", weights_only=True)
    assert meta["dropout"] == 0.3 and meta["config"]["mode"] == "feature-extract"
    assert (config["optimizer"], config["scheduler"], config["augment"]) == ("adamw", "step", "light")
    state = torch.load(in_tmp / "out" / "state.pt", weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    assert "amsgrad" in group and "nesterov" not in group  # AdamW's state, not SGD's
    assert group["lr"] == pytest.approx(config["lr_used"] / 10)  # step: /10 every 30 % of the epochs (1 of 1)


@pytest.mark.slow
def test_momentum_reaches_the_optimizer_and_fold_trains_one_fold(tiny_data, in_tmp):
    r = invoke("train", tiny_data, "--weights", "none", "--epochs", "1", "-b", "8", "--momentum", "0.5", "-o",
               in_tmp / "m", "-q")
    assert r.exit_code == 0, r.output
    state = torch.load(in_tmp / "m" / "state.pt", weights_only=True)
    assert {g["momentum"] for g in state["optimizer"]["param_groups"]} == {0.5}
    r = invoke("train", tiny_data, "--weights", "none", "--epochs", "1", "-b", "8", "--folds", "3", "--fold", "2",
               "-o", in_tmp / "f", "-q")
    assert r.exit_code == 0, r.output
    config = json.loads((in_tmp / "f" / "config.json").read_text())
    assert (config["folds"], config["fold"]) == (3, 2) and config["layout"].startswith("fold 2 of 3")
    r = invoke("train", tiny_data, "--weights", "none", "--fold", "2")
    assert r.exit_code == 2 and "--fold 2: needs --folds K" in r.stderr


def test_overfit_set_in_a_config_file_is_the_sanity_check(tiny_data, in_tmp):
    (in_tmp / "c.json").write_text(json.dumps({"overfit": 4, "augment": "standard", "weight_decay": 0.1}))
    r = invoke("train", tiny_data, "--weights", "none", "--config", in_tmp / "c.json", "--epochs", "1", "-b", "4",
               "-o", in_tmp / "o")
    assert r.exit_code == 0, r.output
    assert "sanity check" in r.stderr
    config = json.loads((in_tmp / "o" / "config.json").read_text())
    assert (config["augment"], config["weight_decay"], config["train_images"]) == ("none", 0.0, 4)


def test_pretrained_default_weights_from_local_cache(tiny_data, in_tmp, monkeypatch):
    """The real DEFAULT path, with a locally made file under torchvision's name in a temporary TORCH_HOME."""
    home = in_tmp / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    weights = home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    from finetune.data.content_index import full_hash
    from finetune.models import weights as W

    monkeypatch.setitem(W.PINNED_SHA256, weights.name, full_hash(str(weights)))  # stands in for the real file
    monkeypatch.setenv("TORCH_HOME", str(home))
    old = torch.hub.get_dir()
    torch.hub._hub_dir = None  # honour TORCH_HOME as a fresh process would
    try:
        r = invoke("train", tiny_data, "--epochs", "1", "-b", "8", "-q", "-o", in_tmp / "run")
    finally:
        torch.hub.set_dir(old)
    assert r.exit_code == 0, r.output
    meta = torch.load(in_tmp / "run" / "best.pt", weights_only=True)
    assert meta["base_weights"] == "ResNet18_Weights.IMAGENET1K_V1"


def test_offline_message_and_exit_code(tiny_data, in_tmp, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(in_tmp / "empty_home"))
    old = torch.hub.get_dir()
    torch.hub._hub_dir = None

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    try:
        r = invoke("train", tiny_data, "--epochs", "1")
    finally:
        torch.hub.set_dir(old)
    assert r.exit_code == 5
    assert "resnet18-f37072fd.pth" in r.stderr and "--weights none" in r.stderr
    assert "Traceback" not in r.output
    assert not (in_tmp / "runs").exists()  # nothing written before the weights are there


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--epochs", "0"], "--epochs 0"),
        (["--lr", "-1"], "--lr -1"),
        (["--model", "resnet019"], "did you mean"),
        (["--device", "tpu"], "--device tpu"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--optimizer", "lbfgs"], "sgd, adamw"),
        (["--weights", "IMAGENET9K"], "DEFAULT, IMAGENET1K_V1"),
    ],
)
def test_option_errors_exit_2_before_any_work(tiny_data, in_tmp, args, needle):
    if needle == "no CUDA GPU" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = invoke("train", tiny_data, *args)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and "Traceback" not in r.output
    assert not (in_tmp / "runs").exists()


def test_dataset_error_exit_3(in_tmp):
    r = invoke("train", in_tmp / "missing")
    assert r.exit_code == 3
    assert "no such folder" in r.stderr and len(r.stderr.strip().splitlines()) <= 2


def test_predict_without_any_model_says_what_to_do(in_tmp, tiny_data):
    r = invoke("predict", tiny_data / "val")
    assert r.exit_code == 2 and "train first" in r.stderr


def test_predict_formats_and_skips_bad_files(trained_model, tiny_data, in_tmp):
    bad = in_tmp / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff truncated")
    good = sorted((tiny_data / "val" / "ants").iterdir())[0]
    r = invoke("predict", good, bad, in_tmp / "nope.png", "--model", trained_model, "--csv", "-k", "1")
    assert r.exit_code == 0, r.output
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == ["path", "class1", "probability1"]
    assert [row[0] for row in rows[1:]] == [str(good)]
    assert "broken.jpg" in r.stderr and "nope.png" in r.stderr and "2 of 3 input(s) skipped" in r.stderr

    r = invoke("predict", str(tiny_data / "val" / "*" / "*.jpg"), "--model", trained_model)
    assert r.exit_code == 0
    assert r.stdout.count("ants") >= 6 and "#2" in r.stdout  # table: both classes shown per image


@pytest.mark.slow
def test_help_version_and_module_entry():
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"finetune {__version__}"
    for cmd in ("train", "predict", "export"):
        r = invoke(cmd, "--help")
        assert r.exit_code == 0 and "Example: finetune " + cmd in r.stdout
    p = subprocess.run([sys.executable, "-m", "finetune", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "train" in p.stdout and "export" in p.stdout


@pytest.mark.slow
def test_cli_import_does_not_import_torch():
    code = "import sys, finetune.cli; print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "False"


def test_unexpected_errors_are_one_line_unless_debug(tiny_data, in_tmp, monkeypatch):
    import finetune.training.request

    def boom(*a, **k):
        raise ValueError("something broke\nsecond line")

    monkeypatch.setattr(finetune.training.request, "run_training", boom)
    r = invoke("train", tiny_data)
    assert r.exit_code == 1
    assert "internal error: ValueError: something broke" in r.stderr and "second line" not in r.stderr
    assert "Traceback" not in r.output
    r = invoke("--debug", "train", tiny_data)
    assert isinstance(r.exception, ValueError)


def test_brackets_in_names_are_printed_verbatim(trained_model, tiny_data, in_tmp):
    weird = in_tmp / "[bold]ant [1].jpg"
    weird.write_bytes(sorted((tiny_data / "val" / "ants").iterdir())[0].read_bytes())
    r = invoke("predict", weird, "--model", trained_model)
    assert r.exit_code == 0, r.output
    flat = "".join(ch for ch in r.stdout if ch not in " \n│")  # the table may fold a long path
    assert "[bold]ant[1].jpg" in flat
    r = invoke("predict", in_tmp / "[red]missing.jpg", "--model", trained_model)
    assert "[red]missing.jpg" in r.stderr


def test_each_training_setting_is_declared_once_in_the_cli():
    """A setting lives in TrainConfig (default, why) and in options.SETTINGS (option, help); train takes them all,
    lr-find, tune and check take theirs from the same table, never a copy with its own default."""
    import ast
    import dataclasses
    import inspect

    from finetune.cli import options as o
    from finetune.cli import tools
    from finetune.cli import train as train_cli
    from finetune.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"data", "given"}
    assert set(o.SETTINGS) == names
    assert names <= set(inspect.signature(train_cli.train).parameters)
    for command in (tools.lr_find, tools.tune, tools.check):
        params = inspect.signature(command).parameters
        taken = [n for n in params if params[n].annotation is o.SETTINGS.get(n)]
        assert len(taken) >= 10 and all(params[n].default == o.OPTION_DEFAULTS.get(n, o.D[n]) for n in taken)
    declared = {name for name, value in vars(o).items() if any(value is s for s in o.SETTINGS.values())}
    written = [f"{path.name}: {a.arg}" for path in Path(train_cli.__file__).parent.glob("*.py")
               for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)
               for a in node.args.args + node.args.kwonlyargs
               if isinstance(a.annotation, ast.Attribute) and a.annotation.attr in declared]
    assert not written  # a command writing out a setting's option again, with a default of its own


def test_help_lists_the_commands_in_the_order_a_user_meets_them():
    from finetune.cli.app import ORDER

    text = CliRunner().invoke(app, ["--help"]).output
    shown = [name for name in ORDER if f"│ {name} " in text]
    assert shown[:5] == ["train", "predict", "evaluate", "export", "serve"]
    assert sorted(shown, key=lambda name: text.index(f"│ {name} ")) == shown
