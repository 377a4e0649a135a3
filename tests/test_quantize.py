"""OpenVINO IR export, int8 exports (onnxruntime static quantization, NNCF for OpenVINO) checked against fp32 on
labelled val images, and the runtime each model file runs on."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finetune._util.files import TEMP_PREFIX
from finetune.cli import app
from finetune.errors import FinetuneError, UsageError
from finetune.formats import int8 as Q
from finetune.formats.export import export_model
from finetune.formats.load import choose_runtime, load_runnable
from finetune.inference.predictor import load_predictor


def test_runtime_choice_per_file_kind():
    assert choose_runtime(Path("m.xml"), "auto") == "openvino"
    assert choose_runtime(Path("best.pt"), "auto") == "torch"  # converting at every start costs more than it saves
    assert choose_runtime(Path("best.pt"), "openvino") == "openvino"
    assert choose_runtime(Path("m.onnx"), "onnx") == "onnx"
    assert choose_runtime(Path("m.pt2"), "auto", "cuda") == "torch"
    with pytest.raises(UsageError, match="--runtime onnx: cannot run best.pt"):
        choose_runtime(Path("best.pt"), "onnx")
    with pytest.raises(UsageError, match="--runtime torch: cannot run m.xml"):
        choose_runtime(Path("m.xml"), "torch")
    with pytest.raises(UsageError, match="choose one of"):
        choose_runtime(Path("m.onnx"), "tensorrt")


def test_judge_reports_agreement_and_both_accuracies_and_refuses_a_drop_over_the_margin(tmp_path):
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    fp32 = torch.nn.functional.one_hot(labels, 2).float()  # all right
    int8 = fp32.clone()
    int8[0] = torch.tensor([0.0, 1.0])  # one wrong: 10 points lower, agreement 90 %
    r = Q._judge(fp32, int8, labels, max_drop=10.0, force=False, out=tmp_path / "m.xml")
    assert r == {"fp32_accuracy": 1.0, "int8_accuracy": 0.9, "agreement": pytest.approx(0.9), "forced": False}
    with pytest.raises(FinetuneError, match=r"int8 accuracy 90.0% is 10.0 points below fp32's 100.0%"):
        Q._judge(fp32, int8, labels, max_drop=1.0, force=False, out=tmp_path / "m.xml")
    assert Q._judge(fp32, int8, labels, max_drop=1.0, force=True, out=tmp_path / "m.xml")["forced"] is True
    with pytest.raises(UsageError, match="labelled images"):
        Q._judge(fp32, int8, None, max_drop=1.0, force=False, out=tmp_path / "m.xml")


@pytest.mark.slow
def test_openvino_ir_export_matches_pytorch_and_predicts_like_best_pt(trained_model, tiny_data, tmp_path):
    pytest.importorskip("openvino")
    out = tmp_path / "model.xml"
    report = export_model(trained_model, out)
    assert report.max_abs_diff <= 1e-3 and out.is_file() and out.with_suffix(".bin").is_file()
    assert not list(tmp_path.glob(TEMP_PREFIX + "*"))
    runnable = load_runnable(out)
    assert runnable.runtime == "openvino" and runnable.info.classes == ["ants", "bees"]
    photos = sorted(str(p) for p in (tiny_data / "val").rglob("*.jpg"))
    ir = {r.path: r.top for r in load_predictor([str(out)]).predict(photos)}
    eager = {r.path: r.top for r in load_predictor([str(trained_model)]).predict(photos)}
    for p in photos:
        assert [c for c, _ in ir[p]] == [c for c, _ in eager[p]]
        assert [x for _, x in ir[p]] == pytest.approx([x for _, x in eager[p]], abs=1e-4)
    out.with_suffix(".bin").unlink()
    with pytest.raises(FinetuneError, match="model.bin is missing"):
        load_runnable(out)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".onnx", ".xml"])
def test_int8_export_is_checked_against_fp32_and_says_so_in_its_metadata(trained_model, tmp_path, suffix):
    pytest.importorskip("onnxruntime" if suffix == ".onnx" else "nncf")
    out = tmp_path / f"model-int8{suffix}"
    # The file's metadata and checks, on a random-init model and 6 val images (one image is 17 points): the margin
    # the docs promise is held on real weights by the test below.
    r = Q.export_int8([str(trained_model)], out, max_drop=100.0)
    assert r.calibration_images == 12 and r.checked_images == 6  # tiny_data: every train image, every val image
    assert 0 <= r.agreement <= 1 and r.fp32_accuracy is not None and r.int8_accuracy is not None
    runnable = load_runnable(out)
    quantization = runnable.info.metrics["int8"]
    assert quantization["type"] == "int8" and quantization["top1_agreement"] == pytest.approx(r.agreement)
    assert runnable.info.metrics["val_acc"] == pytest.approx(r.int8_accuracy)
    assert not list(tmp_path.glob(TEMP_PREFIX + "*"))
    if suffix == ".onnx":
        import onnx

        model = onnx.load(out)
        assert any(n.op_type in ("QuantizeLinear", "QLinearConv") for n in model.graph.node)
        assert json.loads({p.key: p.value for p in model.metadata_props}["finetune"])["quantization"]["type"] == "int8"


@pytest.mark.slow
def test_int8_refused_beyond_the_margin_keeps_no_file_and_force_keeps_it(trained_model, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model-int8.onnx"
    runner = CliRunner()
    refused = runner.invoke(app, ["export", str(out), "-m", str(trained_model), "--int8", "--max-accuracy-drop", "-1"])
    assert refused.exit_code == 7 and "the file was not kept" in refused.output  # refused by its check
    assert not out.exists() and not list(tmp_path.glob(TEMP_PREFIX + "*"))
    forced = runner.invoke(app, ["export", str(out), "-m", str(trained_model), "--int8", "--max-accuracy-drop", "-1",
                                 "--force"])
    assert forced.exit_code == 0, forced.output
    assert "top-1 agrees with fp32" in forced.output and "kept because of --force" in forced.output
    assert out.is_file()


def test_int8_only_for_onnx_and_xml(trained_model, tmp_path):
    r = CliRunner().invoke(app, ["export", str(tmp_path / "m.pt"), "-m", str(trained_model), "--int8"])
    assert r.exit_code == 2 and "--int8 writes .onnx or .xml files" in r.output


@pytest.mark.slow
def test_int8_onnx_of_a_real_model_keeps_the_accuracy_the_docs_promise(antsbees, real_weights, tmp_path):
    """MobileNetV2 (real ImageNet weights, the CPU default's probe) on ants/bees: the onnxruntime int8 file is kept
    at the default margin (at most MAX_ACCURACY_DROP points below fp32 on the 153 val images), as docs/export.md
    shows it."""
    pytest.importorskip("onnxruntime")
    from finetune.config import TrainConfig
    from finetune.training import run_training

    run = run_training(TrainConfig(data=str(antsbees), model="mobilenet_v2", weights=str(real_weights),
                                   output=str(tmp_path / "r")))
    r = Q.export_int8([str(run.model_path)], tmp_path / "m-int8.onnx")  # the default margin: refused beyond it
    assert r.checked_images == 153 and not r.forced
    assert r.fp32_accuracy - r.int8_accuracy <= Q.MAX_ACCURACY_DROP / 100
    # docs/export.md: int8 96.1 % (147 of 153) against fp32's 96.7 %, top-1 agreement 99.3 % (152 of 153). Measured
    # 2026-12-07 on the probe models of seeds 0-4 (2-core AMD EPYC, load 12-15; Q.export_int8 as here): int8 147 of
    # 153 on every seed, fp32 148 (147 on seed 4), agreement 152 or 153 of 153. The floors: one image below those.
    assert round(r.int8_accuracy * 153) >= 146 and round(r.fp32_accuracy * 153) >= 146, r
    assert round(r.agreement * 153) >= 151, r
