"""The learning-rate range test: raise the lr exponentially step by step and watch the loss.

The loss falls while the lr is useful and explodes once it is too high; a good lr sits well below
the point of the lowest (smoothed) loss. A suggestion, not an oracle: the plot tells more.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune._util.ddp import single_process
from finetune._util.files import write_json_atomic
from finetune.config import TrainConfig, validate
from finetune.errors import DivergedError, UsageError
from finetune.training.setup import prepare, silent, torch_flags
from finetune.viz.pictures import lr_plot

SMOOTHING = 0.9  # exponential moving average of the loss; single batches are too noisy to read
STOP_FACTOR = 4.0  # stop once the smoothed loss exceeds this multiple of the best seen


@dataclass
class LrFindResult:
    lrs: list[float]
    losses: list[float]  # smoothed
    suggestion: float  # lr at the smoothed-loss minimum, divided by 10
    min_loss_lr: float
    files: dict[str, Path] = field(default_factory=dict)  # once written: "plot" (lr_find.png), "json" (lr_find.json)


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """(suggested lr, lr of the lowest loss): one tenth of the lr where the smoothed loss bottomed out."""
    if not lrs:
        raise UsageError("the lr range test recorded no step; use more images or a smaller --batch-size")
    best = min(range(len(losses)), key=losses.__getitem__)
    return lrs[best] / 10, lrs[best]


def lr_find(cfg: TrainConfig, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
            emit=silent) -> LrFindResult:
    """Run the range test with cfg's model, data, optimiser and augmentation; the model is thrown away after."""
    if not 0 < start_lr < end_lr:
        raise UsageError(f"--start-lr {start_lr} / --end-lr {end_lr}: need 0 < start < end")
    if steps < 2:
        raise UsageError(f"--steps {steps}: need at least 2")
    single_process("lr-find")
    # A range test of SGD steps: of fine-tuning unless feature-extract is asked for (auto's probe has no lr).
    cfg = validate(dataclasses.replace(cfg, solver="sgd", mode="finetune" if cfg.mode == "auto" else cfg.mode))
    with torch_flags(cfg):
        p = prepare(cfg, emit)
        try:
            return _range_test(p, start_lr, end_lr, steps, emit)
        finally:
            p.close()  # the range test leaves its batches unfinished: their loader's workers stop here


def _range_test(p, start_lr: float, end_lr: float, steps: int, emit) -> LrFindResult:
    trainer = p.trainer
    groups = trainer.optimizer.param_groups
    ratios = [g["lr"] / groups[0]["lr"] for g in groups]  # keep discriminative lrs in proportion
    gamma = (end_lr / start_lr) ** (1 / (steps - 1))
    lrs, smoothed, avg, best = [], [], 0.0, math.inf
    batches = p.epochs.endless_batches()
    emit("lr_find_start", steps=steps)
    for step in range(1, steps + 1):
        lr = start_lr * gamma ** (step - 1)
        for g, r in zip(groups, ratios):
            g["lr"] = lr * r
        x, y, module = next(batches)
        try:
            loss, _ = trainer.step(x, y, 1, step, module)
        except DivergedError:
            break
        avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
        value = avg / (1 - SMOOTHING ** step)  # bias-corrected
        lrs.append(lr)
        smoothed.append(value)
        emit("lr_find_step", step=step, lr=lr, loss=value)
        best = min(best, value)
        if value > STOP_FACTOR * best:
            break
    suggestion, at_min = suggest(lrs, smoothed)
    return LrFindResult(lrs, smoothed, suggestion, at_min)


def write_result(folder: Path, result: LrFindResult) -> dict[str, Path]:
    """lr_find.png (loss against lr, the suggestion marked) and lr_find.json in folder."""
    plot = lr_plot(folder / "lr_find.png", result.lrs, result.losses, result.suggestion, result.min_loss_lr)
    record = {k: v for k, v in asdict(result).items() if k != "files"}
    return {"plot": plot, "json": write_json_atomic(folder / "lr_find.json", record)}
