"""finetune check: counts, unusable files, EXIF rotation, duplicates and leakage; duplicates kept together by splits."""

import json
import shutil

from PIL import Image
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data import dataset as D
from finetune.quality.doctor import check_dataset


def _photo(path, color, size=(48, 40), **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG", **save)
    return path


def _seeded(root):
    a = _photo(root / "train" / "ants" / "a.jpg", (200, 0, 0))
    shutil.copy(a, root / "train" / "ants" / "a copy.jpg")  # within class
    (root / "val" / "ants").mkdir(parents=True)
    shutil.copy(a, root / "val" / "ants" / "leak.jpg")  # train/val leakage
    b = _photo(root / "train" / "bees" / "b.jpg", (0, 200, 0))
    shutil.copy(b, root / "train" / "ants" / "mislabelled.jpg")  # conflicting labels (ants vs bees)
    _photo(root / "val" / "bees" / "c.jpg", (0, 0, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    _photo(root / "train" / "bees" / "rotated.jpg", (10, 10, 10), exif=exif)
    (root / "train" / "bees" / "empty.jpg").write_bytes(b"")
    (root / "train" / "bees" / "notes.txt").write_text("hi")
    return root


def test_report_finds_every_case(tmp_path):
    r = check_dataset(str(_seeded(tmp_path / "d")))
    assert r["counts"] == {"train": {"ants": 3, "bees": 3}, "val": {"ants": 1, "bees": 1}}
    assert r["images"] == 8 and r["usable"] == 7
    assert {s["path"]: s["reason"].split(" (")[0] for s in r["skipped"]} == {
        "train/bees/notes.txt": "not a supported image type", "train/bees/empty.jpg": "empty file"}
    assert r["exif_rotated"] == ["train/bees/rotated.jpg"]
    dup = r["duplicates"]
    leak = dup["train_val_leakage"]
    assert len(leak) == 1 and {m["path"] for m in leak[0]} == {"train/ants/a.jpg", "train/ants/a copy.jpg",
                                                                "val/ants/leak.jpg"}
    assert [{m["class"] for m in g} for g in dup["across_classes"]] == [{"ants", "bees"}]
    assert dup["within_class"] == []  # the a.jpg group is reported as leakage, which is worse
    assert r["modes"] == {"RGB": 7} and r["sizes"]["max"] == [48, 40]


def test_cli_json_on_stdout_table_on_stderr(tmp_path):
    r = CliRunner().invoke(app, ["check", str(_seeded(tmp_path / "d")), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["usable"] == 7
    assert "identical files in train and val (leakage)" in r.stderr
    assert "conflicting labels" in r.stderr and "train/bees/empty.jpg: empty file" in r.stderr


def test_automatic_split_keeps_duplicates_on_one_side(tmp_path):
    root = tmp_path / "flat"
    for i in range(10):
        _photo(root / "x" / f"{i}.jpg", (i * 20, 0, 0))
        _photo(root / "y" / f"{i}.jpg", (0, i * 20, 0))
    for k in range(4):  # four copies of x/0.jpg
        shutil.copy(root / "x" / "0.jpg", root / "x" / f"dup{k}.jpg")
    for seed in range(8):
        split = D.find_dataset(root, val_fraction=0.3, seed=seed)
        copies = [s for s in split.train + split.val if s.path.endswith("/x/0.jpg") or "/x/dup" in s.path]
        assert len(copies) == 5
        assert len({s in split.val for s in copies}) == 1, seed


def test_split_never_empties_train_of_a_class_made_of_copies(tmp_path):
    root = tmp_path / "flat"
    for i in range(3):
        _photo(root / "same" / f"{i}.jpg", (9, 9, 9))  # three identical files
        _photo(root / "varied" / f"{i}.jpg", (i * 60, 0, 0))
    split = D.find_dataset(root, val_fraction=0.34)
    assert split.counts()["train"]["same"] == 3
