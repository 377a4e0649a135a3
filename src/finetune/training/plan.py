"""What a run does on the machine it has, and with what the user asked for.

--mode auto fine-tunes every layer on a GPU; on a CPU it fits a converged linear probe (seconds), and fine-tunes
from that probe (LP-FT) when the user asked for training: a --time-budget, or any setting that only training uses
(--epochs, --lr, -b, --augment, ...). What the user gave is never dropped in silence: it makes the run train, or the
run is refused with the reason (an option the chosen kind of run cannot use). --weights none always trains: a probe
on a random backbone can only be bad. --time-budget plans the fine-tuning epochs from their measured time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune.config import APPLIES, TrainConfig, option
from finetune.errors import UsageError

# What each kind of run uses of the settings in config.APPLIES.
USES = {"probe": {"probe"}, "head": {"train", "head"}, "finetune": {"train", "finetune"}}
# Epochs a time budget may plan when --epochs was not given: the budget, not this, ends the run.
BUDGET_EPOCH_CAP = 1000
# Fine-tuning from a converged probe: the backbone at a tenth of the head's lr, BatchNorm statistics kept. From the
# probe, the default lr (both at 0.008, statistics updated) fell from 0.743 to 0.406 val accuracy in the first epoch on
# dog breeds and from 0.915 to 0.765 on ants/bees thumbnails; with these two, 0.703 and 0.895 (benchmarks/README.md).
LPFT_BACKBONE_LR_MULT = 0.1


@dataclass(frozen=True)
class Plan:
    mode: str  # finetune | feature-extract: what the run's model trains
    probe_first: bool  # fine-tune from a converged linear probe (LP-FT, Kumar et al. 2022) instead of a random head
    budget: float  # seconds for the whole run; 0 = --epochs as given
    why: str  # one line for the run header
    epochs: int = 0  # fine-tuning epochs planned (the budget's cap until the first epoch's time is known); 0: none
    # Fine-tuning from a probe starts from a good model and must not lose it (training.recipe measured these):
    frozen_statistics: bool = False  # BatchNorm normalises with the statistics the probe's features were made with
    backbone_lr_mult: float | None = None  # the backbone's lr over the head's; None: as the settings say


def kind(mode: str, solver: str) -> str:
    """probe | head | finetune: the kind of run a mode and a solver make."""
    if mode == "finetune":
        return "finetune"
    return "probe" if solver == "lbfgs" else "head"


def unused(cfg: TrainConfig, run_kind: str) -> list[str]:
    """The given settings that a run of this kind would not use."""
    return [name for name in cfg.given if name in APPLIES and APPLIES[name] not in USES[run_kind]]


def make_plan(cfg: TrainConfig, device) -> Plan:
    """The run's plan; a given setting the run would not use is refused (UsageError) with what would use it."""
    plan = _choose(cfg, device)
    left = unused(cfg, kind(plan.mode, cfg.solver))
    if left:
        raise UsageError(_refusal(left[0], kind(plan.mode, cfg.solver)))
    epochs = cfg.epochs if not plan.budget or "epochs" in cfg.given else BUDGET_EPOCH_CAP
    gentle = plan.probe_first and "backbone_lr_mult" not in cfg.given
    return Plan(plan.mode, plan.probe_first, plan.budget, plan.why, epochs if plan.mode == "finetune" else 0,
                frozen_statistics=plan.probe_first, backbone_lr_mult=LPFT_BACKBONE_LR_MULT if gentle else None)


def _choose(cfg: TrainConfig, device) -> Plan:
    budget = cfg.time_budget
    if cfg.mode == "feature-extract":
        return Plan("feature-extract", False, 0.0, _head_words(cfg))
    if cfg.mode == "finetune":
        return Plan("finetune", False, budget, "finetune: every layer trains" + _budget_words(cfg))
    if "solver" in cfg.given:  # a head fit was asked for by name
        return Plan("feature-extract", False, 0.0, f"auto with --solver {cfg.solver}: " + _head_words(cfg))
    if device.type != "cpu":
        return Plan("finetune", False, budget, f"auto on {device.type.upper()}: full fine-tuning" + _budget_words(cfg))
    if cfg.weights.strip().lower() == "none":  # a probe of random features is never the answer
        return Plan("finetune", False, budget, "auto on a CPU with --weights none: fine-tuning every layer (a probe "
                    "on a random backbone learns little)" + _budget_words(cfg))
    reasons = _asked_to_train(cfg)
    if reasons:
        return Plan("finetune", True, budget, f"auto on a CPU with {_listed(reasons)}: a converged linear probe "
                    "first, then fine-tuning from it" + _budget_words(cfg))
    if cfg.solver == "sgd":  # set by a caller (finetune tune): the head trains by SGD on the frozen backbone
        return Plan("feature-extract", False, 0.0, "auto on a CPU: " + _head_words(cfg))
    return Plan("feature-extract", False, 0.0, "auto on a CPU: a converged linear probe on the frozen backbone "
                "(seconds); --time-budget 10m fine-tunes from it as well, --mode finetune fine-tunes outright")


def _asked_to_train(cfg: TrainConfig) -> list[str]:
    """What in cfg asks for training steps: a time budget, given settings only training uses, batch mixing."""
    given = [option(n) + _shown(getattr(cfg, n)) for n in cfg.given if APPLIES.get(n) in ("train", "finetune")
             and n != "time_budget"]  # said first, in minutes
    # Set without being given (a caller's TrainConfig): batch mixing regularises SGD steps; --overfit checks them.
    implied = [option(n) for n in ("mixup", "cutmix", "label_smoothing") if getattr(cfg, n) and n not in cfg.given]
    implied += [f"--overfit {cfg.overfit}"] if cfg.overfit else []
    return ([f"--time-budget {cfg.time_budget / 60:.3g}m"] if cfg.time_budget else []) + given + implied


def _shown(value) -> str:
    return "" if isinstance(value, bool) or value is None else f" {value:g}" if isinstance(value, float) \
        else f" {value}"


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _head_words(cfg: TrainConfig) -> str:
    if cfg.solver == "lbfgs":
        return "feature-extract: a converged linear probe on the frozen backbone"
    return f"feature-extract: {cfg.epochs} epochs of SGD on the head of the frozen backbone"


def _budget_words(cfg: TrainConfig) -> str:
    if not cfg.time_budget:
        return f", {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}"
    cap = f"at most {cfg.epochs} " if "epochs" in cfg.given else ""
    return (f", {cap}epochs to fill {cfg.time_budget / 60:.3g} min (planned from the first epoch's time; the lr "
            "schedule spans them)")


_WHAT_USES = {"train": "--mode finetune, or --solver sgd for SGD on the head", "finetune": "--mode finetune",
              "head": "--mode feature-extract", "probe": "--mode feature-extract --solver lbfgs"}
_RUN_WORDS = {"probe": "the converged linear probe (fitted once, with its own L2 chosen by cross-validation)",
              "head": "feature-extract mode (the backbone stays frozen)",
              "finetune": "fine-tuning (every layer trains by SGD or AdamW)"}


def _refusal(name: str, run_kind: str) -> str:
    return (f"{option(name)}: {_RUN_WORDS[run_kind]} does not use it; it applies to {_WHAT_USES[APPLIES[name]]} "
            f"(or leave {option(name)} out)")


def replanned_epochs(current: int, budget: float, elapsed: float, epoch_seconds: float, done: int, cap: int) -> int:
    """The plan after an epoch: fewer epochs as soon as they no longer fit; more (up to cap: a typed --epochs, else
    BUDGET_EPOCH_CAP) when the epochs got faster than the first (a machine less loaded now), so that the budget is
    used, but only for a gain of 2 epochs or a tenth of the plan: not a new schedule (and a line) every epoch."""
    count = planned_epochs(budget, elapsed, epoch_seconds, done, cap)
    return current if current < count < current + max(2, current // 10) else count


def planned_epochs(budget: float, elapsed: float, epoch_seconds: float, done: int, requested: int) -> int:
    """Epochs in all, after `done` epochs took `epoch_seconds` each and the run has used `elapsed` seconds: as many
    more as fit in what is left of the budget (at least the ones done), never more than requested."""
    more = math.floor(max(0.0, budget - elapsed) / max(epoch_seconds, 1e-9))
    return max(done, min(requested, done + more))
