"""Label files as a data source: columns detected or named, header-less files, split column, paths resolved
(extensions searched, the images' subfolder found), errors with line numbers; the same split as the folder
layout; multi-label datasets split by iterative stratification with every label balanced."""

import json
import os
import random
import shutil

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data import dataset as D
from finetune.data.labelfile import LabelFileOptions, read_label_file
from finetune.data.stratify import iterative_stratification, label_balance
from finetune.errors import DatasetError, UsageError


def _csv(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _rows(flat_data, root):
    """(relative path, class) of the flat_data photos copied under root."""
    rows = []
    for cls in ("ants", "bees"):
        for f in sorted((flat_data / cls).iterdir()):
            (root / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / cls / f.name)
            rows.append((f"{cls}/{f.name}", cls))
    return rows


def test_label_file_gives_the_same_split_as_the_folder_layout(flat_data, tmp_path):
    rows = _rows(flat_data, tmp_path / "photos")
    lf = _csv(tmp_path / "photos" / "labels.csv", ["path,label"] + [f"{p},{c}" for p, c in rows])
    by_folder = D.find_dataset(tmp_path / "photos", 0.25, seed=3)
    by_file = D.find_dataset(lf, 0.25, seed=3)
    assert by_file.classes == by_folder.classes == ["ants", "bees"]
    assert by_file.train == by_folder.train and by_file.val == by_folder.val
    assert not by_file.multi_label and by_file.layout.startswith("labels.csv, path column 'path'")


def test_columns_detected_named_or_headerless(flat_data, tmp_path):
    rows = _rows(flat_data, tmp_path)
    named = _csv(tmp_path / "a.csv", ["id,breed,note"] + [f"{p},{c},x" for p, c in rows])
    with pytest.raises(DatasetError, match="cannot tell which column holds the labels .*--label-col"):
        read_label_file(named)  # the paths are found by their values; breed or note is the user's call
    unnamed = _csv(tmp_path / "u.csv", ["a,b,c"] + [f"x{i},{c},y" for i, (p, c) in enumerate(rows)])
    with pytest.raises(DatasetError, match="cannot tell which column holds the image paths.*--path-col"):
        read_label_file(unnamed)  # no column names an image
    assert len(read_label_file(named, LabelFileOptions(path_col="id", label_col="breed")).rows) == len(rows)
    with pytest.raises(UsageError, match="--label-col kind: .* no such column"):
        read_label_file(named, LabelFileOptions(path_col="id", label_col="kind"))
    two = _csv(tmp_path / "b.csv", ["id,breed"] + [f"{p},{c}" for p, c in rows])
    assert read_label_file(two, LabelFileOptions(path_col="id")).classes == ["ants", "bees"]  # the other column
    table = read_label_file(two)  # as a user reads it: id names the image files, breed is the other column
    assert table.classes == ["ants", "bees"] and len(table.rows) == len(rows)
    assert table.columns == "path column 'id' (its values name image files), label column 'breed' (the other column)"
    reversed_ = _csv(tmp_path / "r.csv", ["breed,id"] + [f"{c},{os.path.splitext(p)[0]}" for p, c in rows])
    assert [r.path for r in read_label_file(reversed_).rows] == [r.path for r in table.rows]  # ids without .jpg
    headerless = _csv(tmp_path / "c.tsv", [f"{p}\t{c}" for p, c in rows])
    assert len(read_label_file(headerless).rows) == len(rows)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": p, "tags": [c, "photo"]}) for p, c in rows) + "\n")
    table = read_label_file(jsonl)
    assert table.multi_label and table.classes == ["ants", "bees", "photo"]


def test_ids_without_extension_find_images_in_the_one_subfolder_holding_them(flat_data, tmp_path):
    rows = _rows(flat_data, tmp_path / "train")
    ids = [(p.split("/")[1].rsplit(".", 1)[0], c) for p, c in rows]
    for p, _ in rows:  # flatten: train/<name>.jpg
        shutil.move(tmp_path / "train" / p, tmp_path / "train" / p.split("/")[1])
    lf = _csv(tmp_path / "labels.csv", ["id,breed", *[f"{i},{c}" for i, c in ids], "0000missing,ants",
                                          "0000gone,bees"])
    split = D.find_dataset(lf, labels=LabelFileOptions(path_col="id"))
    assert split.root == str(tmp_path / "train") and len(split.train) + len(split.val) == len(rows)
    assert split.missing == [(len(ids) + 2, "0000missing"), (len(ids) + 3, "0000gone")]
    assert "images in" in split.layout


def test_errors_name_the_line(flat_data, tmp_path):
    rows = _rows(flat_data, tmp_path)
    body = [f"{p},{c}" for p, c in rows]
    cases = [(["path,label", body[0], "../escape.jpg,ants"], "line 3: ../escape.jpg lies outside"),
             (["path,label", body[0], f"{rows[1][0]},"], "line 3: .* has no label"),
             (["path,label", body[0], body[1], body[0]], "line 4: repeats line 2"),
             (["path,label", body[0], f"{rows[0][0]},bees"], "line 3: .* labelled 'bees' here and 'ants' on line 2"),
             (["path,label", body[0], body[1]], "every row has the label 'ants'")]
    for lines, message in cases:
        with pytest.raises(DatasetError, match=message):
            read_label_file(_csv(tmp_path / "bad.csv", lines))


def test_split_column_and_strict(flat_data, tmp_path):
    rows = _rows(flat_data, tmp_path)
    parts = ["train", "train", "val", "test"] * 10
    lf = _csv(tmp_path / "s.csv", ["path,label,split"] + [f"{p},{c},{s}" for (p, c), s in zip(rows, parts)])
    split = D.find_dataset(lf)
    assert split.layout.endswith("its split column")
    assert {s.path for s in split.val} == {str(tmp_path / p) for (p, _), s in zip(rows, parts) if s == "val"}
    assert len(split.train) == sum(s == "train" for s in parts[:len(rows)])  # test rows are kept for evaluate
    samples, _, _ = D.labelled_samples(str(lf), ["ants", "bees"])
    assert {s.path for s in samples} == {str(tmp_path / p) for (p, _), s in zip(rows, parts) if s == "test"}
    missing = _csv(tmp_path / "m.csv", ["path,label"] + [f"{p},{c}" for p, c in rows] + ["nothere.jpg,ants"])
    r = CliRunner().invoke(app, ["train", str(missing), "--strict", "--weights", "none", "-o", str(tmp_path / "o")])
    assert r.exit_code == 3 and "--strict: 1 row(s)" in r.output and "nothere.jpg" in r.output


def test_iterative_stratification_balances_every_label():
    rng = random.Random(0)
    items = [tuple(sorted(rng.sample(range(8), rng.choice([1, 1, 2, 3])))) for _ in range(600)]
    items += [(8,)] * 10  # a rare label
    fractions = [0.8, 0.2]
    parts = iterative_stratification(items, fractions, seed=1)
    assert label_balance(items, parts, fractions) < 0.03  # every label within 3 points of its share
    naive = [rng.random() < 0.2 for _ in items]
    assert label_balance(items, parts, fractions) < label_balance(items, [int(v) for v in naive], fractions)
    assert sum(p == 1 for p in parts) == pytest.approx(0.2 * len(items), abs=3)
    assert parts == iterative_stratification(items, fractions, seed=1)
    groups = [i // 2 for i in range(len(items))]  # pairs stay together
    grouped = iterative_stratification(items, [0.25] * 4, seed=0, groups=groups)
    assert all(grouped[i] == grouped[i + 1] for i in range(0, len(items), 2))
    common = [(labels, part) for labels, part in zip(items, grouped) if labels != (8,)]
    # Within 7 points for every common label (the rare one's 5 pairs cannot split evenly over 4 folds), and better
    # than pairs dealt out at random.
    assert label_balance(*zip(*common), [0.25] * 4) < 0.07
    dealt = [rng.randrange(4) for _ in range(len(items) // 2)]
    at_random = [(labels, dealt[i // 2]) for i, labels in enumerate(items) if labels != (8,)]
    assert label_balance(*zip(*common), [0.25] * 4) < label_balance(*zip(*at_random), [0.25] * 4)


def test_multi_label_folds_cover_every_image_once(flat_data, tmp_path):
    rows = _rows(flat_data, tmp_path)
    lf = _csv(tmp_path / "m.csv", ["path,labels"] + [f"{p},{c};{'odd' if i % 2 else 'even'}"
                                                     for i, (p, c) in enumerate(rows)])
    seen = []
    for fold in (1, 2, 3):
        split = D.find_dataset(lf, folds=3, fold=fold, seed=0)
        assert split.multi_label and split.classes == ["ants", "bees", "even", "odd"]
        assert all(len(s.labels) == 2 for s in split.val)
        seen += [s.path for s in split.val]
    assert sorted(seen) == sorted(str(tmp_path / p) for p, _ in rows)


def test_evaluate_and_predict_take_a_label_file(trained_model, flat_data, tmp_path):
    rows = _rows(flat_data, tmp_path / "photos")
    lf = _csv(tmp_path / "photos" / "labels.csv", ["file,class"] + [f"{p},{c}" for p, c in rows] + ["gone.jpg,ants"])
    r = CliRunner().invoke(app, ["evaluate", str(lf), "-m", str(trained_model), "--json", "-q"])
    assert r.exit_code == 0, r.output
    by_file = json.loads(r.stdout)
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "photos"), "-m", str(trained_model), "--json", "-q"])
    by_folder = json.loads(r.stdout)
    assert by_file["images"] == by_folder["images"] == len(rows)
    assert by_file["confusion_matrix"] == by_folder["confusion_matrix"]
    assert any("line" in s["reason"] and "gone.jpg" in s["path"] for s in by_file["skipped"])
    r = CliRunner().invoke(app, ["predict", str(lf), "-m", str(trained_model), "--sort-into", str(tmp_path / "out"),
                                 "-q"])
    assert r.exit_code == 0, r.output
    copied = sorted(f.name for f in (tmp_path / "out").rglob("*.jpg"))
    assert copied == sorted(p.split("/")[1] for p, _ in rows)


@pytest.mark.slow
def test_label_file_trains_to_the_same_accuracy_as_the_folder(flat_data, tmp_path):
    rows = _rows(flat_data, tmp_path / "photos")
    lf = _csv(tmp_path / "photos" / "labels.csv", ["path,label"] + [f"{p},{c}" for p, c in rows])
    results = []
    for name, data in (("folder", tmp_path / "photos"), ("file", lf)):
        r = CliRunner().invoke(app, ["train", str(data), "--weights", "none", "--mode", "feature-extract",
                                     "--val-fraction", "0.25", "-o", str(tmp_path / name), "-q"])
        assert r.exit_code == 0, r.output
        results.append(json.loads((tmp_path / name / "results.json").read_text()))
        split = json.loads((tmp_path / name / "split.json").read_text())
        results[-1]["split"] = split["val"]
    assert results[0]["split"] == results[1]["split"]
    assert results[0]["best_val_acc"] == results[1]["best_val_acc"]
    assert results[0]["val_metrics"]["confusion_matrix"] == results[1]["val_metrics"]["confusion_matrix"]
