"""Every event the library emits while it works, declared once with its fields.

The library never prints: a training run, lr-find, tune and `check --labels` tell their progress only through these
events. An observer subclasses Observer and overrides the events it wants (the CLI's views, experiment tracking, a
Python caller's progress bar); the library calls emit(name, **fields), which reaches observer.on_<name>(**fields).
An event name that is not declared here is an error at once, never silence, and tests/test_events.py checks every
emit in the source against these declarations (name and fields) before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for the annotations only (the data layer sits below this module)
    from finetune.data.dataset import DatasetSplit

Emit = Callable[..., None]  # emit(event_name, **fields)


@dataclass
class Trial:
    """One trial of `finetune tune`, as its events carry it (and best.json / trials.csv record it)."""

    number: int  # from 1, as its folder trial-NNN
    sampler: str  # random (a start-up trial) | tpe
    epochs: int  # the epochs it may run; the pruner may stop it sooner
    params: dict
    status: str = "running"  # ok | pruned | diverged | failed (out of memory) | interrupted
    val_acc: float | None = None  # the best epoch's (for a pruned trial: the best before it was stopped)
    best_epoch: int | None = None
    epochs_run: int = 0
    seconds: float = 0.0
    run_dir: str = ""
    error: str = ""

    def row(self) -> dict:
        """The trial as a row of trials.csv."""
        return {"trial": self.number, "sampler": self.sampler, "epochs": self.epochs, "epochs_run": self.epochs_run,
                **self.params, "status": self.status, "val_acc": self.val_acc, "best_epoch": self.best_epoch,
                "seconds": round(self.seconds, 2), "run_dir": self.run_dir, "error": self.error}


class Observer:
    """Receives the library's events. Every method is a no-op here: override the ones you want. An Observer is
    itself an emit: observer(name, **fields) calls its on_<name>(**fields)."""

    def __call__(self, name: str, **fields) -> None:
        if name not in EVENTS:
            raise UnknownEvent(f"event {name!r} is not declared on finetune.events.Observer")
        getattr(self, "on_" + name)(**fields)

    # --- a training run, in the order its events arrive ---------------------------------------------------------
    def on_dataset(self, split: DatasetSplit, device: str, weights: str, processes: int = 1) -> None:
        """The data as read and split (classes, counts, layout), the device, the base weights' label."""

    def on_note(self, text: str) -> None:
        """Something about the split the user should know (a class too small to hold one image out, ...)."""

    def on_missing_rows(self, rows: list[tuple[int, str]], root: str, data: str) -> None:
        """A label file's rows that name no image: (line, path as written)."""

    def on_skipped(self, files: list[tuple[str, str]], root: str) -> None:
        """Files left out, each with the reason: unreadable, not an image, changed since the scan."""

    def on_init_from(self, path: str, head_kept: bool, classes: list[str]) -> None:
        """--init-from: the model file the run starts from, and whether its head fit the classes."""

    def on_plan(self, why: str) -> None:
        """What the run will do on this machine with what was given (probe, fine-tuning, budget), and why."""

    def on_recipe(self, why: str, train_size: int, eval_size: int, augment: str) -> None:
        """Fine-tuning's recipe: the training and eval crops, the augmentation chosen for the photos, and why."""

    def on_decode_start(self, total: int, keep: bool, budget_gb: float) -> None:
        """Decoding the images once before epoch 1: into RAM when keep, else a check that each decodes."""

    def on_decode_advance(self, n: int) -> None:
        """n more images decoded."""

    def on_features(self, cached: bool, views: int) -> None:
        """Frozen-backbone features: read from the disk cache, or being computed (views per training image)."""

    def on_precision(self, precision: str) -> None:
        """The arithmetic of training steps (float32, bf16 autocast, ...)."""

    def on_run_config(self, run_dir: Path, config: dict, resumed: bool) -> None:
        """The run folder and every setting as used (what config.json records)."""

    def on_start(self, run_dir: Path, epochs: int | None, batches: int, lr: float | None, first: int,
                 sizes: tuple[int, int] | None, resumed_from: int | None = None) -> None:
        """Epochs begin: their number (None until a time budget has planned them), batches per epoch, the lr
        (None for a probe alone), the first epoch (> 1 when resuming), (train crop, eval crop)."""

    def on_epoch_start(self, epoch: int) -> None:
        """An epoch begins."""

    def on_initial_loss(self, loss: float, expected: float, suspicious: bool) -> None:
        """The first training step's loss against ln(classes), what a fresh head should give; suspicious when far
        from it."""

    def on_batch(self, step: int, loss: float, size: int) -> None:
        """One optimiser step done."""

    def on_probe(self, l2: float, cv_loss: float, tried: int) -> None:
        """The linear probe is fitted: the L2 strength chosen by cross-validation, its held-out loss."""

    def on_epoch_end(self, row: dict, improved: bool) -> None:
        """An epoch's metrics (as metrics.csv has them); improved: it is the best so far (and was saved)."""

    def on_planned(self, epochs: int, phase_epochs: int, epoch_seconds: float, budget: float) -> None:
        """--time-budget: the epochs planned to fill it (and re-planned when epochs run slower)."""

    def on_update_ratio(self, group: str, ratio: float, band: tuple[float, float], advice: str) -> None:
        """An update/weight ratio outside the healthy band: the learning rate is likely wrong."""

    def on_augmentation_strong(self, augment: str, epochs: int, train_acc: float, val_acc: float) -> None:
        """Train accuracy stayed below val for several epochs: the augmentation is too strong for these photos."""

    def on_early_stop(self, epoch: int, best_epoch: int, patience: int) -> None:
        """--patience ended the run."""

    def on_calibrated(self, temperature: float, ece_before: float, ece_cross_fitted: float, images: int) -> None:
        """--calibrate: the softmax temperature fitted on val."""

    def on_thresholds(self, thresholds: list[float], f1: float, f1_cross_fitted: float | None, images: int) -> None:
        """A multi-label run's per-class decision thresholds, fitted on val."""

    def on_label_issues(self, suspects: list[dict] | None = None, skipped: str | None = None, **found: Any) -> None:
        """Likely label errors among the run's images (out-of-sample probes + confident learning), or why they were
        not looked for (skipped)."""

    def on_report(self, paths: dict[str, Path]) -> None:
        """report.html and its pictures are written."""

    def on_report_failed(self, reason: str) -> None:
        """The pictures could not be drawn; the model and results are saved all the same."""

    def on_finish(self, run_dir: Path, model: Path, summary: dict) -> None:
        """The run is done: its folder, the best model file, results.json's content."""

    # --- experiment tracking (--log) -----------------------------------------------------------------------------
    def on_tracking(self, where: dict[str, str]) -> None:
        """Where each tracker records the run."""

    def on_tracking_failed(self, tracker: str, reason: str) -> None:
        """A tracker failed and was dropped; the run goes on."""

    def on_fold_start(self, fold: int, folds: int, output: str) -> None:
        """k-fold cross-validation: the run of one fold (from 1) begins, writing to output."""

    # --- lr-find ------------------------------------------------------------------------------------------------
    def on_lr_find_start(self, steps: int) -> None:
        """The learning-rate range test begins."""

    def on_lr_find_step(self, step: int, lr: float, loss: float) -> None:
        """One step of the range test."""

    # --- tune ---------------------------------------------------------------------------------------------------
    def on_resumed(self, trials: list[Trial], finished: int, total: int) -> None:
        """A search continues from its study."""

    def on_trial_start(self, trial: Trial) -> None:
        """A trial begins."""

    def on_trial_epoch(self, trial: Trial, row: dict) -> None:
        """A trial's epoch ended (the pruner saw it)."""

    def on_trial_end(self, trial: Trial, trials: list[Trial]) -> None:
        """A trial ended: finished, pruned, diverged or failed."""

    # --- check --labels -----------------------------------------------------------------------------------------
    def on_label_heads(self, images: int, folds: int) -> None:
        """The out-of-sample heads that score each image are being fitted."""


EVENTS = frozenset(name[len("on_"):] for name in vars(Observer) if name.startswith("on_"))


class UnknownEvent(ValueError):
    """An event name not declared on Observer: a bug in the emitting code."""


def emitter(*observers: Observer | Emit) -> Emit:
    """emit(name, **fields) that checks the name, then passes the event to each observer in turn (an Observer, or a
    plain callable taking (name, **fields))."""
    def emit(name: str, **fields) -> None:
        if name not in EVENTS:
            raise UnknownEvent(f"event {name!r} is not declared on finetune.events.Observer")
        for observer in observers:
            observer(name, **fields)

    return emit


def silent(name: str, **fields) -> None:
    """An emit that drops every event (ranks other than 0, quiet callers)."""
