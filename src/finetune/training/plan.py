"""What a run does on the machine it has: --mode auto picks full fine-tuning on a GPU and, on a CPU, a converged
linear probe (seconds), followed by fine-tuning from it when --time-budget leaves room; --time-budget plans the
number of fine-tuning epochs from the first epoch's measured time."""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune.config import TrainConfig


@dataclass(frozen=True)
class Plan:
    mode: str  # finetune | feature-extract: what the run's model trains
    probe_first: bool  # fine-tune from a converged linear probe (LP-FT, Kumar et al. 2022) instead of a random head
    budget: float  # seconds for the whole run; 0 = --epochs as given
    why: str  # one line for the run header


def make_plan(cfg: TrainConfig, device) -> Plan:
    budget = cfg.time_budget
    if cfg.mode == "feature-extract":
        why = "feature-extract: a converged linear probe on the frozen backbone" if cfg.solver == "lbfgs" \
            else f"feature-extract: {cfg.epochs} epochs of SGD on the head of the frozen backbone"
        return Plan("feature-extract", False, 0.0, why + (" (--time-budget does not apply)" if budget else ""))
    if cfg.mode == "finetune":
        return Plan("finetune", False, budget, "finetune: every layer trains" + _budget_words(budget, cfg.epochs))
    if device.type != "cpu":
        return Plan("finetune", False, budget, f"auto on {device.type.upper()}: full fine-tuning"
                    + _budget_words(budget, cfg.epochs))
    sgd_only = [o for o in ("mixup", "cutmix", "label_smoothing") if getattr(cfg, o, 0)]
    if sgd_only:  # regularisers of SGD steps through the whole model: the run is a fine-tuning one
        return Plan("finetune", False, budget, f"auto on a CPU with --{sgd_only[0].replace('_', '-')}: fine-tuning "
                    "(what it regularises)" + _budget_words(budget, cfg.epochs))
    if not budget:
        return Plan("feature-extract", False, 0.0, "auto on a CPU: a converged linear probe on the frozen backbone "
                    "(seconds); --time-budget 10m fine-tunes from it as well, --mode finetune fine-tunes outright")
    return Plan("finetune", True, budget, "auto on a CPU with a time budget: a converged linear probe first, then "
                "fine-tuning from it" + _budget_words(budget, cfg.epochs))


def _budget_words(budget: float, epochs: int) -> str:
    if not budget:
        return f", {epochs} epochs"
    return f", as many of {epochs} epochs as fit in {budget / 60:.3g} min (planned from the first epoch's time)"


def planned_epochs(budget: float, elapsed: float, epoch_seconds: float, done: int, requested: int) -> int:
    """Epochs in all, after `done` epochs took `epoch_seconds` each and the run has used `elapsed` seconds: as many
    more as fit in what is left of the budget (at least the ones done), never more than requested."""
    more = math.floor(max(0.0, budget - elapsed) / max(epoch_seconds, 1e-9))
    return max(done, min(requested, done + more))
