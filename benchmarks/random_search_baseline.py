"""The random search `finetune tune` ran before it moved to Optuna (finetune 8e3ca94, src/finetune/tune.py), kept
verbatim as the baseline of benchmarks/tune_search.py: random samples over wide ranges with few epochs (70 %
of the trials), then ranges narrowed around the best 3 and more epochs (Bergstra & Bengio 2012)."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from finetune._util.files import write_csv_atomic, write_json_atomic
from finetune.config import MODES, OPTIMIZERS, TrainConfig, validate
from finetune.errors import DivergedError

# The searched settings and their stage-1 ranges. lr is per optimizer (AdamW wants ~10x lower rates).
LR_RANGE = {"sgd": (1e-4, 1e-1), "adamw": (1e-5, 1e-2)}
WEIGHT_DECAY_RANGE = (1e-6, 1e-2)
DROPOUT_RANGE = (0.0, 0.5)
BATCH_SIZES = (16, 32, 64)
AUGMENTS = ("light", "standard")
TOP = 3  # stage 2 narrows around this many best stage-1 trials


@dataclass
class Space:
    """Ranges to sample from: (low, high) for log-uniform / uniform numbers, tuples of choices otherwise."""

    lr: dict = field(default_factory=lambda: dict(LR_RANGE))
    weight_decay: tuple = WEIGHT_DECAY_RANGE
    dropout: tuple = DROPOUT_RANGE
    batch_size: tuple = BATCH_SIZES
    augment: tuple = AUGMENTS
    optimizer: tuple = OPTIMIZERS
    mode: tuple = MODES

    def sample(self, rng: random.Random) -> dict:
        optimizer = rng.choice(self.optimizer)
        low, high = self.lr[optimizer]
        return {"lr": _log_uniform(rng, low, high), "weight_decay": _log_uniform(rng, *self.weight_decay),
                "dropout": round(rng.uniform(*self.dropout), 3), "batch_size": rng.choice(self.batch_size),
                "augment": rng.choice(self.augment), "optimizer": optimizer, "mode": rng.choice(self.mode)}

    def narrowed(self, best: list[dict]) -> Space:
        """Ranges around the best trials: numbers from half the lowest to twice the highest value seen (log
        scale; dropout +-0.1), clipped to the stage-1 range; choices cut to the values the best trials used."""
        def around(values, low, high):
            return max(low, min(values) / 2), min(high, max(values) * 2)

        lr = {}
        for opt in {t["optimizer"] for t in best}:
            lr[opt] = around([t["lr"] for t in best if t["optimizer"] == opt], *self.lr[opt])
        drop = [t["dropout"] for t in best]
        return Space(lr=lr, weight_decay=around([t["weight_decay"] for t in best], *self.weight_decay),
                     dropout=(max(self.dropout[0], min(drop) - 0.1), min(self.dropout[1], max(drop) + 0.1)),
                     batch_size=_kept(self.batch_size, best, "batch_size"),
                     augment=_kept(self.augment, best, "augment"), optimizer=tuple(sorted(lr)),
                     mode=_kept(self.mode, best, "mode"))


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return float(f"{math.exp(rng.uniform(math.log(low), math.log(high))):.3g}")


def _kept(choices: tuple, best: list[dict], key: str) -> tuple:
    return tuple(c for c in choices if any(t[key] == c for t in best))


@dataclass
class Trial:
    number: int
    stage: int
    epochs: int
    params: dict
    status: str = "running"  # ok | diverged
    val_acc: float | None = None
    best_epoch: int | None = None
    seconds: float = 0.0
    run_dir: str = ""
    error: str = ""

    def row(self) -> dict:
        return {"trial": self.number, "stage": self.stage, "epochs": self.epochs, **self.params,
                "status": self.status, "val_acc": self.val_acc, "best_epoch": self.best_epoch,
                "seconds": round(self.seconds, 2), "run_dir": self.run_dir, "error": self.error}


@dataclass
class TuneResult:
    root: Path
    trials: list[Trial]
    best: Trial | None
    best_config: Path | None
    stopped_by_budget: bool


def run_search(base: TrainConfig, root: Path, trials: int = 20, coarse_epochs: int = 3, fine_epochs: int = 10,
               budget: float | None = None, seed: int = 0, space: Space | None = None,
               emit: Callable = lambda *a, **k: None, run: Callable | None = None) -> TuneResult:
    """Random search in two stages; results in ROOT/trials.json and .csv, the best settings in ROOT/best.json.

    run(cfg) trains one trial; budget is in seconds:
    no new trial starts after it is spent.
    """
    base = dataclasses.replace(base, solver="sgd")  # the searched lr, epochs and batch size act on an SGD head
    validate(base)
    space = space or Space()
    rng = random.Random(seed)
    n_coarse = trials if trials < 4 else max(2, round(trials * 0.7))
    start = time.perf_counter()
    done: list[Trial] = []
    stopped = narrowed = False
    stage_space = space
    for number in range(1, trials + 1):
        if budget is not None and time.perf_counter() - start >= budget:
            stopped = True
            break
        stage = 1 if number <= n_coarse else 2
        if stage == 2 and not narrowed:
            narrowed = True
            ok = sorted((t for t in done if t.status == "ok"), key=lambda t: -t.val_acc)[:TOP]
            if ok:
                stage_space = space.narrowed([t.params for t in ok])
            emit("stage", stage=2, space=dataclasses.asdict(stage_space), around=[t.number for t in ok])
        epochs = coarse_epochs if stage == 1 else fine_epochs
        trial = Trial(number, stage, epochs, stage_space.sample(rng))
        trial.run_dir = str(root / f"trial-{number:03d}")
        cfg = dataclasses.replace(base, **trial.params, epochs=epochs, output=trial.run_dir)
        emit("trial_start", trial=trial)
        t0 = time.perf_counter()
        try:
            result = run(cfg)
            trial.status, trial.val_acc, trial.best_epoch = "ok", result.best_val_acc, result.best_epoch
        except DivergedError as e:  # a learning rate too high for this setting: a result, not a failure
            trial.status, trial.error = "diverged", str(e)
        trial.seconds = time.perf_counter() - t0
        done.append(trial)
        _write_trials(root, done)
        emit("trial_end", trial=trial, trials=done)
    ok = [t for t in done if t.status == "ok"]
    best = max(ok, key=lambda t: (t.val_acc, t.stage, -t.number)) if ok else None
    best_config = None
    if best is not None:
        settings = dataclasses.replace(base, **best.params, epochs=best.epochs, output=None).to_dict()
        settings.pop("data")
        settings.pop("output")
        best_config = write_json_atomic(root / "best.json", {"format": "finetune-config", "trial": best.number,
                                                            "val_acc": best.val_acc, "settings": settings})
    return TuneResult(root, done, best, best_config, stopped)


def _write_trials(root: Path, trials: list[Trial]) -> None:
    rows = [t.row() for t in trials]
    write_json_atomic(root / "trials.json", rows)
    write_csv_atomic(root / "trials.csv", list(rows[0]), rows)
