"""--config run.yaml|.toml|.json: any setting, typed options win, unknown keys refused by their closest name, and a
run folder's config.json repeats that run exactly."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config import RUN_FACTS, TrainConfig
from finetune.configfile import load_config
from finetune.errors import UsageError

runner = CliRunner()


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_three_formats_give_the_same_settings(tmp_path):
    yaml = _write(tmp_path, "run.yaml", "model: resnet50\nbatch-size: 16\nlr: 1e-3  # YAML 1.1 reads this as text\n"
                                        "calibrate: true\nbackbone_lr_mult: null\naugment: trivial\nmixup: 0.2\n")
    toml = _write(tmp_path, "run.toml", 'model = "resnet50"\nbatch_size = 16\nlr = 0.001\ncalibrate = true\n'
                                        'augment = "trivial"\nmixup = 0.2\n')
    as_json = _write(tmp_path, "run.json", '{"--model": "resnet50", "batch_size": 16, "lr": 0.001, "calibrate": true, '
                                           '"augment": "trivial", "mixup": 0.2}')
    expected = {"model": "resnet50", "batch_size": 16, "lr": 0.001, "calibrate": True, "augment": "trivial",
                "mixup": 0.2}
    assert load_config(yaml) == expected | {"backbone_lr_mult": None}
    assert load_config(toml) == expected and load_config(as_json) == expected
    assert isinstance(load_config(_write(tmp_path, "i.yaml", "epochs: 3.0\n"))["epochs"], int)
    assert load_config(_write(tmp_path, "l.yaml", "log: [tensorboard, mlflow]\n")) == {"log": "tensorboard,mlflow"}


@pytest.mark.parametrize("text, message", [
    ("batchsize: 8\n", "unknown setting 'batchsize'; did you mean batch_size?"),
    ("gpus: 2\n", "'gpus' is a command-line option, not a setting of the run; give --gpus on the command line"),
    ("epochs: 2.5\n", "epochs = 2.5 is not a whole number"),
    ("calibrate: 'yes'\n", "calibrate = 'yes' is not true or false"),
    ("lr: fast\n", "lr = 'fast' is not a number"),
    ("epochs:\n", "epochs is empty; give a whole number"),
    ("- lr\n- 0.1\n", "holds a list, not a mapping of settings"),
    ("model: [resnet18\n", "not valid YAML (line 2"),
])
def test_bad_files_are_refused_naming_the_key(tmp_path, text, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("?", r"\?").replace("[", r"\[")):
        load_config(_write(tmp_path, "bad.yaml", text))


def test_unknown_suffix_and_unreadable_files(tmp_path):
    with pytest.raises(UsageError, match=r"unknown file type '.ini'; use a .yaml, .yml, .toml, .json file"):
        load_config(_write(tmp_path, "run.ini", "lr=1"))
    with pytest.raises(UsageError, match="cannot read it"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_config(_write(tmp_path, "bad.toml", "lr = = 1"))


def test_a_run_config_json_gives_back_its_settings_not_its_facts_nor_its_folder(tmp_path):
    cfg = TrainConfig(data="photos", model="mobilenet_v2", epochs=7, output="runs/a", overwrite=True, seed=4)
    record = cfg.to_dict() | {fact: "x" for fact in RUN_FACTS}
    settings = load_config(_write(tmp_path, "config.json", json.dumps(record)))
    assert TrainConfig(**settings) == dataclasses.replace(cfg, output=None, overwrite=False)
    record["colour"] = "red"  # still refused: a run record is not a free-for-all
    with pytest.raises(UsageError, match="unknown setting 'colour'"):
        load_config(_write(tmp_path, "config.json", json.dumps(record)))


def test_typed_options_override_the_file_and_data_may_come_from_it(tiny_data, tmp_path, monkeypatch):
    seen = {}

    def run(cfg, *args, **kwargs):  # the config as train would run it, without training
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr("finetune.training.request.run_training", run)
    path = _write(tmp_path, "run.yaml", f"data: {tiny_data}\nepochs: 4\nbatch_size: 8\nweights: none\n")
    r = runner.invoke(app, ["train", "--config", str(path), "--epochs", "2"])
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert (cfg.data, cfg.epochs, cfg.batch_size, cfg.weights) == (str(tiny_data), 2, 8, "none")
    r = runner.invoke(app, ["train", "--config", str(_write(tmp_path, "nodata.yaml", "epochs: 1\n"))])
    assert r.exit_code == 2 and "missing DATA" in r.stderr


@pytest.mark.slow  # two CLI runs
def test_a_run_folders_config_json_repeats_the_run_exactly(tiny_data, tmp_path):
    first = tmp_path / "first"
    r = runner.invoke(app, ["train", str(tiny_data), "--weights", "none", "--epochs", "2", "-b", "4", "--seed", "3",
                            "--augment", "light", "--label-smoothing", "0.1", "--mixup", "0.2", "--deterministic",
                            "-o", str(first), "-q"])
    assert r.exit_code == 0, r.output
    again = tmp_path / "again"
    r = runner.invoke(app, ["train", "--config", str(first / "config.json"), "-o", str(again), "-q"])
    assert r.exit_code == 0, r.output
    a, b = (json.loads((d / "config.json").read_text()) for d in (first, again))
    # The plan's words differ (config.json records the mode the first run's auto chose); what it does may not.
    assert {k: v for k, v in a.items() if k not in ("output", "plan")} == \
        {k: v for k, v in b.items() if k not in ("output", "plan")}
    assert {k: v for k, v in a["plan"].items() if k != "why"} == {k: v for k, v in b["plan"].items() if k != "why"}
    assert (first / "metrics.csv").read_text().split("\n")[1].split(",")[:5] == \
        (again / "metrics.csv").read_text().split("\n")[1].split(",")[:5]
    sa, sb = (torch.load(d / "best.pt", weights_only=True)["state_dict"] for d in (first, again))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
