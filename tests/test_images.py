"""Decoding (EXIF, bit depth, alpha, palette, size) and the transforms built from a model's preprocessing."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.config import AUGMENTATIONS
from finetune.data import images as D
from finetune.data.preprocessing import Preprocessing


def _jpeg(path: Path, color=(200, 30, 30), size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG")
    return path


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert D.load_image(tmp_path / "r.jpg").size == (20, 60)


def test_16bit_png_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(arr).save(tmp_path / "g16.png")
    px = D.load_image(tmp_path / "g16.png").getpixel((0, 0))
    assert px == (128, 128, 128)


def test_transparency_composited_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert D.load_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_palette_and_grayscale_become_rgb(tmp_path):
    Image.new("P", (8, 8), 3).save(tmp_path / "p.png")
    Image.new("L", (8, 8), 77).save(tmp_path / "l.jpg")
    assert D.load_image(tmp_path / "p.png").mode == "RGB"
    assert D.load_image(tmp_path / "l.jpg").getpixel((0, 0)) == (77, 77, 77)


def test_decode_to_tensor_reduces_large_images(tmp_path):
    _jpeg(tmp_path / "big.jpg", size=(2000, 1000))
    t = D.decode_to_tensor(str(tmp_path / "big.jpg"), 256)
    assert t.dtype == torch.uint8 and t.shape == (3, 256, 512)


def test_decode_all_reports_unreadable_files(tmp_path):
    good = _jpeg(tmp_path / "ok.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    cache, failed = D.decode_all([str(good), str(bad)], 64, workers=2)
    assert list(cache) == [str(good)]
    assert [p for p, _ in failed] == [str(bad)]


def test_eval_transform_follows_weights_preprocessing():
    from torchvision.models import ResNet50_Weights

    pre = Preprocessing.from_weights(ResNet50_Weights.IMAGENET1K_V2)
    assert pre.resize_size == 232 and pre.crop_size == 224  # not a hard-coded 256
    assert Preprocessing.from_dict(pre.to_dict()) == pre  # what model files store reads back the same
    x = pre.eval_transform()(torch.full((3, 300, 400), 128, dtype=torch.uint8))
    assert x.shape == (3, 224, 224)
    expected = (128 / 255 - pre.mean[0]) / pre.std[0]
    assert torch.allclose(x[0], torch.full((224, 224), expected), atol=1e-5)


@pytest.mark.parametrize("augment", AUGMENTATIONS)
def test_train_transform_output_shape(augment):
    pre = Preprocessing(64, 56, (0.5,) * 3, (0.25,) * 3, "bilinear")
    x = pre.train_transform(augment)(torch.randint(0, 255, (3, 64, 90), dtype=torch.uint8))
    assert x.shape == (3, 56, 56) and x.dtype == torch.float32
    if augment != "none":  # a smaller training crop when asked (none is the eval view, always the eval crop)
        x = pre.train_transform(augment, 48)(torch.randint(0, 255, (3, 64, 90), dtype=torch.uint8))
        assert x.shape == (3, 48, 48)


def test_every_path_that_reads_photos_decodes_a_12mp_jpeg_at_reduced_scale(tmp_path, monkeypatch, trained_model,
                                                                           local_weights):
    """Big JPEGs stay cheap: training (decode and features), predict, serve and check decode a 4000x3000 phone photo
    at 1/8 scale (Pillow's draft), never its 12 MP (measured: 40 such photos cost 0.93x the same photos at their own
    size in a feature-extract run). A change of the data path that loses this fails here, not in a benchmark."""
    from finetune.config import TrainConfig
    from finetune.inference.predictor import load_predictor
    from finetune.quality.doctor import check_dataset
    from finetune.serving.model import ServedModel
    from finetune.training import run_training

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls, tint in (("ants", 0), ("bees", 90)):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(3 if split == "train" else 2):
                pixels = rng.integers(0, 60, (3000, 4000, 3), dtype=np.uint8) + np.uint8(tint + 20 * i)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", "JPEG")
    decoded = []
    real = D._to_rgb
    monkeypatch.setattr(D, "_to_rgb", lambda img: decoded.append(img.size) or real(img))
    paths = sorted(str(p) for p in (tmp_path / "data").rglob("*.jpg"))

    run_training(TrainConfig(data=str(tmp_path / "data"), weights=str(local_weights), output=str(tmp_path / "r"),
                             workers=0))
    list(load_predictor([trained_model], device="cpu").predict(paths[:2]))
    ServedModel(load_predictor([trained_model], device="cpu")).prepare(Path(paths[0]).read_bytes())
    check_dataset(str(tmp_path / "data"))
    assert len(decoded) >= 2 * len(paths) + 3
    assert max(w * h for w, h in decoded) <= 500 * 375  # 4000x3000 / 8: never the 12 MP
