"""The Python API (finetune.train, load, evaluate, export, check): typed results, PIL images, an observer, nothing
printed; the --json schemas declared as TypedDicts match what the commands really write; docs/python.md's example
runs as written on the shared real weights."""

import re
from pathlib import Path

import pytest
from PIL import Image

import finetune
from finetune.inference.evaluate import EvalReport
from finetune.quality.doctor import CheckReport
from finetune.training.loop import RunSummary

DOCS = Path(__file__).resolve().parents[1] / "docs" / "python.md"


def _keys(typed_dict) -> set:
    return set(typed_dict.__required_keys__) | set(typed_dict.__optional_keys__)


def test_train_load_predict_evaluate_check_print_nothing_and_return_typed_results(tiny_data, local_weights,
                                                                                  tmp_path, capsys):
    seen = []

    class Epochs(finetune.Observer):
        def on_epoch_end(self, row, improved):
            seen.append(row["epoch"])

    run = finetune.train(tiny_data, weights=str(local_weights), output=str(tmp_path / "r"), workers=0,
                         observer=Epochs())
    assert isinstance(run, finetune.Run) and run.model_path.is_file() and seen == [1]  # the probe: one fit
    assert run.metrics["accuracy"] == pytest.approx(run.best_val_acc)
    assert set(run.summary) <= _keys(RunSummary) and set(RunSummary.__annotations__) - set(run.summary) == {
        "best_val_map", "rows_without_image"}  # results.json as declared (those two: multi-label, label files)
    model = finetune.load(run.model_path)
    assert model.classes == ["ants", "bees"] and model.runtime == "torch"
    photo = next((tiny_data / "val" / "ants").iterdir())
    with Image.open(photo) as img:
        pil = img.copy()
    by_path, in_memory, missing = model.predict([str(photo), pil, str(tmp_path / "nope.jpg")], top_k=2)
    assert isinstance(by_path, finetune.Prediction) and in_memory.path == "image 1"
    assert [c for c, _ in by_path.top] == [c for c, _ in in_memory.top]  # the same pixels, read or given
    assert [p for _, p in by_path.top] == pytest.approx([p for _, p in in_memory.top], abs=1e-5)
    assert isinstance(missing, finetune.Failure) and missing.reason
    result = finetune.evaluate(model, tiny_data / "val")
    assert isinstance(result, finetune.EvalResult) and result.images == 6 and 0 <= result.accuracy <= 1
    assert set(result.report) == _keys(EvalReport) - {"members"}  # what evaluate --json writes, as declared
    checked = finetune.check(tiny_data)
    assert isinstance(checked, finetune.CheckResult) and checked.images == checked.usable == 18
    assert set(checked.report) == _keys(CheckReport)
    assert capsys.readouterr().out == ""  # the library never prints


def test_training_settings_passed_to_the_api_count_as_typed(tiny_data, local_weights, tmp_path):
    run = finetune.train(tiny_data, weights=str(local_weights), epochs=1, batch_size=8, workers=0,
                         output=str(tmp_path / "r"))
    assert [row["lr"] is None for row in run.history] == [True, False]  # the probe, then 1 epoch fine-tuning


def test_a_run_validates_its_settings_once(tiny_data, local_weights, tmp_path, monkeypatch):
    import finetune.config as config

    calls = []
    check = config._check_regularisation  # validate()'s last step: one call per validate()
    monkeypatch.setattr(config, "_check_regularisation", lambda cfg: calls.append(cfg.mode) or check(cfg))
    finetune.train(tiny_data, weights=str(local_weights), epochs=1, batch_size=8, workers=0, output=str(tmp_path / "r"))
    assert calls == ["auto"]  # at the run's entry, not again in prepare() or after the plan


# The shared ants/bees val set, and the floor of the probe's accuracy on it (test_probe.py says how it was measured).
VAL_IMAGES = 153
PROBE_FLOOR = 146


def _wilson(correct: int, total: int, z: float = 1.959964) -> list:
    """The Wilson score interval, written out here so the test does not check the library with itself."""
    p = correct / total
    centre, half = p + z * z / (2 * total), z * (p * (1 - p) / total + z * z / (4 * total * total)) ** 0.5
    return [(centre - half) / (1 + z * z / total), (centre + half) / (1 + z * z / total)]


@pytest.mark.slow
def test_the_docs_example_runs_as_written(antsbees, real_weights, tmp_path, capsys):
    """docs/python.md's first code block, on the real weights: train (the probe, then 2 epochs), predict a path and a
    PIL image, evaluate, export to ONNX and predict torch-free from it, check."""
    code = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    photo = next((antsbees / "val" / "bees").iterdir())
    printed = []
    with Image.open(photo) as img:
        names = {"DATA": str(antsbees), "WEIGHTS": str(real_weights), "OUT": str(tmp_path / "run"),
                 "PHOTO": str(photo), "PIL_IMAGE": img.copy(), "print": lambda *a: printed.append(a)}
    exec(compile(code, str(DOCS), "exec"), names)
    assert capsys.readouterr().out == ""  # nothing but the example's own prints, which went to `printed`
    assert len(printed) == 8, printed  # train, 2 predictions, evaluate, the export, the ONNX prediction, explain, check
    (model_path, best, ci95, epochs), by_path, in_memory, evaluated, exported, (onnx_top,), (pictures,), checked = \
        printed

    # train: the probe then 2 epochs, the best kept; it starts from the probe, so it holds the probe's floor
    assert model_path == tmp_path / "run" / "best.pt" and model_path.is_file() and epochs == 3
    correct = round(best * VAL_IMAGES)
    assert correct / VAL_IMAGES == best and correct >= PROBE_FLOOR, printed[0]
    assert ci95 == pytest.approx(_wilson(correct, VAL_IMAGES), abs=1e-9)

    # predict: the path and the PIL image of the same bee, top 2 in order, the image named by its position
    assert by_path[0] == str(photo) and in_memory[0] == "image 1"  # named by its index in the list
    for top in (by_path[1], in_memory[1], onnx_top):
        assert [c for c, _ in top] == ["bees", "ants"] and sum(p for _, p in top) == pytest.approx(1, abs=1e-6)
    assert [p for _, p in in_memory[1]] == pytest.approx([p for _, p in by_path[1]], abs=1e-5)  # same pixels

    # evaluate: the val images (DATA's val/) with the same model, so the run's own figures, per class too
    accuracy, eval_ci95, per_class = evaluated
    assert accuracy == best and eval_ci95 == pytest.approx(ci95, abs=1e-9)
    assert sorted(per_class) == ["ants", "bees"] and [per_class[c]["support"] for c in ("ants", "bees")] == [70, 83]
    assert round(sum(per_class[c]["recall"] * per_class[c]["support"] for c in per_class)) == correct
    assert names["result"].images == VAL_IMAGES

    # export: the ONNX file, checked on the run's val images (8 of them, every top-1 the same), run by onnxruntime,
    # gives the PyTorch model's probabilities (float rounding apart)
    assert names["run"].model is names["model"] and exported == (8, 8)
    assert names["exported"].path == tmp_path / "run" / "model.onnx" and names["exported"].path.is_file()
    assert [p for _, p in onnx_top] == pytest.approx([p for _, p in by_path[1]], abs=1e-4)

    # explain: one picture, named after the photo, in OUT/why
    assert pictures == [tmp_path / "run" / "why" / f"{photo.stem}.png"] and pictures[0].stat().st_size > 10_000

    # check: every photo of the set (the 397 JPEGs; the one .gif is named as skipped, not counted)
    images, usable, skipped = checked
    assert images == usable == 397 and [Path(s["path"]).name for s in skipped] == ["imageNotFound.gif"], checked
