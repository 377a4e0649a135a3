"""--model timm:NAME: built by timm with its own data config stored as the model's preprocessing; weights from a
state_dict file or the Hugging Face cache (SHA-256 checked, offline error); predict, evaluate and export on it.
No network: random init, a locally saved state_dict and a hand-made cache."""

import hashlib
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from finetune.config import TrainConfig
from finetune.errors import ModelFileError, ResourceError, UsageError
from finetune.formats.export import export_model
from finetune.inference.evaluate import evaluate_folder
from finetune.inference.predictor import load_predictor
from finetune.models import timm as timm_models
from finetune.models.model_file import load_model_file
from finetune.training import run_training
from finetune.training.setup import prepare

timm = pytest.importorskip("timm")
NAME = "test_efficientnet"  # timm's own tiny test model (0.36 M parameters, 160 px, bicubic)
ARCH = f"timm:{NAME}"


@pytest.fixture(scope="session")
def timm_model(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("timm") / "run"
    cfg = TrainConfig(data=str(tiny_data), model=ARCH, weights="none", epochs=1, batch_size=8, output=str(out),
                      workers=1)
    return run_training(cfg).model_path


def test_the_model_file_carries_timms_data_config(timm_model):
    mf = load_model_file(timm_model)
    data = timm.data.resolve_model_data_config(timm.create_model(NAME))
    pre = mf.preprocessing
    assert mf.arch == ARCH and mf.head == "classifier" and mf.base_weights == "none"
    assert pre.crop_size == data["input_size"][-1] == 160 and pre.resize_size == math.floor(160 / data["crop_pct"])
    assert pre.interpolation == "bicubic" and pre.mean == data["mean"] and pre.std == data["std"]


def test_predict_evaluate_and_export_work_on_it(timm_model, tiny_data, tmp_path):
    photos = sorted(str(p) for p in (tiny_data / "val" / "bees").iterdir())
    predictions = list(load_predictor([timm_model], "cpu").predict(photos))
    assert len(predictions) == len(photos) and all(p.top[0][0] in ("ants", "bees") for p in predictions)
    report = evaluate_folder(str(timm_model), str(tiny_data / "val"), device="cpu")
    assert report["images"] == 6
    exported = export_model(timm_model, tmp_path / "model.pt")  # checked by plain torch + timm, as docs say
    assert exported.top1_agree == exported.checked_images


def test_weights_from_a_local_state_dict_file(tiny_data, tmp_path):
    torch.manual_seed(5)
    source = timm.create_model(NAME)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    p = prepare(TrainConfig(data=str(tiny_data), model=ARCH, weights=str(path), workers=1))
    state = p.net.plain_state_dict()
    assert p.choice.label == "file:weights.safetensors"
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items() if not k.startswith("classifier."))
    assert state["classifier.weight"].shape == (2, source.classifier.in_features)  # a new head for 2 classes
    wrong = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(wrong))
    with pytest.raises(ModelFileError, match="weights do not fit timm:test_efficientnet"):
        prepare(TrainConfig(data=str(tiny_data), model=ARCH, weights=str(wrong), workers=1))


def _fake_hub_cache(root, repo: str, state: dict) -> str:
    """The Hugging Face cache layout: blobs named by SHA-256, a snapshot linking to them, refs/main."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True)
    tmp = folder / "blobs" / "tmp"
    save_file(state, str(tmp))
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.rename(folder / "blobs" / sha)
    commit = "0" * 40
    (folder / "snapshots" / commit).mkdir(parents=True)
    os.symlink(f"../../blobs/{sha}", folder / "snapshots" / commit / "model.safetensors")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return str(folder / "blobs" / sha)


def test_default_weights_come_from_the_hugging_face_cache_checked(tiny_data, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = TrainConfig(data=str(tiny_data), model=ARCH, workers=1)
    with pytest.raises(ResourceError, match=r"could not get hf:timm/test_efficientnet.r160_in1k weights "
                                            r"\(HF_HUB_OFFLINE is set\).*model.safetensors.*--weights PATH"):
        prepare(cfg)
    torch.manual_seed(6)
    source = timm.create_model(NAME)
    blob = _fake_hub_cache(tmp_path / "hub", "timm/test_efficientnet.r160_in1k",
                           {k: v.contiguous() for k, v in source.state_dict().items()})
    p = prepare(cfg)
    assert p.choice.label == "hf:timm/test_efficientnet.r160_in1k"
    assert torch.equal(p.net.plain_state_dict()["conv_stem.weight"], source.state_dict()["conv_stem.weight"])
    with open(blob, "r+b") as f:  # one byte changed: the content no longer matches the name it is stored under
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ModelFileError, match="do not match their published SHA-256.*delete"):
        prepare(cfg)


def test_names_are_checked_with_the_closest_timm_names(monkeypatch):
    with pytest.raises(UsageError, match="not a timm model; did you mean timm:test_efficientnet"):
        timm_models.check_name("timm:test_eficientnet")
    monkeypatch.setitem(__import__("sys").modules, "timm", None)
    with pytest.raises(UsageError, match=r"needs the timm extra .*pip install 'finetune\[timm\]'"):
        timm_models.check_name(ARCH)


@pytest.mark.slow  # five exports and a subprocess
def test_the_docs_loading_snippet_runs_on_a_timm_model_with_timm_as_the_one_extra(timm_model, tiny_data, tmp_path):
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    snippet = re.search(r"## Loading without finetune.*?```python\n(.*?)```", docs, re.S).group(1)
    for suffix in (".pt", ".safetensors", ".pt2", ".onnx", ".xml"):
        export_model(timm_model, tmp_path / f"model{suffix}")
    shutil.copy(sorted((tiny_data / "val" / "bees").iterdir())[0], tmp_path / "photo.jpg")
    code = 'import sys\nsys.modules["finetune"] = None\n' + snippet
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().split("\n")
    assert lines[0].split()[0] in ("ants", "bees") and lines[-1] == lines[-2] == lines[0].split()[0]
