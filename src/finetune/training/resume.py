"""Interrupting and resuming a run: the per-epoch resumable state (model, optimiser, schedule, RNGs, the
split), and the settings a resumed run takes from it."""

from __future__ import annotations

import os
import random
from pathlib import Path

from finetune._util.files import atomic_write
from finetune.config import SETTINGS, TrainConfig, option
from finetune.errors import DatasetError, ModelFileError, UsageError

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
    for name, value in given.items():
        if name in ("data", "output", "epochs", "workers", "device", "log") or stored.get(name) == value:
            continue
        raise UsageError(f"--resume {run_dir}: {option(name)} {value} differs from that run's {stored.get(name)!r}; "
                         f"a resumed run keeps its settings (leave {option(name)} out, or start a new run)")
    offset, planned = state.get("phases", [[0, stored["epochs"]]])[-1]  # its last phase (after a probe, if any)
    epochs = given.get("epochs", planned)
    if offset + epochs <= state["epoch"]:
        done = state["epoch"] - offset
        raise UsageError(f"--resume {run_dir}: that run already completed {done} of its {planned} epochs; give "
                         f"--epochs larger than {done} to train it further")
    cfg = TrainConfig(**stored | {k: given[k] for k in ("data", "workers", "device", "log") if k in given}
                      | {"output": str(run_dir), "epochs": epochs})
    return cfg, state


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
