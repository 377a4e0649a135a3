"""Calibration: ECE by hand, temperature scaling on an over-confident fixture, and --calibrate end to end."""

import json

import pytest
import torch

from finetune.config import TrainConfig
from finetune.metrics import calibrate as C
from finetune.models.model_file import load_model_file
from finetune.training import run_training


def test_ece_hand_computed():
    probs = [[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]
    labels = [0, 1, 0, 1]  # right (0.9), wrong (0.8), right (0.6), right (0.7): one image per bin
    assert C.expected_calibration_error(probs, labels) == pytest.approx((0.1 + 0.8 + 0.4 + 0.3) / 4)
    bins = C.reliability_bins(probs, labels)
    assert sum(b["count"] for b in bins) == 4 and len(bins) == C.ECE_BINS
    # A perfectly calibrated bin: 3 of 4 right at confidence 0.75.
    assert C.expected_calibration_error([[0.75, 0.25]] * 4, [0, 0, 0, 1]) == pytest.approx(0.0)


def _overconfident(n=4000, true_t=3.0, seed=0):
    """Labels drawn from softmax(z); the 'model' reports true_t * z: over-confident by a factor true_t."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64) * 1.5
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    return z * true_t, labels


def test_temperature_recovers_the_overconfidence_and_lowers_ece():
    logits, labels = _overconfident()
    t = C.fit_temperature(logits, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    s = C.calibration_summary(logits, labels, t)
    assert s["ece_before"] > 0.1 and s["ece_after"] < s["ece_before"] / 3
    assert s["nll_after"] < s["nll_before"]
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))  # no prediction changes


def test_temperature_of_a_calibrated_model_stays_near_one():
    logits, labels = _overconfident(true_t=1.0, seed=1)
    assert C.fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)


def test_train_calibrate_stores_temperature_used_by_predict_and_evaluate(tiny_data, tmp_path):
    from finetune.formats.export import metadata
    from finetune.inference.evaluate import evaluate_folder
    from finetune.inference.predictor import load_predictor

    events = []
    cfg = TrainConfig(data=str(tiny_data), mode="finetune", weights="none", epochs=2, batch_size=4, calibrate=True,
                      output=str(tmp_path / "r"), workers=1)
    result = run_training(cfg, lambda e, **k: events.append((e, k)))
    meta = load_model_file(result.model_path)
    summary = json.loads((tmp_path / "r" / "results.json").read_text())["calibration"]
    assert summary["fitted"] and meta.temperature == pytest.approx(summary["temperature"])
    assert meta.temperature != 1.0
    assert summary["nll_after"] <= summary["nll_before"] + 1e-9  # T = 1 is among the candidates
    assert [k["temperature"] for e, k in events if e == "calibrated"] == [summary["temperature"]]
    # the calibrated ECE the user is shown is measured on val images the temperature was not fitted on
    assert 0 <= summary["ece_cross_fitted"] <= 1
    assert [k["ece_cross_fitted"] for e, k in events if e == "calibrated"] == [summary["ece_cross_fitted"]]
    assert (tmp_path / "r" / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Calibration (reliability)" in (tmp_path / "r" / "report.html").read_text()
    assert metadata(meta)["temperature"] == meta.temperature  # every export format carries it

    predictor = load_predictor([result.model_path], "cpu")
    image = sorted((tiny_data / "val" / "ants").iterdir())[0]
    (pred,) = predictor.predict([str(image)], top_k=2)
    expected = (torch.tensor(pred.logits) / meta.temperature).softmax(0)
    assert pred.top[0][1] == pytest.approx(float(expected.max()), abs=1e-6)

    report = evaluate_folder(str(result.model_path), str(tiny_data), "cpu")
    cal = report["calibration"]
    assert cal["fitted"] and cal["temperature"] == pytest.approx(meta.temperature)
    assert 0 <= cal["ece_before"] <= 1 and 0 <= cal["ece_after"] <= 1


def test_uncalibrated_runs_still_report_ece_and_keep_temperature_one(trained_model, tiny_data):
    from finetune.inference.evaluate import evaluate_folder

    assert load_model_file(trained_model).temperature == 1.0
    cal = evaluate_folder(str(trained_model), str(tiny_data), "cpu")["calibration"]
    assert not cal["fitted"] and cal["ece_before"] == pytest.approx(cal["ece_after"])


@pytest.mark.slow
def test_cli_calibrate_flag_and_evaluate_line(tiny_data, tmp_path):
    from typer.testing import CliRunner

    from finetune.cli import app

    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", str(tiny_data), "--weights", "none", "--epochs", "1", "-b", "4", "--calibrate",
                            "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "calibrated" in r.stderr and "temperature" in r.stderr
    t = load_model_file(out / "best.pt").temperature
    r = runner.invoke(app, ["evaluate", str(tiny_data), "-m", str(out / "best.pt")])
    assert r.exit_code == 0, r.output
    assert "expected calibration error" in r.stderr and f"{t:.3g}" in r.stderr


def test_cross_fitted_ece_fits_on_one_half_and_measures_on_the_other(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(40, 3) * 4
    labels = torch.randint(0, 3, (40,))
    fits = []
    real = C.fit_temperature
    monkeypatch.setattr(C, "fit_temperature", lambda z, y: fits.append(len(y)) or real(z, y))
    value = C.cross_fitted_ece(logits, labels)
    assert fits == [20, 20]  # two fits, each on half of the images
    in_sample = C.expected_calibration_error((logits / real(logits, labels)).softmax(1), labels)
    assert 0 <= value <= 1 and value != pytest.approx(in_sample)
