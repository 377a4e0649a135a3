"""check --labels: label issues from K-fold heads + cleanlab, near-duplicates and outliers, review copies; measured
on real photos with the shared real MobileNetV2 weights (skipped where they are absent; under CI=true, failed)."""

import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config import TrainConfig
from finetune.errors import UsageError
from finetune.quality import label_errors as trust
from finetune.quality import near_duplicates as similar
from finetune.training import label_issues

REPO = Path(__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _blobs(n, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(2, d, generator=g) * 2
    y = torch.arange(n) % 2
    return centers[y] + torch.randn(n, d, generator=g), y.tolist()


def test_heads_never_score_their_own_images_and_cleanlab_ranks_flips_first():
    x, y = _blobs(200)
    flipped = set(random.Random(1).sample(range(200), 10))
    noisy = [1 - v if i in flipped else v for i, v in enumerate(y)]
    probs = label_issues.out_of_sample_probabilities(x, noisy, 2, l2=0.03)  # L2 given: fit_probe's search is tested apart
    assert probs.shape == (200, 2) and torch.allclose(probs.sum(1), torch.ones(200))
    flagged, quality = label_issues.rank_label_issues(noisy, probs)
    ranked = sorted(range(200), key=lambda i: quality[i])
    assert len(set(ranked[:10]) & flipped) >= 8  # chance: 0.5 of 10
    assert set(flagged) & flipped and len(set(flagged) & flipped) / len(flagged) >= 0.7
    # in-sample heads would have learnt the flips; out-of-sample ones give a flipped image little to its label
    assert sum(float(probs[i, noisy[i]]) for i in flipped) / 10 < 0.3


def test_the_noise_estimate_counts_disagreements_only_where_the_heads_are_surest():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(100, 3, generator=g), 1) * 0.5 + 0.1  # unsure heads: max at most 0.6
    probs[:20] = torch.tensor([0.98, 0.01, 0.01])  # the fifth they are surest about: class 0
    labels = [0] * 18 + [1, 2] + [int(v) for v in (probs[20:].argmax(1) + 1) % 3]  # the unsure fifths all disagree
    est = trust.noise_estimate(labels, probs)
    assert est["basis_images"] == 20 and est["basis_disagreeing"] == 2 and est["rate"] == pytest.approx(0.1)
    low, high = est["ci95"]
    assert 0.02 < low < 0.1 < high < 0.35 and est["expected_wrong"] == 10  # not the 82 % the heads disagree with


def test_check_labels_reads_as_a_queue_to_review_never_as_a_count_of_wrong_labels(capsys):
    from finetune.cli.trust import render_labels

    suspects = [{"path": f"cats/{i}.jpg", "split": "train", "given": "siamese", "suggested": "birman",
                 "confidence": 0.8} for i in range(230)]
    render_labels({"folds": 5, "images": 995, "out_of_sample_accuracy": 0.70, "suspects": suspects,
                   "noise_estimate": {"rate": 0.06, "ci95": [0.035, 0.10], "images": 995, "basis_images": 199,
                                      "basis_disagreeing": 12, "expected_wrong": 60}})
    text = " ".join(capsys.readouterr().err.split())
    assert "agree with 70.0% of the 995 labels" in text and "estimated 6.0% (95 % interval 3.5%-10.0%)" in text
    assert "review these 230 first" in text and "not a count of wrong labels" in text
    assert "many are the heads' own mistakes" in text  # even 10 % of 995 is fewer than the 230 queued
    assert "label error" not in text


def test_a_class_with_one_image_is_refused():
    from finetune.errors import DatasetError

    with pytest.raises(DatasetError, match="at least 2 images of every class"):
        label_issues.fold_count([0, 0, 0, 1], 2)
    assert label_issues.fold_count([0] * 3 + [1] * 9, 2) == 3  # the smallest class caps K


def test_near_duplicate_pairs_groups_and_outliers_on_known_vectors():
    g = torch.Generator().manual_seed(0)
    center = torch.randn(64, generator=g)
    base = center + 1.2 * torch.randn(30, 64, generator=g)  # one kind of photo: similar, none a copy
    feats = torch.cat([base, base[:2] + 0.05 * torch.randn(2, 64, generator=g), -center[None]])
    pairs, knn = similar.neighbours(feats, threshold=0.9, k=5)
    assert sorted((i, j) for i, j, _ in pairs) == [(0, 30), (1, 31)]
    assert sorted(m for m, _ in similar._groups(len(feats), pairs)) == [[0, 30], [1, 31]]
    flagged, limit = similar.outliers(knn)
    assert flagged[0] == 32 and knn[32] > limit


def test_review_copies_never_moves_and_refuses_a_folder_inside_the_dataset(tmp_path, tiny_data):
    suspects = [{"path": "train/ants/" + sorted(os.listdir(tiny_data / "train" / "ants"))[0], "split": "train",
                 "given": "ants", "suggested": "bees", "confidence": 0.9, "given_probability": 0.1, "quality": 0.1}]
    before = sorted(p.name for p in (tiny_data / "train" / "ants").iterdir())
    done = trust.review_into(suspects, str(tiny_data), tmp_path / "rev")
    again = trust.review_into(suspects, str(tiny_data), tmp_path / "rev")
    assert (tmp_path / "rev" / "ants->bees" / Path(suspects[0]["path"]).name).is_file()
    assert done["copied"] == 1 and again["copied"] == 0  # an identical copy already there is kept
    assert sorted(p.name for p in (tiny_data / "train" / "ants").iterdir()) == before
    assert "ants->bees" in (tmp_path / "rev" / "review.csv").read_text()
    with pytest.raises(UsageError, match="inside the dataset"):
        trust.review_into(suspects, str(tiny_data), tiny_data / "review")


def test_missing_cleanlab_is_a_usage_error_naming_the_extra(monkeypatch, tiny_data):
    monkeypatch.setitem(sys.modules, "cleanlab", None)
    r = invoke("check", tiny_data, "--labels")
    assert r.exit_code == 2 and "pip install 'finetune[labels]'" in r.output


def test_check_labels_refuses_a_family_without_an_embedding_and_review_without_labels(tiny_data):
    r = invoke("check", tiny_data, "--labels", "-m", "squeezenet1_0", "--weights", "none")
    assert r.exit_code == 2 and "squeezenet1_0" in r.output and "Traceback" not in r.output
    r = invoke("check", tiny_data, "--review-into", "rev")
    assert r.exit_code == 2 and "add --labels" in r.output


def _copy_sample(dst: Path) -> Path:
    shutil.copytree(REPO / "sample_data", dst)
    return dst


@pytest.fixture
def real_cache(tmp_path_factory, monkeypatch):
    """One feature cache for the real-weights tests of this module (each computes its own dataset's features)."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "real-cache"))


@pytest.mark.slow
def test_flipped_labels_are_ranked_first_with_real_weights(tmp_path, real_cache, real_weights):
    data = _copy_sample(tmp_path / "noisy")
    files = sorted((data / "train" / "ants").iterdir())[:2] + sorted((data / "train" / "bees").iterdir())[:2]
    moved = set()
    for f in files:
        other = "bees" if f.parent.name == "ants" else "ants"
        f.rename(data / "train" / other / f.name)
        moved.add(f"train/{other}/{f.name}")
    cfg = TrainConfig(data=str(data), model="mobilenet_v2", weights=str(real_weights), workers=1)
    r = trust.check_trust(cfg, review=str(tmp_path / "rev"))
    top = [s["path"] for s in r["labels"]["suspects"][:8]]
    assert len(moved & set(top)) >= 3  # 4 flipped among 48 images: 8 drawn at random would hold 0.67
    first = r["labels"]["suspects"][0]
    assert first["suggested"] != first["given"] and first["confidence"] > 0.5
    assert (tmp_path / "rev" / "review.csv").is_file() and not (data / "rev").exists()


@pytest.mark.slow
def test_reencoded_and_resized_copies_are_near_duplicates_and_unrelated_photos_are_not(tmp_path, real_cache,
                                                                                         real_weights):
    data = _copy_sample(tmp_path / "copies")
    a, b = sorted((data / "train" / "ants").iterdir())[3], sorted((data / "val" / "bees").iterdir())[2]
    with Image.open(a) as img:
        img.convert("RGB").save(data / "train" / "bees" / "copy-q60.jpg", quality=60)
    with Image.open(b) as img:
        small = img.convert("RGB").resize((round(img.width * 0.75), round(img.height * 0.75)), Image.LANCZOS)
        small.save(data / "train" / "ants" / "copy-75.jpg", quality=90)
    emb = trust.embed(TrainConfig(data=str(data), model="mobilenet_v2", weights=str(real_weights), workers=1))
    found = similar.near_duplicates(emb)
    groups = [sorted(m["path"] for m in g["members"]) for g in found["across_classes"]]
    assert sorted(groups) == sorted([sorted([str(a.relative_to(data)), "train/bees/copy-q60.jpg"]),
                                     sorted([str(b.relative_to(data)), "train/ants/copy-75.jpg"])])
    assert found["within_class"] == []  # no two distinct photos of the set are taken for copies
    leaked = [sorted(m["path"] for m in g["members"]) for g in found["train_val_leakage"]]
    assert leaked == [sorted([str(b.relative_to(data)), "train/ants/copy-75.jpg"])]


@pytest.mark.slow
def test_check_labels_cli_json_and_review(tmp_path, real_cache, real_weights):
    data = _copy_sample(tmp_path / "d")
    r = invoke("check", data, "--labels", "-m", "mobilenet_v2", "--weights", real_weights, "--json", "--review-into",
               tmp_path / "rev", "-j", "1")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert {"labels", "near_duplicates", "outliers", "review"} <= set(report)
    assert report["labels"]["images"] == 48 and report["labels"]["out_of_sample_accuracy"] > 0.75
    est = report["labels"]["noise_estimate"]
    assert est["basis_images"] == 10 and est["ci95"][0] <= est["rate"] <= est["ci95"][1]
    assert all({"path", "given", "suggested", "confidence"} <= set(s) for s in report["labels"]["suspects"])


@pytest.mark.slow
def test_a_feature_extract_run_reports_label_issues_and_a_finetune_run_says_how(tiny_data, tmp_path):
    from finetune.training import run_training

    fe = run_training(TrainConfig(data=str(tiny_data), weights="none", mode="feature-extract", augment="none",
                                  output=str(tmp_path / "fe"), workers=1))
    issues = json.loads((fe.run_dir / "results.json").read_text())["label_issues"]
    assert issues["folds"] == 5 and issues["images"] == 18 and 0 <= issues["out_of_sample_accuracy"] <= 1
    assert "Likely label errors" in (fe.run_dir / "report.html").read_text()
    ft = run_training(TrainConfig(data=str(tiny_data), mode="finetune", weights="none", epochs=1,
                                  output=str(tmp_path / "ft"), workers=1))
    assert "finetune check" in ft.summary["label_issues"]["skipped"]
