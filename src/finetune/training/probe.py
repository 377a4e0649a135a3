"""A converged linear probe: multinomial logistic regression on frozen-backbone features, fitted full-batch
with L-BFGS, its L2 strength chosen by k-fold cross-validation on the training images alone (never on val).

The linear-probe protocol of the CLIP paper (Radford et al. 2021, appendix A.3: L-BFGS logistic regression,
the L2 strength searched on held-out training data). In seconds on a CPU it gives the head an SGD run would
approach only with a well-chosen learning rate and enough epochs. Training runs fit it on the plain (eval)
view of each image, as CLIP does (augmented views cost accuracy there: training/features.py); several views of
an image, where given, are extra rows with its label, kept in the same fold as the image.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

L2_GRID = tuple(10.0 ** e for e in range(1, -7, -1))  # strong to weak; then refined around the best (as CLIP)
CV_FOLDS = 5
MAX_ITER = 100
# Below this many rows x features x classes the fit runs on one thread: its thousands of tiny operations gain
# nothing from more, and on a busy CPU each would wait at a thread barrier. Measured on 2 cores beside another
# 2-thread process: 32 images x 1280 features, 25 s on two threads against 1.6 s on one; quiet, equal.
ONE_THREAD_BELOW = 20_000_000


@dataclass
class Probe:
    weight: object  # [classes, features]
    bias: object  # [classes]
    l2: float
    cv_loss: float  # mean held-out cross-entropy of the chosen l2
    grid: list  # [(l2, mean held-out loss)] as searched


def _row_losses(logits, y, weight=None):
    """Per row: cross-entropy on class indices; on multi-hot targets the mean per-class BCE (weight is then
    pos_weight)."""
    import torch

    if y.dim() == 2:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=weight,
                                                                    reduction="none").mean(1)
    return torch.nn.functional.cross_entropy(logits, y, weight=weight, reduction="none")


def _fold_losses(x, y, w, b, weight=None):
    """[folds, rows] losses of every row under each fold's weights [folds, classes, dim] and biases."""
    import torch

    folds, classes = w.shape[0], w.shape[1]
    logits = torch.einsum("rd,fcd->frc", x, w) + b[:, None, :]
    targets = y.expand(folds, *y.shape).reshape(-1, *y.shape[1:])
    return _row_losses(logits.reshape(-1, classes), targets, weight).reshape(folds, -1)


def _fit(x, y, masks, classes: int, l2: float, class_weights=None):
    """Weights [folds, classes, dim] and biases [folds, classes], one fit per row mask (fold), all at once:
    each minimises its rows' mean loss + l2 * ||weight||^2 (full batch, L-BFGS; the folds do not interact, so
    one optimiser call serves them all)."""
    import torch

    folds = len(masks)
    w = torch.zeros(folds, classes, x.shape[1])
    b = torch.zeros(folds, classes)
    w.requires_grad_(True)
    b.requires_grad_(True)
    counts = masks.sum(1)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=MAX_ITER, tolerance_grad=1e-6, tolerance_change=1e-9,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((_fold_losses(x, y, w, b, class_weights) * masks).sum(1) / counts).sum() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fold_masks(groups, k: int, seed: int):
    """[k, rows] masks of the rows each fold trains on; the rows of one image (its views) stay together."""
    import torch

    images = torch.unique(groups)
    order = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))]
    return torch.stack([~torch.isin(groups, order[i::k]) for i in range(k)]).float()


def _cv_losses(x, y, classes: int, masks, class_weights, l2s) -> list[tuple[float, float]]:
    """Mean held-out cross-entropy for each l2, strong to weak; stops once the loss has risen twice in a row (it has
    one minimum in l2). Every fit starts from zero: warm starts along the path let L-BFGS stop early."""
    out, rises = [], 0
    held = 1 - masks
    for l2 in l2s:
        w, b = _fit(x, y, masks, classes, l2, class_weights)
        out.append((l2, float(((_fold_losses(x, y, w, b) * held).sum(1) / held.sum(1)).mean())))
        rises = rises + 1 if len(out) > 1 and out[-1][1] > out[-2][1] else 0
        if rises == 2:
            break
    return out


def fit_probe(features, labels, classes: int, seed: int = 0, class_weights=None, folds: int = CV_FOLDS,
              l2: float | None = None) -> Probe:
    """The probe for features [views, images, dim] (or [images, dim]) and labels [images]. Returned as the
    weight and bias of a Linear layer on the raw features (it is fitted on standardised ones, which L-BFGS
    converges on in far fewer steps). A given l2 is used as is: no search (cv_loss is then NaN)."""
    import torch

    x = torch.as_tensor(features, dtype=torch.float32)
    if x.dim() == 2:
        x = x[None]
    views, n, _ = x.shape
    labels = torch.as_tensor(labels)
    y = labels.repeat(views, *[1] * (labels.dim() - 1))  # [images x views] indices, or multi-hot rows
    x = x.reshape(views * n, -1)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    with _threads(1 if z.numel() * classes < ONE_THREAD_BELOW else torch.get_num_threads()):
        w, b, l2, loss, grid = _search_and_fit(z, y, labels, n, views, classes, seed, class_weights, folds, l2)
    weight = w / std  # back to raw features: w.(x - mean)/std + b = (w/std).x + (b - (w/std).mean)
    return Probe(weight, b - weight @ mean, l2, loss, sorted(grid))


@contextlib.contextmanager
def _threads(count: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _search_and_fit(z, y, labels, n: int, views: int, classes: int, seed: int, class_weights, folds: int, l2):
    """On standardised rows: the L2 strength (searched when l2 is None) and the weights fitted on every row."""
    import torch

    cw = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
    fewest = int(labels.sum(0).min()) if labels.dim() == 2 else int(torch.bincount(labels).min())
    k = max(2, min(folds, fewest))
    masks = fold_masks(torch.arange(n).repeat(views), k, seed)
    grid, loss = [], math.nan
    if l2 is None:
        grid = _cv_losses(z, y, classes, masks, cw, L2_GRID)
        best = min(grid, key=lambda g: g[1])[0]
        grid += _cv_losses(z, y, classes, masks, cw, (best * 3, best / 3))  # one refinement step around it
        l2, loss = min(grid, key=lambda g: g[1])
    w, b = _fit(z, y, torch.ones(1, len(y)), classes, l2, cw)
    w, b = w[0], b[0]
    if not (torch.isfinite(w).all() and (grid == [] or math.isfinite(loss))):
        raise FloatingPointError("the linear probe did not converge to finite weights")
    return w, b, l2, loss, grid


class ProbeEpochs:
    """Feature-extract mode with --solver lbfgs: one "epoch" that fits the converged probe on the cached training
    features and puts it into the model's head; the val images are only measured, never used to choose."""

    fixed_count = 1  # the loop runs this many epochs, whatever --epochs says
    scheduled = False  # fitted once, to convergence: no lr schedule, no SGD step

    def __init__(self, trainer, train_feats, train_labels, val_feats, val_labels):
        import torch

        self.t = trainer
        self.train_feats, self.train_labels = train_feats, train_labels  # [views, N, D], [N]
        self.val_feats, self.val_labels = val_feats, val_labels
        self.linear = next(m for m in reversed(list(trainer.net.head_module().modules()))
                           if isinstance(m, torch.nn.Linear))
        self.batches = 1
        self.generator = _NoGenerator()
        self.val_logits = None
        self.probe: Probe | None = None

    def close(self) -> None:
        """Nothing to release: the features are tensors."""

    def __call__(self, epoch: int) -> dict:
        import torch

        t = self.t
        weights = None if t.cfg.balance == "none" else t.task.loss_weights(self.train_labels.cpu(), t.num_classes)
        self.probe = fit_probe(self.train_feats.cpu(), self.train_labels.cpu(), t.num_classes, t.cfg.seed, weights)
        with torch.no_grad():
            self.linear.weight.copy_(self.probe.weight)
            self.linear.bias.copy_(self.probe.bias)
        t.emit("probe", l2=self.probe.l2, cv_loss=self.probe.cv_loss, tried=len(self.probe.grid))
        head = t.net.head_module().eval()
        with torch.inference_mode():
            train = head(self.train_feats.reshape(-1, self.train_feats.shape[-1]).to(t.device)).float().cpu()
            val = head(self.val_feats.to(t.device)).float().cpu()
        labels = self.train_labels.cpu()
        y = labels.repeat(len(self.train_feats), *[1] * (labels.dim() - 1))
        self.val_logits = val
        vy = self.val_labels.cpu()
        return {"train_loss": float(_row_losses(train, y).mean()), "train_acc": t.task.correct(train, y) / len(y),
                "val_loss": float(_row_losses(val, vy).mean()), "val_acc": t.task.correct(val, vy) / max(len(vy), 1)}


class _NoGenerator:
    """The probe draws no random numbers during training: nothing to save for a resume."""

    def get_state(self):
        return None

    def set_state(self, state) -> None:
        pass
