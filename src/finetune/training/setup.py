"""Everything a training loop (or an lr range test) needs, set up once: options checked, the data read and
split, the model built with its weights, images decoded or features extracted, the trainer ready."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

from finetune._util import ddp as dist
from finetune.config import TrainConfig
from finetune.data.dataset import DatasetSplit, find_dataset
from finetune.data.images import default_workers
from finetune.data.labelfile import options_from
from finetune.errors import DatasetError, UsageError
from finetune.events import Emit, silent  # silent: the emit of ranks other than 0 (they train, rank 0 reports)
from finetune.models import timm as timm_models
from finetune.models.model_file import ModelFile
from finetune.models.registry import Network, build_network, check_model_name
from finetune.models.weights import WeightsChoice, load_pretrained_state, resolve_weights
from finetune.tasks.base import task_for
from finetune.training.cache import decode_for_training
from finetune.training.epochs import Epochs, ImageEpochs
from finetune.training.features import feature_epochs
from finetune.training.initfrom import init_choice, kept_head, load_init
from finetune.training.plan import Plan, make_plan
from finetune.training.recipe import Recipe, choose_recipe
from finetune.training.resume import check_same_split
from finetune.training.sanity import overfit_split
from finetune.training.trainer import Trainer


@contextlib.contextmanager
def torch_flags(cfg: TrainConfig):
    """torch's global switches a run needs (--deterministic; cuDNN autotuning on CUDA), put back afterwards so a
    program that trains twice, or a test suite, sees them as they were."""
    import torch

    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(cfg.deterministic or before[0])
    torch.backends.cudnn.benchmark = not cfg.deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


@dataclass
class Phase:
    """Epochs of one kind: run(local epoch) -> metrics; they are epochs offset+1 .. offset+count of the run."""

    run: Epochs  # ImageEpochs, FeatureEpochs or ProbeEpochs
    count: int
    offset: int = 0
    planned: bool = False  # its count is planned from the first epoch's time (--time-budget)
    cap: int = 0  # the most epochs a plan may give it (a typed --epochs, else BUDGET_EPOCH_CAP)


@dataclass
class Prepared:
    cfg: TrainConfig  # as run: --mode auto resolved by the plan
    plan: Plan
    device: object
    split: DatasetSplit
    choice: WeightsChoice
    net: Network
    trainer: Trainer
    phases: list[Phase]
    train_size: int  # the training crop (the eval crop is choice.preprocessing.crop_size)
    split_files: dict  # the split as scanned (DatasetSplit.files), before unreadable files were dropped
    recipe: Recipe  # the augmentation chosen for the run and the photos

    @property
    def epochs(self):
        """The epochs that train the saved model's weights last (the only phase, or fine-tuning after a probe)."""
        return self.phases[-1].run

    def close(self) -> None:
        """Release what the phases hold beyond memory (loader worker processes): when the run ends, also by failing."""
        for phase in self.phases:
            phase.run.close()


def train_crop(cfg: TrainConfig, choice: WeightsChoice, net: Network) -> int:
    """The training crop size: --train-size, else 80 % of the eval crop (to a multiple of 16) in finetune mode.

    A random resized crop makes objects look larger than the eval center crop does, so training on a
    smaller crop than the eval one matches apparent object sizes better (Touvron et al. 2019, "Fixing
    the train-test resolution discrepancy"); torchvision's own reference recipe trains at 176 for a 224
    eval for that reason. It also costs about 40 % less compute per step. Feature-extract mode computes
    each view once, so there is nothing to save and the eval crop is kept; so is it without augmentation.
    """
    crop = choice.preprocessing.crop_size
    if cfg.train_size:
        if cfg.train_size != crop and not net.accepts_size(cfg.train_size):
            raise UsageError(f"--train-size {cfg.train_size}: {cfg.model} only runs on {crop}x{crop} inputs; "
                             f"use --train-size {crop} or leave it out")
        return cfg.train_size
    if cfg.mode != "finetune" or cfg.augment == "none":
        return crop
    size = max(32, round(crop * 0.8 / 16) * 16)
    return size if net.accepts_size(size) else crop


def _check_world(cfg: TrainConfig, world: dist.World, device) -> None:
    """Options that need several processes, or that several processes cannot do."""
    if cfg.sync_bn and world.distributed and device.type != "cuda":
        raise dist.echoed(UsageError("--sync-bn: torch's SyncBatchNorm runs on GPUs only; drop it for a CPU run"))
    if cfg.compile and world.distributed:
        raise dist.echoed(UsageError("--compile: one process only for now; drop it under torchrun or --gpus"))
    if cfg.overfit and world.distributed:
        raise dist.echoed(UsageError("--overfit: the sanity check runs in one process; launch it without torchrun "
                                     "or --gpus"))


def _read_split(cfg: TrainConfig, world: dist.World, resume: dict | None) -> tuple[DatasetSplit, DatasetSplit]:
    """The split (scanned once, by rank 0; every rank gets the same) and this rank's share of it."""
    split = dist.on_main(lambda: find_dataset(cfg.data, cfg.val_fraction, cfg.seed, cfg.folds, cfg.fold,
                                              options_from(cfg)))
    if cfg.overfit:
        split = overfit_split(split, cfg.overfit, cfg.seed)
    if resume is not None:
        if split.classes != resume["classes"]:
            raise DatasetError(f"{cfg.data}: classes {split.classes} differ from the resumed run's "
                               f"{resume['classes']}; resume on the same data or start a new run")
        check_same_split(resume, split.files(), cfg.data)
    if len(split.train) < world.size:
        raise dist.echoed(DatasetError(f"{cfg.data}: {len(split.train)} training images for {world.size} "
                                       "processes; use fewer processes"))
    local = dataclasses.replace(split, train=dist.shard(split.train), val=dist.shard(split.val)) \
        if world.distributed else split
    return split, local


def _build(cfg: TrainConfig, split: DatasetSplit, choice: WeightsChoice, resume: dict | None,
           init: ModelFile | None, emit: Emit) -> Network:
    import torch

    # A resumed run gets its weights from the state; no download needed. Rank 0 downloads, then the others read.
    state = None
    if resume is None:
        state = init.state_dict if init is not None else dist.main_first(lambda: load_pretrained_state(choice))
    net = build_network(cfg.model, len(split.classes), cfg.dropout, state)
    if init is not None and resume is None:  # --init-from: the backbone is loaded; the head too if it fits
        whole = kept_head(init, split.classes, net.head)
        if whole is not None:
            net.load_plain_state(whole)
        emit("init_from", path=cfg.init_from, head_kept=whole is not None, classes=init.classes)
    if cfg.sync_bn and dist.current().distributed:  # BatchNorm statistics over the global batch (same keys)
        net.module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net.module)
    if resume is not None:
        net.module.load_state_dict(resume["model"])
    if cfg.mode == "feature-extract":
        net.freeze_backbone()
    return net


def _label_file_checks(cfg: TrainConfig, split: DatasetSplit, emit: Emit) -> None:
    """A label file's rows without an image: summarised, or the end of a --strict run; notes on the split."""
    if split.missing and cfg.strict:
        line, path = split.missing[0]
        raise dist.echoed(DatasetError(f"--strict: {len(split.missing)} row(s) of {cfg.data} name no image, e.g. "
                                       f"line {line}: {path} (under {split.root}); fix the paths or --image-dir, or "
                                       "drop --strict to skip those rows"))
    if split.missing:
        emit("missing_rows", rows=list(split.missing), root=split.root, data=cfg.data)
    for note in split.notes:
        emit("note", text=note)


def prepare(cfg: TrainConfig, emit: Emit = silent, stop: Callable[[], int] = lambda: 0,
            resume: dict | None = None) -> Prepared:
    """Read the data, build the model with its weights, decode or extract features (cfg validated by the caller:
    once per run, at its entry)."""
    import torch

    check_model_name(cfg.model)
    world = dist.init(cfg.device)
    emit = emit if world.main else silent
    device = dist.device(cfg.device)
    plan = make_plan(cfg, device) if resume is None or "plan" not in resume else Plan(**resume["plan"])
    cfg = dataclasses.replace(cfg, mode=plan.mode, backbone_lr_mult=plan.backbone_lr_mult
                              if plan.backbone_lr_mult is not None else cfg.backbone_lr_mult)
    _check_world(cfg, world, device)
    torch.manual_seed(cfg.seed)
    split, local = _read_split(cfg, world, resume)
    split_files = split.files()
    init = load_init(cfg)  # --init-from: a trained finetune model instead of --weights
    resolve = timm_models.resolve_weights if timm_models.is_timm(cfg.model) else resolve_weights
    choice = init_choice(cfg, init) if init is not None else resolve(cfg.model, cfg.weights)
    emit("dataset", split=split, device=str(device), weights=choice.label, processes=world.size)
    recipe = choose_recipe(cfg, plan.mode == "finetune", plan.probe_first, choice.preprocessing, split)
    cfg = dataclasses.replace(cfg, augment=recipe.augment)
    task = task_for(split.multi_label)
    task.check(cfg)  # what this kind of head cannot use, refused before any long work
    _label_file_checks(cfg, split, emit)
    if split.skipped:
        emit("skipped", files=list(split.skipped), root=split.root)
    net = _build(cfg, split, choice, resume, init, emit)
    workers = default_workers(world.local_size) if cfg.workers < 0 else cfg.workers
    use_features = cfg.mode == "feature-extract" and net.head_gives_logits(choice.preprocessing.crop_size)
    # Feature-extract mode trains the head on every rank alike, one batch per step; images split over ranks.
    per_step = min(cfg.batch_size * (1 if use_features else world.size), len(split.train))
    # ln(classes) is what a fresh head gives: not one fitted by the probe first, nor a trained model's (--init-from).
    fresh_head = resume is None and not plan.probe_first and init is None
    trainer = Trainer(cfg, net, device, emit, task=task, images_per_step=per_step,
                      train_targets=task.targets(split.train, len(split.classes)), num_classes=len(split.classes),
                      stop=stop, check_initial_loss=fresh_head)
    emit("plan", why=plan.why)
    train_size = train_crop(cfg, choice, net)
    if plan.mode == "finetune":
        emit("recipe", why=recipe.why, train_size=train_size, eval_size=choice.preprocessing.crop_size,
             augment=recipe.augment)
    if use_features:
        run = feature_epochs(trainer, split, local, choice, workers, emit, train_size)
        phases = [Phase(run, run.fixed_count or cfg.epochs)]
    else:
        phases = _image_phases(cfg, plan, trainer, split, local, choice, workers, emit, train_size, resume)
    if any(ph.run.scheduled for ph in phases):  # a probe alone takes no SGD step
        emit("precision", precision=trainer.precision)
    return Prepared(cfg, plan, device, split, choice, net, trainer, phases, train_size, split_files, recipe)


def _image_phases(cfg, plan, trainer, split, local, choice, workers, emit, train_size, resume) -> list[Phase]:
    """Fine-tuning, after a converged probe fitted on the same decoded images when the plan says so (not again
    when resuming: the probe's head is in the resumed weights)."""
    pre = choice.preprocessing
    cache = decode_for_training(split, local, pre.resize_size, workers, cfg, emit)
    # Decoded tensors live in this process and transforms on them are cheap: no worker processes then.
    images = ImageEpochs(trainer, local, pre, cache, 0 if cache is not None else workers, train_size,
                         [s.path for s in split.val], frozen_statistics=plan.frozen_statistics)
    probe_done = resume is not None and plan.probe_first
    phases = []
    if plan.probe_first and not probe_done:
        phases.append(Phase(feature_epochs(trainer, split, local, choice, workers, emit, pre.crop_size, cache), 1))
    offset = 1 if plan.probe_first else 0
    count = cfg.epochs if resume is not None or not plan.epochs else plan.epochs  # a resume: the epochs it asks
    return phases + [Phase(images, count, offset, planned=plan.budget > 0 and resume is None, cap=count)]
