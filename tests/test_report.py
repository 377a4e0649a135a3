"""The run report: every picture is a real PNG, the page is one offline file with escaped text."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.metrics.classification import classification_report
from finetune.report.html import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["cat", "dog", "<b>&"]  # the last one must come out escaped in the HTML


def _inputs(tmp_path: Path) -> dict:
    images = tmp_path / "images"
    images.mkdir()
    for name, color in (("a.jpg", (200, 40, 40)), ("b.png", (40, 40, 200))):
        Image.new("RGB", (64, 48), color).save(images / name)
    (images / "broken.jpg").write_bytes(b"not an image")
    wrong = [
        {"path": str(images / "a.jpg"), "true": "cat", "predicted": "dog", "probability": 0.93},
        {"path": str(images / "b.png"), "true": "dog", "predicted": "<b>&", "probability": 0.71},
        {"path": str(images / "missing.jpg"), "true": "<b>&", "predicted": "cat", "probability": 0.6},
        {"path": str(images / "broken.jpg"), "true": "cat", "predicted": "dog", "probability": 0.55},
    ]
    history = [{"epoch": e, "train_loss": 1.2 / e, "train_acc": 0.5 + 0.1 * e, "val_loss": 1.0 / e + 0.05,
                "val_acc": 0.55 + 0.08 * e, "lr": 0.01 * 0.5 ** (e - 1), "seconds": 1.5} for e in range(1, 5)]
    history[-1]["val_acc"] = 0.75  # the best epoch is 3, not the last
    return {
        "history": history,
        "classes": CLASSES,
        "wrong": wrong,
        "filters_before": torch.randn(8, 3, 3, 3),
        "filters_after": torch.randn(8, 3, 3, 3),
        "config": {"model": "resnet18", "data": "/photos", "epochs": 4, "lr": 0.01, "classes": CLASSES},
        "summary": {"best_epoch": 3, "best_val_acc": 0.79, "best_val_loss": 0.38, "seconds": 12.3,
                    "val_metrics": classification_report([0] * 6 + [1] * 9 + [2] * 5,
                                                         [0] * 5 + [1] + [0] * 2 + [1] * 6 + [2] + [1] + [2] * 4,
                                                         CLASSES)},
    }


def _assert_png(path: Path, min_width: int, min_height: int) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert min_width <= img.width <= 5000 and min_height <= img.height <= 5000


def test_report_writes_pictures_and_one_offline_page(tmp_path):
    paths = write_report(tmp_path / "run", **_inputs(tmp_path))
    assert set(paths) == {"curves", "confusion", "wrong", "filters", "report"}
    for key, path in paths.items():
        assert path.is_file() and path.parent == tmp_path / "run", key
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")] == []  # no temp files left
    _assert_png(paths["curves"], 1000, 300)
    _assert_png(paths["confusion"], 300, 300)
    _assert_png(paths["wrong"], 500, 300)  # 2 readable + 2 unreadable tiles: drawn, not crashed
    _assert_png(paths["filters"], 500, 300)

    page = paths["report"].read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4
    assert "cat" in page and "dog" in page and "resnet18" in page
    assert "best epoch" in page and "79.0 %" in page
    assert "&lt;b&gt;&amp;" in page and "<b>&" not in page
    import re

    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page).lower()  # base64 can spell "http" by chance
    assert "<script" not in text and "http" not in text


def test_report_without_filters_or_mistakes(tmp_path):
    inputs = _inputs(tmp_path) | {"filters_before": None, "filters_after": None, "wrong": []}
    paths = write_report(tmp_path / "run", **inputs)
    assert "filters" not in paths and not (tmp_path / "run" / "filters.png").exists()
    _assert_png(paths["wrong"], 300, 100)  # the "no mistakes" panel
    assert paths["report"].read_text(encoding="utf-8").count("data:image/png;base64,") == 3


def test_report_grayscale_filters_capped(tmp_path):
    # A 1-channel stem with more filters than the grid shows: channel mean in gray, no crash.
    inputs = _inputs(tmp_path) | {"filters_before": np.random.randn(70, 1, 5, 5),
                                  "filters_after": np.zeros((70, 1, 5, 5))}
    _assert_png(write_report(tmp_path / "run", **inputs)["filters"], 500, 300)


@pytest.mark.slow
def test_import_does_not_load_matplotlib():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", "import sys, finetune.report.html; print('matplotlib' in sys.modules)"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_probe_run_shows_its_l2_search_not_one_point_curves(tiny_data, local_weights, tmp_path):
    """A probe fits once: no epochs to draw. The report shows what it did (held-out loss against L2, the chosen L2)."""
    import json

    from finetune.config import TrainConfig
    from finetune.training import run_training

    result = run_training(TrainConfig(data=str(tiny_data), weights=str(local_weights), output=str(tmp_path / "r"),
                                      workers=0))
    probe = json.loads((tmp_path / "r" / "results.json").read_text())["probe"]
    assert len(probe["grid"]) >= 3 and probe["l2"] in [g[0] for g in probe["grid"]]
    assert min(g[1] for g in probe["grid"]) == pytest.approx(probe["cv_loss"])
    page = (result.run_dir / "report.html").read_text()
    assert "The linear probe&#x27;s L2 search" in page and "Training curves" not in page
    assert (tmp_path / "r" / "curves.png").read_bytes().startswith(PNG_SIGNATURE)
