"""Hostile folders and runaway runs: what is not an image file at all, runs that go wrong numerically, and the
run folder itself. Every case is named, bounded and leaves the user's files as they were."""

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from finetune.cli import app
from finetune.quality.doctor import check_dataset
from finetune.training.outputs import LOCK_FILE, RunLock

runner = CliRunner()
HOSTILE = {  # entry -> what the skip message says
    "zero.jpg": "a device, not an image file",
    "pipe.jpg": "a FIFO (named pipe), not an image file",
    "sock.jpg": "a socket, not an image file",
    "loop_a.jpg": "a symbolic link loop",
    "dangling.jpg": "dangling link",
}


def _hostile(root: Path, tiny_data: Path) -> Path:
    """tiny_data plus, in train/ants, every kind of entry that is not an image file (and an empty image)."""
    shutil.copytree(tiny_data, root)
    ants = root / "train" / "ants"
    (ants / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(ants / "pipe.jpg")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(ants / "sock.jpg"))
    s.close()
    (ants / "loop_a.jpg").symlink_to(ants / "loop_b.jpg")
    (ants / "loop_b.jpg").symlink_to(ants / "loop_a.jpg")
    (ants / "dangling.jpg").symlink_to(ants / "gone.jpg")
    (root / "val" / "bees" / "empty.jpg").write_bytes(b"")  # size 0, like /dev/zero's stat: never "a duplicate"
    return root


def test_entries_that_are_not_image_files_are_named_and_never_opened(tiny_data, tmp_path, monkeypatch):
    root = _hostile(tmp_path / "d", tiny_data)
    (root / "train" / "bees" / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):  # as root, chmod 000 does not lock anyone out: refuse this one folder here
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = check_dataset(str(root))
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    for name, reason in HOSTILE.items():
        assert reason in reasons[name], (name, reasons.get(name))
    assert "cannot read this folder (Permission denied)" in reasons["locked"]
    assert "empty file" in reasons["empty.jpg"]
    assert report["usable"] == 18 and report["duplicates"]["across_classes"] == []


def _capped(args: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """finetune ARGS in a process whose memory is capped (an unbounded read would fail, not eat the machine)."""
    def cap():
        limit = 8 * 1024**3  # torch itself needs ~5 GB of address space; a /dev/zero read would need all of it
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run([sys.executable, "-m", "finetune", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=cap)


@pytest.mark.slow
def test_check_train_and_predict_on_a_hostile_folder_stay_bounded_and_name_every_entry(tiny_data, tmp_path):
    root = _hostile(tmp_path / "d", tiny_data)
    for args in (["check", root], ["train", root, "--weights", "none", "--epochs", "1", "-b", "8", "-o", "run"],
                 ["predict", root / "train" / "ants", "-m", "run/best.pt"]):
        t = time.time()
        p = _capped(args, tmp_path)
        assert p.returncode == 0, (args[0], p.stderr[-2000:])
        assert time.time() - t < 240 and "Traceback" not in p.stderr
        for name, reason in HOSTILE.items():
            assert reason in next(line for line in p.stderr.splitlines() if name in line), (args[0], name)


def test_divergence_ends_the_run_before_anything_is_saved_from_it(tiny_data, in_tmp):
    r = runner.invoke(app, ["train", str(tiny_data), "--mode", "finetune", "--weights", "none", "--epochs", "2", "--lr",
                            "1e9", "-o", "r"])
    assert r.exit_code == 6, r.output
    assert "training diverged" in r.stderr and "try --lr" in r.stderr
    assert not (in_tmp / "r" / "best.pt").exists() and not (in_tmp / "runs" / "latest.json").exists()


def test_the_default_lr_follows_the_images_a_step_really_takes(tiny_data, in_tmp):
    r = runner.invoke(app, ["train", str(tiny_data), "--weights", "none", "--epochs", "1", "-b", "100000", "-o", "r",
                            "-q"])
    assert r.exit_code == 0, r.output
    config = json.loads((in_tmp / "r" / "config.json").read_text())
    assert config["lr_used"] == pytest.approx(1e-3 / 4 * 12)  # 12 training images, not 100000


def test_json_output_is_always_valid_json(trained_model, tiny_data, tmp_path):
    bad = tmp_path / "nan.pt"
    obj = torch.load(trained_model, weights_only=True)
    obj["state_dict"]["fc.bias"] = torch.full_like(obj["state_dict"]["fc.bias"], float("nan"))
    torch.save(obj, bad)
    r = runner.invoke(app, ["predict", str(tiny_data / "val"), "-m", str(bad), "--json"])
    rows = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert rows and all(p["probability"] is None for row in rows for p in row["predictions"])


@pytest.mark.slow
def test_a_run_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tiny_data, in_tmp):
    args = ["train", str(tiny_data), "--weights", "none", "--epochs", "1", "-b", "8", "-o", "r", "-q"]
    assert runner.invoke(app, args).exit_code == 0
    config = (in_tmp / "r" / "config.json").read_bytes()
    r = runner.invoke(app, [*args, "--epochs", "2"])
    assert r.exit_code == 2 and "the folder is not empty" in r.stderr and "--resume" in r.stderr
    assert (in_tmp / "r" / "config.json").read_bytes() == config  # nothing of the old run was touched
    (in_tmp / "r" / "notes.txt").write_text("mine")
    r = runner.invoke(app, [*args, "--overwrite"])
    assert r.exit_code == 2 and "notes.txt" in r.stderr  # --overwrite removes only what a run wrote
    (in_tmp / "r" / "notes.txt").unlink()
    r = runner.invoke(app, [*args, "--overwrite", "--seed", "5"])
    assert r.exit_code == 0, r.output
    assert json.loads((in_tmp / "r" / "config.json").read_text())["seed"] == 5


@pytest.mark.slow
def test_two_runs_into_one_folder_at_once_fail_clearly_and_a_crash_leaves_no_lock(tiny_data, in_tmp):
    (in_tmp / "r").mkdir()
    lock = RunLock(in_tmp / "r")  # another run, writing there right now
    try:
        r = runner.invoke(app, ["train", str(tiny_data), "--weights", "none", "--epochs", "1", "-o", "r"])
        assert r.exit_code == 5 and "another finetune run is writing to this run folder" in r.stderr
    finally:
        lock.release()
    code = f"from finetune.training.outputs import RunLock; RunLock(__import__('pathlib').Path({str(in_tmp / 'r')!r}))"
    subprocess.run([sys.executable, "-c", code + "; import os; os._exit(9)"], check=False)  # dies holding it
    assert (in_tmp / "r" / LOCK_FILE).exists()
    r = runner.invoke(app, ["train", str(tiny_data), "--weights", "none", "--epochs", "1", "-b", "8", "-o", "r", "-q"])
    assert r.exit_code == 0, r.output


def test_resume_after_the_data_changed_says_what_changed(tiny_data, tmp_path, in_tmp):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    r = runner.invoke(app, ["train", str(data), "--weights", "none", "--epochs", "2", "-b", "8", "-o", "r", "-q"])
    assert r.exit_code == 0
    gone = sorted((data / "train" / "ants").iterdir())[0]
    gone.unlink()
    shutil.copy(sorted((data / "val" / "bees").iterdir())[0], data / "train" / "bees" / "new.jpg")
    r = runner.invoke(app, ["train", "--resume", "r", "--epochs", "3"])
    assert r.exit_code == 3
    assert "1 image(s) added to train (e.g. train/bees/new.jpg (bees))" in r.stderr
    assert f"1 image(s) gone from train (e.g. train/ants/{gone.name} (ants))" in r.stderr


def test_a_broken_latest_pointer_is_a_model_file_error(in_tmp, tiny_data):
    (in_tmp / "runs").mkdir()
    (in_tmp / "runs" / "latest.json").write_text("{not json")
    r = runner.invoke(app, ["predict", str(tiny_data / "val")])
    assert r.exit_code == 4 and "runs/latest.json: unreadable" in r.stderr and "Traceback" not in r.output


def test_library_warnings_do_not_reach_the_user(trained_model, tiny_data, tmp_path, monkeypatch):
    import warnings

    import PIL.Image

    # As outside pytest: a warning is written to stderr (pytest would otherwise record it out of sight).
    monkeypatch.setattr(warnings, "showwarning", lambda message, category, *a, **k: sys.stderr.write(
        f"{category.__name__}: {message}\n"))
    warnings.simplefilter("always")

    Image.new("RGB", (40, 30), (9, 9, 9)).save(tmp_path / "big.png")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 1200 pixels: Pillow warns, does not refuse
    r = runner.invoke(app, ["predict", str(tmp_path / "big.png"), "-m", str(trained_model)])
    assert r.exit_code == 0, r.output
    assert "Warning" not in r.stderr and "warn" not in r.stderr.lower()
    obj = torch.load(trained_model, weights_only=True)
    torch.save(obj, tmp_path / "p4.pt", pickle_protocol=4)  # torch warns about the protocol, then refuses it
    r = runner.invoke(app, ["predict", str(tmp_path / "big.png"), "-m", str(tmp_path / "p4.pt")])
    assert r.exit_code == 4 and "Warning" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_many_classes_get_pictures_that_scale(tmp_path):
    from finetune.metrics.classification import classification_report
    from finetune.report.html import write_report

    classes = [f"class {i}" for i in range(300)]
    y = [i % 300 for i in range(900)]
    pred = [(t + (k % 3 == 0)) % 300 for k, t in enumerate(y)]
    summary = {"best_epoch": 1, "best_val_acc": 0.5, "val_metrics": classification_report(y, pred, classes)}
    t = time.time()
    paths = write_report(tmp_path, history=[{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0,
                                             "val_acc": 0.5, "lr": 0.01}], classes=classes, wrong=[],
                         filters_before=None, filters_after=None, config={}, summary=summary)
    assert time.time() - t < 60  # was minutes and gigabytes with a number in every one of 90,000 cells
    with Image.open(paths["confusion"]) as img:
        assert img.width * img.height < 2000 * 2000  # the top confusions as bars, not a 300 x 300 matrix
    confusions = paths["report"].read_text().split("<h2>Top confusions</h2>")[1].split("</table>")[0]
    assert confusions.count("<tr><td") == 20  # the 20 largest, each of 3 images; the first: class 0 taken for 1
    assert '<tr><td class="text">class 0</td><td>class 1</td><td>3</td></tr>' in confusions


def test_a_failing_report_is_one_warning_and_keeps_the_exit_code(tiny_data, in_tmp, monkeypatch):
    import finetune.training.outputs as outputs

    def boom(*a, **k):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr(outputs, "write_report", boom)
    r = runner.invoke(app, ["train", str(tiny_data), "--weights", "none", "--epochs", "1", "-b", "8", "-o", "r"])
    assert r.exit_code == 0, r.output
    assert r.stderr.count("could not draw the run's pictures (MemoryError") == 1
    assert (in_tmp / "r" / "best.pt").is_file() and (in_tmp / "r" / "results.json").is_file()
