"""Interrupting and resuming a run: the per-epoch resumable state (model, optimiser, schedule, RNGs)."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.config import TrainConfig
from finetune.errors import FinetuneError


class Interrupted(FinetuneError):
    """Training stopped on request (SIGINT/SIGTERM) after a step; the run folder holds a resumable state."""

    def __init__(self, signum: int, run_dir: Path | None = None):
        self.signum, self.run_dir = signum, run_dir
        super().__init__(f"interrupted by signal {signum}", exit_code=128 + signum)


STATE_FILE = "state.pt"  # resumable state of the last completed epoch


def _rng_state(epochs) -> dict:
    import random

    import numpy as np
    import torch

    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loader": epochs.generator.get_state()}


def set_rng_state(epochs, rng: dict) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(rng["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in rng["python"]))
    np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32), *rng["numpy"][2:]))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    epochs.generator.set_state(rng["loader"])


def load_resume_state(run_dir: str | os.PathLike) -> dict:
    """The resumable state of a run folder, loaded without running code."""
    import torch

    from finetune.errors import ModelFileError

    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise FinetuneError(f"--resume {run_dir}: no {STATE_FILE} there (a run folder holds one after its first "
                            "epoch)", exit_code=2)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelFileError(f"{path}: unreadable resume state ({type(e).__name__}); start a new run") from None
    if not isinstance(state, dict) or state.get("format") != "finetune-state":
        raise ModelFileError(f"{path}: not a finetune resume state")
    return state


def resume_config(run_dir: str | os.PathLike, data: str, model: str) -> tuple[TrainConfig, dict]:
    """The original run's settings (run folder and data as given now); refuses another architecture."""
    state = load_resume_state(run_dir)
    stored = state["config"]
    if model != stored["model"]:
        raise FinetuneError(f"--resume {run_dir}: that run trains {stored['model']}, not --model {model}; "
                            "resume with the same model or start a new run", exit_code=2)
    known = {f for f in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**{k: v for k, v in stored.items() if k in known} | {"data": data, "output": str(run_dir)})
    return cfg, state


def save_state(run_dir: Path, epoch: int, model, trainer, epochs, history, best, cfg: TrainConfig,
               classes: list[str]) -> None:
    """Everything an exact resume needs, after each completed epoch (atomically, so a kill leaves one whole)."""
    import torch

    from finetune.checkpoint import atomic_write

    state = {"format": "finetune-state", "epoch": epoch, "model": model.state_dict(), **trainer.state(),
             "rng": _rng_state(epochs), "history": history, "best": best, "config": cfg.to_dict(),
             "classes": classes}
    atomic_write(run_dir / STATE_FILE, lambda tmp: torch.save(state, tmp))
