"""Dataset discovery: layouts, classes, stratified splits, what folders hold besides images."""

from pathlib import Path

import pytest
from PIL import Image

from finetune.data import dataset as D
from finetune.errors import DatasetError


def _jpeg(path: Path, color=(200, 30, 30), size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG")
    return path


def test_train_val_layout_used_as_given(tiny_data):
    split = D.find_dataset(tiny_data)
    assert split.classes == ["ants", "bees"]
    assert split.counts() == {"train": {"ants": 6, "bees": 6}, "val": {"ants": 3, "bees": 3}}
    assert all("/train/" in s.path for s in split.train)
    assert all("/val/" in s.path for s in split.val)


@pytest.mark.parametrize("val_name", ["valid", "validation", "VAL"])
def test_val_folder_aliases(tmp_path, val_name):
    for split in ("train", val_name):
        for cls in ("a", "b"):
            _jpeg(tmp_path / split / cls / "x.jpg")
    split = D.find_dataset(tmp_path)
    assert len(split.train) == 2 and len(split.val) == 2
    assert split.layout.startswith("train/ + " + val_name)


def test_flat_layout_is_split_stratified_and_reproducible(flat_data):
    a = D.find_dataset(flat_data, val_fraction=1 / 3, seed=1)
    b = D.find_dataset(flat_data, val_fraction=1 / 3, seed=1)
    c = D.find_dataset(flat_data, val_fraction=1 / 3, seed=2)
    assert a.counts() == {"train": {"ants": 6, "bees": 6}, "val": {"ants": 3, "bees": 3}}
    assert a.train == b.train and a.val == b.val
    assert {s.path for s in a.val} != {s.path for s in c.val}
    assert not {s.path for s in a.train} & {s.path for s in a.val}
    assert {s.path for s in a.train} | {s.path for s in a.val} == {str(p) for p in flat_data.glob("*/*.jpg")}


def test_stratified_split_keeps_class_proportions():
    samples = [D.Sample(f"a{i}", 0) for i in range(90)] + [D.Sample(f"b{i}", 1) for i in range(10)]
    train, val = D.stratified_split(samples, 0.2, seed=0)
    assert sum(s.label == 0 for s in val) == 18
    assert sum(s.label == 1 for s in val) == 2
    assert len(train) == 80


def test_extensions_case_insensitive_and_junk_ignored(tmp_path):
    _jpeg(tmp_path / "cats" / "A.JPG")
    _jpeg(tmp_path / "cats" / "b.Jpeg")
    _jpeg(tmp_path / "dogs" / "c.jpg")
    _jpeg(tmp_path / "dogs" / "d.png")
    _jpeg(tmp_path / "dogs" / "._d.jpg")  # macOS resource fork
    _jpeg(tmp_path / ".ipynb_checkpoints" / "e.jpg")  # would become class 0 in ImageFolder
    _jpeg(tmp_path / "__MACOSX" / "cats" / "f.jpg")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    classes, samples = D._scan(tmp_path)
    assert classes == ["cats", "dogs"]
    assert sorted(Path(s.path).name for s in samples) == ["A.JPG", "b.Jpeg", "c.jpg", "d.png"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: None, "no such folder"),
        (lambda r: (r.parent.mkdir(parents=True, exist_ok=True), r.write_text("x")), "is a file"),
        (lambda r: _jpeg(r / "loose.jpg"), "images lie directly in it"),
        (lambda r: _jpeg(r / "only" / "x.jpg"), "found 1 class"),
        (lambda r: (_jpeg(r / "a" / "x.jpg"), _jpeg(r / "a" / "y.jpg"), (r / "b").mkdir()), "class 'b' has no images"),
    ],
)
def test_dataset_shape_errors(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DatasetError, match=message) as e:
        D.find_dataset(root)
    assert e.value.exit_code == 3


def test_val_classes_must_match_train(tmp_path):
    for cls in ("a", "b"):
        _jpeg(tmp_path / "train" / cls / "x.jpg")
    _jpeg(tmp_path / "val" / "a" / "x.jpg")
    _jpeg(tmp_path / "val" / "c" / "x.jpg")
    with pytest.raises(DatasetError, match=r"missing: \['b'\].*extra: \['c'\]"):
        D.find_dataset(tmp_path)


def test_too_few_images_for_split(tmp_path):
    _jpeg(tmp_path / "a" / "x.jpg")
    _jpeg(tmp_path / "b" / "x.jpg")
    _jpeg(tmp_path / "b" / "y.jpg")
    with pytest.raises(DatasetError, match="too few to hold out"):
        D.find_dataset(tmp_path)


def test_classes_differing_by_case_are_an_error(tmp_path):
    _jpeg(tmp_path / "Cat" / "x.jpg")
    _jpeg(tmp_path / "cat" / "y.jpg")
    if len({p.name for p in tmp_path.iterdir()}) < 2:
        pytest.skip("case-insensitive file system")
    with pytest.raises(DatasetError, match="differ only by case"):
        D.find_dataset(tmp_path)


def test_symlink_loop_does_not_duplicate_samples(tmp_path):
    for cls in ("a", "b"):
        _jpeg(tmp_path / cls / "x.jpg")
        _jpeg(tmp_path / cls / "y.jpg")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a")
    classes, samples = D._scan(tmp_path)
    assert len(samples) == 4
