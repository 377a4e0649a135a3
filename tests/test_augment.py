"""Augmentation and regularisation from torchvision and torch: the policies (TrivialAugmentWide, RandAugment), random
erasing, MixUp/CutMix with soft targets in the training step, label smoothing; refused where they cannot act."""

import pytest
import torch
from torchvision.transforms import v2

from finetune.config import TrainConfig, validate
from finetune.data.images import decode_to_tensor
from finetune.data.preprocessing import Preprocessing
from finetune.errors import UsageError
from finetune.models.registry import build_network
from finetune.tasks.base import SingleLabel
from finetune.training.sanity import overfit_config
from finetune.training.trainer import Trainer, batch_mixer

PRE = Preprocessing(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")


def _kinds(transform) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


@pytest.mark.parametrize("augment, policy", [("trivial", "TrivialAugmentWide"), ("randaugment", "RandAugment"),
                                             ("standard", "RandomRotation")])
def test_policies_are_torchvisions_and_run_on_a_real_photo(tiny_data, augment, policy):
    photo = decode_to_tensor(str(sorted((tiny_data / "train" / "ants").iterdir())[0]), 256)
    t = PRE.train_transform(augment, 176)
    assert policy in _kinds(t) and _kinds(t).index(policy) < _kinds(t).index("ToDtype")  # on uint8, before floats
    torch.manual_seed(0)
    views = [t(photo) for _ in range(4)]
    assert all(v.shape == (3, 176, 176) and v.dtype == torch.float32 for v in views)
    assert not torch.equal(views[0], views[1])


def test_random_erasing_erases_a_rectangle_to_the_mean_colour(tiny_data):
    photo = decode_to_tensor(str(sorted((tiny_data / "train" / "bees").iterdir())[0]), 256)
    torch.manual_seed(1)
    erased = PRE.train_transform("none", erasing=1.0)(photo)
    plain = PRE.train_transform("none")(photo)
    assert _kinds(PRE.train_transform("light", erasing=0.25))[-1] == "RandomErasing"
    zero = (erased == 0).all(0)
    assert zero.sum() > 224 * 224 * 0.02 and (erased[:, ~zero] == plain[:, ~zero]).all()


def test_mixup_and_cutmix_give_soft_targets_drawn_per_batch():
    assert batch_mixer(TrainConfig(data="x"), 3) is None
    assert isinstance(batch_mixer(TrainConfig(data="x", mixup=0.2), 3), v2.MixUp)
    both = batch_mixer(TrainConfig(data="x", mixup=0.2, cutmix=1.0), 3)
    assert isinstance(both, v2.RandomChoice)
    torch.manual_seed(0)
    x, y = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    mixed, soft = batch_mixer(TrainConfig(data="x", mixup=0.4), 3)(x, y)
    lam = soft[0, 0].item()  # image 0 (class 0) blended with image 5 (class 2): lam and 1 - lam
    assert soft.shape == (6, 3) and torch.allclose(soft.sum(1), torch.ones(6))
    assert torch.allclose(mixed[0], lam * x[0] + (1 - lam) * x[5], atol=1e-6)


def test_the_training_step_takes_soft_targets_and_counts_against_the_real_labels():
    cfg = TrainConfig(data="x", weights="none", mixup=0.4, cutmix=1.0, label_smoothing=0.1, channels_last=False)
    net = build_network("mobilenet_v3_small", 3)
    t = Trainer(cfg, net, torch.device("cpu"), lambda *a, **k: None, task=SingleLabel(), images_per_step=4,
                train_targets=torch.tensor([0, 1, 2, 0]), num_classes=3, check_initial_loss=False)
    assert t.train_criterion.label_smoothing == 0.1 and t.criterion.label_smoothing == 0.0  # val loss stays plain
    torch.manual_seed(0)
    net.module.train()
    loss, correct = t.step(torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 0]), 1, 1, net.module)
    assert torch.isfinite(torch.tensor(loss)) and 0 <= correct <= 4


def test_refused_where_they_cannot_act_and_off_in_the_sanity_check():
    with pytest.raises(UsageError, match="--mixup: mixes images before the backbone, so it needs --mode finetune"):
        validate(TrainConfig(data="x", mode="feature-extract", mixup=0.2))
    with pytest.raises(UsageError, match="--label-smoothing: the L-BFGS probe fits hard labels"):
        validate(TrainConfig(data="x", mode="feature-extract", label_smoothing=0.1))
    validate(TrainConfig(data="x", mode="feature-extract", solver="sgd", label_smoothing=0.1, erasing=0.25))
    with pytest.raises(UsageError, match="--erasing 1.5: must be a probability"):
        validate(TrainConfig(data="x", erasing=1.5))
    quiet = overfit_config(TrainConfig(data="x", mixup=0.2, cutmix=1.0, label_smoothing=0.1, erasing=0.5,
                                       augment="trivial"))
    assert (quiet.mixup, quiet.cutmix, quiet.label_smoothing, quiet.erasing, quiet.augment) == (0, 0, 0, 0, "none")
