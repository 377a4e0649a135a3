"""Backbone registry, weights resolution (DEFAULT via the hub cache, enum names, files, none), head swap, freezing."""

import pickle
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from finetune.data.content_index import full_hash
from finetune.errors import FinetuneError, ModelFileError, ResourceError
from finetune.models import registry as M
from finetune.models import weights as W

REQUIRED = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d",
            "alexnet"]


@pytest.mark.parametrize("arch", REQUIRED + ["mobilenet_v2", "efficientnet_b0", "squeezenet1_0", "vit_b_16"])
def test_head_swapped_for_dataset_classes(arch):
    net = M.build_network(arch, num_classes=3, dropout=0.2)
    model, head = net.module, net.head
    expected_head = {"alexnet": "classifier.6", "mobilenet_v2": "classifier.1", "efficientnet_b0": "classifier.1",
                     "squeezenet1_0": "classifier.1", "vit_b_16": "heads.head"}.get(arch, "fc")
    assert head == expected_head
    wrapped = model.get_submodule(head)
    assert isinstance(wrapped, torch.nn.Sequential) and isinstance(wrapped[0], torch.nn.Dropout)
    size = 224 if arch.startswith("vit") else 96
    with torch.inference_mode():
        out = model.eval()(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3)


def test_plain_state_dict_loads_into_plain_torchvision_model():
    net = M.build_network("resnet18", num_classes=4, dropout=0.5)
    model, state = net.module, net.plain_state_dict()
    assert "fc.weight" in state and "fc.1.weight" not in state
    plain = torchvision.models.get_model("resnet18", num_classes=4)
    plain.load_state_dict(state)  # strict
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(plain.eval()(x), model.eval()(x))


def test_unknown_model_suggests_close_names():
    with pytest.raises(FinetuneError, match="did you mean resnet50") as e:
        M.check_model_name("resnet05")
    assert e.value.exit_code == 2


def test_resolve_weights_choices(tmp_path):
    d = W.resolve_weights("resnet50", "DEFAULT")
    assert d.label == "ResNet50_Weights.IMAGENET1K_V2" and d.preprocessing.resize_size == 232
    v1 = W.resolve_weights("resnet50", "imagenet1k_v1")
    assert v1.label == "ResNet50_Weights.IMAGENET1K_V1" and v1.preprocessing.resize_size == 256
    none = W.resolve_weights("alexnet", "none")
    assert none.enum is None and none.path is None and none.preprocessing.crop_size == 224
    f = tmp_path / "w.pth"
    torch.save({}, f)
    assert W.resolve_weights("resnet18", str(f)).path == str(f)
    with pytest.raises(FinetuneError, match="IMAGENET1K_V1"):
        W.resolve_weights("resnet18", "IMAGENET22K")


def _fake_hub(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.hub.set_dir(str(tmp_path / "torch" / "hub"))
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    return ckpt


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    old = torch.hub.get_dir()
    yield _fake_hub(tmp_path, monkeypatch)
    torch.hub.set_dir(old)


def _pin(monkeypatch, path):
    """Our locally made file stands in for the published one: pin its hash as the real file's is pinned."""
    monkeypatch.setitem(W.PINNED_SHA256, path.name, full_hash(str(path)))


def test_default_weights_come_from_the_torch_hub_cache(hub, monkeypatch):
    """A locally made state_dict under torchvision's expected file name is what DEFAULT loads."""
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), hub / "resnet18-f37072fd.pth")
    _pin(monkeypatch, hub / "resnet18-f37072fd.pth")
    choice = W.resolve_weights("resnet18", "DEFAULT")
    model = M.build_network("resnet18", 2, 0.0, W.load_pretrained_state(choice)).module
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 2


def test_offline_download_failure_names_the_file(hub, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ResourceError) as e:
        W.load_pretrained_state(W.resolve_weights("resnet18", "DEFAULT"))
    msg = str(e.value)
    assert e.value.exit_code == 5
    assert "resnet18-f37072fd.pth" in msg and str(hub) in msg
    assert "--weights none" in msg and "--weights PATH" in msg


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_tampered_hub_cache_file_does_not_run_code(hub, tmp_path, monkeypatch):
    marker = tmp_path / "payload-ran"
    boom = _Boom()
    boom.marker = str(marker)
    payload = pickle.dumps({"conv1.weight": boom})
    (hub / "resnet18-f37072fd.pth").write_bytes(payload)
    with pytest.raises(ModelFileError, match="do not match their published SHA-256"):
        W.load_pretrained_state(W.resolve_weights("resnet18", "DEFAULT"))
    assert not marker.exists()
    # Even if its hash were pinned (a poisoned pin), weights_only=True still refuses to run it.
    _pin(monkeypatch, hub / "resnet18-f37072fd.pth")
    with pytest.raises(ModelFileError, match="could not be loaded safely|corrupt or unsafe"):
        W.load_pretrained_state(W.resolve_weights("resnet18", "DEFAULT"))
    assert not marker.exists()
    pickle.loads(payload)  # control: the payload is live when unpickled unsafely
    assert marker.exists()


def test_weights_file_with_other_head_and_prefixes_loads(tmp_path):
    src = torchvision.models.resnet18(num_classes=10)
    state = {"module." + k: v for k, v in src.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    loaded = W.load_state_dict_file(str(tmp_path / "w.pth"))
    model = M.build_network("resnet18", 2, 0.0, loaded).module
    assert torch.equal(model.layer1[0].conv1.weight, src.layer1[0].conv1.weight)


def test_weights_file_for_another_architecture_is_refused(tmp_path):
    torch.save(torchvision.models.alexnet().state_dict(), tmp_path / "alex.pth")
    with pytest.raises(ModelFileError, match="do not fit resnet18"):
        M.build_network("resnet18", 2, 0.0, W.load_state_dict_file(str(tmp_path / "alex.pth")))


@pytest.mark.parametrize("content, match", [(b"", "empty"), (b"<html>404</html>", "not a loadable")])
def test_bad_weights_files(tmp_path, content, match):
    (tmp_path / "w.pth").write_bytes(content)
    with pytest.raises(ModelFileError, match=match) as e:
        W.load_state_dict_file(str(tmp_path / "w.pth"))
    assert "weights_only=False" not in str(e.value)


def test_feature_extract_trains_only_the_head_and_keeps_bn_statistics():
    net = M.build_network("resnet18", 2)
    model = net.module
    net.freeze_backbone()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    net.set_train_mode(frozen_backbone=True)
    before = model.bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64) * 3 + 1)
    assert torch.equal(model.bn1.running_mean, before)
    assert model.fc.training and not model.bn1.training


def test_full_sha256_pins_are_checked_in_full(hub, monkeypatch):
    for name, digest in W.PINNED_SHA256.items():  # each pin is a full digest that begins with the name's prefix
        assert len(digest) == 64 and digest.startswith(name.rsplit("-", 1)[1].split(".")[0])
    path = hub / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    real = full_hash(str(path))
    monkeypatch.setitem(W.PINNED_SHA256, path.name, real[:-1] + ("0" if real[-1] != "0" else "1"))
    with pytest.raises(ModelFileError, match="do not match their published SHA-256"):
        W.verify_cached_weights(path)  # differs only in the last hex digit: refused
    monkeypatch.setitem(W.PINNED_SHA256, path.name, real)
    W.verify_cached_weights(path)
