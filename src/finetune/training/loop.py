"""The training loop: epochs, the best model kept, a NaN guard, early stopping, and the run folder written
through one RunSaver. run_training is the library's entry point for one run."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from finetune._about import STARTED
from finetune._util import ddp as dist
from finetune.config import TrainConfig, validate
from finetune.errors import Interrupted, ResourceError
from finetune.events import Emit, Observer, emitter, silent
from finetune.metrics.multilabel import epoch_map
from finetune.models.model_file import ModelFile
from finetune.training.label_issues import run_label_issues
from finetune.training.outputs import RunSaver, check_run_folder, open_run_folder
from finetune.training.plan import replanned_epochs
from finetune.training.resume import rng_state, set_rng_state
from finetune.training.sanity import OverfitVerdict, update_ratio_warnings
from finetune.training.setup import Phase, Prepared, prepare, torch_flags
from finetune.training.tracking import tracked

# Train accuracy this far below val for this many fine-tuning epochs in a row: the augmentation is too strong.
STRONG_AFTER, STRONG_MARGIN = 3, 0.02


class RunSummary(TypedDict, total=False):
    """results.json: the best epoch's model and how good it is (Run.summary; the keys after `label_issues` appear
    where they apply)."""

    best_epoch: int
    best_val_acc: float
    best_val_loss: float
    seconds: float
    model: str  # best.pt
    skipped: list[dict]  # path, reason: files left out
    label_issues: dict  # likely label errors (suspects), or why they were not looked for (skipped)
    probe: dict  # the probe's L2, its held-out loss and the L2 search (runs that fit one)
    best_val_map: float | None  # multi-label runs
    rows_without_image: dict  # a label file's rows naming no image: count, the first
    val_metrics: dict  # ClassificationReport, or MultiLabelReport (metrics/)
    calibration: dict  # ECE before and after, the temperature (fitted with --calibrate)
    wrong: list[dict]  # the most confidently wrong val images


@dataclass
class Run:
    """A finished training run: where its model is, how good it is, and how it got there."""

    run_dir: Path  # the run folder (config.json, metrics.csv, report.html, ...)
    model_path: Path  # best.pt: the best epoch's model, self-describing
    best_epoch: int
    best_val_acc: float
    best_val_loss: float
    history: list[dict]  # one row per epoch, as metrics.csv has them
    seconds: float
    classes: list[str]
    device: str
    summary: RunSummary  # what results.json holds
    best_val_map: float | None = None  # multi-label runs: the best epoch's macro mAP (what chose it)
    sanity: OverfitVerdict | None = None  # with overfit: did the model memorise the images it trained on?

    @property
    def metrics(self) -> dict:
        """The best model's val metrics: accuracy with its 95 % interval, per-class precision/recall/F1, the
        confusion matrix, calibration (multi-label: mAP, F1 at the thresholds, ...)."""
        return self.summary.get("val_metrics") or {}


def run_training(cfg: TrainConfig, emit: Observer | Emit = silent, stop: Callable[[], int] = lambda: 0,
                 resume: dict | None = None) -> Run:
    """Train cfg.model on cfg.data; write the run folder; return where the best model is.

    emit receives the run's events (finetune.events): an Observer, or a callable taking (name, **fields). stop()
    returning a signal number ends training after the current step (Interrupted). resume is a state from
    training.resume.load_resume_state: training continues after its last completed epoch.
    """
    t_start = time.perf_counter()
    emit = emitter(emit)  # an undeclared event is an error at once
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
            return _Training(p.cfg, p, folder, emit if world.main else silent, resume).train(t_start)
        finally:
            p.close()
            if "lock" in held:
                held["lock"].release()


class _Training:
    """One run's state across epochs: history, the best epoch so far, and what it writes."""

    def __init__(self, cfg: TrainConfig, p: Prepared, folder: Path, emit: Emit, resume: dict | None):
        self.cfg, self.p, self.emit, self.resume = cfg, p, emit, resume
        self.world = dist.current()
        config = cfg.to_dict() | {
            "lr_used": p.trainer.lr, "train_size_used": p.train_size, "classes": p.split.classes,
            "layout": p.split.layout, "train_images": len(p.split.train), "val_images": len(p.split.val),
            "data_root": p.split.root, "multi_label": p.split.multi_label,
            "device": str(p.device), "precision": p.trainer.precision, "base_weights": p.choice.label,
            "preprocessing": p.choice.preprocessing.to_dict(), "processes": self.world.size,
            "plan": dataclasses.asdict(p.plan), "recipe": p.recipe.why}
        self.saver = RunSaver(folder, config, p.split.classes, enabled=self.world.main)
        self.history: list[dict] = []
        self.t_start = 0.0
        # best also carries what the run's pictures need: filters before training and at the best epoch, val logits.
        self.best = {"epoch": 0, "val_acc": -1.0, "val_loss": math.inf, "filters_before": p.net.first_conv_weight()}
        self.said_strong = False  # the augmentation-too-strong warning, given once
        # Multi-label runs keep the epoch with the best val mAP (threshold-free), not exact-match accuracy.
        self.task = p.trainer.task
        self.val_targets = self.task.targets(p.split.val, len(p.split.classes)) if self.task.multi_label else None

    @property
    def last(self) -> int:
        """The run's last epoch, as planned so far."""
        return self.p.phases[-1].offset + self.p.phases[-1].count

    def train(self, t_start: float) -> Run:
        p, first, self.t_start = self.p, 1, t_start
        if self.resume is not None:
            if not self.resume.get("fresh_optimizer"):  # a probe run fine-tuned from its probe starts one afresh
                p.trainer.load_state(self.resume)
            if not self.world.distributed:  # several processes seed each epoch from (seed, rank, epoch) instead
                set_rng_state(p.epochs.generator, self.resume["rng"])
            self.history, self.best = list(self.resume["history"]), dict(self.resume["best"])
            first = self.resume["epoch"] + 1
        else:
            self.saver.start(p.split_files)
        self.emit("run_config", run_dir=self.saver.folder, config=self.saver.config, resumed=first > 1)
        steps = [ph for ph in p.phases if ph.run.scheduled]
        unknown = any(ph.planned for ph in p.phases)  # a time budget plans them after the first fine-tuning epoch
        self.emit("start", run_dir=self.saver.folder, epochs=None if unknown else self.last, batches=p.epochs.batches,
                  lr=p.trainer.lr if steps else None, first=first,
                  sizes=(p.train_size, p.choice.preprocessing.crop_size) if steps else None,
                  resumed_from=self.resume["config"]["epochs"] if self.resume is not None
                  and not self.resume.get("fresh_optimizer") else None)
        try:
            for phase in p.phases:
                if self._phase(phase, first):
                    break
        except Interrupted as e:
            e.run_dir = self.saver.folder
            raise
        except MemoryError:
            raise ResourceError(f"out of {self.p.device.type.upper()} memory at batch size {self.cfg.batch_size}; try -b "
                                f"{max(1, self.cfg.batch_size // 2)} (the best model so far is in "
                                f"{self.saver.folder})") from None
        return self._finish(time.perf_counter() - t_start)

    def _phase(self, phase: Phase, first: int) -> bool:
        """The phase's epochs from the run's epoch `first` on; True when early stopping ended the run."""
        local = max(1, first - phase.offset)
        while local <= phase.count:
            if self._epoch(phase.offset + local, phase, local):
                return True
            local += 1
        return False

    def _plan(self, phase: Phase, local: int) -> None:
        """--time-budget: as many epochs as fit, from the time this phase's last epochs took (planned after the
        first, then shortened when they no longer fit or lengthened when they got faster); the lr schedule spans
        them."""
        budget, recent = self.p.plan.budget, self.history[-min(local, 3):]
        seconds = sum(row["seconds"] for row in recent) / len(recent)
        elapsed = time.perf_counter() - self.t_start
        count = replanned_epochs(phase.count, budget, elapsed, seconds, local, phase.cap or phase.count)
        changed = count != phase.count
        phase.count = count
        if local == 1 or changed:  # the schedule was made before the budget's epochs were known
            self.p.trainer.set_schedule_length(count)
            self.emit("planned", epochs=self.last, phase_epochs=phase.count, epoch_seconds=seconds, budget=budget)

    def _epoch(self, epoch: int, phase: Phase, local: int) -> bool:
        """Train and validate one epoch, keep what improved; True when early stopping ends the run."""
        t, t0 = self.p.trainer, time.perf_counter()
        self.emit("epoch_start", epoch=epoch)
        scheduled = phase.run.scheduled
        lr_used = t.optimizer.param_groups[0]["lr"] if scheduled else None
        row = {"epoch": epoch, **self._run_epoch(phase, local), "lr": lr_used,
               "update_ratio_head": t.update_ratios["head"], "update_ratio_backbone": t.update_ratios["backbone"]}
        if self.val_targets is not None:
            row["val_map"] = epoch_map(phase.run.val_logits, self.val_targets)
        t.check_finite("validation", row["val_loss"], epoch)  # nothing of a diverged epoch is saved
        score = row[self.task.best_by] if row.get(self.task.best_by) is not None else row["val_acc"]
        if scheduled:
            for warning in update_ratio_warnings(t.update_ratios, lr_used, t.lr, t.cfg.backbone_lr()):
                self.emit("update_ratio", **warning)
            self._check_augmentation(row)
        row["seconds"] = time.perf_counter() - t0
        row["elapsed"] = time.monotonic() - STARTED  # since the command started: time to this epoch's model
        self.history.append(row)
        if phase.planned:
            self._plan(phase, local)
        if scheduled:  # the next epoch's lr, on the schedule as planned now (and saved with the state below)
            t.schedule(score)
        best = self.best.get("score", self.best["val_acc"])
        improved = score > best or (score == best and row["val_loss"] < self.best["val_loss"])
        if improved:
            self.best |= {"epoch": epoch, "val_acc": row["val_acc"], "val_loss": row["val_loss"], "score": score,
                          "val_map": row.get("val_map"),
                          "filters": self.p.net.first_conv_weight(), "val_logits": phase.run.val_logits}
            self.saver.best(self._model_file(row))
        self.saver.epoch(self.history, self._state(epoch))
        self.emit("epoch_end", row=row, improved=improved)
        if self.cfg.patience and epoch - self.best["epoch"] >= self.cfg.patience:
            self.emit("early_stop", epoch=epoch, best_epoch=self.best["epoch"], patience=self.cfg.patience)
            return True
        return False

    def _check_augmentation(self, row: dict) -> None:
        """Train accuracy below val for STRONG_AFTER epochs in a row, on augmented views, means the augmentation is
        too strong for these photos (said once)."""
        trained = [r for r in self.history + [row] if r.get("lr") is not None][-STRONG_AFTER:]
        if len(trained) < STRONG_AFTER or self.cfg.augment == "none" or self.said_strong:
            return
        if all(r["train_acc"] < r["val_acc"] - STRONG_MARGIN for r in trained):
            self.said_strong = True
            self.emit("augmentation_strong", augment=self.cfg.augment, epochs=STRONG_AFTER,
                      train_acc=row["train_acc"], val_acc=row["val_acc"])

    @staticmethod
    def _run_epoch(phase: Phase, local: int) -> dict:
        import torch

        try:
            return phase.run(local)
        except torch.OutOfMemoryError:
            raise MemoryError from None

    def _model_file(self, row: dict) -> ModelFile:
        p = self.p
        metrics = {"best_epoch": row["epoch"]} | {k: row[k] for k in ("val_acc", "val_loss", "train_acc", "train_loss")}
        if row.get("val_map") is not None:
            metrics["val_map"] = row["val_map"]
        return ModelFile(arch=self.cfg.model, classes=p.split.classes, preprocessing=p.choice.preprocessing,
                         state_dict=p.net.plain_state_dict(), head=p.net.head, dropout=self.cfg.dropout,
                         base_weights=p.choice.label, metrics=metrics, config=self.saver.config,
                         multi_label=p.split.multi_label)

    def _state(self, epoch: int) -> dict:
        p = self.p
        return {"epoch": epoch, "model": p.net.module.state_dict(), **p.trainer.state(),
                "rng": rng_state(p.epochs.generator), "history": self.history, "best": self.best,
                "config": self.cfg.to_dict(), "classes": p.split.classes, "split": p.split_files,
                "plan": dataclasses.asdict(p.plan), "phases": [[ph.offset, ph.count] for ph in p.phases]}

    def _finish(self, seconds: float) -> Run:
        split, best = self.p.split, self.best
        result = Run(self.saver.folder, self.saver.model_path, best["epoch"], best["val_acc"], best["val_loss"],
                           self.history, seconds, split.classes, str(self.p.device), {}, best.get("val_map"))
        if self.world.main:
            summary = {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "best_val_loss": best["val_loss"],
                       "seconds": seconds, "model": str(self.saver.model_path),
                       "skipped": [{"path": p, "reason": r} for p, r in split.skipped],
                       "label_issues": run_label_issues(self.p)}
            probe = next((ph.run.probe for ph in self.p.phases if ph.run.probe is not None), None)
            if probe is not None:  # what the probe chose, and the search that chose it (report.html draws it)
                summary["probe"] = {"l2": probe.l2, "cv_loss": probe.cv_loss, "grid": [list(g) for g in probe.grid]}
            if split.multi_label:
                summary["best_val_map"] = best.get("val_map")
            if split.missing:
                summary["rows_without_image"] = {"count": len(split.missing), "first": [
                    {"line": n, "path": w} for n, w in split.missing[:100]]}
            self.emit("label_issues", **summary["label_issues"])
            result.summary = self.saver.finish(summary, split, best, self.history, self.cfg, self.emit)
            self.emit("finish", run_dir=self.saver.folder, model=self.saver.model_path, summary=result.summary)
        return result
