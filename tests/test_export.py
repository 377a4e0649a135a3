"""Exports load without finetune and match eager PyTorch; a failed check leaves nothing behind."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.formats import export as E
from finetune.models.model_file import network_from_file


def _eager_logits(model_path, images):
    net, mf = network_from_file(model_path)
    x, _ = E._check_batch(mf, str(images))
    with torch.inference_mode():
        return net.module(x), x


@pytest.mark.slow
def test_pt_export_loads_in_plain_pytorch_without_finetune(trained_model, tiny_data, tmp_path):
    out = tmp_path / "model.pt"
    report = E.export_model(trained_model, out)
    assert report.max_abs_diff <= E.ATOL and report.checked_images == 6
    expected, x = _eager_logits(trained_model, tiny_data / "val")
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["finetune"] = None  # any import of finetune would now fail
        import torch, torchvision
        ckpt = torch.load({str(out)!r}, weights_only=True)
        model = torchvision.models.get_model(ckpt["arch"], num_classes=len(ckpt["classes"]))
        model.load_state_dict(ckpt["state_dict"])
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        with torch.inference_mode():
            torch.save(model.eval()(x), {str(tmp_path / 'y.pt')!r})
        print(ckpt["classes"], ckpt["preprocessing"]["crop_size"])
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "['ants', 'bees'] 224"
    assert torch.allclose(torch.load(tmp_path / "y.pt"), expected, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pt2", pytest.param(".onnx", marks=pytest.mark.slow), ".safetensors"])
def test_other_formats_round_trip_with_metadata(trained_model, tmp_path, suffix):
    if suffix == ".onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / ("model" + suffix)
    report = E.export_model(trained_model, out)
    assert out.is_file() and report.format == suffix and report.max_abs_diff <= E.ATOL
    if suffix == ".pt2":
        extra = {"finetune.json": ""}
        torch.export.load(out, extra_files=extra)
        meta = json.loads(extra["finetune.json"])
    elif suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        meta = json.loads(props["finetune"])
        assert json.loads(props["classes"]) == ["ants", "bees"]
    else:
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            meta = json.loads(f.metadata()["finetune"])
    assert meta["classes"] == ["ants", "bees"] and meta["arch"] == "resnet18"
    assert meta["preprocessing"]["crop_size"] == 224
    assert list(tmp_path.iterdir()) == [out]  # no temp files


def test_mismatching_export_is_not_kept(trained_model, tmp_path, monkeypatch):
    out = tmp_path / "model.pt"
    out.write_bytes(b"previous export")
    monkeypatch.setattr(E, "_run", lambda path, fmt, x: torch.zeros(len(x), 2))
    with pytest.raises(FinetuneError, match="disagrees with PyTorch"):
        E.export_model(trained_model, out)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_unknown_format_is_a_usage_error(trained_model, tmp_path):
    with pytest.raises(FinetuneError, match=r"\.pt, \.safetensors, \.pt2, \.onnx") as e:
        E.export_model(trained_model, tmp_path / "model.h5")
    assert e.value.exit_code == 2


@pytest.mark.slow
def test_the_loading_snippet_in_the_docs_runs_as_printed(trained_model, tiny_data, tmp_path):
    import re
    import shutil
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    snippet = re.search(r"## Loading without finetune.*?```python\n(.*?)```", docs, re.S).group(1)
    for suffix in (".pt", ".safetensors", ".pt2", ".onnx", ".xml"):
        E.export_model(trained_model, tmp_path / f"model{suffix}")
    shutil.copy(sorted((tiny_data / "val" / "bees").iterdir())[0], tmp_path / "photo.jpg")
    code = 'import sys\nsys.modules["finetune"] = None\n' + snippet
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    first, last = p.stdout.split("\n")[0].split()[0], p.stdout.strip().split("\n")[-1]
    lines = p.stdout.strip().split("\n")
    assert first in ("ants", "bees") and last == first and lines[-2] == first  # .pt, .onnx and .xml agree
