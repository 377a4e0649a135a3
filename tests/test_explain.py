"""predict --explain: Grad-CAM heatmaps at the photo's size in [0, 1], a layer for every torchvision family, the
heat on the insect (hand-drawn boxes, tests/data/insect_boxes.json) with real weights, clear refusals."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import UsageError
from finetune.inference import explain
from finetune.models.registry import available_models, find_head

REPO = Path(__file__).resolve().parents[1]
BOXES = Path(__file__).parent / "data" / "insect_boxes.json"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_every_torchvision_family_has_a_grad_cam_layer_and_an_unknown_one_is_refused():
    for name in available_models():
        assert explain.family(name) in explain.TARGETS
    with pytest.raises(UsageError, match="no Grad-CAM layer known"):
        explain.family("lenet5")


def test_a_crop_map_lands_on_the_photo_at_its_size_and_nowhere_outside_the_crop():
    heat = torch.zeros(224, 224)
    heat[100:124, 100:124] = 1.0  # a hot spot at the crop's centre
    out = explain.place(heat, (500, 300), 256)  # resized to 427x256, cropped 224: 262 px of the photo
    assert out.shape == (300, 500) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    assert out[150, 250] > 0.5  # the centre of the photo
    assert out[:, :110].max() == 0 and out[:, 390:].max() == 0 and out[:15].max() == 0  # outside the crop


def test_a_heatmap_has_the_photo_size_and_lies_in_0_1(trained_model, tiny_data):
    e = explain.Explainer(trained_model, "cpu").explain(str(next((tiny_data / "val" / "bees").iterdir())), 1)
    assert e.heatmap.shape == (e.photo.size[1], e.photo.size[0])
    assert e.heatmap.min() >= 0 and e.heatmap.max() <= 1 and e.heatmap.max() > 0.99  # scaled to its maximum


@pytest.mark.slow
def test_predict_explain_writes_one_picture_per_image(trained_model, tiny_data, tmp_path):
    r = invoke("predict", tiny_data / "val" / "ants", "-m", trained_model, "--explain", tmp_path / "why", "-k", "2")
    assert r.exit_code == 0, r.output
    written = sorted(p.name for p in (tmp_path / "why").iterdir())
    assert written == sorted(Path(p).stem + ".png" for p in os.listdir(tiny_data / "val" / "ants"))


def test_explain_refuses_ensembles_compiled_exports_and_a_missing_extra(trained_model, tiny_data, tmp_path,
                                                                       monkeypatch):
    photo = next((tiny_data / "val" / "ants").iterdir())
    r = invoke("predict", photo, "-m", trained_model, "-m", trained_model, "--explain", tmp_path / "e")
    assert r.exit_code == 2 and "ensemble" in r.output
    (tmp_path / "m.onnx").write_bytes(b"not used")
    r = invoke("predict", photo, "-m", tmp_path / "m.onnx", "--explain", tmp_path / "e")
    assert r.exit_code == 2 and "gives no gradients" in r.output
    monkeypatch.setitem(sys.modules, "captum", None)
    r = invoke("predict", photo, "-m", trained_model, "--explain", tmp_path / "e")
    assert r.exit_code == 2 and "pip install 'finetune[explain]'" in r.output
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vit_b_16", "swin_t"])
def test_transformers_get_a_heatmap_over_their_token_grid(arch):
    import torchvision

    ex = explain.Explainer.__new__(explain.Explainer)
    torch.manual_seed(0)
    ex.module = torchvision.models.get_model(arch, weights=None, num_classes=2).eval()
    head = ex.module.get_submodule(find_head(ex.module))
    torch.nn.init.normal_(head.weight, std=0.02)  # torchvision starts ViT's head at zero: no gradient at all
    ex.getter, ex.layout = explain.TARGETS[explain.family(arch)]
    x = torch.randn(1, 3, 224, 224)
    cam = ex.grad_cam(x, 1)
    assert cam.shape == (1, 224, 224) and cam.min() >= 0 and cam.max() == pytest.approx(1.0)
    assert (cam[0] > 0.05).float().mean() < 0.95  # a map, not a flat field
    assert torch.equal(ex.module(x), ex.module(x))  # no hook left behind changing the model


@pytest.fixture(scope="module")
def real_model(tmp_path_factory, real_weights):
    """A feature-extract MobileNetV2 (real ImageNet weights, linear probe) trained on sample_data/train."""
    from finetune.config import TrainConfig
    from finetune.training import run_training

    base = tmp_path_factory.mktemp("explain-real")
    with pytest.MonkeyPatch.context() as mp:  # session fixtures run before the per-test private cache is set
        mp.setenv("FINETUNE_CACHE", str(base / "cache"))
        cfg = TrainConfig(data=str(REPO / "sample_data"), model="mobilenet_v2", weights=str(real_weights),
                          mode="feature-extract", output=str(base / "run"), workers=1)
        return run_training(cfg).model_path


@pytest.mark.slow
def test_real_model_looks_at_the_insect_more_than_at_the_background(real_model):
    ex = explain.Explainer(real_model, "cpu")
    boxes = json.loads(BOXES.read_text())["boxes"]
    ratios = []
    for rel, (left, top, right, bottom) in boxes.items():
        e = ex.explain(str(REPO / "sample_data" / rel), ex.info.classes.index(rel.split("/")[1]))
        width, height = e.photo.size
        assert e.heatmap.shape == (height, width) and 0 <= e.heatmap.min() and e.heatmap.max() <= 1
        pre = ex.info.preprocessing
        seen = explain.place(torch.ones(pre.crop_size, pre.crop_size), e.photo.size, pre.resize_size) > 0  # the crop
        insect = np.zeros_like(seen)
        insect[top:bottom, left:right] = True
        ratios.append(e.heatmap[insect & seen].mean() / max(e.heatmap[~insect & seen].mean(), 1e-6))
    # docs/inference.md: 6 of the 7 photos, median ratio 3.4. Measured 2026-12-07 (this model with seeds 0-4, 2-core
    # AMD EPYC): 6 of 7 on every seed, median 3.270-3.275 (the pupa photo 0.75-0.76, the others 2.55-5.77). The
    # floor leaves 0.27 below the measured median for gradients computed on another CPU; the old bar was 2.
    assert sum(r > 1 for r in ratios) >= len(ratios) - 1, ratios  # one photo may fool it (see the JSON's note)
    assert float(np.median(ratios)) >= 3.0, ratios


def test_report_tiles_get_the_heatmap_of_their_predicted_class(trained_model, tiny_data, monkeypatch):
    photos = sorted(str(p) for p in (tiny_data / "val" / "ants").iterdir())[:2]
    maps = explain.heatmaps_for(trained_model, [{"path": photos[0], "predicted": "bees"},
                                                {"path": photos[1] + ".gone", "predicted": "ants"}])
    assert list(maps) == [photos[0]] and maps[photos[0]].max() <= 1  # a photo gone since training: a plain tile
    monkeypatch.setitem(sys.modules, "captum", None)
    assert explain.heatmaps_for(trained_model, [{"path": photos[0], "predicted": "bees"}]) == {}
