"""One door: `finetune train` and finetune.train build the same run from the same words, and refuse the same inputs
with the same error, each naming the setting as its caller wrote it (--batch-size on the command line, batch_size in
Python). Every training setting is walked: a new one without a sample here fails the first test."""

import dataclasses

import pytest
import typer
from typer.testing import CliRunner

import finetune
from finetune.cli import app
from finetune.cli.train import _spell
from finetune.config import TrainConfig, validate
from finetune.errors import FinetuneError, UsageError
from finetune.training.request import GIVEN_SETTINGS

runner = CliRunner()
TRAIN = next(c for c in typer.main.get_command(app).commands.values() if c.name == "train")
PARAMS = {p.name: p for p in TRAIN.params}

# A value other than the default for every setting, as a user would give it (words where the command line takes
# words: time_budget as "10m"). init_from is walked with a real model file below.
SAMPLES = {
    "model": "mobilenet_v2", "weights": "none", "mode": "finetune", "solver": "sgd", "dropout": 0.2,
    "optimizer": "adamw", "lr": 0.003, "momentum": 0.8, "weight_decay": 0.001, "scheduler": "step", "epochs": 3,
    "time_budget": "10m", "batch_size": 8, "workers": 0, "augment": "trivial", "train_size": 160,
    "val_fraction": 0.3, "path_col": "file", "label_col": "tag", "label_sep": "|", "multi_label": True,
    "image_dir": "imgs", "seed": 7, "device": "cpu", "amp": False, "channels_last": False, "compile": True,
    "output": "out", "overwrite": True, "strict": True, "max_pixels": 1000000, "balance": "sampler",
    "freeze_epochs": 2, "backbone_lr_mult": 0.5, "overfit": 5, "patience": 3, "folds": 3, "fold": 2,
    "calibrate": True, "deterministic": True, "sync_bn": True, "log": "tensorboard", "mixup": 0.2, "cutmix": 1.0,
    "label_smoothing": 0.1, "erasing": 0.25,
}
# A value each refuses (where the setting has a rule), refused by the command line's parser or by the library.
BAD = {"epochs": 0, "batch_size": 0, "lr": -1.0, "momentum": 1.5, "weight_decay": -0.1, "dropout": 1.0,
       "freeze_epochs": -1, "backbone_lr_mult": -1.0, "overfit": -1, "patience": -1, "train_size": 16, "folds": 1,
       "max_pixels": 0, "val_fraction": 1.0, "workers": -2, "time_budget": "10x", "mixup": 11.0, "cutmix": -1.0,
       "label_smoothing": 1.0, "erasing": 2.0, "log": "wandb", "optimizer": "lion", "scheduler": "linear",
       "mode": "train", "augment": "heavy", "balance": "oversample", "solver": "adam", "epochs_text": "three"}


def _argv(name: str, value) -> list[str]:
    return _spell(PARAMS[name], value)


@pytest.fixture
def captured(monkeypatch):
    """The TrainConfig a train call would run (validated as the run validates it), without training."""
    seen = {}

    def run(cfg, *args, **kwargs):
        seen["cfg"] = validate(cfg)
        raise SystemExit(0)

    monkeypatch.setattr("finetune.training.request.run_training", run)
    return seen


def _cli(seen: dict, *argv) -> tuple[TrainConfig | None, int, str]:
    seen.clear()
    r = runner.invoke(app, ["train", *map(str, argv)])
    return seen.get("cfg"), r.exit_code, r.stderr


def _python(seen: dict, data, **kwargs) -> tuple[TrainConfig | None, FinetuneError | None]:
    seen.clear()
    try:
        finetune.train(data, **kwargs)
    except SystemExit:
        pass
    except FinetuneError as e:
        return None, e
    return seen.get("cfg"), None


def test_every_setting_has_a_sample_and_an_option():
    assert set(SAMPLES) | {"init_from", "data"} == set(GIVEN_SETTINGS)
    assert set(SAMPLES) | {"init_from"} <= set(PARAMS)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_setting_builds_the_same_run_from_either_door(name, captured, tiny_data):
    # fold needs folds; folds' runs need one folder name (a timestamped default differs between two calls)
    extra = {"folds": 3, "output": "cv"} if name in ("fold", "folds") else {}
    argv = [a for n, v in ({name: SAMPLES[name]} | extra).items() for a in _argv(n, v)]
    cli_cfg, code, stderr = _cli(captured, tiny_data, *argv)
    py_cfg, error = _python(captured, tiny_data, **{name: SAMPLES[name]} | extra)
    assert code == 0 and error is None, (stderr, error)
    assert dataclasses.asdict(cli_cfg) == dataclasses.asdict(py_cfg)
    assert name in py_cfg.given and getattr(py_cfg, name) != getattr(TrainConfig(data="x"), name)


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_value_is_refused_alike_naming_the_setting_as_written(name, captured, tiny_data):
    setting, value = ("epochs", BAD[name]) if name == "epochs_text" else (name, BAD[name])
    _, code, stderr = _cli(captured, tiny_data, *_argv(setting, value))
    _, error = _python(captured, tiny_data, **{setting: value})
    assert isinstance(error, UsageError) and code == UsageError.exit_code, stderr
    option = "--" + setting.replace("_", "-")
    assert option in stderr or (PARAMS[setting].opts[-1] in stderr)  # the option, as typed (or its short form)
    assert setting in str(error) and option not in str(error)  # the keyword, never the option


def test_the_model_file_gives_init_from_its_architecture_at_either_door(captured, tiny_data, trained_model):
    cli_cfg, code, stderr = _cli(captured, tiny_data, "--init-from", trained_model)
    py_cfg, error = _python(captured, tiny_data, init_from=str(trained_model))
    assert code == 0 and error is None, stderr
    assert cli_cfg == py_cfg and py_cfg.model == finetune.load(trained_model).info.arch
    _, code, stderr = _cli(captured, tiny_data, "--init-from", trained_model, "--weights", "none")
    _, error = _python(captured, tiny_data, init_from=str(trained_model), weights="none")
    assert code == error.exit_code == UsageError.exit_code
    assert "--weights and --init-from" in stderr and "weights and init_from" in str(error)


def test_an_unknown_keyword_is_refused_with_the_closest_setting(tiny_data):
    with pytest.raises(UsageError, match="unknown setting 'epoch'; did you mean epochs"):
        finetune.train(tiny_data, epoch=3)
    with pytest.raises(UsageError, match="missing data"):
        finetune.train(epochs=3)
