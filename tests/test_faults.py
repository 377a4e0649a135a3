"""Interrupts, exact resume, kill -9 at any moment: never a truncated file, never lost work."""

import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from finetune._util.files import TEMP_PREFIX
from finetune.cli import app
from finetune.config import TrainConfig
from finetune.errors import FinetuneError, Interrupted
from finetune.models.model_file import load_model_file
from finetune.training import resume as R
from finetune.training import run_training


def _cfg(data, out, epochs=4, **kw):
    return TrainConfig(data=str(data), mode="finetune", weights="none", epochs=epochs, batch_size=4, output=str(out), workers=0,
                       deterministic=True, **kw)


@pytest.mark.slow
def test_two_epochs_interrupt_resume_equals_four_straight(tiny_data, tmp_path):
    straight = run_training(_cfg(tiny_data, tmp_path / "a"))
    epochs_done = []

    def emit(event, **kw):
        if event == "epoch_end":
            epochs_done.append(kw["row"]["epoch"])

    with pytest.raises(Interrupted) as e:
        run_training(_cfg(tiny_data, tmp_path / "b"), emit, stop=lambda: signal.SIGINT if len(epochs_done) >= 2
                       else 0)
    assert e.value.exit_code == 130 and e.value.run_dir == tmp_path / "b"
    assert epochs_done == [1, 2]
    cfg, state = R.resume_config(tmp_path / "b", {})
    assert state["epoch"] == 2
    resumed = run_training(cfg, resume=state)
    assert [r["val_acc"] for r in resumed.history] == [r["val_acc"] for r in straight.history]
    a = torch.load(tmp_path / "a" / R.STATE_FILE, weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / R.STATE_FILE, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_epoch_interrupt_resume_is_bit_exact_fast(tiny_data, tmp_path):
    """The fast subset's exact-resume check (a small network, 2 epochs; the test above runs resnet18 for 4): the
    resumed run's weights equal an uninterrupted run's bit for bit."""
    cfg = lambda out: _cfg(tiny_data, out, epochs=2, model="mobilenet_v3_small", train_size=64)  # noqa: E731
    straight = run_training(cfg(tmp_path / "a"))
    done = []
    with pytest.raises(Interrupted):
        run_training(cfg(tmp_path / "b"), lambda e, **kw: done.append(e) if e == "epoch_end" else None,
                     stop=lambda: signal.SIGINT if done else 0)
    resumed_cfg, state = R.resume_config(tmp_path / "b", {})
    resumed = run_training(resumed_cfg, resume=state)
    assert state["epoch"] == 1 and [r["epoch"] for r in resumed.history] == [1, 2]
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    a = torch.load(tmp_path / "a" / R.STATE_FILE, weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / R.STATE_FILE, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_classes_or_architecture(tiny_data, tmp_path):
    run_training(_cfg(tiny_data, tmp_path / "r", epochs=1))
    with pytest.raises(FinetuneError, match="--model alexnet differs from that run's 'resnet18'") as e:
        R.resume_config(tmp_path / "r", {"model": "alexnet"})
    assert e.value.exit_code == 2
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    for split in ("train", "val"):
        (other / split / "bees").rename(other / split / "wasps")
    cfg, state = R.resume_config(tmp_path / "r", {"data": str(other), "epochs": 2})
    with pytest.raises(FinetuneError, match=r"classes \['ants', 'wasps'\] differ"):
        run_training(cfg, resume=state)


def _spawn(data, out, *extra):
    cmd = [sys.executable, "-m", "finetune", "train", str(data), "--mode", "finetune", "--weights", "none", "--epochs", "200",
           "-b", "4",
           "-o", str(out), "-j", "0", "--overwrite", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=300):
    t = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t < timeout
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_stops_keeps_best_and_prints_resume_command(tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = _spawn(tiny_data, out)
    _wait_for(out / R.STATE_FILE, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert f"--resume {out}" in stderr and "Traceback" not in stderr
    load_model_file(out / "best.pt")
    assert R.load_resume_state(out)["epoch"] >= 1
    assert not list(out.glob(TEMP_PREFIX + "*"))


@pytest.mark.slow
def test_kill_9_never_leaves_a_truncated_file(tiny_data, tmp_path):
    out = tmp_path / "run"
    rng = random.Random(0)
    for attempt in range(3):
        proc = _spawn(tiny_data, out)
        _wait_for(out / R.STATE_FILE, proc)
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere in an epoch, maybe inside a save
        proc.kill()
        proc.wait()
        assert load_model_file(out / "best.pt").arch == "resnet18"  # whole, or this raises
        assert R.load_resume_state(out)["format"] == "finetune-state"
        (out / R.STATE_FILE).unlink()  # next attempt waits for a fresh one
    # temp files a kill left behind are removed when the folder is used again
    (out / (TEMP_PREFIX + "stale.pt")).write_bytes(b"partial")
    r = CliRunner().invoke(app, ["train", str(tiny_data), "--weights", "none", "--epochs", "1", "-b", "8", "-o",
                                 str(out), "-q", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert not list(out.glob(TEMP_PREFIX + "*"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_ends_the_process_at_once_and_loses_nothing(tiny_data, tmp_path, sig):
    out = tmp_path / "run"
    proc = _spawn(tiny_data, out)
    _wait_for(out / R.STATE_FILE, proc)
    proc.send_signal(sig)
    time.sleep(1.0)  # the first is handled (a clean stop after this step is on its way) ...
    t = time.time()
    proc.send_signal(sig)  # ... the second does not wait for it, whatever the process is doing
    proc.communicate(timeout=120)
    assert proc.returncode in (-sig, 128 + sig) and time.time() - t < 5
    load_model_file(out / "best.pt")  # every file at its final path is whole: the run can be resumed
    assert R.load_resume_state(out)["epoch"] >= 1


def test_out_of_memory_is_exit_5_with_a_smaller_batch(tiny_data, in_tmp, monkeypatch):
    import torch.nn.functional as F

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(F, "cross_entropy", oom)
    r = CliRunner().invoke(app, ["train", str(tiny_data), "--weights", "none", "--epochs", "1", "-b", "8"])
    assert r.exit_code == 5
    assert "out of CPU memory at batch size 8; try -b 4" in r.stderr


def test_exported_program_runs_in_predict_but_one_that_would_unpickle_is_refused(trained_model, tiny_data, tmp_path):
    import zipfile

    from finetune.formats.export import export_model

    export_model(trained_model, tmp_path / "m.pt2")
    r = CliRunner().invoke(app, ["predict", str(tiny_data / "val"), "--model", str(tmp_path / "m.pt2"), "--json"])
    assert r.exit_code == 0, r.output
    # The same archive with one weight marked as pickled: torch.export.load would unpickle it (weights_only=False).
    with zipfile.ZipFile(tmp_path / "m.pt2") as src, zipfile.ZipFile(tmp_path / "evil.pt2", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("model_weights_config.json"):
                data = data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
            dst.writestr(item, data)
    r = CliRunner().invoke(app, ["predict", str(tiny_data / "val"), "--model", str(tmp_path / "evil.pt2")])
    assert r.exit_code == 4 and "could run code" in r.stderr and "Traceback" not in r.output
