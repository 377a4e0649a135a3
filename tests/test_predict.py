"""Input expansion and batched prediction."""


import pytest
import torch

from finetune.checkpoint import model_from_file
from finetune.predict import Failure, Prediction, Predictor, expand_inputs


def test_expand_inputs_files_folders_globs_and_missing(tiny_data, tmp_path):
    ants = sorted(str(p) for p in (tiny_data / "val" / "ants").iterdir())
    files, missing = expand_inputs([ants[0], str(tiny_data / "val"), str(tiny_data / "val" / "*" / "*.jpg"),
                                    str(tmp_path / "none.jpg")])
    assert files[0] == ants[0]
    assert len(files) == 6  # named three ways, listed once
    assert [m.path for m in missing] == [str(tmp_path / "none.jpg")]


def test_predictions_match_model_and_keep_order_around_failures(trained_model, tiny_data, tmp_path):
    good = sorted(str(p) for p in (tiny_data / "val" / "bees").iterdir())
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    paths = [good[0], str(bad), good[1], good[2]]
    results = list(Predictor(trained_model, "cpu").predict(paths, top_k=5, batch_size=2))
    assert [r.path for r in results] == paths
    assert [type(r) for r in results] == [Prediction, Failure, Prediction, Prediction]
    assert all(len(r.top) == 2 for r in results if isinstance(r, Prediction))  # top_k capped at class count

    # Probabilities equal a softmax over the model's own logits on the same preprocessing.
    predictor = Predictor(trained_model, "cpu")
    model, _ = model_from_file(trained_model)
    with torch.inference_mode():
        p = torch.softmax(model(predictor._load(good[0])[None]), 1)[0]
    top = dict(results[0].top)
    assert top["ants"] == pytest.approx(p[0].item(), abs=1e-5)
    assert top["bees"] == pytest.approx(p[1].item(), abs=1e-5)


def test_sort_into_copies_never_overwrites_and_logs(tiny_data, tmp_path):
    import csv

    from finetune.predict import sort_into

    src = sorted((tiny_data / "val" / "ants").iterdir())
    preds = [Prediction(str(src[0]), [("ants", 0.9), ("bees", 0.1)]),
             Prediction(str(src[1]), [("bees", 0.6), ("ants", 0.4)]),
             Prediction(str(src[0]), [("ants", 0.95), ("bees", 0.05)])]  # same name twice
    dest = tmp_path / "sorted"
    log = sort_into(preds, dest, min_confidence=0.8)
    assert sorted(p.name for p in (dest / "ants").iterdir()) == sorted([src[0].name, src[0].stem + "-2.jpg"])
    assert [p.name for p in (dest / "unsure").iterdir()] == [src[1].name]
    assert all(p.exists() for p in src)  # originals untouched
    rows = list(csv.DictReader(log.open()))
    assert [r["predicted"] for r in rows] == ["ants", "bees", "ants"]
    assert rows[1]["copied_to"].endswith("unsure/" + src[1].name)
    assert sort_into(preds[:1], dest).name == "sorted-2.csv"  # an earlier log is kept too
