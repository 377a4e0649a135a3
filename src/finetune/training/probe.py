"""A converged linear probe: multinomial logistic regression on frozen-backbone features, fitted full-batch
with L-BFGS, its L2 strength chosen by k-fold cross-validation on the training images alone (never on val).

The linear-probe protocol of the CLIP paper (Radford et al. 2021, appendix A.3: L-BFGS logistic regression,
the L2 strength searched on held-out training data). In seconds on a CPU it gives the head an SGD run would
approach only with a well-chosen learning rate and enough epochs. Augmented views of a training image are
extra rows with its label, kept in the same fold as the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune.training.trainer import class_weights

L2_GRID = tuple(10.0 ** e for e in range(1, -7, -1))  # strong to weak; then refined around the best (as CLIP)
CV_FOLDS = 5
MAX_ITER = 100


@dataclass
class Probe:
    weight: object  # [classes, features]
    bias: object  # [classes]
    l2: float
    cv_loss: float  # mean held-out cross-entropy of the chosen l2
    grid: list  # [(l2, mean held-out loss)] as searched


def _fit(x, y, classes: int, l2: float, class_weights=None, init=None):
    """(weight, bias) minimising mean cross-entropy + l2 * ||weight||^2 (full batch, L-BFGS), from init if given
    (a warm start from the solution for a nearby l2)."""
    import torch

    w = torch.zeros(classes, x.shape[1]) if init is None else init[0].clone()
    b = torch.zeros(classes) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=MAX_ITER, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y, weight=class_weights) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _folds(groups, k: int, seed: int) -> list:
    """k folds of row indices; the rows of one image (its views) stay together."""
    import torch

    images = torch.unique(groups)
    order = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))]
    return [torch.isin(groups, order[i::k]).nonzero().flatten() for i in range(k)]


def _cv_losses(x, y, classes: int, folds: list, class_weights, l2s) -> list[tuple[float, float]]:
    """Mean held-out cross-entropy for each l2 (strong to weak, each fit warm-started from the previous one's);
    stops once the loss has risen twice in a row (it has one minimum in l2)."""
    import torch

    out, warm, rises = [], [None] * len(folds), 0
    for l2 in l2s:
        losses = []
        for i, held in enumerate(folds):
            keep = torch.ones(len(y), dtype=torch.bool)
            keep[held] = False
            warm[i] = _fit(x[keep], y[keep], classes, l2, class_weights, warm[i])
            w, b = warm[i]
            losses.append(float(torch.nn.functional.cross_entropy(x[held] @ w.T + b, y[held])))
        out.append((l2, sum(losses) / len(losses)))
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
    y = torch.as_tensor(labels).repeat(views)
    x = x.reshape(views * n, -1)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    cw = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
    k = max(2, min(folds, int(torch.bincount(torch.as_tensor(labels)).min())))
    parts = _folds(torch.arange(n).repeat(views), k, seed)
    grid, loss = [], math.nan
    if l2 is None:
        grid = _cv_losses(z, y, classes, parts, cw, L2_GRID)
        best = min(grid, key=lambda g: g[1])[0]
        grid += _cv_losses(z, y, classes, parts, cw, (best * 3, best / 3))  # one refinement step around it
        l2, loss = min(grid, key=lambda g: g[1])
    w, b = _fit(z, y, classes, l2, cw)
    if not (torch.isfinite(w).all() and (grid == [] or math.isfinite(loss))):
        raise FloatingPointError("the linear probe did not converge to finite weights")
    weight = w / std  # back to raw features: w.(x - mean)/std + b = (w/std).x + (b - (w/std).mean)
    return Probe(weight, b - weight @ mean, l2, loss, sorted(grid))


class ProbeEpochs:
    """Feature-extract mode with --solver lbfgs: one "epoch" that fits the converged probe on the cached training
    features and puts it into the model's head; the val images are only measured, never used to choose."""

    count = 1  # the loop runs this many epochs, whatever --epochs says

    def __init__(self, trainer, train_feats, train_labels, val_feats, val_labels):
        self.t = trainer
        trainer.scheduler = None  # fitted once, to convergence: no lr schedule
        self.train_feats, self.train_labels = train_feats, train_labels  # [views, N, D], [N]
        self.val_feats, self.val_labels = val_feats, val_labels
        import torch

        self.linear = next(m for m in reversed(list(trainer.net.head_module().modules()))
                           if isinstance(m, torch.nn.Linear))
        self.batches = 1
        self.generator = _NoGenerator()
        self.val_logits = None
        self.probe: Probe | None = None

    def __call__(self, epoch: int) -> dict:
        import torch

        t = self.t
        weights = class_weights(self.train_labels.tolist(), t.num_classes) if t.cfg.balance != "none" else None
        self.probe = fit_probe(self.train_feats.cpu(), self.train_labels.cpu(), t.num_classes, t.cfg.seed, weights)
        with torch.no_grad():
            self.linear.weight.copy_(self.probe.weight)
            self.linear.bias.copy_(self.probe.bias)
        t.emit("probe", l2=self.probe.l2, cv_loss=self.probe.cv_loss, tried=len(self.probe.grid))
        head = t.net.head_module().eval()
        with torch.inference_mode():
            train = head(self.train_feats.reshape(-1, self.train_feats.shape[-1]).to(t.device)).float().cpu()
            val = head(self.val_feats.to(t.device)).float().cpu()
        y = self.train_labels.cpu().repeat(len(self.train_feats))
        self.val_logits = val
        ce = torch.nn.functional.cross_entropy
        return {"train_loss": float(ce(train, y)), "train_acc": float((train.argmax(1) == y).float().mean()),
                "val_loss": float(ce(val, self.val_labels.cpu())),
                "val_acc": float((val.argmax(1) == self.val_labels.cpu()).float().mean())}


class _NoGenerator:
    """The probe draws no random numbers during training: nothing to save for a resume."""

    def get_state(self):
        return None

    def set_state(self, state) -> None:
        pass
