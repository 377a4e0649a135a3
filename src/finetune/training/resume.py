"""Interrupting and resuming a run: the per-epoch resumable state (model, optimiser, schedule, RNGs, the
split), and the settings a resumed run takes from it."""

from __future__ import annotations

import os
import random
from pathlib import Path

from finetune._util.files import atomic_write
from finetune.config import SETTINGS, TrainConfig, option
from finetune.errors import DatasetError, ModelFileError, UsageError
from finetune.training.plan import LPFT_BACKBONE_LR_MULT

STATE_FILE = "state.pt"  # resumable state of the last completed epoch
STATE_VERSION = 2  # 2: folds numbered from 1 in the stored config, the split stored


def rng_state(generator) -> dict:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loader": generator.get_state()}


def set_rng_state(generator, rng: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(rng["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in rng["python"]))
    np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32), *rng["numpy"][2:]))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if rng["loader"] is not None:  # None: a probe's (it shuffles nothing)
        generator.set_state(rng["loader"])


def save_state(run_dir: Path, state: dict) -> None:
    """Everything an exact resume needs, after each completed epoch (atomically, so a kill leaves one whole)."""
    import torch

    payload = {"format": "finetune-state", "version": STATE_VERSION, **state}
    atomic_write(run_dir / STATE_FILE, lambda tmp: torch.save(payload, tmp), "choose another run folder with -o")


def load_resume_state(run_dir: str | os.PathLike) -> dict:
    """The resumable state of a run folder, loaded without running code."""
    import torch

    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise UsageError(f"--resume {run_dir}: no {STATE_FILE} there (a run folder holds one after its first epoch)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelFileError(f"{path}: unreadable resume state ({type(e).__name__}); start a new run") from None
    if not isinstance(state, dict) or state.get("format") != "finetune-state":
        raise ModelFileError(f"{path}: not a finetune resume state")
    if state.get("version", 1) < 2 and state["config"].get("folds"):
        state["config"]["fold"] += 1  # version 1 numbered folds from 0
    return state


def resume_config(run_dir: str | os.PathLike, given: dict) -> tuple[TrainConfig, dict]:
    """The run's own settings, with the run folder, the data folder and a larger --epochs as given now.

    given: the settings typed on the command line. One that differs from the run's is refused by name
    (a resumed run repeats its settings); --epochs may grow, and the schedule is then stretched.
    """
    state = load_resume_state(run_dir)
    stored = {k: v for k, v in state["config"].items() if k in SETTINGS}
    stored["given"] = tuple(stored.get("given", ()))
    for name, value in given.items():
        if name in ("data", "output", "epochs", "workers", "device", "log") or stored.get(name) == value:
            continue
        raise UsageError(f"--resume {run_dir}: {option(name)} {value} differs from that run's {stored.get(name)!r}; "
                         f"a resumed run keeps its settings (leave {option(name)} out, or start a new run)")
    kept = {k: given[k] for k in ("data", "workers", "device", "log") if k in given}
    if _probe_only(state) and "epochs" in given:
        if "mode" in stored["given"]:
            raise UsageError(f"--resume {run_dir} --epochs: that run is --mode feature-extract's converged probe, "
                             "fitted once; start a --mode finetune run (or --init-from its best.pt) to train further")
        return _fine_tune_the_probe(stored | kept | {"output": str(run_dir)}, state, given["epochs"])
    offset, planned = state.get("phases", [[0, stored["epochs"]]])[-1]  # its last phase (after a probe, if any)
    epochs = given.get("epochs", planned)
    if offset + epochs <= state["epoch"]:
        done = state["epoch"] - offset
        raise UsageError(f"--resume {run_dir}: that run already completed {done} of its {planned} epochs; give "
                         f"--epochs larger than {done} to train it further")
    cfg = TrainConfig(**stored | kept | {"output": str(run_dir), "epochs": epochs})
    return cfg, state


def _probe_only(state: dict) -> bool:
    """Was the run a converged probe alone (one fit, no SGD epoch)?"""
    config, plan = state["config"], state.get("plan") or {}
    return config.get("solver") == "lbfgs" and plan.get("mode") == "feature-extract"


def _fine_tune_the_probe(settings: dict, state: dict, epochs: int) -> tuple[TrainConfig, dict]:
    """--resume of a probe run with --epochs N: N epochs of fine-tuning from its probe (LP-FT), as the same run given
    --epochs would have done; a fresh optimiser, for the probe took no SGD step."""
    given = tuple(dict.fromkeys([*settings.get("given", ()), "epochs"]))
    gentle = None if "backbone_lr_mult" in given else LPFT_BACKBONE_LR_MULT  # as a run given --epochs would
    state = state | {"plan": {"mode": "finetune", "probe_first": True, "budget": 0.0, "epochs": epochs,
                              "why": f"resumed with --epochs {epochs}: the run's converged probe, then {epochs} "
                                     "epochs of fine-tuning from it", "frozen_statistics": True,
                              "backbone_lr_mult": gentle},
                     "phases": [[0, 1], [1, epochs]], "fresh_optimizer": True}
    return TrainConfig(**settings | {"epochs": epochs, "given": given}), state


def check_same_split(state: dict, now: dict, data: str) -> None:
    """Refuse to resume on data that changed since the run started, saying exactly what changed."""
    before = state.get("split")
    if before is None:  # runs from before the split was stored: the class check in setup is all there is
        return
    if before["classes"] != now["classes"]:
        raise DatasetError(f"{data}: classes {now['classes']} differ from the resumed run's {before['classes']}; "
                           "resume on the same data or start a new run")
    changes = []
    for part in ("train", "val"):
        old, new = {tuple(r) for r in before[part]}, {tuple(r) for r in now[part]}
        for what, items in (("added to", new - old), ("gone from", old - new)):
            if items:
                sample = ", ".join(f"{p} ({c})" for p, c in sorted(items)[:3])
                changes.append(f"{len(items)} image(s) {what} {part} (e.g. {sample})")
    if changes:
        raise DatasetError(f"{data}: the data changed since this run started: {'; '.join(changes)}; restore it, "
                           "or start a new run on the data as it is now")
