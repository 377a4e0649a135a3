"""Input expansion and batched prediction."""

import json

import pytest
import torch

from finetune.data.inputs import Failure, expand_inputs
from finetune.inference.predictor import Prediction, load_predictor
from finetune.models.model_file import network_from_file


def test_expand_inputs_files_folders_globs_and_missing(tiny_data, tmp_path):
    ants = sorted(str(p) for p in (tiny_data / "val" / "ants").iterdir())
    files, missing = expand_inputs([ants[0], str(tiny_data / "val"), str(tiny_data / "val" / "*" / "*.jpg"),
                                    str(tmp_path / "none.jpg")])
    assert files[0] == ants[0]
    assert len(files) == 6  # named three ways, listed once
    assert [m.path for m in missing] == [str(tmp_path / "none.jpg")]
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "anim.gif").write_bytes(b"GIF89a")
    (tmp_path / "folder" / "IMG_1.HEIC").write_bytes(b"x")
    files, unusable = expand_inputs([str(tmp_path / "folder")])  # a folder's other files are named, as in train
    assert files == [] and {(u.path.rsplit("/", 1)[1], u.reason[:24]) for u in unusable} == {
        ("anim.gif", "not a supported image ty"), ("IMG_1.HEIC", ".heic photos need the pi")}


def test_predictions_match_model_and_keep_order_around_failures(trained_model, tiny_data, tmp_path):
    good = sorted(str(p) for p in (tiny_data / "val" / "bees").iterdir())
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    paths = [good[0], str(bad), good[1], good[2]]
    results = list(load_predictor([trained_model], "cpu").predict(paths, top_k=5, batch_size=2))
    assert [r.path for r in results] == paths
    assert [type(r) for r in results] == [Prediction, Failure, Prediction, Prediction]
    assert all(len(r.top) == 2 for r in results if isinstance(r, Prediction))  # top_k capped at class count

    # Probabilities equal a softmax over the model's own logits on the same preprocessing.
    predictor = load_predictor([trained_model], "cpu")
    net, _ = network_from_file(trained_model)
    with torch.inference_mode():
        p = torch.softmax(net.module(predictor._load(good[0])[None]), 1)[0]
    top = dict(results[0].top)
    assert top["ants"] == pytest.approx(p[0].item(), abs=1e-5)
    assert top["bees"] == pytest.approx(p[1].item(), abs=1e-5)


def test_a_gif_named_on_the_command_line_is_refused_like_in_training(trained_model, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "placeholder.gif")
    (result,) = load_predictor([trained_model], "cpu").predict([str(tmp_path / "placeholder.gif")])
    assert isinstance(result, Failure) and "not a supported image type (.gif)" in result.reason


def test_sort_into_copies_never_overwrites_never_duplicates_and_logs(tiny_data, tmp_path):
    import csv

    from finetune.inference.predictor import sort_into

    src = sorted((tiny_data / "val" / "ants").iterdir())
    other = tmp_path / "elsewhere" / src[0].name  # same name, other content
    other.parent.mkdir()
    other.write_bytes(src[2].read_bytes())
    preds = [Prediction(str(src[0]), [("ants", 0.9), ("bees", 0.1)]),
             Prediction(str(src[1]), [("bees", 0.6), ("ants", 0.4)]),
             Prediction(str(other), [("ants", 0.95), ("bees", 0.05)])]
    dest = tmp_path / "sorted"
    done = sort_into(preds, dest, min_confidence=0.8)
    assert done["folders"] == {"ants": 2, "unsure": 1} and done["copied"] == 3
    assert sorted(p.name for p in (dest / "ants").iterdir()) == sorted([src[0].name, src[0].stem + "-2.jpg"])
    assert [p.name for p in (dest / "unsure").iterdir()] == [src[1].name]
    assert all(p.exists() for p in src)  # originals untouched
    again = sort_into(preds, dest, min_confidence=0.8)  # sorting again copies nothing twice
    assert again["copied"] == 0 and len(list((dest / "ants").iterdir())) == 2
    assert sorted(p.name for p in dest.iterdir()) == ["ants", "sorted.csv", "unsure"]  # one log
    rows = list(csv.DictReader(done["log"].open()))
    assert [r["predicted"] for r in rows] == ["ants", "bees", "ants"] * 2
    assert [r["action"] for r in rows] == ["copied"] * 3 + ["already there"] * 3
    assert rows[1]["copied_to"].endswith("unsure/" + src[1].name)


def test_the_default_predict_path_caches_an_export_then_runs_without_torch(trained_model, tiny_data, monkeypatch,
                                                                           tmp_path):
    """As a user meets it (the torch-free path on, as by default): the first prediction runs through torch and caches
    an ONNX export; the next one with the same model file runs on onnxruntime, with the same answers."""
    from typer.testing import CliRunner

    from finetune.cli import app

    monkeypatch.delenv("FINETUNE_LITE")  # the suite turns it off for every other test
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))  # as on a fresh machine: no export cached yet
    runner = CliRunner()
    args = ["predict", str(tiny_data / "val"), "-m", str(trained_model), "--json"]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0 == second.exit_code, first.output + second.output
    assert "runtime torch" in first.stderr and "cached an ONNX export" in first.stderr
    assert "runtime onnxruntime (no torch)" in second.stderr and "cached" not in second.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert [r["predictions"][0]["class"] for r in a] == [r["predictions"][0]["class"] for r in b]
    assert [r["predictions"][0]["probability"] for r in a] == pytest.approx(
        [r["predictions"][0]["probability"] for r in b], abs=1e-4)
