"""Real photo folders: bad files are named and skipped (or stop the run with --strict), never substituted."""

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config import TrainConfig
from finetune.data import dataset as DS
from finetune.data import images as I
from finetune.training import cache, run_training

runner = CliRunner()


def _photo(path: Path, size=(64, 48), color=(120, 80, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG", quality=90)
    return path


@pytest.fixture()
def messy(tmp_path, tiny_data) -> Path:
    """tiny_data plus one of each kind of bad file, in train/ants."""
    root = tmp_path / "messy"
    shutil.copytree(tiny_data, root)
    ants = root / "train" / "ants"
    (ants / "empty.jpg").write_bytes(b"")
    good = sorted(ants.glob("*.jpg"))[0].read_bytes()
    (ants / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (ants / "page.jpg").write_text("<!DOCTYPE html><html><body>404</body></html>")
    (ants / "noise.jpg").write_bytes(os.urandom(4096))
    (ants / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (ants / "Thumbs.db").write_bytes(b"x")
    (ants / "._photo.jpg").write_bytes(b"\x00\x05\x16\x07")
    (ants / ".ipynb_checkpoints").mkdir()
    return root


EXPECTED = {
    "empty.jpg": "empty file",
    "truncated.jpg": "truncated",
    "page.jpg": "not an image",
    "noise.jpg": "not an image",
    "IMG_0001.HEIC": "pip install pillow-heif",
}


def test_bad_files_are_named_and_skipped(messy, in_tmp):
    r = runner.invoke(app, ["train", str(messy), "--weights", "none", "--epochs", "1", "-b", "8", "-j", "1"])
    assert r.exit_code == 0, r.output
    for name, reason in EXPECTED.items():
        line = next(line for line in r.stderr.splitlines() if name in line)
        assert f"skipped train/ants/{name}" in line and reason in line, line
    for quiet in ("Thumbs.db", "._photo", "ipynb"):
        assert quiet not in r.stderr
    run = next(p for p in (in_tmp / "runs").iterdir() if p.is_dir())
    import json

    config = json.loads((run / "config.json").read_text())
    assert config["train_images"] == 12  # only the real photos
    assert len(json.loads((run / "results.json").read_text())["skipped"]) == len(EXPECTED)


def test_strict_stops_before_epoch_1_and_writes_nothing(messy, in_tmp):
    r = runner.invoke(app, ["train", str(messy), "--weights", "none", "--epochs", "1", "--strict"])
    assert r.exit_code == 3
    assert "--strict: 5 file(s) cannot be used" in r.stderr
    assert "epoch 1" not in r.stderr
    assert not (in_tmp / "runs").exists()


def test_unicode_spaces_and_emoji_names(tmp_path):
    for cls, name in (("café au lait", "photo 1.JPG"), ("🐝 bees", "ünïcode 🐝.jpeg")):
        for i in range(3):
            _photo(tmp_path / cls / f"{i} {name}", color=(i * 50, len(cls), 0))
    split = DS.find_dataset(tmp_path, val_fraction=1 / 3)
    assert split.classes == ["café au lait", "🐝 bees"]
    assert len(split.train) == 4 and len(split.val) == 2
    cache, failed = I.decode_all([s.path for s in split.train], 32, 1)
    assert not failed and len(cache) == 4


def test_nfd_class_names_are_normalised(tmp_path):
    import unicodedata

    _photo(tmp_path / unicodedata.normalize("NFD", "café") / "a.jpg")
    _photo(tmp_path / "tea" / "b.jpg")
    classes, _ = DS._scan(tmp_path)
    assert unicodedata.normalize("NFC", "café") in classes


def test_two_links_to_one_file_give_one_sample(tmp_path):
    real = _photo(tmp_path / "a" / "real.jpg")
    (tmp_path / "a" / "link.jpg").symlink_to(real)
    _photo(tmp_path / "b" / "x.jpg")
    skipped = []
    classes, samples = DS._scan(tmp_path, skipped=skipped)
    assert len(samples) == 2
    assert [Path(p).name for p, _ in skipped] == ["real.jpg"] or [Path(p).name for p, _ in skipped] == ["link.jpg"]


def test_decompression_bomb_and_extreme_aspect_refused_from_header(tmp_path):
    _photo(tmp_path / "big.jpg", size=(400, 300))
    with pytest.raises(I.ImageRejected, match="megapixels"):
        I.load_image(tmp_path / "big.jpg", max_pixels=100_000)
    Image.new("L", (5000, 2), 0).save(tmp_path / "strip.png")
    with pytest.raises(I.ImageRejected, match="more than 25:1"):
        I.load_image(tmp_path / "strip.png")


def test_float_and_cmyk_and_animated_images(tmp_path):
    import numpy as np

    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), "F").save(tmp_path / "f.tif")
    img = I.load_image(tmp_path / "f.tif")
    assert img.mode == "RGB" and img.getpixel((0, 0))[0] == 0 and img.getpixel((7, 7))[0] == 255
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = I.load_image(tmp_path / "c.jpg").getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    assert I.load_image(tmp_path / "anim.webp").getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.slow
def test_file_failing_mid_run_is_dropped_and_named_not_substituted(tiny_data, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = sorted((data / "train" / "bees").iterdir())[0]
    monkeypatch.setattr(cache, "CACHE_BUDGET_BYTES", 1)  # stream from disk, so the change is seen
    events = []

    def emit(event, **kw):
        events.append((event, kw))
        if event == "start":  # after the scan: the file breaks
            victim.write_bytes(b"garbage")

    cfg = TrainConfig(data=str(data), mode="finetune", weights="none", epochs=2, batch_size=4, output=str(tmp_path / "r"),
                      workers=0,
                      augment="none")
    result = run_training(cfg, emit)
    reported = [f for e, kw in events if e == "skipped" for f in kw["files"]]
    assert [p for p, _ in reported] == [str(victim)]  # named once, over two epochs
    assert "not an image" in reported[0][1]
    sizes = [kw["size"] for e, kw in events if e == "batch"]
    assert sum(sizes) == 2 * 11  # 12 train images, one dropped from both epochs, none substituted
    assert len(result.history) == 2


def test_feature_extract_skips_a_file_failing_mid_run_like_the_image_path(tiny_data, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = sorted((data / "val" / "ants").iterdir())[0]
    monkeypatch.setattr(cache, "CACHE_BUDGET_BYTES", 1)  # stream from disk, so the change is seen
    events = []

    def emit(event, **kw):
        events.append((event, kw))
        if event == "features":  # after the scan and the check, before extraction: the file breaks
            victim.write_bytes(b"garbage")

    cfg = TrainConfig(data=str(data), weights="none", mode="feature-extract", epochs=2, batch_size=4,
                      output=str(tmp_path / "r"), workers=0)
    result = run_training(cfg, emit)
    reported = [f for e, kw in events if e == "skipped" for f in kw["files"]]
    assert [p for p, _ in reported] == [str(victim)] and "not an image" in reported[0][1]
    assert result.summary["val_metrics"]["images"] == 5  # 6 val images, the broken one left out
    assert len(result.history) == 1  # the linear probe: fitted once
