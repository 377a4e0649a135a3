"""Hyper-parameter search on Optuna: random start-up trials, then TPE (a model of which settings did well),
with a pruner fed each epoch's val accuracy so that clearly worse trials stop early.

Every trial is a normal run in its own folder (ROOT/trial-NNN). The study lives in ROOT/study.db
(SQLite), so running the same search again resumes it (a trial cut short by an interruption is run
again) and a larger --trials adds trials to it. A diverged trial (NaN loss) is a result: it counts as
0 accuracy, so the sampler learns to avoid its region. The best finished trial's settings are written
as ROOT/best.json, a config file that `finetune train DATA --config best.json` reproduces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from finetune._util.ddp import single_process
from finetune._util.extras import require
from finetune._util.files import write_csv_atomic, write_json_atomic
from finetune.config import MODES, OPTIMIZERS, TrainConfig, validate
from finetune.errors import DivergedError, ResourceError, UsageError
from finetune.events import Trial
from finetune.training import run_training
from finetune.training.outputs import RunLock
from finetune.training.plan import kind, unused

# The searched settings and their ranges. lr is per optimizer (AdamW wants ~10x lower rates).
LR_RANGE = {"sgd": (1e-4, 1e-1), "adamw": (1e-5, 1e-2)}
WEIGHT_DECAY_RANGE = (1e-6, 1e-2)
DROPOUT_RANGE = (0.0, 0.5)
BATCH_SIZES = (16, 32, 64)
AUGMENTS = ("light", "standard")
PRUNERS = ("median", "halving", "none")
STUDY_FILE = "study.db"
STUDY_NAME = "finetune-tune"
# What a study remembers of the search that made it; a search resumed with other values would mix two searches.
SEARCH_KEYS = ("settings", "space", "coarse_epochs", "fine_epochs", "pruner")


@dataclass
class Space:
    """Ranges to search: (low, high) for log-uniform / uniform numbers, tuples of choices otherwise."""

    lr: dict = field(default_factory=lambda: dict(LR_RANGE))
    weight_decay: tuple = WEIGHT_DECAY_RANGE
    dropout: tuple = DROPOUT_RANGE
    batch_size: tuple = BATCH_SIZES
    augment: tuple = AUGMENTS
    optimizer: tuple = OPTIMIZERS
    mode: tuple = MODES

    def suggest(self, trial) -> dict:
        """One point of the space, asked of an Optuna trial (the lr's range depends on the optimizer)."""
        optimizer = trial.suggest_categorical("optimizer", list(self.optimizer))
        return {"lr": trial.suggest_float(f"lr_{optimizer}", *self.lr[optimizer], log=True),
                "weight_decay": trial.suggest_float("weight_decay", *self.weight_decay, log=True),
                "dropout": trial.suggest_float("dropout", *self.dropout, step=0.01),
                "batch_size": trial.suggest_categorical("batch_size", list(self.batch_size)),
                "augment": trial.suggest_categorical("augment", list(self.augment)), "optimizer": optimizer,
                "mode": trial.suggest_categorical("mode", list(self.mode))}

    def describe(self) -> dict:
        """Plain types, as stored with the study."""
        return {k: list(v) if isinstance(v, tuple) else {o: list(r) for o, r in v.items()}
                for k, v in dataclasses.asdict(self).items()}


@dataclass
class TuneResult:
    root: Path
    trials: list[Trial]  # every trial of the study, earlier runs' included
    best: Trial | None
    best_config: Path | None
    stopped_by_budget: bool
    resumed: int = 0  # trials the study held before this call


def startup_trials(trials: int) -> int:
    """Random trials before TPE takes over: about 30 % of the search, 3 to 10 (Optuna's default is 10)."""
    return min(10, max(3, round(trials * 0.3)))


def make_pruner(pruner: str, coarse_epochs: int, startup: int):
    """median: stop a trial whose best val accuracy so far is below the median of finished trials at the same
    epoch; halving: successive halving (keep the best third at coarse_epochs, 3x coarse_epochs, ...). Neither acts
    before a trial has run coarse_epochs epochs."""
    import optuna

    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=min(5, startup), n_warmup_steps=coarse_epochs)
    if pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=coarse_epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def run_search(base: TrainConfig, root: Path, trials: int = 20, coarse_epochs: int = 3, fine_epochs: int = 10,
               budget: float | None = None, seed: int = 0, space: Space | None = None,
               emit: Callable = lambda *a, **k: None, run: Callable | None = None, pruner: str = "median",
               stop: Callable[[], int] = lambda: 0) -> TuneResult:
    """Search until the study in ROOT holds `trials` finished trials; results in ROOT/trials.json and .csv, the
    best settings in ROOT/best.json.

    run(cfg, emit) trains one trial (default: finetune.training.run_training) and emits "epoch_end" events,
    which feed the pruner. budget is in seconds: no new trial starts after it is spent. stop() returning a
    signal number ends the search after the running trial's step (Interrupted); it resumes from the study.
    """
    single_process("tune")
    require("optuna", "tune", "finetune tune")
    _check(trials, coarse_epochs, fine_epochs, pruner)
    base = dataclasses.replace(base, solver="sgd")  # the searched lr, epochs and batch size act on an SGD head
    validate(base)
    space = space or Space()
    search = {"settings": _settings(base), "space": space.describe(), "coarse_epochs": coarse_epochs,
              "fine_epochs": fine_epochs, "pruner": pruner}
    root.mkdir(parents=True, exist_ok=True)
    lock = RunLock(root)
    try:
        with _quiet_optuna():
            study = _open_study(root, search, trials, seed, coarse_epochs, pruner)
            return _Search(base, root, study, space, fine_epochs, trials, emit, run, stop).go(budget)
    finally:
        lock.release()


def _check(trials: int, coarse_epochs: int, fine_epochs: int, pruner: str) -> None:
    if trials < 1:
        raise UsageError(f"--trials {trials}: must be at least 1")
    if coarse_epochs < 1 or fine_epochs < 1:
        raise UsageError("--coarse-epochs and --fine-epochs must be at least 1")
    if coarse_epochs > fine_epochs:
        raise UsageError(f"--coarse-epochs {coarse_epochs}: must not exceed --fine-epochs {fine_epochs}")
    if pruner not in PRUNERS:
        raise UsageError(f"--pruner {pruner}: choose one of {', '.join(PRUNERS)}")


def _settings(base: TrainConfig) -> dict:
    return {k: v for k, v in base.to_dict().items() if k not in ("output", "workers", "device", "given")}


@contextlib.contextmanager
def _quiet_optuna():
    """Optuna logs each trial to stderr; the library stays silent (the CLI renders trials from events)."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def _open_study(root: Path, search: dict, trials: int, seed: int, coarse_epochs: int, pruner: str):
    """The study in ROOT/study.db: created, or resumed if it is the same search."""
    import optuna

    db = root / STUDY_FILE
    if not db.exists() and any(root.glob("trial-*")):
        raise UsageError(f"-o {root}: holds trial folders but no {STUDY_FILE} (a search by an older finetune, or "
                         "its study was deleted); choose another -o")
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}")
        _fast_commits(storage)
        existing = optuna.study.get_all_study_names(storage)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy and Optuna raise many types for a bad database
        raise UsageError(f"{db}: not a readable Optuna study ({type(e).__name__}); choose another -o") from None
    startup = startup_trials(trials)
    held = len(storage.get_all_trials(storage.get_study_id_from_name(STUDY_NAME))) if STUDY_NAME in existing else 0
    # A resumed study gets fresh random draws: the same seed would repeat the first run's start-up trials.
    with warnings.catch_warnings():  # group: Optuna marks it experimental; it is what conditional lr ranges need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(n_startup_trials=startup, seed=seed + held, group=True)
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize", sampler=sampler,
                                pruner=make_pruner(pruner, coarse_epochs, startup), load_if_exists=True)
    before = study.user_attrs.get("search")
    if before is None:
        study.set_user_attr("search", search)
    else:
        _same_search(root, before, search)
    return study


def _fast_commits(storage) -> None:
    """SQLite in write-ahead-log mode without a disk sync per commit: an Optuna trial commits ~15 times (each
    suggestion, report and attribute), 17 ms apiece with syncs on this project's disk, 2 ms without. A crash
    can lose the last commits, never corrupt the study; a lost trial is run again."""
    import sqlalchemy

    def pragmas(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sqlalchemy.event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections made before the listener are dropped


def _same_search(root: Path, before: dict, now: dict) -> None:
    """Refuse to resume a study with other data, model, ranges or epochs, naming the first difference."""
    for key in SEARCH_KEYS:
        old, new = before.get(key), now[key]
        if key == "settings":
            diff = next((k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)), None)
            if diff is not None:
                raise UsageError(f"-o {root}: holds a search with {diff} = {old.get(diff)!r}, not {new.get(diff)!r}; "
                                 "resume it with the same options, or choose another -o for a new search")
        elif old != new:
            raise UsageError(f"-o {root}: holds a search with {key} = {old!r}, not {new!r}; resume it with the same "
                             "options, or choose another -o for a new search")


class _Search:
    """One call's share of a study: earlier trials read back, new ones asked, run, told."""

    def __init__(self, base, root, study, space, fine_epochs, trials, emit, run, stop):
        self.base, self.root, self.study, self.space = base, root, study, space
        self.fine_epochs, self.trials, self.emit, self.stop = fine_epochs, trials, emit, stop
        self.run = run or (lambda cfg, on_event: run_training(cfg, on_event, stop=stop))
        self.done = [self._read(t) for t in self._close_interrupted()]
        self.startup = startup_trials(trials)

    def _close_interrupted(self) -> list:
        """Trials left running by a process that died are marked failed (and run again)."""
        from optuna.trial import TrialState

        storage = self.study._storage  # Optuna's own way to fail stale trials needs a heartbeat thread
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        return self.study.get_trials(deepcopy=False)

    def _read(self, t) -> Trial:
        record = dict(t.user_attrs.get("record") or {"number": t.number + 1, "sampler": "?", "params": {},
                                                     "epochs": self.fine_epochs})
        if t.state.name != "COMPLETE" and record.get("status") in (None, "running"):
            record["status"] = "interrupted"
        return Trial(**record)

    def finished(self) -> int:
        """Trials that count towards --trials (an interrupted one is run again)."""
        return sum(t.status != "interrupted" for t in self.done)

    def go(self, budget: float | None) -> TuneResult:
        resumed, start, stopped = len(self.done), time.perf_counter(), False
        if resumed:
            self.emit("resumed", trials=list(self.done), finished=self.finished(), total=self.trials)
        while self.finished() < self.trials:
            if budget is not None and time.perf_counter() - start >= budget:
                stopped = True
                break
            self._one()
        best = max((t for t in self.done if t.status == "ok"), key=lambda t: (t.val_acc, -t.number), default=None)
        best_config = None
        if best is not None:
            settings = dataclasses.replace(self.base, **best.params, epochs=best.epochs).to_dict()
            for key in ("data", "output"):
                settings.pop(key)
            settings["given"] = list(self._given(best.params))
            best_config = write_json_atomic(self.root / "best.json", {
                "format": "finetune-config", "trial": best.number, "val_acc": best.val_acc, "settings": settings})
        return TuneResult(self.root, self.done, best, best_config, stopped, resumed)

    def _given(self, params: dict) -> tuple[str, ...]:
        """What a trial (and `train --config best.json`) is given, as if its user had typed it: what the search's
        user typed, what the trial searched, its epochs (and the SGD head of a feature-extract search). So a trial
        applies what it searched (an auto plan on a CPU trains, not probes), and best.json does not ask for every
        setting it records (--backbone-lr-mult would be refused for a frozen backbone)."""
        cfg = dataclasses.replace(self.base, **params)
        searched = {*params, "epochs", *(("solver",) if cfg.mode == "feature-extract" else ())}
        # a searched setting the trial's mode cannot use (dropout of an SGD head on frozen features is used; a
        # --backbone-lr-mult would not be) is left untyped rather than refused: the search chose it, not the user
        run_kind = kind("finetune" if cfg.mode == "auto" else cfg.mode, cfg.solver)  # auto, given these, trains
        idle = set(unused(dataclasses.replace(cfg, given=tuple(searched)), run_kind))
        return tuple(sorted(set(self.base.given) | (searched - idle)))

    def _one(self) -> None:
        import optuna

        asked = self.study.ask()
        sampler = "random" if asked.number < self.startup else "tpe"
        trial = Trial(asked.number + 1, sampler, self.fine_epochs, self.space.suggest(asked))
        trial.run_dir = str(self.root / f"trial-{trial.number:03d}")
        cfg = dataclasses.replace(self.base, **trial.params, epochs=self.fine_epochs, output=trial.run_dir,
                                  given=self._given(trial.params))
        self.done.append(trial)
        self._record(asked, trial)  # so that an interrupted trial still shows what it was
        self.emit("trial_start", trial=trial)
        t0 = time.perf_counter()
        value, state = None, optuna.trial.TrialState.COMPLETE
        try:
            result = self.run(cfg, self._reporter(asked, trial))
            value = _score(result)
            trial.status, trial.val_acc, trial.best_epoch = "ok", value, result.best_epoch
        except optuna.TrialPruned:
            trial.status, state = "pruned", optuna.trial.TrialState.PRUNED
        except DivergedError as e:  # a learning rate too high for this setting: a result, not a failure
            trial.status, trial.error, value = "diverged", str(e), 0.0
        except ResourceError as e:  # e.g. out of memory at this batch size: the search goes on without it
            trial.status, trial.error, state = "failed", str(e), optuna.trial.TrialState.FAIL
        except BaseException as e:  # Ctrl-C, or an error every trial would meet: the search stops; resumed, the
            trial.status, trial.error = "interrupted", str(e)  # trial is run again
            trial.seconds = time.perf_counter() - t0
            self._tell(asked, trial, None, optuna.trial.TrialState.FAIL)
            raise
        trial.seconds = time.perf_counter() - t0
        self._tell(asked, trial, value, state)
        self.emit("trial_end", trial=trial, trials=self.done)

    def _reporter(self, asked, trial: Trial) -> Callable:
        """The trial's emit: each epoch's val accuracy goes to the pruner, which may stop the trial there."""
        import optuna

        def on_event(event: str, **kw) -> None:
            if event != "epoch_end":
                return
            row = kw["row"]
            trial.epochs_run = row["epoch"]
            score = row["val_acc"] if row.get("val_map") is None else row["val_map"]  # multi-label: mAP
            if trial.val_acc is None or score > trial.val_acc:
                trial.val_acc, trial.best_epoch = score, row["epoch"]
            asked.report(score, row["epoch"])
            self.emit("trial_epoch", trial=trial, row=row)
            if row["epoch"] < trial.epochs and asked.should_prune():
                raise optuna.TrialPruned(f"stopped at epoch {row['epoch']}")

        return on_event

    def _record(self, asked, trial: Trial) -> None:
        """The trial as trials.json shows it, kept in the study (one write: each is a committed transaction)."""
        asked.set_user_attr("record", dataclasses.asdict(trial))

    def _tell(self, asked, trial: Trial, value, state) -> None:
        self._record(asked, trial)
        self.study.tell(asked, value if state.name == "COMPLETE" else None, state=state)
        _write_trials(self.root, self.done)


def _score(result) -> float:
    """What ranks a trial: val mAP for a multi-label run (what chose its best epoch), else val accuracy."""
    mean_ap = result.best_val_map
    return result.best_val_acc if mean_ap is None else mean_ap


def _write_trials(root: Path, trials: list[Trial]) -> None:
    rows = [t.row() for t in trials]
    write_json_atomic(root / "trials.json", rows)
    write_csv_atomic(root / "trials.csv", list(dict.fromkeys(k for r in rows for k in r)), rows)
