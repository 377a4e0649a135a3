"""--init-from MODEL: a new run starting from a trained model; its head kept for the same classes (rows put in the
data's class order), replaced for other classes; the architecture and preprocessing come from the file."""

import dataclasses
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config import TrainConfig
from finetune.data.preprocessing import Preprocessing
from finetune.errors import UsageError
from finetune.models.model_file import ModelFile, load_model_file, save_model_file
from finetune.models.registry import build_network
from finetune.training.setup import prepare

runner = CliRunner()


def _cfg(data, model_file, **kw):
    return TrainConfig(data=str(data), init_from=str(model_file), epochs=1, batch_size=8, workers=1, **kw)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_classes_keep_every_weight_including_the_head(tiny_data, trained_model):
    p = prepare(_cfg(tiny_data, trained_model))
    mf = load_model_file(trained_model)
    assert _same(p.net.plain_state_dict(), mf.state_dict)
    assert p.choice.preprocessing == mf.preprocessing and p.choice.label == "init:best.pt"


def test_head_rows_follow_the_class_names_not_their_positions(tiny_data, trained_model, tmp_path):
    mf = load_model_file(trained_model)
    swapped = dict(mf.state_dict) | {k: mf.state_dict[k].flip(0) for k in ("fc.weight", "fc.bias")}
    path = save_model_file(tmp_path / "swapped.pt", dataclasses.replace(mf, classes=mf.classes[::-1],
                                                                         state_dict=swapped))
    p = prepare(_cfg(tiny_data, path))
    assert _same(p.net.plain_state_dict(), mf.state_dict)  # bees/ants rows put back as ants/bees


def test_other_classes_keep_the_backbone_and_get_a_new_head(tiny_data, trained_model, tmp_path):
    data = tmp_path / "three"
    shutil.copytree(tiny_data, data)
    for part in ("train", "val"):
        shutil.copytree(data / part / "bees", data / part / "wasps")
    events = []
    p = prepare(_cfg(data, trained_model), lambda e, **k: events.append((e, k)))
    mf = load_model_file(trained_model)
    state = p.net.plain_state_dict()
    assert state["fc.weight"].shape == (3, 512)
    assert all(torch.equal(state[k], v) for k, v in mf.state_dict.items() if not k.startswith("fc."))
    assert ("init_from", {"path": str(trained_model), "head_kept": False, "classes": ["ants", "bees"]}) in events


def test_a_model_mismatch_is_refused_naming_the_files_architecture(tiny_data, trained_model):
    with pytest.raises(UsageError, match="a resnet18 model, not --model resnet34; give --model resnet18 or leave"):
        prepare(_cfg(tiny_data, trained_model, model="resnet34"))


@pytest.mark.slow  # a CLI run of mobilenet_v2
def test_cli_takes_the_architecture_from_the_file(tiny_data, tmp_path):
    from torchvision.models import MobileNet_V2_Weights

    net = build_network("mobilenet_v2", 2)
    pre = Preprocessing.from_weights(MobileNet_V2_Weights.IMAGENET1K_V1)
    source = ModelFile(arch="mobilenet_v2", classes=["ants", "bees"],
                       preprocessing=pre, state_dict=net.plain_state_dict(), head=net.head)
    path = save_model_file(tmp_path / "mnv2.pt", source)
    r = runner.invoke(app, ["train", str(tiny_data), "--init-from", str(path), "--epochs", "1", "-b", "8",
                            "-o", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert "init from" in r.stderr and "head kept (same classes)" in r.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"] == "mobilenet_v2" and config["base_weights"] == "init:mnv2.pt"
    assert config["init_from"] == str(path)
    r = runner.invoke(app, ["train", str(tiny_data), "--init-from", str(path), "--weights", "none"])
    assert r.exit_code == 2 and "--weights and --init-from" in r.stderr
