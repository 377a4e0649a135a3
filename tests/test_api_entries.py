"""Every public entry of the Python API: the life cycle as one object (run.model, Model's methods), ensembles, and
each entry refusing bad input with a FinetuneError (never a raw TypeError or a traceback from deep inside)."""

from pathlib import Path

import pytest

import finetune
from finetune.errors import DatasetError, FinetuneError, ModelFileError, UsageError
from finetune.formats.export import ExportReport


def test_a_run_carries_its_model_and_the_model_carries_the_life_cycle(tiny_data, local_weights, tmp_path):
    run = finetune.train(tiny_data, weights=str(local_weights), output=str(tmp_path / "r"), workers=0)
    model = run.model
    assert isinstance(run, finetune.Run) and isinstance(model, finetune.Model) and model is run.model
    assert model.path == run.model_path and model.classes == run.classes == ["ants", "bees"]
    result = model.evaluate(tiny_data / "val")
    assert isinstance(result, finetune.EvalResult) and result.images == 6
    assert result.accuracy == pytest.approx(result.report["accuracy"])
    report = model.export(tmp_path / "m.safetensors")
    assert isinstance(report, ExportReport) and report.path == tmp_path / "m.safetensors" and report.path.is_file()
    assert report.checked_images > 0 and report.top1_agree == report.checked_images
    again = finetune.load(report.path)
    photo = next((tiny_data / "val" / "bees").iterdir())
    assert again.predict(photo)[0].top[0][0] == model.predict(photo)[0].top[0][0]


def test_several_files_load_as_an_ensemble_and_export_as_one(trained_model, tiny_data, tmp_path):
    ensemble = finetune.load([trained_model, trained_model])
    assert "2 files" in repr(ensemble) and ensemble.classes == ["ants", "bees"]
    photo = next((tiny_data / "val" / "ants").iterdir())
    alone, together = finetune.load(trained_model).predict(photo)[0], ensemble.predict(photo)[0]
    assert together.top[0][1] == pytest.approx(alone.top[0][1], abs=1e-5)  # two equal members: the same mean
    assert finetune.export([trained_model, trained_model], tmp_path / "e.pt").path.is_file()


def test_lr_find_returns_the_curve_and_the_files_it_wrote(tiny_data, tmp_path):
    result = finetune.lr_find(tiny_data, weights="none", steps=5, batch_size=4, workers=0, output=tmp_path / "lr")
    assert len(result.lrs) == len(result.losses) <= 5 and result.suggestion > 0
    assert result.files["plot"] == tmp_path / "lr" / "lr_find.png" and result.files["plot"].is_file()
    assert "files" not in (tmp_path / "lr" / "lr_find.json").read_text(encoding="utf-8")


@pytest.mark.parametrize("call, error, words", [
    (lambda d, m, t: finetune.load(t / "missing.pt"), ModelFileError, "no such model file"),
    (lambda d, m, t: finetune.load([]), UsageError, "give a model file"),
    (lambda d, m, t: finetune.load(m).predict(d, top_k=0), UsageError, "top_k=0"),
    (lambda d, m, t: finetune.load(m).predict(d, batch_size="8"), UsageError, "batch_size='8'"),
    (lambda d, m, t: finetune.evaluate(m, t / "nowhere"), DatasetError, "nowhere"),
    (lambda d, m, t: finetune.load(m).evaluate(t / "nowhere"), DatasetError, "nowhere"),
    (lambda d, m, t: finetune.export(m, t / "m.tflite"), UsageError, "unknown export format"),
    (lambda d, m, t: finetune.export(m, t / "m.pt2", int8=True), UsageError, "--int8 writes"),
    (lambda d, m, t: finetune.load(m).suggest(d, n=0), UsageError, "n=0"),
    (lambda d, m, t: finetune.check(t / "nowhere"), DatasetError, "nowhere"),
    (lambda d, m, t: finetune.train(d, epochs="three"), UsageError, "epochs='three'"),
    (lambda d, m, t: finetune.train(d, epoch=3), UsageError, "did you mean epochs"),
    (lambda d, m, t: finetune.lr_find(d, steps=1), UsageError, "--steps 1"),
    (lambda d, m, t: finetune.lr_find(d, epoch=1), UsageError, "did you mean epochs"),
    (lambda d, m, t: finetune.tune(d, modes=["fast"]), UsageError, "modes=['fast']"),
    (lambda d, m, t: finetune.tune(d, budget="soon"), UsageError, "budget='soon'"),
    (lambda d, m, t: finetune.serve(t / "missing.pt"), ModelFileError, "no such model file"),
])
def test_every_entry_refuses_bad_input_with_a_finetune_error(call, error, words, tiny_data, trained_model, tmp_path):
    with pytest.raises(error) as caught:
        call(tiny_data, trained_model, tmp_path)
    assert isinstance(caught.value, FinetuneError) and words in str(caught.value)


def test_explain_refuses_an_export_without_gradients(trained_model, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = finetune.export(trained_model, tmp_path / "m.onnx").path
    with pytest.raises(UsageError, match="gives no gradients"):
        finetune.load(onnx).explain([Path(trained_model)], tmp_path / "why")
