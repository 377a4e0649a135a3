"""A training run as a user asks for it, in their words -> the finished run.

The command line and finetune.train both come through train(): the settings given (Python keywords, or the options
typed) over a --config file over the defaults; durations as text ("10m"); --init-from's architecture read from its
model file; the sanity check's settings for --overfit; --folds' runs; or a run to resume. So both accept, and
refuse, the same inputs with the same error, named as the caller wrote it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from finetune._util import ddp as dist
from finetune.config import SETTINGS, TrainConfig, check_names, defaults, option, typed
from finetune.configfile import given_in, load_config
from finetune.errors import UsageError
from finetune.events import Emit, silent
from finetune.training.folds import CrossValidation, cross_validate
from finetune.training.initfrom import init_arch
from finetune.training.loop import Run, run_training
from finetune.training.resume import resume_config
from finetune.training.sanity import overfit_config, overfit_verdict

# What a caller may set: every setting but `given`, which records what was set.
GIVEN_SETTINGS = tuple(name for name in SETTINGS if name != "given")


def train(data: str | os.PathLike | None, given: Mapping[str, Any], *, config: str | os.PathLike | None = None,
          resume: str | os.PathLike | None = None, emit: Emit = silent,
          stop: Callable[[], int] = lambda: 0) -> Run | CrossValidation:
    """One run (or, with folds and no fold, one run per fold) of the settings given over config's and the defaults;
    or the run at resume continued. stop() returning a signal number ends training after its step."""
    cfg, state = train_config(data, given, config=config, resume=resume)
    if cfg.folds and not cfg.fold and state is None:
        return cross_validate(cfg, lambda c: _one(c, None, emit, stop), emit)
    return _one(cfg, state, emit, stop)


def _one(cfg: TrainConfig, state: dict | None, emit: Emit, stop: Callable[[], int]) -> Run:
    run = run_training(cfg, emit, stop=stop, resume=state)
    if cfg.overfit:
        run.sanity = overfit_verdict(run.history, cfg.overfit)
    return run


def train_config(data: str | os.PathLike | None, given: Mapping[str, Any], *, config: str | os.PathLike | None = None,
                 resume: str | os.PathLike | None = None) -> tuple[TrainConfig, dict | None]:
    """The run's TrainConfig (and, resuming, the state it continues from): defaults < config file < given."""
    check_names(given, GIVEN_SETTINGS, "finetune.train")
    given = {name: typed(name, value, "") for name, value in given.items()}
    if data is not None:
        given["data"] = os.fspath(data)
    if resume is not None:  # read by rank 0 (other machines may not share its disk) and handed to all
        if config is not None:
            raise UsageError(f"{option('resume')} and {option('config')}: a resumed run keeps its own settings; "
                             "give one of them")
        return dist.on_main(lambda: resume_config(os.fspath(resume), given))
    from_file = load_config(config) if config is not None else {}
    settings = defaults() | {k: v for k, v in from_file.items() if k != "given"} | given
    settings["given"] = tuple(sorted({*given_in(from_file), *given}))
    if settings.get("data") is None:
        raise UsageError(f"missing {'DATA' if option('data').startswith('-') else 'data'}: the folder of photos to "
                         f"train on (or {option('resume')} RUN to continue a run)")
    if settings.get("init_from"):
        _init_model(settings, given | from_file)
    cfg = TrainConfig(**settings)
    return (overfit_config(cfg) if cfg.overfit else cfg), None


def _init_model(settings: dict, given: dict) -> None:
    """init_from: the architecture is the model file's unless model is given (it is then checked against it);
    weights do not apply."""
    if "weights" in given and given["weights"] != "DEFAULT":
        raise UsageError(f"{option('weights')} and {option('init_from')}: the weights come from the "
                         f"{option('init_from')} model file; give one")
    if "model" not in given:
        settings["model"] = init_arch(settings["init_from"])
