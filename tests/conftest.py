"""Shared fixtures: a tiny real-photo folder (from sample_data/) and one model trained on it; every test runs in
its own empty working folder, with a private cache, and must leave the repository and torch's global flags as
they were."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
# The shared real data and ImageNet weights beside the repository (../shared), as on the machines that develop it
# and in CI; FINETUNE_TEST_SHARED points elsewhere. The tests behind the docs' accuracy figures need them: where they
# are absent those tests skip on a developer's machine, naming what is missing, and fail under CI=true (CI places
# shared/ beside the clone, so a missing one there is a broken setup, not a reason to pass without the figures).
SHARED = Path(os.environ.get("FINETUNE_TEST_SHARED", REPO.parent / "shared"))
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")


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


def _shared(relative: str, what: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        if IN_CI:
            pytest.fail(f"{what} are not at {path}, and CI=true: CI must place shared/ beside the clone "
                        "(or set FINETUNE_TEST_SHARED)", pytrace=False)
        pytest.skip(f"{what} are not at {path}")
    return path


@pytest.fixture(scope="session")
def real_weights() -> Path:
    """The shared MobileNetV2 ImageNet weights (a real pretrained state_dict)."""
    return _shared("weights/mobilenet_v2-imagenet-int8dequant.pth", "the shared MobileNetV2 weights")


@pytest.fixture(scope="session")
def antsbees() -> Path:
    """The full ants/bees set (245 train / 153 val photos)."""
    return _shared("data/hymenoptera_data", "the shared ants/bees photos")


@pytest.fixture(scope="session")
def local_weights(tmp_path_factory) -> Path:
    """A resnet18 state_dict file (random init, seeded): what --weights PATH takes, so a run treats it as pretrained
    (the probe, LP-FT) without any download. Its features are random: tests of mechanics, not of accuracy."""
    import torch
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18-local.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, tiny_data) -> Path:
    """A resnet18 model file fine-tuned for one epoch (SGD) from random init on tiny_data."""
    from finetune.config import TrainConfig
    from finetune.training import run_training

    out = tmp_path_factory.mktemp("run") / "run"
    cfg = TrainConfig(data=str(tiny_data), mode="finetune", weights="none", epochs=1, batch_size=8, output=str(out),
                      workers=1)
    return run_training(cfg).model_path


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Every test runs in an empty working directory (runs/ and runs/latest.json land there, never in the repo)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _repo_state() -> str:
    """Every file of the repository outside .git and ignored build outputs, with its size and change time."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout.decode()
    rows = []
    for name in sorted(filter(None, out.split("\0"))):
        path = REPO / name
        st = path.stat() if path.exists() else None
        rows.append(f"{name} {st.st_size if st else '-'} {st.st_mtime_ns if st else '-'}")
    return "\n".join(rows)


@pytest.fixture(scope="session", autouse=True)
def _repository_unchanged():
    """No test writes outside its temp folder: the repository tree is the same after the suite."""
    before = _repo_state()
    yield
    after = _repo_state()
    assert after == before, "the test suite changed the repository tree"


@pytest.fixture(autouse=True)
def _torch_flags_restored():
    """No test (and no library call) leaves torch's global switches changed for the tests after it."""
    import torch

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, torch.get_num_threads())
    yield
    after = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, torch.get_num_threads())
    assert after == before, "a global torch flag was left changed"


@pytest.fixture(autouse=True)
def _private_feature_cache(tmp_path_factory, monkeypatch):
    """Tests never write into the user's ~/.cache; predict's torch-free path (and the ONNX export it caches after
    a first prediction) is on only in the tests of it (test_lite.py)."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "feature-cache"))
    monkeypatch.setenv("FINETUNE_LITE", "0")
