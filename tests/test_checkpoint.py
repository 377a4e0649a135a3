"""The model file: self-describing, loadable with weights_only=True, written atomically, refused when unsafe."""

import os
from pathlib import Path

import pytest
import torch

from finetune._util import files as F
from finetune.errors import ModelFileError, ResourceError
from finetune.models import model_file as C


def test_model_file_is_self_describing_and_weights_only(trained_model):
    obj = torch.load(trained_model, map_location="cpu", weights_only=True)
    assert obj["format"] == "finetune-model" and obj["format_version"] == 1
    assert obj["arch"] == "resnet18" and obj["classes"] == ["ants", "bees"]
    assert obj["base_weights"] == "none"
    assert set(obj["preprocessing"]) == {"resize_size", "crop_size", "mean", "std", "interpolation"}
    assert obj["metrics"]["best_epoch"] == 1 and 0 <= obj["metrics"]["val_acc"] <= 1
    assert obj["config"]["epochs"] == 1 and obj["config"]["model"] == "resnet18"
    assert set(obj["versions"]) == {"finetune", "torch", "torchvision"}
    assert obj["state_dict"]["fc.weight"].shape == (2, 512)


def test_model_from_file_round_trip(trained_model):
    net, mf = C.network_from_file(trained_model)
    assert not net.module.training and mf.classes == ["ants", "bees"] and mf.arch == "resnet18"
    with torch.inference_mode():
        assert net.module(torch.randn(1, 3, 64, 64)).shape == (1, 2)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_crafted_pickle_is_refused_and_does_not_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # explicit weights_only=True must still win
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "finetune-model", "x": _Payload(str(marker))}, evil)
    with pytest.raises(ModelFileError, match="refused") as e:
        C.load_model_file(evil)
    assert e.value.exit_code == 4
    assert "weights_only=False" not in str(e.value)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # control: the payload is real
    assert marker.exists()


@pytest.mark.parametrize("content, match", [(b"", "empty"), (b"<!DOCTYPE html><html></html>", "not a finetune"),
                                            (None, "no such model file")])
def test_bad_model_files(tmp_path, content, match):
    p = tmp_path / "m.pt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ModelFileError, match=match):
        C.load_model_file(p)


def test_plain_state_dict_is_not_a_model_file(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "sd.pt")
    with pytest.raises(ModelFileError, match="--weights PATH"):
        C.load_model_file(tmp_path / "sd.pt")


def test_truncated_model_file_refused(trained_model, tmp_path):
    data = trained_model.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        C.load_model_file(tmp_path / "cut.pt")


def test_atomic_write_keeps_old_file_and_leaves_no_temp_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    F.write_text_atomic(target, "old")

    def failing(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk exploded")

    with pytest.raises(RuntimeError):
        F.atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


def test_unwritable_destination_is_a_resource_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ResourceError, match="could not write"):
        F.write_text_atomic(blocker / "sub" / "f.txt", "data")


@pytest.mark.parametrize("failure", [RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 7 vs 9"),
                                     OSError(28, "No space left on device")])
def test_disk_full_is_a_clear_resource_error_and_keeps_the_old_file(tmp_path, failure):
    target = tmp_path / "best.pt"
    F.write_text_atomic(target, "old")

    def full(tmp):
        Path(tmp).write_text("partial")
        raise failure

    with pytest.raises(ResourceError, match="the disk is full") as e:
        F.atomic_write(target, full)
    assert e.value.exit_code == 5
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["best.pt"]


@pytest.mark.parametrize("damage, match", [
    (lambda o: o.pop("state_dict"), "no state_dict of tensors"),
    (lambda o: o.update(state_dict={}), "no state_dict of tensors"),
    (lambda o: o.update(classes="ants"), "no list of class names"),
    (lambda o: o.pop("preprocessing"), "no preprocessing"),
    (lambda o: o.update(arch=7), "no architecture name"),
])
def test_damaged_model_files_are_exit_4_not_internal_errors(trained_model, tmp_path, damage, match):
    obj = torch.load(trained_model, weights_only=True)
    damage(obj)
    torch.save(obj, tmp_path / "d.pt")
    with pytest.raises(ModelFileError, match=match) as e:
        C.load_model_file(tmp_path / "d.pt")
    assert e.value.exit_code == 4


def test_model_file_naming_an_unknown_architecture_is_exit_4(trained_model, tmp_path):
    obj = torch.load(trained_model, weights_only=True)
    torch.save(obj | {"arch": "os.system"}, tmp_path / "x.pt")
    with pytest.raises(ModelFileError, match="names architecture 'os.system'") as e:
        C.network_from_file(tmp_path / "x.pt")
    assert e.value.exit_code == 4
