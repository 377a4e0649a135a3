"""The training loop: feature caching, divergence guard, memory-bounded loading."""

import pytest
import torch

from finetune.config import TrainConfig, validate
from finetune.data.dataset import find_dataset
from finetune.data.images import decode_to_tensor
from finetune.errors import DivergedError, FinetuneError
from finetune.models.model_file import network_from_file
from finetune.models.registry import Network
from finetune.tasks.base import class_weights
from finetune.training import cache, run_training
from finetune.training.sanity import initial_loss_check, overfit_config, overfit_split
from finetune.training.setup import prepare, train_crop


def _val_accuracy_of_saved_model(model_path, data):
    net, mf = network_from_file(model_path)
    split = find_dataset(data)
    tf = mf.preprocessing.eval_transform()
    x = torch.stack([tf(decode_to_tensor(s.path, mf.preprocessing.resize_size)) for s in split.val])
    y = torch.tensor([s.label for s in split.val])
    with torch.inference_mode():
        return (net.module(x).argmax(1) == y).float().mean().item()


@pytest.mark.slow
def test_feature_extract_uses_cached_features_and_saves_a_consistent_model(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    events = []
    cfg = TrainConfig(data=str(tiny_data), weights="none", mode="feature-extract", epochs=3, batch_size=4,
                      output=str(tmp_path / "a"), workers=1)
    first = run_training(cfg, lambda e, **k: events.append((e, k)))
    assert [k["cached"] for e, k in events if e == "features"] == [False]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    # The head trained on cached features is the head of the saved model: same val accuracy on real images.
    assert _val_accuracy_of_saved_model(first.model_path, tiny_data) == pytest.approx(first.best_val_acc)
    # The backbone was not touched.
    import torchvision

    state = torch.load(first.model_path, weights_only=True)["state_dict"]
    torch.manual_seed(0)
    fresh = torchvision.models.resnet18()
    assert torch.equal(state["layer4.1.bn2.running_var"], fresh.state_dict()["layer4.1.bn2.running_var"])

    events.clear()
    second = run_training(cfg.__class__(**{**cfg.to_dict(), "output": str(tmp_path / "b")}),
                            lambda e, **k: events.append((e, k)))
    assert [k["cached"] for e, k in events if e == "features"] == [True]
    assert not [e for e, _ in events if e == "decode_start"]  # nothing decoded on a cache hit
    assert [r["val_acc"] for r in second.history] == [r["val_acc"] for r in first.history]


def test_nan_loss_stops_with_epoch_step_and_lower_lr(tiny_data, tmp_path):
    cfg = TrainConfig(data=str(tiny_data), mode="finetune", weights="none", epochs=1, batch_size=4, lr=1e30, output=str(tmp_path / "r"),
                      workers=1, scheduler="none")
    with pytest.raises(DivergedError, match=r"at epoch 1, step \d+ .*try --lr 1e\+29") as e:
        run_training(cfg)
    assert e.value.exit_code == 6
    assert not (tmp_path / "r" / "best.pt").exists()


@pytest.mark.slow
def test_streams_from_disk_when_cache_budget_is_too_small(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "CACHE_BUDGET_BYTES", 1)
    events = []
    cfg = TrainConfig(data=str(tiny_data), mode="finetune", weights="none", epochs=1, batch_size=4,
                      output=str(tmp_path / "r"),
                      workers=1)
    result = run_training(cfg, lambda e, **k: events.append((e, k)))
    assert [k["keep"] for e, k in events if e == "decode_start"] == [False]  # checked, not kept in RAM
    assert result.model_path.is_file() and len(result.history) == 1


@pytest.mark.slow
def test_loader_workers_stop_when_a_run_ends_also_by_failing(tiny_data, tmp_path, monkeypatch):
    """A streaming run's persistent loader workers end with the run, also an interrupted one whose traceback
    (held here, as a caller or pytest holds it) still references the loader's iterator."""
    import multiprocessing
    import signal

    from finetune.errors import Interrupted

    monkeypatch.setattr(cache, "CACHE_BUDGET_BYTES", 1)
    cfg = TrainConfig(data=str(tiny_data), mode="finetune", weights="none", epochs=2, batch_size=4,
                      output=str(tmp_path / "r"), workers=1)
    with pytest.raises(Interrupted) as e:
        run_training(cfg, stop=lambda: signal.SIGINT)
    assert e.value.__traceback__ is not None and multiprocessing.active_children() == []


def test_ram_cache_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("FINETUNE_RAM_CACHE_GB", "0.5")
    assert cache.cache_budget() == 512 * 1024**2
    monkeypatch.setenv("FINETUNE_RAM_CACHE_GB", "lots")
    with pytest.raises(FinetuneError, match="FINETUNE_RAM_CACHE_GB='lots': must be a number of GiB") as e:
        cache.cache_budget()
    assert e.value.exit_code == 2
    monkeypatch.delenv("FINETUNE_RAM_CACHE_GB")
    assert cache.cache_budget() == cache.CACHE_BUDGET_BYTES


def test_initial_loss_check():
    from math import log

    assert initial_loss_check(0.7, log(2)) == {"loss": 0.7, "expected": pytest.approx(log(2)), "suspicious": False}
    assert initial_loss_check(5.4, log(2))["suspicious"]  # e.g. unnormalised inputs blowing up the logits
    assert initial_loss_check(0.01, log(10))["suspicious"]  # labels leaking into the inputs?


def test_update_ratios_logged_and_early_stop(tiny_data, tmp_path):
    events = []
    cfg = TrainConfig(data=str(tiny_data), weights="none", mode="feature-extract", solver="sgd", epochs=6,
                      batch_size=4, lr=1e-30, patience=2, augment="none", output=str(tmp_path / "r"), workers=1)
    result = run_training(cfg, lambda e, **k: events.append((e, k)))
    # with a vanishing lr nothing improves after epoch 1: stopped 2 epochs later
    assert len(result.history) == 3 and result.best_epoch == 1
    assert [k["best_epoch"] for e, k in events if e == "early_stop"] == [1]
    assert [e for e, _ in events].count("initial_loss") == 1
    row = result.history[0]
    assert row["update_ratio_backbone"] is None  # frozen
    assert 0 <= row["update_ratio_head"] < 1e-20
    assert {k["group"] for e, k in events if e == "update_ratio"} == {"head"}  # far below ~1e-3: said so
    header = (tmp_path / "r" / "metrics.csv").read_text().splitlines()[0]
    assert "update_ratio_head" in header and "update_ratio_backbone" in header


def test_class_weights_hand_computed():
    assert class_weights([0, 0, 0, 1], 2).tolist() == pytest.approx([4 / 6, 4 / 2])
    assert class_weights([0, 1, 2], 3).tolist() == pytest.approx([1, 1, 1])


def test_freeze_epochs_then_lower_backbone_lr(tiny_data, tmp_path):
    snapshots = {}

    def emit(event, **kw):
        if event == "epoch_end":
            state = torch.load(tmp_path / "r" / "state.pt", weights_only=True)
            snapshots[kw["row"]["epoch"]] = (state["model"]["conv1.weight"].clone(), state["model"]["fc.weight"].clone(),
                                             [g["lr"] for g in state["optimizer"]["param_groups"]])

    torch.manual_seed(0)
    cfg = TrainConfig(data=str(tiny_data), mode="finetune", weights="none", epochs=2, batch_size=4, freeze_epochs=1,
                      lr=0.01,
                      scheduler="none", output=str(tmp_path / "r"), workers=1, augment="none")
    run_training(cfg, emit)
    import torchvision

    torch.manual_seed(0)
    init = torchvision.models.resnet18().conv1.weight
    assert torch.equal(snapshots[1][0], init)  # epoch 1: backbone frozen
    assert not torch.equal(snapshots[2][0], init)  # epoch 2: trained
    assert not torch.equal(snapshots[1][1], snapshots[2][1])
    assert snapshots[2][2] == pytest.approx([0.01, 0.001])  # head lr, backbone lr x 0.1


@pytest.mark.slow
@pytest.mark.parametrize("balance", ["weighted-loss", "sampler"])
def test_balance_modes_counter_an_imbalanced_folder(tiny_data, tmp_path, balance):
    import shutil
    from collections import Counter

    data = tmp_path / "imbalanced"
    shutil.copytree(tiny_data, data)
    for extra in sorted((data / "train" / "bees").iterdir())[2:]:  # 6 ants, 2 bees
        extra.unlink()
    for mode in ("finetune", "feature-extract"):
        cfg = TrainConfig(data=str(data), weights="none", epochs=1, batch_size=4, balance=balance, mode=mode,
                          solver="sgd", output=str(tmp_path / mode), workers=0)
        p = prepare(cfg)
        if balance == "weighted-loss":  # bees weigh 3x ants: inverse frequency, mean 1
            assert p.trainer.train_criterion.weight.tolist() == pytest.approx([8 / 12, 8 / 4])
            assert p.trainer.criterion.weight is None  # val loss stays comparable
        else:  # sampler: classes drawn about equally often, with replacement
            torch.manual_seed(0)
            if mode == "finetune":
                drawn = [p.split.train[i].label for _ in range(50) for i in p.epochs.train_loader.sampler]
            else:
                drawn = [int(p.epochs.train_labels[i]) for _ in range(50) for i in p.epochs._order(8)]
            share = Counter(drawn)[1] / len(drawn)
            assert 0.4 < share < 0.6, share  # 2 of 8 images, but half the draws
        assert len(run_training(cfg).history) == 1


def test_overfit_split_and_config(tiny_data):
    split = overfit_split(find_dataset(tiny_data), 5, seed=0)
    assert split.train == split.val and len(split.train) == 5
    assert {s.label for s in split.train} == {0, 1}  # spread over the classes
    cfg = overfit_config(TrainConfig(data=str(tiny_data), weight_decay=0.1, dropout=0.5, overfit=5))
    assert (cfg.augment, cfg.weight_decay, cfg.dropout) == ("none", 0.0, 0.0)


@pytest.mark.slow
def test_overfit_sanity_check_reaches_100_percent(tiny_data, in_tmp):
    from typer.testing import CliRunner

    from finetune.cli import app

    r = CliRunner().invoke(app, ["train", str(tiny_data), "--mode", "finetune", "--weights", "none", "--overfit", "4",
                                 "--epochs", "10",
                                 "-b", "4", "--optimizer", "adamw", "--lr", "0.001", "-q"])
    assert r.exit_code == 0, r.output
    assert "sanity check passed" in r.stderr
    # a learning rate of ~0 cannot memorise anything: the check must say so
    r = CliRunner().invoke(app, ["train", str(tiny_data), "--weights", "none", "--overfit", "4", "--epochs", "2",
                                 "-b", "4", "--lr", "1e-12", "--mode", "feature-extract", "--solver", "sgd", "-q", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "sanity check failed" in r.stderr and "labels" in r.stderr


class _FixedSize(torch.nn.Module):
    """A model that, like torchvision's ViTs, runs only on the input size it was built for."""

    def __init__(self, size):
        super().__init__()
        self.size, self.fc = size, torch.nn.Linear(3, 2)

    def forward(self, x):
        assert x.shape[-1] == self.size, "wrong input size"
        return self.fc(x.mean((2, 3)))


def _choice(crop: int):
    from finetune.data.preprocessing import Preprocessing
    from finetune.models.weights import WeightsChoice

    return WeightsChoice("resnet18", None, None, "none", Preprocessing(crop + 32, crop, (0.5,) * 3, (0.2,) * 3,
                                                                       "bilinear"))


def test_train_crop_rule():
    import torchvision

    pre = _choice(224)
    resnet = Network(torchvision.models.resnet18(num_classes=2), "resnet18", "fc")
    cfg = TrainConfig(data="x", mode="finetune")
    assert train_crop(cfg, pre, resnet) == 176  # torchvision's own recipe: train 176, evaluate 224
    assert train_crop(cfg, _choice(299), resnet) == 240
    assert train_crop(TrainConfig(data="x", mode="feature-extract"), pre, resnet) == 224
    assert train_crop(TrainConfig(data="x", mode="finetune", augment="none"), pre, resnet) == 224
    assert train_crop(TrainConfig(data="x", mode="finetune", train_size=200), pre, resnet) == 200
    assert resnet.module.training  # probing left the mode as it was

    fixed = Network(_FixedSize(224), "resnet18", "fc")
    assert train_crop(cfg, pre, fixed) == 224  # falls back to the one size it accepts
    with pytest.raises(FinetuneError, match="--train-size 160: resnet18 only runs on 224x224") as e:
        train_crop(TrainConfig(data="x", mode="finetune", train_size=160), pre, fixed)
    assert e.value.exit_code == 2
    with pytest.raises(FinetuneError, match="--train-size 8"):
        validate(TrainConfig(data="x", train_size=8))


def test_training_batches_use_the_train_crop_and_val_the_eval_crop(tiny_data, tmp_path):
    cfg = TrainConfig(data=str(tiny_data), mode="finetune", weights="none", epochs=1, batch_size=4, train_size=160,
                      output=str(tmp_path / "r"), workers=1)
    p = prepare(cfg)
    x, _, _ = next(p.epochs.endless_batches())
    assert x.shape[-2:] == (160, 160)
    xv, _, _ = next(iter(p.epochs.val_loader))
    assert xv.shape[-2:] == (224, 224)
    start = []
    run_training(cfg, lambda e, **k: start.append(k) if e == "start" else None)
    assert start[0]["sizes"] == (160, 224)


def test_update_ratio_is_the_median_per_tensor_not_one_pooled_norm():
    from finetune.training.sanity import update_ratio

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Parameter(torch.full((4,), v)) for v in (1.0, 1.0, 1000.0))
            self.fc = torch.nn.Linear(2, 2)

    net = Network(Net(), "net", "fc")
    before = {g: [p.detach().clone() for p in ps] for g, ps in net.parameter_groups().items()}
    with torch.no_grad():
        net.module.a += 0.001  # ratio 1e-3
        net.module.b += 0.003  # ratio 3e-3
        net.module.c += 0.001  # ratio 1e-6: the huge tensor would swamp a pooled norm (~1.0e-6)
        net.module.fc.weight.mul_(1.5)
        net.module.fc.bias.mul_(1.5)
    after = net.parameter_groups()
    assert update_ratio(before["backbone"], after["backbone"]) == pytest.approx(1e-3, rel=1e-3)
    assert update_ratio(before["head"], after["head"]) == pytest.approx(0.5, rel=1e-4)  # weight and bias x1.5


@pytest.mark.parametrize("ratios, advice", [
    # the ratios measured on real ImageNet weights (benchmarks/update_ratio.py), epoch 1 of each run
    ({"head": 0.090, "backbone": 4.5e-4}, None),  # fine-tune, default lr: the fresh head's large ratio is healthy
    ({"head": 2.71, "backbone": 1.35e-2}, "lower --lr"),  # 30x the default lr
    ({"head": 3.0e-3, "backbone": 1.5e-5}, "raise --lr"),  # 1/30 of it
    ({"head": 0.041, "backbone": None}, None),  # feature-extract (the head alone), default lr
    ({"head": 1.22, "backbone": None}, "lower --lr"),
    ({"head": 1.4e-3, "backbone": None}, "raise --lr"),
])
def test_update_ratio_advice_is_judged_on_the_right_group(ratios, advice):
    from finetune.training.sanity import update_ratio_warnings

    warnings = update_ratio_warnings(ratios, lr_now=0.008, lr_base=0.008)
    assert [w["advice"] for w in warnings] == ([advice] if advice else [])
    if warnings:
        assert warnings[0]["group"] == ("backbone" if ratios["backbone"] is not None else "head")
    assert update_ratio_warnings(ratios, lr_now=0.003, lr_base=0.008) == []  # the schedule has decayed the lr


def test_a_backbone_slowed_on_purpose_is_judged_against_its_own_rate():
    """Fine-tuning from the probe trains the backbone at 0.1x the lr: its smaller steps are the plan, not a sign
    that --lr is too low; 100x smaller still is."""
    from finetune.training.sanity import update_ratio_warnings

    slowed = {"head": 0.02, "backbone": 4e-5}
    assert [w["advice"] for w in update_ratio_warnings(slowed, 0.008, 0.008)] == ["raise --lr"]
    assert update_ratio_warnings(slowed, 0.008, 0.008, backbone_lr_mult=0.1) == []
    assert [w["advice"] for w in update_ratio_warnings({"head": 0.02, "backbone": 4e-7}, 0.008, 0.008,
                                                       backbone_lr_mult=0.1)] == ["raise --lr"]
