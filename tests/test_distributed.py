"""Several processes (DDP through torchrun), tested on CPU with the gloo backend: 2 processes, tiny real photos."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finetune._util import ddp as dist
from finetune.cli import app
from finetune.data.dataset import find_dataset
from finetune.inference.evaluate import evaluate_folder
from finetune.inference.predictor import load_predictor
from finetune.models.model_file import load_model_file
from finetune.training import resume as R
from finetune.training import run_training

HERE = Path(__file__).resolve().parent

SLOW = pytest.mark.slow  # the tests that start torchrun or 2 processes; the others are in the fast subset


def _finetune(*args, timeout=600, env=None):
    """`finetune ARGS` in a fresh process (torchrun's workers must start from a clean interpreter)."""
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})  # two processes on a 2-core machine
    return subprocess.run([sys.executable, "-m", "finetune", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_shard_splits_disjointly_and_evenly():
    items = list(range(11))
    shares = [dist.shard(items, dist.World(rank=r, size=3)) for r in range(3)]
    assert sorted(sum(shares, [])) == items
    assert [len(s) for s in shares] == [4, 4, 3]


def test_even_batches_same_steps_every_epoch_reshuffled():
    a = dist.EvenBatches(7, steps=3, seed=0, rank=0)
    b = dist.EvenBatches(7, steps=3, seed=0, rank=1)
    for sampler in (a, b):
        epoch1 = list(sampler)
        assert len(epoch1) == len(sampler) == 3 and sorted(sum(epoch1, [])) == list(range(7))
        sampler.set_epoch(2)
        assert list(sampler) != epoch1  # a new order each epoch...
        sampler.set_epoch(1)
        assert list(sampler) == epoch1  # ...that depends on (seed, rank, epoch) alone: a resume repeats it
    assert list(a) != list(b)
    weighted = dist.EvenBatches(6, steps=2, seed=0, rank=0, weights=torch.tensor([1.0, 0, 0, 0, 0, 0]))
    assert sum(list(weighted), []) == [0] * 6


def _torchrun_worker(*args, env=None):
    """tests/dist_worker.py ARGS in 2 processes under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(HERE / "dist_worker.py"), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}))
    assert r.returncode == 0, r.stderr[-3000:]


@SLOW
def test_ranks_train_on_disjoint_shares_whose_union_is_the_training_set(tiny_data, tmp_path):
    _torchrun_worker("shares", tiny_data, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    train = {s.path for s in find_dataset(tiny_data).train}
    val = {s.path for s in find_dataset(tiny_data).val}
    assert all(x["split_train"] == ranks[0]["split_train"] for x in ranks)  # one split, the same on every rank
    for epoch in ("1", "2"):
        seen = [[p for batch in x["batches"][epoch] for p in batch] for x in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(train)  # each image once per epoch, by one rank
    assert [len(x["batches"]["1"]) for x in ranks] == [x["steps"] for x in ranks] == [2, 2]  # 6 images, -b 4
    assert ranks[0]["batches"]["1"] != ranks[0]["batches"]["2"]  # reshuffled
    assert not set(ranks[0]["val"]) & set(ranks[1]["val"]) and set(ranks[0]["val"] + ranks[1]["val"]) == val


@pytest.fixture(scope="module")
def ddp_run(tiny_data, tmp_path_factory):
    """A 2-process CPU run through `finetune train --gpus 2 --device cpu` (torchrun underneath)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    r = _finetune("train", tiny_data, "--mode", "finetune", "--gpus", 2, "--device", "cpu", "--weights", "none", "--epochs",
                  2, "-b", 4,
                  "-o", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


@SLOW
def test_two_process_run_writes_the_single_process_model_format(ddp_run, trained_model, tiny_data):
    out, r = ddp_run
    assert r.stdout.strip() == str(out / "best.pt")  # printed once, by rank 0
    assert r.stderr.count("epoch 1/2") == 1 and "x 2 processes (DistributedDataParallel)" in r.stderr
    meta = torch.load(out / "best.pt", weights_only=True)
    single = torch.load(trained_model, weights_only=True)
    assert not any(k.startswith("module.") for k in meta["state_dict"])
    assert meta["state_dict"].keys() == single["state_dict"].keys()
    assert meta.keys() == single.keys() and meta["classes"] == ["ants", "bees"]
    config = json.loads((out / "config.json").read_text())
    assert config["processes"] == 2 and config["lr_used"] == pytest.approx(1e-3 / 4 * 4 * 2)  # -b 4 on 2 ranks
    photo = sorted((tiny_data / "val" / "ants").iterdir())[0]
    (prediction,) = load_predictor([out / "best.pt"], "cpu").predict([str(photo)], top_k=2)
    assert {c for c, _ in prediction.top} == {"ants", "bees"}


@SLOW
def test_two_process_val_metrics_equal_a_single_process_evaluation(ddp_run, tiny_data):
    out, _ = ddp_run
    results = json.loads((out / "results.json").read_text())
    single = evaluate_folder(str(out / "best.pt"), str(tiny_data), device="cpu")
    assert results["val_metrics"]["images"] == single["images"] == 6  # both ranks' val images, gathered
    assert results["best_val_acc"] == single["accuracy"]
    assert results["val_metrics"]["confusion_matrix"] == single["confusion_matrix"]
    assert results["calibration"]["ece_before"] == pytest.approx(single["calibration"]["ece_before"], abs=1e-4)


@SLOW
def test_distributed_run_resumes_at_the_right_epoch_with_any_number_of_processes(ddp_run, tiny_data, tmp_path):
    out, _ = ddp_run
    for processes in (2, 1):
        run = tmp_path / f"resume-{processes}"
        shutil.copytree(out, run)
        state = torch.load(run / R.STATE_FILE, weights_only=True)
        assert state["epoch"] == 2
        state["config"]["epochs"] = 4  # the 2-epoch run, as if it had been stopped half-way through 4
        state["phases"] = [[0, 4]]
        torch.save(state, run / R.STATE_FILE)
        if processes == 2:  # and streaming images from disk each epoch, as a dataset larger than RAM would
            r = _finetune("train", tiny_data, "--resume", run, "--gpus", 2, "--device", "cpu",
                          env={"FINETUNE_RAM_CACHE_GB": "0"})
            assert r.returncode == 0, r.stderr[-3000:]
            assert "resuming at epoch 3" in r.stderr and "streaming images from disk" in r.stderr
        else:
            cfg, st = R.resume_config(run, {"data": str(tiny_data)})
            run_training(cfg, resume=st)
        with open(run / "metrics.csv") as f:
            assert [int(row["epoch"]) for row in csv.DictReader(f)] == [1, 2, 3, 4]
        assert torch.load(run / R.STATE_FILE, weights_only=True)["epoch"] == 4
        load_model_file(run / "best.pt")


@SLOW
def test_feature_extract_mode_with_two_processes(tiny_data, tmp_path):
    out = tmp_path / "fe"
    r = _finetune("train", tiny_data, "--gpus", 2, "--device", "cpu", "--weights", "none", "--mode",
                  "feature-extract", "-o", out, "-q")  # the probe: each rank extracts its share, all fit alike
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    single = evaluate_folder(str(out / "best.pt"), str(tiny_data), device="cpu")
    assert results["val_metrics"]["images"] == 6 and results["best_val_acc"] == pytest.approx(single["accuracy"])
    assert results["val_metrics"]["confusion_matrix"] == single["confusion_matrix"]


@SLOW
@pytest.mark.parametrize("case", ["sync-bn on CPU", "no such folder (found by rank 0)"])
def test_errors_are_printed_once_with_one_exit_code(case, tiny_data, tmp_path):
    if case == "sync-bn on CPU":
        args, code, message = (tiny_data, "--sync-bn"), 2, "--sync-bn: torch's SyncBatchNorm runs on GPUs only"
    else:
        args, code, message = (tmp_path / "missing",), 3, "missing: no such folder"
    r = _finetune("train", *args, "--gpus", 2, "--device", "cpu", "--weights", "none")
    assert r.returncode == code
    assert r.stderr.count(message) == 1, r.stderr
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr and "rank 1" not in r.stderr


def test_gpus_option_checks(tiny_data, monkeypatch):
    runner = CliRunner()
    if torch.cuda.device_count() < 2:
        r = runner.invoke(app, ["train", str(tiny_data), "--gpus", "2"])
        assert r.exit_code == 2 and "CUDA GPU(s)" in r.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = runner.invoke(app, ["train", str(tiny_data), "--gpus", "2", "--device", "cpu"])
    assert r.exit_code == 2 and "already running under torchrun" in r.output


def test_gpus_relaunches_the_same_command(tiny_data, monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "launch", lambda args, n: calls.append((args, n)) or 7)
    r = CliRunner().invoke(app, ["train", str(tiny_data), "--gpus", "3", "--device", "cpu", "--epochs", "5",
                                 "--no-amp", "-q", "-o", "out dir", "--lr", "0.01"])
    assert r.exit_code == 7
    (args, n), = calls
    assert n == 3 and args[:2] == ["train", str(tiny_data)] and "--gpus" not in args
    pairs = {(args[i], args[i + 1]) for i in range(len(args) - 1)}
    assert {("--device", "cpu"), ("--epochs", "5"), ("--output", "out dir"), ("--lr", "0.01")} <= pairs
    assert "--no-amp" in args and "--quiet" in args and "--model" not in args  # defaults are not repeated


@pytest.mark.parametrize("command", ["tune", "lr-find"])
def test_one_process_commands_refuse_torchrun(command, tiny_data, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = CliRunner().invoke(app, [command, str(tiny_data), "--weights", "none", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and f"finetune {command} runs in one process" in r.output, r.output
    assert not (tmp_path / "x").exists()


@SLOW
def test_image_failing_mid_run_in_another_process_is_reported_once_by_rank_0(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    train = [s.path for s in find_dataset(data).train]  # the split every rank gets
    victim = dist.shard(train, dist.World(rank=1, size=2))[0]  # rank 1 trains on it, rank 0 never opens it
    _torchrun_worker("failing", data, tmp_path, victim, env={"FINETUNE_RAM_CACHE_GB": "0"})
    out = json.loads((tmp_path / "rank0.json").read_text())
    assert [path for path, _ in out["reported"]] == [victim]  # named once over epochs 2 and 3
    assert "not an image" in out["reported"][0][1] and out["epochs"] == 3


@SLOW
def test_unfreezing_the_backbone_keeps_every_rank_identical(tiny_data, tmp_path):
    """--freeze-epochs: DDP is rebuilt when the backbone joins, so its gradients are averaged too."""
    _torchrun_worker("freeze", tiny_data, tmp_path)
    out = json.loads((tmp_path / "rank0.json").read_text())
    rank0, rank1 = out["ranks"]
    assert rank0 == rank1  # identical parameters after each epoch
    backbone = [n for n in rank0[0] if not n.startswith(out["head"] + ".")]
    assert any(rank0[0][n] != rank0[1][n] for n in backbone)  # epoch 2 trained the backbone
