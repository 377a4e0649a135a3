"""TrainConfig: every training setting, its default and its choices, declared once, with why; validate().

The CLI reads its defaults and choice lists from here; config files and `finetune tune` go through the
same validate(), so an option is refused the same way wherever it comes from (UsageError, exit 2).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass

from finetune.errors import UsageError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "step", "plateau", "none")
MODES = ("auto", "finetune", "feature-extract")
BALANCE = ("none", "weighted-loss", "sampler")
SOLVERS = ("lbfgs", "sgd")
AUGMENTATIONS = ("auto", "none", "light", "standard", "trivial", "randaugment")
TRACKERS = ("tensorboard", "mlflow")
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
# Pillow's own decompression-bomb error threshold (2 x 89.5 MP): larger images are refused from the header.
MAX_PIXELS = 178_956_970
# Largest over smallest class at which train and check warn about imbalance.
IMBALANCE_WARNING = 1.5
# Default learning rate per training image in a step (linear scaling rule), from the tutorial's SGD
# setting (batch 4, lr 1e-3) and AdamW's usual 1e-4 at batch 32.
LR_PER_IMAGE = {"sgd": 1e-3 / 4, "adamw": 1e-4 / 32}


@dataclass(frozen=True)
class TrainConfig:
    data: str
    model: str = "resnet18"  # small, fast, strong on small datasets
    weights: str = "DEFAULT"  # ImageNet-pretrained: transfer learning is the point
    mode: str = "auto"  # auto (GPU: finetune; CPU: a linear probe, then fine-tuning within --time-budget) | ...
    solver: str = "lbfgs"  # feature-extract's head: a converged L-BFGS linear probe (seconds) | sgd for --epochs
    dropout: float = 0.0  # before the new head; 0 disables
    optimizer: str = "sgd"  # sgd (Nesterov momentum) | adamw
    lr: float | None = None  # None: LR_PER_IMAGE x the images in a step
    momentum: float = 0.9  # SGD's; the torchvision reference recipe's value
    weight_decay: float = 1e-4  # L2; the torchvision reference recipe's value
    scheduler: str = "cosine"  # cosine | step | plateau | none
    epochs: int = 10  # enough for a pretrained backbone on a small dataset
    time_budget: float = 0.0  # seconds for the whole run: fine-tuning epochs planned to fit; 0 = --epochs as given
    batch_size: int = 32  # larger than the tutorial's 4: fewer, better-utilised steps
    workers: int = -1  # -1: min(4, cpu count - 1)
    augment: str = "auto"  # auto: chosen for the run and the photos (training.recipe) | none | light | standard | ...
    train_size: int = 0  # training crop in pixels; 0: 80 % of the eval crop in finetune mode (training.setup)
    val_fraction: float = 0.2  # used only when DATA has no val folder (or its label file no split column)
    path_col: str | None = None  # label file: the column of image paths; None = detected (path, file, image, ...)
    label_col: str | None = None  # label file: the column of labels; None = detected (label, labels, class, tags)
    label_sep: str | None = None  # label file: between several labels in a cell; None = ';' or '|' when present
    multi_label: bool = False  # one sigmoid per class even when each row has one label
    image_dir: str | None = None  # label file: where relative paths start; None = the file's folder
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: bool = True  # bf16/fp16 autocast on CUDA only
    channels_last: bool = True  # measured faster on CUDA and on CPU
    compile: bool = False  # torch.compile the training forward: a start-up cost that pays off on long GPU runs
    output: str | None = None  # run folder; default runs/<timestamp>-<model>
    overwrite: bool = False  # -o names a folder an earlier run wrote: remove that run's files first
    strict: bool = False  # any unusable file stops the run before epoch 1 instead of being skipped
    max_pixels: int = MAX_PIXELS
    balance: str = "none"  # none | weighted-loss | sampler: counter class imbalance
    freeze_epochs: int = 0  # train the head alone this many epochs first, then everything
    backbone_lr_mult: float | None = None  # backbone lr = lr x this; None: 0.1 with --freeze-epochs, else 1
    overfit: int = 0  # sanity check: train and evaluate on this many training images; 0 = a normal run
    patience: int = 0  # early stopping: end after this many epochs without a better val accuracy; 0 = off
    folds: int = 0  # k-fold cross-validation: 0 = off
    fold: int = 0  # with folds: 0 = every fold in turn; 1..folds = only that fold
    calibrate: bool = False  # fit a softmax temperature on the val set after training (stored in the model)
    deterministic: bool = False  # deterministic kernels: bitwise-repeatable runs and resumes on CPU
    sync_bn: bool = False  # several GPU processes: BatchNorm statistics over the global batch
    # Issue 18: experiment tracking, continued training, batch mixing and regularisation.
    log: str = "none"  # none | tensorboard | mlflow | tensorboard,mlflow: where the run is also recorded
    init_from: str | None = None  # a finetune model file whose weights start this run (its head kept if same classes)
    mixup: float = 0.0  # MixUp's Beta(alpha, alpha) for whole-image blends; 0 = off
    cutmix: float = 0.0  # CutMix's Beta(alpha, alpha) for pasted patches; 0 = off
    label_smoothing: float = 0.0  # share of the target spread over all classes
    erasing: float = 0.0  # probability of erasing a random rectangle of each training view
    # The settings the user set (typed, from a --config file, or finetune.train's keywords), so that none is dropped
    # in silence: under --mode auto one that only training uses makes the run train; one the run cannot use is
    # refused (training.plan). Not a setting itself: config files and --resume carry it, no option sets it.
    given: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """Plain-types view, safe to store inside a model file."""
        return dataclasses.asdict(self)

    def backbone_lr(self) -> float:
        """Multiplier of the backbone's learning rate relative to the head's."""
        if self.backbone_lr_mult is not None:
            return self.backbone_lr_mult
        return 0.1 if self.freeze_epochs else 1.0

    def base_lr(self, images_per_step: int) -> float:
        """The learning rate used: --lr, else LR_PER_IMAGE x the images a step really takes (the batch summed
        over processes, but never more than the training set holds)."""
        if self.lr is not None:
            return self.lr
        return LR_PER_IMAGE[self.optimizer] * images_per_step


def defaults() -> dict:
    """Every setting's default (what the CLI shows and uses)."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


SETTINGS = tuple(f.name for f in dataclasses.fields(TrainConfig))

_RULES = (  # (setting, test of its value, what it must be)
    ("epochs", lambda v: v >= 1, "must be at least 1"),
    ("batch_size", lambda v: v >= 1, "must be at least 1"),
    ("lr", lambda v: v is None or (v > 0 and math.isfinite(v)), "must be a positive number, e.g. 0.001"),
    ("momentum", lambda v: 0 <= v < 1, "must be in [0, 1), e.g. 0.9"),
    ("weight_decay", lambda v: v >= 0 and math.isfinite(v), "must be 0 or more"),
    ("dropout", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("freeze_epochs", lambda v: v >= 0, "must be 0 or more"),
    ("backbone_lr_mult", lambda v: v is None or v >= 0, "must be 0 or more"),
    ("overfit", lambda v: v >= 0, "must be a number of images, e.g. 50"),
    ("patience", lambda v: v >= 0, "must be 0 (off) or more"),
    ("train_size", lambda v: v == 0 or v >= 32, "must be 0 (automatic) or at least 32 pixels, e.g. 224"),
    ("folds", lambda v: v == 0 or v >= 2, "must be 0 (off) or at least 2, e.g. 5"),
    ("max_pixels", lambda v: v >= 1, "must be at least 1"),
    ("val_fraction", lambda v: 0 < v < 1, "must be between 0 and 1, e.g. 0.2"),
    ("workers", lambda v: v >= -1, "must be -1 (automatic) or 0 or more"),
    ("time_budget", lambda v: v >= 0 and math.isfinite(v), "must be a duration, e.g. 10m (0 = none)"),
    ("mixup", lambda v: 0 <= v <= 10, "must be 0 (off) or a Beta alpha such as 0.2"),
    ("cutmix", lambda v: 0 <= v <= 10, "must be 0 (off) or a Beta alpha such as 1.0"),
    ("label_smoothing", lambda v: 0 <= v < 1, "must be in [0, 1), e.g. 0.1"),
    ("erasing", lambda v: 0 <= v <= 1, "must be a probability in [0, 1], e.g. 0.25"),
    ("log", lambda v: all(t in TRACKERS for t in trackers(v)), f"choose none or any of {', '.join(TRACKERS)}, "
     "comma-separated"),
)
# The settings that only some kinds of run use (training.plan.USES): "train" = SGD steps (fine-tuning, or an SGD
# head), "finetune" = steps through the backbone, "head" = feature-extract's head fit. Every other setting applies to
# every run (EVERY_RUN). A given setting the planned run would not use makes an auto run train, or is refused.
APPLIES = {name: "train" for name in ("epochs", "lr", "optimizer", "momentum", "weight_decay", "scheduler",
                                      "batch_size", "augment", "train_size", "dropout", "patience", "erasing",
                                      "label_smoothing")} | \
    {name: "finetune" for name in ("freeze_epochs", "backbone_lr_mult", "mixup", "cutmix", "compile", "sync_bn",
                                   "time_budget")} | \
    {"solver": "head"}
EVERY_RUN = ("data", "model", "weights", "mode", "workers", "val_fraction", "path_col", "label_col",
             "label_sep", "multi_label", "image_dir", "seed", "device", "amp", "channels_last", "output", "overwrite",
             "strict", "max_pixels", "balance", "overfit", "folds", "fold", "calibrate", "deterministic", "log",
             "init_from", "given")
# What config.json records about a run besides its settings (finetune.training.loop); `--config` ignores them.
RUN_FACTS = ("lr_used", "train_size_used", "classes", "layout", "train_images", "val_images", "device", "precision",
             "base_weights", "preprocessing", "processes", "data_root", "plan", "recipe")
_CHOICES = {"optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "mode": MODES, "augment": AUGMENTATIONS,
            "balance": BALANCE, "solver": SOLVERS}


# How messages name a setting: as the caller writes it. The first door a call comes through decides, for the call's
# duration: the command line names options (--batch-size), finetune's Python API keywords (batch_size). Unset (a
# caller inside the library): options.
SPELLING: contextvars.ContextVar[str] = contextvars.ContextVar("finetune_spelling", default="")


@contextlib.contextmanager
def spelled_as(kind: str):
    """Within this block, messages name settings as kind ("option" or "keyword"), unless an outer door decided."""
    token = SPELLING.set(kind) if not SPELLING.get() else None
    try:
        yield
    finally:
        if token is not None:
            SPELLING.reset(token)


def option(setting: str) -> str:
    """A setting as the caller names it: --batch-size on the command line, batch_size in Python."""
    return setting if SPELLING.get() == "keyword" else "--" + setting.replace("_", "-")


def given_as(setting: str, value) -> str:
    """A setting and its value as the caller wrote them: `--epochs 0` on the command line, `epochs=0` in Python."""
    return f"{setting}={value!r}" if SPELLING.get() == "keyword" else f"{option(setting)} {value}"


def validate(cfg: TrainConfig) -> TrainConfig:
    """Refuse bad settings before any work (UsageError, exit 2); returns cfg."""
    for name, ok, must in _RULES:
        value = getattr(cfg, name)
        if not ok(value):
            raise UsageError(f"{given_as(name, value)}: {must}")
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise UsageError(f"{given_as(name, getattr(cfg, name))}: choose one of {', '.join(choices)}")
    if cfg.folds and not 0 <= cfg.fold <= cfg.folds:
        raise UsageError(f"{given_as('fold', cfg.fold)}: must be between 1 and {given_as('folds', cfg.folds)} "
                         "(0 = every fold)")
    if cfg.fold and not cfg.folds:
        raise UsageError(f"{given_as('fold', cfg.fold)}: needs {option('folds')} K")
    _check_regularisation(cfg)
    return cfg


def parse_duration(text: str | float | None, option_name: str) -> float:
    """Seconds from 900, 900s, 15m or 2h, as text or a number of seconds (None or 0: no limit)."""
    if text in (None, "", 0, "0"):
        return 0.0
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    elif isinstance(text, str):
        units = {"s": 1, "m": 60, "h": 3600}
        number, unit = (text[:-1], units[text[-1]]) if text[-1] in units else (text, 1)
        try:
            value = float(number) * unit
        except ValueError:
            value = -1.0
    else:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        shown = f"{option_name} {text}" if option_name.startswith("-") else f"{option_name}={text!r}"
        raise UsageError(f"{shown}: give seconds or a number with s, m or h, e.g. 10m")
    return value


_HINTS = typing.get_type_hints(TrainConfig)


def typed(name: str, value, where: str):
    """value as setting name's type, the way a config file or a Python keyword gives it: numbers from numeric text,
    a duration for time_budget ("10m"), None only where the setting allows it; else UsageError naming where."""
    if name == "time_budget":
        return parse_duration(value, f"{where}: {name}" if where else option(name))
    args = typing.get_args(_HINTS[name])
    kind = next((a for a in args if a is not type(None)), _HINTS[name]) if args else _HINTS[name]
    if value is None:
        if type(None) in args:
            return None
        shown = f"{where}: {name} is empty" if where else given_as(name, None)
        raise UsageError(f"{shown}; give {_kind_name(kind)} (or leave {name} out)")
    try:
        return _as_kind(name, kind, value)
    except (TypeError, ValueError):
        shown = f"{where}: {name} = {value!r}" if where else given_as(name, value)
        raise UsageError(f"{shown} is not {_kind_name(kind)}") from None


def _as_kind(name: str, kind, value):
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if kind in (int, float):
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                or (kind is int and not float(number).is_integer()):
            raise ValueError
        return kind(number)
    if name == "log" and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # log: [tensorboard, mlflow]
    if isinstance(value, (dict, list, tuple, bytes)):
        raise ValueError
    return str(value)


def _kind_name(kind) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(kind, kind.__name__)


def trackers(log: str) -> list[str]:
    """--log's trackers: "tensorboard,mlflow" -> ["tensorboard", "mlflow"]; "none" -> []."""
    return [t.strip().lower() for t in log.split(",") if t.strip() and t.strip().lower() != "none"]


def _check_regularisation(cfg: TrainConfig) -> None:
    """Batch mixing needs images through the whole model; the L-BFGS probe has its own (L2) regularisation."""
    if cfg.mode == "feature-extract":
        for name in ("mixup", "cutmix"):
            if getattr(cfg, name):
                raise UsageError(f"{option(name)}: mixes images before the backbone, so it needs --mode finetune")
        if cfg.solver == "lbfgs" and cfg.label_smoothing:
            raise UsageError("--label-smoothing: the L-BFGS probe fits hard labels; add --solver sgd or use "
                             "--mode finetune")


def check_names(names, known, what: str) -> None:
    """Refuse unknown setting names, naming the closest known one."""
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(sorted(known))}"
            raise UsageError(f"{what}: unknown setting {name!r}{hint}")
