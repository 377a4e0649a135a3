"""predict without torch: an ONNX model (or a model file's cached ONNX export) run by onnxruntime, with images
prepared exactly as the torch path prepares them."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.images import decode_to_tensor, load_image
from finetune.inference import onnx_fast as lite
from finetune.inference.predictor import load_predictor

pytestmark = pytest.mark.slow  # ONNX exports and fresh processes


def test_prepared_images_equal_the_torch_paths(trained_model, tiny_data):
    pre = load_predictor([trained_model], "cpu").info.preprocessing
    for path in sorted((tiny_data / "val").rglob("*.jpg")):
        expected = pre.eval_transform()(decode_to_tensor(str(path), pre.resize_size)).numpy()
        got = lite.prepare(load_image(path, min_side=pre.resize_size), pre)
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5


def test_a_model_file_is_cached_as_onnx_then_predicted_without_torch(trained_model, tiny_data, in_tmp,
                                                                     monkeypatch):
    monkeypatch.setenv("FINETUNE_LITE", "1")
    runner = CliRunner()
    first = runner.invoke(app, ["predict", str(tiny_data / "val"), "-m", str(trained_model), "--json"])
    assert first.exit_code == 0, first.output
    assert "cached an ONNX export of this model" in first.stderr and lite.cached_export(trained_model).is_file()
    code = ("import sys, json; from finetune.cli import main; sys.argv = ['finetune', 'predict', {images!r}, '-m', "
            "{model!r}, '--json']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules, file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", code.format(images=str(tiny_data / "val"), model=str(trained_model))],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "TORCH False" in p.stderr  # the second prediction never imported torch
    a, b = json.loads(first.stdout), json.loads(p.stdout)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for ra, rb in zip(a, b):
        assert [c["class"] for c in ra["predictions"]] == [c["class"] for c in rb["predictions"]]
        assert [c["probability"] for c in ra["predictions"]] == pytest.approx(
            [c["probability"] for c in rb["predictions"]], abs=1e-4)


def test_an_onnx_model_and_tta_and_bad_files(trained_model, tiny_data, tmp_path, monkeypatch):
    from finetune.formats.export import export_model

    monkeypatch.setenv("FINETUNE_LITE", "1")
    export_model(trained_model, tmp_path / "m.onnx")
    light = lite.light_predictor([str(tmp_path / "m.onnx")], "cpu", True, 178_956_970)
    assert isinstance(light, lite.LitePredictor)
    heavy = load_predictor([tmp_path / "m.onnx"], "cpu", tta=True)
    (tmp_path / "bad.jpg").write_bytes(b"<html>")
    images = [str(p) for p in sorted((tiny_data / "val").rglob("*.jpg"))][:3] + [str(tmp_path / "bad.jpg")]
    got, expected = list(light.predict(images, 2)), list(heavy.predict(images, 2))
    assert [type(a).__name__ for a in got] == ["Prediction"] * 3 + ["Failure"]  # the bad file named, in its place
    for a, b in zip(got, expected, strict=True):
        assert type(a) is type(b) and a.path == b.path
        if hasattr(a, "top"):  # both top-2 entries: classes in the same order, probabilities equal
            assert [c for c, _ in a.top] == [c for c, _ in b.top] and len(a.top) == 2
            assert [p for _, p in a.top] == pytest.approx([p for _, p in b.top], abs=1e-4)
