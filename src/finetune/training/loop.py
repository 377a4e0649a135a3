"""The training loop: epochs, the best model kept, a NaN guard, early stopping, and the run folder written
through one RunSaver. run_training is the library's entry point for one run."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune import distributed as dist
from finetune.checkpoint import ModelFile
from finetune.config import TrainConfig, validate
from finetune.errors import Interrupted, ResourceError
from finetune.tracking import tracked
from finetune.training.outputs import RunSaver, check_run_folder, open_run_folder
from finetune.training.resume import rng_state, set_rng_state
from finetune.training.sanity import update_ratio_warnings
from finetune.training.setup import Prepared, prepare, silent, torch_flags
from finetune.training.trainer import Emit


@dataclass
class RunResult:
    run_dir: Path
    model_path: Path
    best_epoch: int
    best_val_acc: float
    best_val_loss: float
    history: list[dict]
    seconds: float
    classes: list[str]
    device: str
    summary: dict


def run_training(cfg: TrainConfig, emit: Emit = silent, stop: Callable[[], int] = lambda: 0,
                 resume: dict | None = None) -> RunResult:
    """Train cfg.model on cfg.data; write the run folder; return where the best model is.

    stop() returning a signal number ends training after the current step (Interrupted). resume is
    a state from training.resume.load_resume_state: training continues after its last completed epoch.
    """
    t_start = time.perf_counter()
    validate(cfg)
    world = dist.init(cfg.device)
    resuming = resume is not None
    dist.on_main(lambda: check_run_folder(cfg, resuming))  # refused before any long work, nothing created
    held: dict = {}

    def open_folder() -> Path:
        folder, held["lock"] = open_run_folder(cfg, resuming)
        return folder

    # --log: the trackers observe the events (and are opened now, before any long work)
    with torch_flags(cfg), tracked(cfg, emit, resuming) as emit:
        p = prepare(cfg, emit, stop, resume)
        folder = dist.on_main(open_folder)  # rank 0 writes, under the folder's lock
        try:
            return _Run(cfg, p, folder, emit if world.main else silent, resume).train(t_start)
        finally:
            if "lock" in held:
                held["lock"].release()


class _Run:
    """One run's state across epochs: history, the best epoch so far, and what it writes."""

    def __init__(self, cfg: TrainConfig, p: Prepared, folder: Path, emit: Emit, resume: dict | None):
        self.cfg, self.p, self.emit, self.resume = cfg, p, emit, resume
        self.world = dist.current()
        config = cfg.to_dict() | {
            "lr_used": p.trainer.lr, "train_size_used": p.train_size, "classes": p.split.classes,
            "layout": p.split.layout, "train_images": len(p.split.train), "val_images": len(p.split.val),
            "device": str(p.device), "precision": p.trainer.precision, "base_weights": p.choice.label,
            "preprocessing": p.choice.preprocessing.to_dict(), "processes": self.world.size}
        self.saver = RunSaver(folder, config, p.split.classes, enabled=self.world.main)
        self.history: list[dict] = []
        self.last = getattr(p.epochs, "count", None) or cfg.epochs  # a probe is fitted once, not for --epochs
        # best also carries what the run's pictures need: filters before training and at the best epoch, val logits.
        self.best = {"epoch": 0, "val_acc": -1.0, "val_loss": math.inf, "filters_before": p.net.first_conv_weight()}

    def train(self, t_start: float) -> RunResult:
        p, first = self.p, 1
        if self.resume is not None:
            p.trainer.load_state(self.resume)
            if not self.world.distributed:  # several processes seed each epoch from (seed, rank, epoch) instead
                set_rng_state(p.epochs.generator, self.resume["rng"])
            self.history, self.best = list(self.resume["history"]), dict(self.resume["best"])
            first = self.resume["epoch"] + 1
        else:
            self.saver.start(p.split_files)
        self.emit("run_config", run_dir=self.saver.folder, config=self.saver.config, resumed=first > 1)
        self.emit("start", run_dir=self.saver.folder, epochs=self.last, batches=p.epochs.batches,
                  lr=p.trainer.lr, first=first, sizes=(p.train_size, p.choice.preprocessing.crop_size),
                  resumed_from=self.resume["config"]["epochs"] if self.resume is not None else None)
        try:
            for epoch in range(first, self.last + 1):
                if self._epoch(epoch):
                    break
        except Interrupted as e:
            e.run_dir = self.saver.folder
            raise
        except MemoryError:
            raise ResourceError(f"out of {self.p.device.type.upper()} memory at batch size {self.cfg.batch_size}; try -b "
                                f"{max(1, self.cfg.batch_size // 2)} (the best model so far is in "
                                f"{self.saver.folder})") from None
        return self._finish(time.perf_counter() - t_start)

    def _epoch(self, epoch: int) -> bool:
        """Train and validate one epoch, keep what improved; True when early stopping ends the run."""
        t, t0 = self.p.trainer, time.perf_counter()
        self.emit("epoch_start", epoch=epoch)
        lr_used = t.optimizer.param_groups[0]["lr"]
        row = {"epoch": epoch, **self._run_epoch(epoch), "lr": lr_used,
               "update_ratio_head": t.update_ratios["head"], "update_ratio_backbone": t.update_ratios["backbone"]}
        t.check_finite("validation", row["val_loss"], epoch)  # nothing of a diverged epoch is saved
        for warning in update_ratio_warnings(t.update_ratios, lr_used, t.lr):
            self.emit("update_ratio", **warning)
        t.schedule(row["val_acc"])
        row["seconds"] = time.perf_counter() - t0
        self.history.append(row)
        improved = row["val_acc"] > self.best["val_acc"] or (
            row["val_acc"] == self.best["val_acc"] and row["val_loss"] < self.best["val_loss"])
        if improved:
            self.best |= {"epoch": epoch, "val_acc": row["val_acc"], "val_loss": row["val_loss"],
                          "filters": self.p.net.first_conv_weight(), "val_logits": self.p.epochs.val_logits}
            self.saver.best(self._model_file(row))
        self.saver.epoch(self.history, self._state(epoch))
        self.emit("epoch_end", row=row, improved=improved)
        if self.cfg.patience and epoch - self.best["epoch"] >= self.cfg.patience:
            self.emit("early_stop", epoch=epoch, best_epoch=self.best["epoch"], patience=self.cfg.patience)
            return True
        return False

    def _run_epoch(self, epoch: int) -> dict:
        import torch

        try:
            return self.p.epochs(epoch)
        except torch.OutOfMemoryError:
            raise MemoryError from None

    def _model_file(self, row: dict) -> ModelFile:
        p = self.p
        metrics = {"best_epoch": row["epoch"]} | {k: row[k] for k in ("val_acc", "val_loss", "train_acc", "train_loss")}
        return ModelFile(arch=self.cfg.model, classes=p.split.classes, preprocessing=p.choice.preprocessing,
                         state_dict=p.net.plain_state_dict(), head=p.net.head, dropout=self.cfg.dropout,
                         base_weights=p.choice.label, metrics=metrics, config=self.saver.config)

    def _state(self, epoch: int) -> dict:
        p = self.p
        return {"epoch": epoch, "model": p.net.module.state_dict(), **p.trainer.state(),
                "rng": rng_state(p.epochs.generator), "history": self.history, "best": self.best,
                "config": self.cfg.to_dict(), "classes": p.split.classes, "split": p.split_files}

    def _finish(self, seconds: float) -> RunResult:
        split, best = self.p.split, self.best
        result = RunResult(self.saver.folder, self.saver.model_path, best["epoch"], best["val_acc"], best["val_loss"],
                           self.history, seconds, split.classes, str(self.p.device), {})
        if self.world.main:
            summary = {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "best_val_loss": best["val_loss"],
                       "seconds": seconds, "model": str(self.saver.model_path),
                       "skipped": [{"path": p, "reason": r} for p, r in split.skipped]}
            result.summary = self.saver.finish(summary, split, best, self.history, self.cfg, self.emit)
            self.emit("finish", run_dir=self.saver.folder, model=self.saver.model_path, summary=result.summary)
        return result
