"""finetune evaluate: metrics against hand-computed values, and the command on real photos."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import DatasetError
from finetune.inference.evaluate import evaluate_folder
from finetune.metrics.classification import classification_report, wilson_interval


def test_wilson_interval_hand_computed():
    # 143 of 153 (ants/bees val): p = 0.93464, centre 0.92400, half-width 0.04012
    low, high = wilson_interval(143, 153)
    assert low == pytest.approx(0.88388, abs=1e-4) and high == pytest.approx(0.96412, abs=1e-4)
    low, high = wilson_interval(10, 10)  # all right: the interval still admits mistakes
    assert low == pytest.approx(0.72247, abs=1e-4) and high == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 0.0)


def test_classification_report_hand_computed():
    # true:  a a a a b b c      predicted: a a b c b a c
    y_true = [0, 0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 2, 1, 0, 2]
    r = classification_report(y_true, y_pred, ["a", "b", "c"])
    assert r["confusion_matrix"] == [[2, 1, 1], [1, 1, 0], [0, 0, 1]]
    assert r["accuracy"] == pytest.approx(4 / 7) and r["correct"] == 4
    a, b, c = (r["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(2 / 3), 0.5, 4)
    assert a["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert (b["precision"], b["recall"], b["f1"]) == (0.5, 0.5, 0.5)
    assert (c["precision"], c["recall"], c["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    assert r["macro"]["recall"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def test_evaluate_matches_predictions_and_reports_mistakes(trained_model, tiny_data):
    r = evaluate_folder(str(trained_model), str(tiny_data), device="cpu")
    assert r["data"].endswith("val") and r["images"] == 6
    assert sum(map(sum, r["confusion_matrix"])) == 6
    assert r["correct"] == sum(r["confusion_matrix"][i][i] for i in range(2))
    assert len(r["most_confident_wrong"]) == r["images"] - r["correct"]
    probs = [m["probability"] for m in r["most_confident_wrong"]]
    assert probs == sorted(probs, reverse=True)


def test_unknown_class_in_folder_is_an_error(trained_model, tiny_data, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(tiny_data / "val", data)
    (data / "bees").rename(data / "wasps")
    with pytest.raises(DatasetError, match=r"\['wasps'\] are not among the model's classes"):
        evaluate_folder(str(trained_model), str(data), device="cpu")


def test_cli_json_and_tables(trained_model, tiny_data):
    res = CliRunner().invoke(app, ["evaluate", str(tiny_data), "--model", str(trained_model), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert set(r) >= {"accuracy", "accuracy_ci95", "per_class", "macro", "confusion_matrix", "most_confident_wrong"}
    assert "95 % CI" in res.stderr and "confusion matrix" in res.stderr and "macro avg" in res.stderr


def test_the_pixel_limit_and_threads_reach_check_predict_and_evaluate(trained_model, tiny_data):
    """--max-pixels is honoured by every command that decodes (sample photos are ~0.19 MP), and evaluate takes -j."""
    runner = CliRunner()
    r = runner.invoke(app, ["check", str(tiny_data), "--max-pixels", "1000", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["usable"] == 0 and all("--max-pixels limit" in s["reason"] for s in report["skipped"])
    r = runner.invoke(app, ["predict", str(tiny_data / "val"), "-m", str(trained_model), "--max-pixels", "1000"])
    assert r.exit_code == 3 and "6 of 6 input(s) skipped" in r.stderr and "--max-pixels limit" in r.stderr
    r = runner.invoke(app, ["evaluate", str(tiny_data), "-m", str(trained_model), "--max-pixels", "1000"])
    assert r.exit_code == 3 and "none of the images could be read" in r.stderr
    r = runner.invoke(app, ["evaluate", str(tiny_data), "-m", str(trained_model), "-j", "1", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["images"] == 6
