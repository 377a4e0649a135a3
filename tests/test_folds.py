"""k-fold cross-validation: stratified, disjoint folds that cover the data; one model per fold; mean +- sd."""

import json
import statistics
from collections import Counter

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data import dataset as D
from finetune.errors import DatasetError

runner = CliRunner()


def test_folds_are_disjoint_cover_everything_and_are_stratified():
    samples = [D.Sample(f"a{i}.jpg", 0) for i in range(23)] + [D.Sample(f"b{i}.jpg", 1) for i in range(11)]
    groups = {"a0.jpg": "a0.jpg", "a1.jpg": "a0.jpg", "a2.jpg": "a0.jpg"}  # three copies of one photo
    folds = D.stratified_folds(samples, 5, seed=3, groups=groups)
    paths = [s.path for f in folds for s in f]
    assert sorted(paths) == sorted(s.path for s in samples) and len(paths) == len(set(paths))
    for label, total in ((0, 23), (1, 11)):
        counts = [sum(s.label == label for s in f) for f in folds]
        assert sum(counts) == total and max(counts) - min(counts) <= 2  # the 3-copy group may tip one fold
    holding = [i for i, f in enumerate(folds) for s in f if s.path in groups]
    assert len(set(holding)) == 1  # copies stay in one fold
    assert D.stratified_folds(samples, 5, seed=3, groups=groups) == folds  # seeded
    assert D.stratified_folds(samples, 5, seed=4, groups=groups) != folds


def test_find_dataset_fold_pools_train_and_val(tiny_data):
    splits = [D.find_dataset(tiny_data, folds=3, fold=i) for i in (1, 2, 3)]
    vals = [s.path for split in splits for s in split.val]
    assert len(vals) == len(set(vals)) == 18  # 6 + 3 per class, both classes, pooled
    for split in splits:
        assert Counter(s.label for s in split.val) == {0: 3, 1: 3}
        assert not {s.path for s in split.train} & {s.path for s in split.val}
        assert len(split.train) == 12 and "fold" in split.layout
    with pytest.raises(DatasetError, match="too few for --folds 10") as e:
        D.find_dataset(tiny_data, folds=10, fold=1)
    assert e.value.exit_code == 3


@pytest.mark.slow
def test_cli_folds_trains_one_model_per_fold(tiny_data, tmp_path):
    out = tmp_path / "cv"
    r = runner.invoke(app, ["train", str(tiny_data), "--weights", "none", "--epochs", "1", "-b", "4", "--folds", "2",
                            "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out / "folds.json")
    summary = json.loads((out / "folds.json").read_text())
    accs = [f["val_acc"] for f in summary["folds"]]
    assert len(accs) == 2 and summary["mean_val_acc"] == pytest.approx(statistics.mean(accs))
    assert summary["sd_val_acc"] == pytest.approx(statistics.stdev(accs))
    assert summary["images"] == 18
    for i in (1, 2):
        config = json.loads((out / f"fold-{i}" / "config.json").read_text())
        assert config["fold"] == i and config["folds"] == 2 and (out / f"fold-{i}" / "best.pt").is_file()
    assert "2-fold cross-validation" in r.stderr and "mean ± sd" in r.stderr
    r = runner.invoke(app, ["train", str(tiny_data), "--weights", "none", "--folds", "1"])
    assert r.exit_code == 2 and "--folds 1" in r.stderr
