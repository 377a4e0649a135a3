"""Ensembles: several --model files, probabilities averaged; evaluate shows each member beside the ensemble."""

import dataclasses
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config import TrainConfig
from finetune.errors import FinetuneError
from finetune.formats.load import load_runnable
from finetune.inference.evaluate import evaluate_folder
from finetune.inference.predictor import Ensemble, Predictor, load_predictor
from finetune.models.model_file import load_model_file, update_model_file
from finetune.training import run_training


def _predictor(path, tta=False):
    return load_predictor([path], "cpu", tta)

runner = CliRunner()


@pytest.fixture(scope="module")
def second_model(tmp_path_factory, tiny_data):
    """Another resnet18 on the same classes (other seed, so other weights), calibrated: temperature != 1."""
    out = tmp_path_factory.mktemp("run2") / "run"
    cfg = TrainConfig(data=str(tiny_data), weights="none", epochs=1, batch_size=8, seed=1, calibrate=True,
                      output=str(out), workers=1)
    return run_training(cfg).model_path


def _probs(prediction, classes):
    d = dict(prediction.top)
    return torch.tensor([d[c] for c in classes])


def test_ensemble_probabilities_are_the_mean_of_the_members(trained_model, second_model, tiny_data):
    images = [str(p) for p in sorted((tiny_data / "val").rglob("*.jpg"))]
    a, b = _predictor(trained_model), _predictor(second_model)
    assert b.temperature != 1.0  # each member keeps its own temperature inside the ensemble
    ensemble = load_predictor([trained_model, second_model], "cpu")
    assert isinstance(ensemble, Ensemble) and isinstance(load_predictor([trained_model], "cpu"), Predictor)
    classes = ensemble.classes
    for pa, pb, pe in zip(a.predict(images, 2), b.predict(images, 2), ensemble.predict(images, 2, batch_size=2)):
        assert pa.path == pb.path == pe.path
        expected = (_probs(pa, classes) + _probs(pb, classes)) / 2
        assert torch.allclose(_probs(pe, classes), expected, atol=1e-6)
        assert torch.allclose(torch.tensor(pe.logits).softmax(0), expected, atol=1e-6)
        assert [round(x, 6) for x in pe.members[1]] == [round(x, 6) for x in _probs(pb, classes).tolist()]


def test_models_of_other_classes_are_refused(trained_model, tmp_path):
    other = tmp_path / "wasps.pt"
    shutil.copy(trained_model, other)
    update_model_file(other, classes=["ants", "wasps"])
    with pytest.raises(FinetuneError, match="wasps.pt: its classes .* an ensemble needs") as e:
        load_predictor([trained_model, other], "cpu")
    assert e.value.exit_code == 2


def test_evaluate_ensemble_beside_its_members(trained_model, second_model, tiny_data):
    alone = [evaluate_folder(str(m), str(tiny_data), "cpu") for m in (trained_model, second_model)]
    both = evaluate_folder([str(trained_model), str(second_model)], str(tiny_data), "cpu")
    assert [m["accuracy"] for m in both["members"]] == [r["accuracy"] for r in alone]
    assert [m["model"] for m in both["members"]] == [str(trained_model), str(second_model)]
    assert both["images"] == alone[0]["images"] and "members" not in alone[0]


def test_cli_predict_and_evaluate_with_two_models(trained_model, second_model, tiny_data):
    image = str(sorted((tiny_data / "val" / "bees").iterdir())[0])
    r = runner.invoke(app, ["predict", image, "-m", str(trained_model), "-m", str(second_model), "--json"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)
    assert sum(p["probability"] for p in row["predictions"]) == pytest.approx(1.0, abs=1e-5)
    r = runner.invoke(app, ["evaluate", str(tiny_data), "-m", str(trained_model), "-m", str(second_model)])
    assert r.exit_code == 0, r.output
    assert "ensemble of 2" in r.stderr


def test_tta_averages_the_logits_of_the_image_and_its_mirror(trained_model, tiny_data):
    image = str(sorted((tiny_data / "val" / "ants").iterdir())[0])
    plain, tta = _predictor(trained_model), _predictor(trained_model, tta=True)
    x = plain._load(image)[None]
    expected = (plain.model.forward(x) + plain.model.forward(x.flip(-1))) / 2
    (pred,) = tta.predict([image], 2)
    assert torch.allclose(torch.tensor(pred.logits), expected[0], atol=1e-5)
    (pred_plain,) = plain.predict([image], 2)
    assert not torch.allclose(torch.tensor(pred_plain.logits), expected[0], atol=1e-6)  # mirroring did something
    r = runner.invoke(app, ["predict", image, "-m", str(trained_model), "--tta", "--json"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", pytest.param(".pt2", marks=pytest.mark.slow),
                                    pytest.param(".onnx", marks=pytest.mark.slow)])
def test_ensemble_exports_as_one_file_that_gives_the_mean_probabilities(trained_model, second_model, tiny_data,
                                                                        tmp_path, suffix):
    from finetune.formats import export as E

    if suffix == ".onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"ensemble{suffix}"
    report = E.export_model([trained_model, second_model], out)
    assert out.is_file() and report.checked_images == 6 and report.max_abs_diff <= E.ATOL
    # What the file returns is checked against eager PyTorch inside export; here: eager is the members' mean.
    images = [str(p) for p in sorted((tiny_data / "val").rglob("*.jpg"))][:3]
    a, b = _predictor(trained_model), _predictor(second_model)
    x = torch.stack([a._load(p) for p in images])
    expected = ((a.logits(x) / a.temperature).softmax(1) + (b.logits(x) / b.temperature).softmax(1)) / 2
    module, meta = E._load([trained_model, second_model])
    with torch.inference_mode():
        assert torch.allclose(module(x).softmax(1), expected, atol=1e-5)
    exported = load_runnable(out, "cpu")  # what predict and evaluate load
    assert torch.allclose(exported.forward(x).softmax(1), expected, atol=1e-4)
    assert exported.info.temperature == 1.0 and len(exported.info.members) == 2
    info = E.metadata(meta)
    assert [m["temperature"] for m in info["members"]] == [a.temperature, b.temperature]


def test_ensemble_export_refuses_other_preprocessing(trained_model, tmp_path):
    from finetune.formats import export as E

    other = tmp_path / "other.pt"
    shutil.copy(trained_model, other)
    pre = dataclasses.replace(load_model_file(other).preprocessing, resize_size=232)
    update_model_file(other, preprocessing=pre)
    with pytest.raises(FinetuneError, match="preprocessing .* differs") as e:
        E.export_model([trained_model, other], tmp_path / "e.pt")
    assert e.value.exit_code == 2 and not (tmp_path / "e.pt").exists()


def test_members_with_other_preprocessing_each_decode_their_own_way(trained_model, second_model, tiny_data,
                                                                    tmp_path):
    other = tmp_path / "resize232.pt"
    shutil.copy(second_model, other)
    update_model_file(other, preprocessing=dataclasses.replace(load_model_file(other).preprocessing, resize_size=232))
    images = [str(p) for p in sorted((tiny_data / "val").rglob("*.jpg"))]
    a, b = _predictor(trained_model), _predictor(other)
    ensemble = load_predictor([trained_model, other], "cpu")
    for pa, pb, pe in zip(a.predict(images, 2), b.predict(images, 2), ensemble.predict(images, 2)):
        expected = (_probs(pa, ensemble.classes) + _probs(pb, ensemble.classes)) / 2
        assert torch.allclose(_probs(pe, ensemble.classes), expected, atol=1e-6)
