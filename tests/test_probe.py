"""The linear probe of feature-extract mode: converged, its L2 chosen on the training data alone."""

import pytest
import torch

from finetune.config import TrainConfig
from finetune.training import run_training
from finetune.training.probe import fit_probe


def _blobs(n, d=20, classes=3, seed=0, spread=2.5):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * spread
    y = torch.arange(n) % classes
    return centers[y] + torch.randn(n, d, generator=g) * 1.5 + 7, y  # offset and scale: standardisation matters


def test_probe_learns_a_linear_problem_and_returns_a_head_for_raw_features():
    x, y = _blobs(600)
    x, xt, y, yt = x[:300], x[300:], y[:300], y[300:]
    probe = fit_probe(x, y, 3)
    acc = ((xt @ probe.weight.T + probe.bias).argmax(1) == yt).float().mean()
    assert acc > 0.9
    assert probe.l2 == min(probe.grid, key=lambda g: g[1])[0]  # the L2 with the lowest cross-validated loss
    assert len(probe.grid) >= 4 and probe.weight.shape == (3, 20)


def test_more_regularisation_is_chosen_when_features_are_noise():
    x, _ = _blobs(120, d=60)
    y = torch.randint(0, 3, (120,), generator=torch.Generator().manual_seed(3))  # labels unrelated to features
    noise = fit_probe(x, y, 3)
    signal = fit_probe(*_blobs(120, d=60), 3)
    assert noise.l2 > signal.l2  # cross-validation on training folds sees that nothing generalises


def test_views_of_one_image_stay_in_one_fold(monkeypatch):
    from finetune.training import probe as P

    seen = []
    real = P.fold_masks
    monkeypatch.setattr(P, "fold_masks", lambda groups, k, seed: seen.append(groups) or real(groups, k, seed))
    x, y = _blobs(40)
    fit_probe(torch.stack([x, x + 0.1]), y, 3)  # 2 views of 40 images
    groups = seen[0]
    masks = real(groups, 5, 0)  # per fold: the rows it trains on
    assert masks.shape == (5, 80) and torch.equal(masks.sum(0), torch.full((80,), 4.0))  # each row held out once
    for mask in masks:
        for image in range(40):
            assert len(set(mask[groups == image].tolist())) == 1  # both rows of an image, or neither


def test_feature_extract_run_fits_the_probe_once_into_the_saved_head(tiny_data, tmp_path):
    events = []
    cfg = TrainConfig(data=str(tiny_data), weights="none", mode="feature-extract", epochs=7,
                      output=str(tmp_path / "r"), workers=1)
    result = run_training(cfg, lambda e, **k: events.append((e, k)))
    assert len(result.history) == 1 and result.history[0]["lr"] is None  # fitted once: no lr, no schedule
    (probe,) = [k for e, k in events if e == "probe"]
    assert probe["l2"] > 0 and probe["tried"] >= 4
    state = torch.load(result.model_path, weights_only=True)["state_dict"]
    assert torch.isfinite(state["fc.weight"]).all() and state["fc.weight"].abs().sum() > 0


def test_the_probe_fits_on_the_plain_view_and_sgd_heads_on_augmented_ones(tiny_data, tmp_path, monkeypatch):
    """The probe's rows are the eval view predict sees (augmented rows cost it accuracy on real data); an SGD
    head draws augmented views, one per epoch."""
    from finetune.training import features as F

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))  # computed here, not found from another test
    made = []
    real = F.ImageDataset
    monkeypatch.setattr(F, "ImageDataset", lambda samples, transform, *a: made.append(transform) or
                        real(samples, transform, *a))
    for solver, views in (("lbfgs", 1), ("sgd", 2)):
        events, made[:] = [], []
        cfg = TrainConfig(data=str(tiny_data), weights="none", mode="feature-extract", solver=solver, epochs=3,
                          output=str(tmp_path / solver), workers=1)
        run_training(cfg, lambda e, **k: events.append((e, k)))
        assert [k["views"] for e, k in events if e == "features"] == [views]
        train_transforms = {repr(t) for t in made[:-1]}  # the last dataset is val's
        assert ("RandomResizedCrop" in "".join(train_transforms)) == (solver == "sgd"), train_transforms


def test_a_small_probe_fits_on_one_thread_and_gives_the_threads_back(monkeypatch):
    """Thousands of tiny operations: on a busy CPU more threads only wait at barriers (measured 25 s against 1.6 s)."""
    from finetune.training import probe as P

    seen, real = [], P._fit
    monkeypatch.setattr(P, "_fit", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fit_probe(*_blobs(60), 3)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        seen.clear()
        monkeypatch.setattr(P, "ONE_THREAD_BELOW", 0)  # a large problem keeps the process's threads
        fit_probe(*_blobs(60), 3)
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)


# The probe on ants/bees with the shared weights, as README.md, docs/training.md and benchmarks/README.md state it:
# 0.961-0.967 val accuracy (147-148 of 153 val images; one image is 0.65 points). Measured 2026-12-07 (2-core AMD
# EPYC shared with other work, load 12-15), seeds 0-9 of the default run: 148 of 153 for seeds 0-3 and 5-9 (L2 0.01
# or 0.03), 147 for seed 4 (L2 0.003): a spread of one image, all from the L2 the training folds choose (the features
# are the same). The floor is the documented low end less that one image of slack, for a CPU or BLAS build that
# rounds a borderline image the other way; two images below the docs' range is a regression.
PROBE_VAL_IMAGES = 153
PROBE_FLOOR = 146  # of 153: 0.954


@pytest.mark.slow
def test_the_cpu_default_on_real_weights_reaches_the_accuracy_the_docs_state(antsbees, real_weights, tmp_path):
    """Transfer learning for real, as a user's first run does it: the CPU default (the converged probe) with real
    ImageNet weights on the full ants/bees set reaches the 0.961-0.967 the docs state, less one image."""
    result = run_training(TrainConfig(data=str(antsbees), model="mobilenet_v2", weights=str(real_weights),
                                      output=str(tmp_path / "r")))
    assert result.history[-1]["lr"] is None  # the probe: no SGD epoch
    m = result.metrics
    assert m["images"] == PROBE_VAL_IMAGES and m["correct"] / PROBE_VAL_IMAGES == result.best_val_acc
    assert m["correct"] >= PROBE_FLOOR, f"{m['correct']} of {PROBE_VAL_IMAGES} val images; the docs state 147-148"
