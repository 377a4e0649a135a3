"""k-fold cross-validation: one run per stratified fold in FOLDER/fold-N/, then the mean and spread of the
folds' best val accuracy (FOLDER/folds.json); the fold models form an ensemble."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

from finetune._util import ddp as dist
from finetune._util.files import write_json_atomic
from finetune.config import TrainConfig, validate
from finetune.errors import UsageError
from finetune.events import Emit, silent
from finetune.training.outputs import run_folder


def fold_configs(cfg: TrainConfig) -> tuple[Path, list[TrainConfig]]:
    """The cross-validation folder and one config per fold (all, or --fold's), writing into FOLDER/fold-N/."""
    root = run_folder(cfg)
    if root.is_dir() and any(root.iterdir()) and not cfg.overwrite:
        raise UsageError(f"-o {root}: the folder is not empty; replace its fold runs with --overwrite, or choose "
                         "another -o")
    numbers = [cfg.fold] if cfg.fold else range(1, cfg.folds + 1)
    return root, [dataclasses.replace(cfg, fold=i, output=str(root / f"fold-{i}")) for i in numbers]


class Fold(TypedDict, total=False):
    """One fold's run, as folds.json lists it."""

    fold: int
    model: str  # its best.pt
    best_epoch: int
    val_acc: float
    val_loss: float
    val_images: int
    val_map: float  # multi-label folds


class CrossValidation(TypedDict, total=False):
    """What --folds K returns and writes to FOLDER/folds.json: every fold, their mean and spread."""

    folds: list[Fold]
    mean_val_acc: float
    sd_val_acc: float  # sample standard deviation over the folds
    images: int  # val images over all folds
    seconds: float
    path: str  # folds.json
    mean_val_map: float  # multi-label folds: mAP is what chose each fold's model
    sd_val_map: float


def cross_validate(cfg: TrainConfig, run_one: Callable, emit: Emit = silent) -> CrossValidation:
    """Train every fold with run_one(fold_cfg) -> Run; returns the summary written to folds.json (rank 0; the other
    processes get an empty one)."""
    validate(cfg)
    root, configs = dist.on_main(lambda: fold_configs(cfg))  # one timestamped folder for all processes
    results = []
    for i, fold_cfg in enumerate(configs, 1):
        if dist.current().main:
            emit("fold_start", fold=i, folds=len(configs), output=str(fold_cfg.output))
        results.append(run_one(fold_cfg))
    if not dist.current().main:
        return {}
    return summarize_folds(root, results)


def summarize_folds(root: Path, results: list) -> CrossValidation:
    """Per-fold best val accuracy, their mean and sample standard deviation; written to ROOT/folds.json."""
    accs = [r.best_val_acc for r in results]
    folds = [{"fold": int(r.run_dir.name.rsplit("-", 1)[1]), "model": str(r.model_path), "best_epoch": r.best_epoch,
              "val_acc": r.best_val_acc, "val_loss": r.best_val_loss, "val_images": _val_images(r.run_dir)}
             for r in results]
    summary: CrossValidation = {"folds": folds, "mean_val_acc": statistics.mean(accs),
               "sd_val_acc": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "images": sum(f["val_images"] for f in folds), "seconds": sum(r.seconds for r in results),
               "path": str(root / "folds.json")}
    maps = [r.best_val_map for r in results]
    if all(m is not None for m in maps):  # multi-label folds: mAP is what chose each fold's model
        for f, m in zip(folds, maps):
            f["val_map"] = m
        summary |= {"mean_val_map": statistics.mean(maps), "sd_val_map": statistics.stdev(maps) if len(maps) > 1
                    else 0.0}
    write_json_atomic(root / "folds.json", summary)
    return summary


def _val_images(run_dir: Path) -> int:
    return json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))["val_images"]
