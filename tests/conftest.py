"""Shared fixtures: a tiny real-photo folder (from sample_data/) and one model trained on it."""

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """train/ and val/ with 6 and 3 real photos per class (ants, bees)."""
    root = tmp_path_factory.mktemp("tiny") / "photos"
    for split, n in (("train", 6), ("val", 3)):
        for cls in ("ants", "bees"):
            dst = root / split / cls
            dst.mkdir(parents=True)
            for f in sorted((SAMPLE / split / cls).iterdir())[:n]:
                shutil.copy(f, dst / f.name)
    return root


@pytest.fixture(scope="session")
def flat_data(tmp_path_factory, tiny_data) -> Path:
    """The same photos as class folders only (no train/val): DATA/<class>/*."""
    root = tmp_path_factory.mktemp("flat") / "photos"
    for cls in ("ants", "bees"):
        (root / cls).mkdir(parents=True)
        for f in sorted((tiny_data / "train" / cls).iterdir()) + sorted((tiny_data / "val" / cls).iterdir()):
            shutil.copy(f, root / cls / f.name)
    return root


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, tiny_data) -> Path:
    """A resnet18 model file trained for one epoch from random init on tiny_data."""
    from finetune.config import TrainConfig
    from finetune.training import run_training

    out = tmp_path_factory.mktemp("run") / "run"
    cfg = TrainConfig(data=str(tiny_data), weights="none", epochs=1, batch_size=8, output=str(out), workers=1)
    return run_training(cfg).model_path


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in an empty working directory (runs/ and runs/latest.json land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _private_feature_cache(tmp_path_factory, monkeypatch):
    """Tests never write into the user's ~/.cache."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "feature-cache"))
