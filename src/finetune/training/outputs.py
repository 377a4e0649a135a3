"""The run folder, written by one RunSaver: a fresh or resumed folder held under a lock, config.json,
best.pt (and runs/latest.json), state.pt and metrics.csv each epoch, results.json and the report at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from finetune._util.files import (
    TEMP_PREFIX,
    point_latest,
    prune_stale_temp_files,
    timestamped_dir,
    write_csv_atomic,
    write_json_atomic,
)
from finetune.config import TrainConfig
from finetune.errors import ResourceError, UsageError
from finetune.metrics import calibrate
from finetune.metrics.classification import classification_report, confident_mistakes
from finetune.metrics.multilabel import label_mistakes, multilabel_report
from finetune.models.model_file import ModelFile, save_model_file, update_model_file
from finetune.report.html import write_report
from finetune.tasks.multilabel import binary_pairs, cross_fitted_f1, fit_thresholds, probabilities, targets
from finetune.training.resume import STATE_FILE, save_state
from finetune.training.tracking import MLFLOW_FILE, TENSORBOARD_DIR

METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "update_ratio_head",
                 "update_ratio_backbone", "seconds", "elapsed")
LOCK_FILE = ".finetune.lock"
# What a run writes into its folder: --overwrite removes these (and nothing else).
RUN_FILES = ("best.pt", STATE_FILE, "config.json", "split.json", "metrics.csv", "results.json", "report.html",
             "curves.png", "confusion.png", "wrong.png", "filters.png", "reliability.png", "label_issues.png",
             MLFLOW_FILE)
RUN_FOLDERS = (TENSORBOARD_DIR,)  # --log tensorboard's event files
MAX_WRONG = 16


def run_folder(cfg: TrainConfig) -> Path:
    """--output as given, else runs/<date>-<time>-<model>."""
    return Path(cfg.output) if cfg.output else timestamped_dir("", cfg.model)


class RunLock:
    """An exclusive lock on a run folder while a run writes into it; the kernel releases it when the process
    ends however it ends, so a crashed run never leaves the folder locked."""

    def __init__(self, folder: Path):
        import fcntl

        self.path = folder / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise ResourceError(f"{folder}: another finetune run is writing to this run folder right now; wait for "
                                "it to finish, or choose another folder with -o") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE and not p.name.startswith(TEMP_PREFIX))


def check_run_folder(cfg: TrainConfig, resuming: bool) -> None:
    """Before any long work: refuse a run folder that holds an earlier run (unless resuming it, or --overwrite)
    or that another run is writing to right now. Creates nothing."""
    folder = run_folder(cfg)
    if not folder.is_dir():
        return
    if (folder / LOCK_FILE).exists():
        RunLock(folder).release()  # raises when another process holds it
    if not resuming and not cfg.overwrite and _leftovers(folder):
        raise UsageError(f"-o {folder}: the folder is not empty (it holds {', '.join(_leftovers(folder)[:4])}); "
                         "continue that run with --resume, replace it with --overwrite, or choose another -o")


def open_run_folder(cfg: TrainConfig, resuming: bool) -> tuple[Path, RunLock]:
    """Create (or, resuming, reuse) the run folder and lock it. A folder holding anything is refused unless the
    run resumes it, or --overwrite removes the files an earlier run wrote there."""
    check_run_folder(cfg, resuming)
    folder = run_folder(cfg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ResourceError(f"{folder}: cannot create the run folder ({e.strerror}); choose another with -o") \
            from None
    lock = RunLock(folder)
    try:
        prune_stale_temp_files(folder)
        if not resuming and _leftovers(folder):
            _clear(folder)
    except BaseException:
        lock.release()
        raise
    return folder, lock


def _clear(folder: Path) -> None:
    """--overwrite: remove what an earlier run wrote (and only that)."""
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        if (folder / name).is_dir() and not (folder / name).is_symlink():
            shutil.rmtree(folder / name)
    if _leftovers(folder):
        raise UsageError(f"-o {folder}: --overwrite removes only the files a run writes, and the folder also holds "
                         f"{', '.join(_leftovers(folder)[:4])}; choose another -o")


class RunSaver:
    """Everything a run writes, in one place (rank 0 only under several processes)."""

    def __init__(self, folder: Path, config: dict, classes: list[str], enabled: bool = True):
        self.folder, self.config, self.classes, self.enabled = folder, config, classes, enabled
        self.model_path = folder / "best.pt"

    def start(self, split_files: dict) -> None:
        if self.enabled:
            write_json_atomic(self.folder / "config.json", self.config)
            write_json_atomic(self.folder / "split.json", split_files)

    def best(self, model: ModelFile) -> None:
        if self.enabled:
            save_model_file(self.model_path, model)
            point_latest(self.folder, self.model_path)

    def epoch(self, history: list[dict], state: dict) -> None:
        if self.enabled:
            fields = list(METRIC_FIELDS) + (["val_map"] if any("val_map" in r for r in history) else [])
            write_csv_atomic(self.folder / "metrics.csv", fields, history)
            save_state(self.folder, state)

    def finish(self, summary: dict, split, best: dict, history: list[dict], cfg: TrainConfig, emit) -> dict:
        """results.json (val metrics, calibration, mistakes, skipped files) and the report; returns the summary."""
        labels = [s.label for s in split.val]
        logits = best.get("val_logits")
        if split.multi_label and logits is not None and len(logits) == len(labels):
            self._multilabel(summary, split, logits, cfg, emit)
        elif logits is not None and len(logits) == len(labels):
            summary["val_metrics"] = classification_report(labels, logits.argmax(1).tolist(), self.classes)
            summary["calibration"] = self._calibration(cfg, logits, labels, emit)
            probs = (logits / summary["calibration"]["temperature"]).softmax(1)
            summary["wrong"] = confident_mistakes([s.path for s in split.val], labels, probs, self.classes, MAX_WRONG,
                                                  split.root)
        write_json_atomic(self.folder / "results.json", summary)
        try:
            paths = write_report(self.folder, history=history, classes=self.classes, wrong=summary.get("wrong", []),
                                 filters_before=best.get("filters_before"), filters_after=best.get("filters"),
                                 config=self.config, summary=summary, model=self.model_path)
        except (Exception, MemoryError) as e:  # noqa: BLE001 - pictures are a bonus; never lose a finished run
            emit("report_failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        else:
            emit("report", paths=paths)
        return summary

    def _multilabel(self, summary: dict, split, logits, cfg: TrainConfig, emit) -> None:
        """Multi-label: a shared temperature with --calibrate (fitted on every val (image, label) decision), the
        per-class thresholds fitted on val (stored in the model), the metrics at them, the largest mistakes."""
        y = targets(split.val, len(self.classes))
        pairs, decisions = binary_pairs(logits), y.flatten().long()
        temperature = calibrate.fit_temperature(pairs, decisions) if cfg.calibrate else 1.0
        probs = probabilities(logits, temperature)
        thresholds = fit_thresholds(probs, y)
        update_model_file(self.model_path, thresholds=thresholds, temperature=temperature)
        report = multilabel_report(probs, y, thresholds, self.classes)
        report["f1_macro_cross_fitted"] = cross_fitted_f1(probs, y)
        summary["val_metrics"] = report
        summary["calibration"] = calibrate.calibration_summary(pairs, decisions, temperature) | {
            "fitted": cfg.calibrate, "over": "every (image, label) decision"}
        summary["wrong"] = label_mistakes([s.path for s in split.val], probs, y, thresholds, self.classes, MAX_WRONG,
                                          split.root)
        emit("thresholds", thresholds=dict(zip(self.classes, thresholds)), images=len(y),
             f1=report["f1_macro"], f1_cross_fitted=report["f1_macro_cross_fitted"])

    def _calibration(self, cfg: TrainConfig, logits, labels: list[int], emit) -> dict:
        """The best epoch's calibration on the val set; with --calibrate, a temperature fitted (and stored in the
        model file) with its ECE measured cross-fitted (fit on one half of val, measured on the other)."""
        temperature = calibrate.fit_temperature(logits, labels) if cfg.calibrate else 1.0
        out = calibrate.calibration_summary(logits, labels, temperature) | {"fitted": cfg.calibrate}
        if cfg.calibrate:
            out["ece_cross_fitted"] = calibrate.cross_fitted_ece(logits, labels)
            update_model_file(self.model_path, temperature=temperature)
            emit("calibrated", temperature=temperature, ece_before=out["ece_before"],
                 ece_cross_fitted=out["ece_cross_fitted"], images=len(labels))
        return out
