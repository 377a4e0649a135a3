"""finetune's command line: parse options, call the library, render with Rich. The only module that prints.

torch is imported inside the commands, so `finetune --help` stays fast.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape as esc  # user text (paths, class names) must never be read as markup
from rich.table import Column, Table

from finetune import __version__
from finetune.errors import FinetuneError

out = Console(soft_wrap=True)  # results
err = Console(stderr=True, soft_wrap=True)  # progress, logs, errors

app = typer.Typer(
    name="finetune",
    help="Turn a folder of photos into a working image classifier: train, predict, export.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        out.print(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


def _handle_errors(fn):
    """One red line and a stable exit code for user-facing failures; a traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FinetuneError as e:
            if not getattr(e, "echo", False):  # raised by every process of a distributed run: rank 0 prints it
                if _state["debug"]:
                    err.print_exception()
                err.print(f"[bold red]error:[/] {_rank_prefix()}{esc(str(e))}", highlight=False)
            if getattr(e, "collective", False):
                from finetune.distributed import leave_together

                leave_together()
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.BadParameter):
            raise
        except Exception as e:  # a bug, or a failure no message was written for: one line, not a traceback
            if _state["debug"]:
                raise
            if "DataLoader worker" in str(e) or "Bus error" in str(e):
                err.print(f"[bold red]error:[/] a data-loading worker died ({esc(str(e).splitlines()[0][:120])}); "
                          "host memory or /dev/shm ran out: use fewer workers (-j 0)", highlight=False)
                raise typer.Exit(5) from None
            err.print(f"[bold red]internal error:[/] {type(e).__name__}: {esc(str(e).splitlines()[0][:200]) if str(e) else ''}"
                      " (please report it; --debug shows the traceback)", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


def _rank_prefix() -> str:
    """'rank N: ' in the processes of a distributed run other than rank 0 (read from torchrun's environment)."""
    from finetune.distributed import from_env

    try:
        world = from_env()
    except FinetuneError:  # a malformed environment: its own error says so
        return ""
    return f"rank {world.rank}: " if world.distributed and not world.main else ""


def _fmt_pct(x: float) -> str:
    return f"{x * 100:.1f}%"


# ------------------------------------------------------------------------------------------------ train


class _TrainView:
    """Renders training events: epoch and batch bars with live loss, a line per epoch, a summary table."""

    def __init__(self, quiet: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.quiet = quiet
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), console=err, transient=True, disable=quiet,
        )
        self.epoch_task = self.batch_task = self.decode_task = None
        self.epochs = 0
        self.best_epoch = 0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def log(self, msg: str) -> None:
        if not self.quiet:
            self.progress.console.print(msg, highlight=False, soft_wrap=True)

    def __call__(self, event: str, **kw) -> None:
        getattr(self, "on_" + event, lambda **_: None)(**kw)

    def on_dataset(self, split, device, weights, processes=1):
        counts = split.counts()
        per_class = ", ".join(f"{esc(c)} {counts['train'][c]}/{counts['val'][c]}" for c in split.classes)
        self.log(f"[bold]data[/] {esc(split.root)}: {len(split.classes)} classes, {len(split.train)} train / "
                 f"{len(split.val)} val images ({split.layout}); per class train/val: {per_class}")
        ddp = f" x {processes} processes (DistributedDataParallel)" if processes > 1 else ""
        self.log(f"[bold]device[/] {device}{ddp}   [bold]weights[/] {weights}")
        train = counts["train"].values()
        if min(train) and max(train) / min(train) >= 1.5:
            self.log(f"[yellow]warning:[/] imbalanced classes: the largest has {max(train) / min(train):.1f}x the "
                     "images of the smallest; consider --balance weighted-loss or sampler")

    def on_decode_start(self, total, keep, budget_gb=None):
        if not keep:
            self.log(f"[bold]streaming[/] images from disk each epoch: decoded, they would not fit the "
                     f"{budget_gb:g} GiB RAM budget (FINETUNE_RAM_CACHE_GB)")
        self.decode_task = self.progress.add_task("decoding" if keep else "checking", total=total, info="")

    def on_decode_advance(self, n):
        self.progress.advance(self.decode_task, n)

    def on_skipped(self, files, root):
        for path, reason in files:
            self.log(f"[yellow]warning:[/] skipped {esc(os.path.relpath(path, root))}: {esc(reason)}")
        self.log(f"[yellow]{len(files)} file(s) skipped[/] (--strict makes this an error)")

    def on_features(self, cached, views):
        if self.decode_task is not None:
            self.progress.remove_task(self.decode_task)
            self.decode_task = None
        what = "reused from cache" if cached else f"computing once ({views} view(s) per training image)"
        self.log(f"[bold]features[/] frozen backbone: {what}")

    def on_start(self, run_dir, epochs, batches, lr, first, sizes):
        if self.decode_task is not None:
            self.progress.remove_task(self.decode_task)
        self.epochs = epochs
        self.log(f"[bold]run[/] {esc(str(run_dir))}   lr {lr:.3g}, {batches} batches/epoch, "
                 f"train crop {sizes[0]} / eval crop {sizes[1]} px")
        if first > 1:
            self.log(f"[bold]resuming[/] at epoch {first}")
        self.epoch_task = self.progress.add_task("epochs", total=epochs, completed=first - 1, info="")
        self.batch_task = self.progress.add_task("batches", total=batches, info="")

    def on_epoch_start(self, epoch):
        self.progress.reset(self.batch_task)
        self.progress.update(self.epoch_task, info=f"epoch {epoch}")

    def on_batch(self, step, loss, size):
        self.progress.update(self.batch_task, completed=step, info=f"loss {loss:.4f}")

    def on_initial_loss(self, loss, expected, suspicious):
        if suspicious:
            self.log(f"[yellow]warning:[/] initial loss {loss:.3f} is far from ln(classes) = {expected:.3f}, what a "
                     "fresh classifier head should give: check the labels and the preprocessing (or the weights)")

    def on_early_stop(self, epoch, best_epoch, patience):
        self.log(f"early stop: no better val accuracy for {patience} epoch(s) since epoch {best_epoch}")

    def on_calibrated(self, temperature, ece_before, ece_after, images):
        self.log(f"[bold]calibrated[/] temperature {temperature:.3g} fitted on {images} val images: expected "
                 f"calibration error {ece_before:.3f} -> {ece_after:.3f} (on the same images)")

    def on_report(self, paths):
        self.log(f"[bold]report[/] {esc(str(paths['report']))}")

    def on_report_failed(self, reason):
        self.log(f"[yellow]warning:[/] could not draw the run's pictures ({esc(reason)}); the model is saved")

    def on_epoch_end(self, row, improved):
        self.progress.advance(self.epoch_task)
        if improved:
            self.best_epoch = row["epoch"]
        mark = " [green]*best[/]" if improved else ""
        w = len(str(self.epochs))
        self.log(f"epoch {row['epoch']:>{w}}/{self.epochs}  train loss {row['train_loss']:.4f} acc "
                 f"{_fmt_pct(row['train_acc']):>6}  val loss {row['val_loss']:.4f} acc {_fmt_pct(row['val_acc']):>6}"
                 f"  lr {row['lr']:.2e}  {row['seconds']:.1f}s{mark}")

    def on_update_ratio(self, group, ratio, advice):
        self.log(f"[yellow]warning:[/] {group} update/weight ratio {ratio:.1e} is far from ~1e-3: {advice}")


@app.command(epilog="Example: finetune train ./images --model resnet50 --epochs 15")
@_handle_errors
def train(
    ctx: typer.Context,
    data: Annotated[str, typer.Argument(help="Folder of class folders (DATA/<class>/*.jpg), or with train/ and "
                                             "val/ (or valid/, validation/) inside.", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="Any torchvision classification model: resnet18, "
                                       "resnet50, wide_resnet50_2, resnext50_32x4d, alexnet, mobilenet_v2, ...")
                     ] = "resnet18",
    weights: Annotated[str, typer.Option(help="DEFAULT (ImageNet, downloaded once), an enum name such as "
                                         "IMAGENET1K_V2, none (random init), or a path to a state_dict file.")
                       ] = "DEFAULT",
    mode: Annotated[str, typer.Option(help="finetune (train everything) or feature-extract (frozen backbone, "
                                      "head only).")] = "finetune",
    epochs: Annotated[int, typer.Option(help="Passes over the training images.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per step.")] = 32,
    lr: Annotated[float | None, typer.Option(help="Learning rate. Default: 1e-3 per 4 images for SGD "
                                             "(0.008 at -b 32), 1e-4 per 32 images for AdamW.")] = None,
    optimizer: Annotated[str, typer.Option(help="sgd (Nesterov momentum 0.9) or adamw.")] = "sgd",
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay.")] = 1e-4,
    scheduler: Annotated[str, typer.Option(help="Learning-rate schedule: cosine, step, plateau or none.")
                         ] = "cosine",
    dropout: Annotated[float, typer.Option(help="Dropout before the new head (0 = none).")] = 0.0,
    augment: Annotated[str, typer.Option(help="Training augmentation: none, light (crop 35-100%, flip) or "
                                         "standard (crop 8-100%, flip, rotation up to 10 deg).")] = "standard",
    train_size: Annotated[int, typer.Option(help="Training crop in pixels. 0 = automatic: 80% of the eval crop in "
                                            "finetune mode (176 for 224: objects in random crops look larger, "
                                            "and it is ~1.8x faster), else the eval crop.")] = 0,
    val_fraction: Annotated[float, typer.Option(help="Share of each class held out for validation when DATA "
                                                "has no val/ folder (stratified).")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed for the split, initialisation and shuffling.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")
                      ] = "auto",
    workers: Annotated[int, typer.Option("--workers", "-j", help="Decoding threads/loader workers; -1 = "
                                         "automatic.")] = -1,
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA.")] = True,
    channels_last: Annotated[bool, typer.Option(help="channels_last memory format on CUDA.")] = True,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Run folder. Default: "
                                               "runs/<date>-<time>-<model>.")] = None,
    strict: Annotated[bool, typer.Option(help="Stop (exit 3) before training if any file cannot be used, "
                                         "instead of skipping it with a warning.")] = False,
    max_pixels: Annotated[int, typer.Option(help="Refuse images with more pixels than this (decompression "
                                            "bombs), read from the header.")] = 178_956_970,
    balance: Annotated[str, typer.Option(help="Class imbalance: none, weighted-loss (rarer classes weigh more) "
                                         "or sampler (classes drawn equally often).")] = "none",
    freeze_epochs: Annotated[int, typer.Option(help="Train only the head for this many epochs, then unfreeze "
                                               "the backbone.")] = 0,
    backbone_lr_mult: Annotated[float | None, typer.Option(help="Backbone learning rate = --lr x this. Default: "
                                                           "0.1 with --freeze-epochs, else 1.")] = None,
    overfit: Annotated[int, typer.Option(help="Sanity check: train on this many training images (e.g. 50) with no "
                                         "augmentation or regularisation; it should reach 100 % on them.")] = 0,
    patience: Annotated[int, typer.Option(help="Early stopping: stop after this many epochs without a better "
                                          "val accuracy (0 = off).")] = 0,
    resume: Annotated[str | None, typer.Option(help="Continue an interrupted run folder from its last completed "
                                               "epoch, with that run's settings.")] = None,
    folds: Annotated[int, typer.Option(help="k-fold cross-validation: train one model per stratified fold (every "
                                       "image, train/ and val/ pooled) and report mean ± sd val accuracy; 0 = off.")
                     ] = 0,
    calibrate: Annotated[bool, typer.Option(help="After training, fit a softmax temperature on the val images so "
                                            "probabilities match accuracy; stored in the model.")] = False,
    deterministic: Annotated[bool, typer.Option(help="Deterministic kernels: repeatable runs (slower on GPU).")
                             ] = False,
    config: Annotated[str | None, typer.Option(help="Settings from a best.json written by `finetune tune`; "
                                               "options given on the command line override them.")] = None,
    gpus: Annotated[int, typer.Option(help="Train on this many GPUs of this machine (DistributedDataParallel, "
                                      "launched through torchrun); -b is per GPU. With --device cpu: that many CPU "
                                      "processes, to try the setup. For several machines, see README.")] = 1,
    sync_bn: Annotated[bool, typer.Option(help="With several GPUs: BatchNorm statistics over all GPUs' images "
                                          "(SyncBatchNorm) rather than each GPU's share.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Fine-tune a pretrained torchvision model on a folder of photos."""
    import signal

    if gpus != 1:
        raise typer.Exit(_launch(ctx, gpus, device))

    from finetune.config import TrainConfig
    from finetune.resume import Interrupted, resume_config
    from finetune.train import run_training

    cfg = TrainConfig(data=data, model=model, weights=weights, mode=mode, dropout=dropout, optimizer=optimizer,
                      lr=lr, weight_decay=weight_decay, scheduler=scheduler, epochs=epochs, batch_size=batch_size,
                      workers=workers, augment=augment, train_size=train_size, val_fraction=val_fraction, seed=seed,
                      device=device, amp=amp, channels_last=channels_last, output=output, strict=strict,
                      max_pixels=max_pixels, deterministic=deterministic, patience=patience, balance=balance,
                      freeze_epochs=freeze_epochs, backbone_lr_mult=backbone_lr_mult, overfit=overfit,
                      calibrate=calibrate, folds=folds, sync_bn=sync_bn)
    if config:
        import dataclasses

        from finetune.tune import load_config

        def given(name: str) -> bool:  # typed on the command line (ParameterSource.COMMANDLINE; click or typer's)
            source = ctx.get_parameter_source(name)
            return source is not None and source.name == "COMMANDLINE"

        settings = load_config(config)
        cfg = dataclasses.replace(cfg, **{k: v for k, v in settings.items() if not given(k)})
    if overfit:
        from finetune.train import overfit_config

        cfg = overfit_config(cfg)
    from finetune import distributed

    world = distributed.init(cfg.device)
    quiet = quiet or not world.main
    state = None
    if resume:  # read by rank 0 (other machines may not share its disk) and handed to all
        cfg, state = distributed.on_main(lambda: resume_config(resume, data, model))
    requested = {"signal": 0}

    def on_signal(signum, frame):
        if requested["signal"]:  # a second Ctrl-C: stop now (atomic writes leave no partial file)
            raise Interrupted(signum)
        requested["signal"] = signum
        if world.main:
            err.print("[yellow]stopping after this step (again to stop at once)[/]")

    def run_one(cfg, state):
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with _TrainView(quiet) as view:
                return run_training(cfg, view, stop=lambda: requested["signal"], resume=state)
        except Interrupted as e:
            if world.main:
                _interrupted(e.run_dir, data, model, world.distributed)
            if getattr(e, "collective", False):  # all ranks stopped at the same step; rank 0 said how to resume
                distributed.leave_together()
            raise typer.Exit(e.exit_code) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    if cfg.folds and state is None:
        _cross_validate(cfg, run_one, quiet, world.main)
        return
    result = run_one(cfg, state)
    if not world.main:
        return
    if not quiet:
        table = Table(title="finetune train", show_header=False, title_justify="left")
        best = result.history[result.best_epoch - 1]
        rows = [
            ("best epoch", f"{result.best_epoch} of {len(result.history)}"),
            ("val accuracy", _fmt_pct(result.best_val_acc)),
            ("val loss", f"{result.best_val_loss:.4f}"),
            ("train accuracy", _fmt_pct(best["train_acc"])),
            ("classes", ", ".join(result.classes)),
            ("device", result.device),
            ("time", f"{result.seconds:.1f} s"),
            ("model", str(result.model_path)),
        ]
        for k, v in rows:
            table.add_row(k, esc(v))
        err.print(table)
    if overfit:
        # Training accuracy (train mode, measured as it learns) or the eval-mode pass over the same images.
        reached = [r["epoch"] for r in result.history if r["train_acc"] == 1.0 or r["val_acc"] == 1.0]
        best_acc = max(max(r["train_acc"], r["val_acc"]) for r in result.history)
        if reached:
            err.print(f"[green]sanity check passed[/]: 100 % on the {overfit} images by epoch {reached[0]}; "
                      "the model, labels and preprocessing can learn")
        else:
            err.print(f"[yellow]sanity check failed[/]: {_fmt_pct(best_acc)} at best on the images it "
                      "trained on. Usually: labels that do not match the images, broken preprocessing, a learning "
                      "rate far too low or high, or too few --epochs; try more epochs or another --lr first")
    out.print(str(result.model_path), highlight=False, soft_wrap=True)


def _interrupted(run: Path | None, data: str, model: str, distributed: bool) -> None:
    """How to go on after Ctrl-C / SIGTERM: the best model so far and the resume command."""
    from finetune.resume import STATE_FILE

    if run is not None and (run / STATE_FILE).is_file():
        err.print("[yellow]interrupted[/]: " + esc(f"best model so far in {run / 'best.pt'}; resume with: "
                  f"finetune train {shlex.quote(data)} --resume {shlex.quote(str(run))}"
                  + (f" --model {model}" if model != "resnet18" else "")
                  + (" (with --gpus N or under torchrun again, any number of processes)" if distributed else "")),
                  highlight=False)
    else:
        err.print("[yellow]interrupted[/] before the first epoch completed: nothing to resume")


def _cross_validate(cfg, run_one, quiet: bool, main: bool) -> None:
    """--folds K: one run per fold in RUN/fold-N/, then the mean and spread of the folds' val accuracy."""
    from finetune.distributed import on_main
    from finetune.train import fold_configs, summarize_folds, validate

    validate(cfg)
    root, configs = on_main(lambda: fold_configs(cfg))  # one timestamped folder for all processes
    results = []
    for i, fold_cfg in enumerate(configs, 1):
        if main:
            err.print(f"[bold]fold {i} of {len(configs)}[/] " + esc(str(fold_cfg.output)), highlight=False)
        results.append(run_one(fold_cfg, None))
    if not main:
        return
    summary = summarize_folds(root, results)
    table = Table("fold", "val images", "best epoch", "val accuracy", "model",
                  title=f"{len(results)}-fold cross-validation", title_justify="left")
    for f in summary["folds"]:
        table.add_row(str(f["fold"]), str(f["val_images"]), str(f["best_epoch"]), _fmt_pct(f["val_acc"]),
                      esc(f["model"]))
    table.add_row("mean ± sd", str(summary["images"]), "", f"{_fmt_pct(summary['mean_val_acc'])} ± "
                  f"{100 * summary['sd_val_acc']:.1f}", esc(str(root / "folds.json")), style="bold")
    if not quiet:
        err.print(table)
        models = " ".join(f"-m {shlex.quote(f['model'])}" for f in summary["folds"])
        err.print(esc(f"the {len(results)} fold models form an ensemble: finetune predict PHOTOS {models}"),
                  highlight=False)
    out.print(str(root / "folds.json"), highlight=False, soft_wrap=True)


def _launch(ctx: typer.Context, gpus: int, device: str) -> int:
    """--gpus N: this same command in N processes under torchrun (standalone, this machine); its exit code."""
    import torch

    if gpus < 1:
        raise typer.BadParameter(f"{gpus}: must be at least 1", param_hint="--gpus")
    if "WORLD_SIZE" in os.environ:
        raise typer.BadParameter("already running under torchrun; leave --gpus out (torchrun's --nproc-per-node "
                                 "sets the number of processes)", param_hint="--gpus")
    on_cpu = device.strip().lower() == "cpu"
    if not on_cpu and torch.cuda.device_count() < gpus:
        raise typer.BadParameter(f"{gpus}: this machine has {torch.cuda.device_count()} CUDA GPU(s); ask for at "
                                 f"most that many (or --device cpu for {gpus} CPU processes)", param_hint="--gpus")
    from finetune.distributed import launch

    return launch([*(["--debug"] if _state["debug"] else []), "train", *_command_line(ctx, skip={"gpus"})], gpus)


def _command_line(ctx: typer.Context, skip: set[str]) -> list[str]:
    """The options and arguments given to this command, as a command line (without those named in skip)."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        source = ctx.get_parameter_source(param.name)
        if param.name in skip or source is None or source.name == "DEFAULT":
            continue
        if param.param_type_name == "argument":
            args.append(str(value))
        elif param.is_flag and param.secondary_opts:
            args.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.is_flag:
            if value:
                args.append(param.opts[0])
        else:
            args += [param.opts[0], str(value)]
    return args


# ------------------------------------------------------------------------------------------------ predict


def _model_path(model: str | None) -> str:
    from finetune.train import latest_model

    return model or str(latest_model())


def _model_paths(models: list[str] | None) -> list[str]:
    """-m given once or more (an ensemble), else the latest run's best model."""
    return list(models) if models else [_model_path(None)]


@app.command(epilog="Example: finetune predict photo.jpg ./more_photos 'shots/*.png' -k 2 --json")
@_handle_errors
def predict(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively) or globs.",
                                               show_default=False)],
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Model file; repeat for an ensemble "
                                                    "(probabilities averaged). Default: the latest run's best model.")
                     ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Classes to show per image.")] = 3,
    tta: Annotated[bool, typer.Option(help="Test-time augmentation: average the logits of each image and its "
                                      "mirror image (two forward passes).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV on stdout.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    workers: Annotated[int, typer.Option("--workers", "-j", help="Decoding threads.")] = 2,
    sort_into: Annotated[str | None, typer.Option(help="Also copy each image into SORT_INTO/<predicted class>/ "
                                                  "(never moves or overwrites), with a CSV of what was done.")
                         ] = None,
    min_confidence: Annotated[float, typer.Option(help="With --sort-into: images whose top probability is below "
                                                  "this go to unsure/.")] = 0.0,
) -> None:
    """Classify images with a trained model: top-k classes with probabilities."""
    from finetune.predict import Failure, check_inputs, expand_inputs, load_predictor

    if not 0 <= min_confidence <= 1:
        raise typer.BadParameter(f"{min_confidence}: must be between 0 and 1", param_hint="--min-confidence")
    if as_json and as_csv:
        raise typer.BadParameter("choose one of --json and --csv", param_hint="--json/--csv")
    if top_k < 1:
        raise typer.BadParameter(f"{top_k}: must be at least 1", param_hint="--top-k")
    files, missing = expand_inputs(paths)
    for f in missing:
        err.print(f"[yellow]warning:[/] {esc(f.path)}: {esc(f.reason)}", highlight=False)
    check_inputs(files, missing)
    predictor = load_predictor(_model_paths(model), device, tta)
    results = list(predictor.predict(files, top_k, batch_size, workers))
    good = [r for r in results if not isinstance(r, Failure)]
    bad = [r for r in results if isinstance(r, Failure)] + missing
    for f in bad:
        if f not in missing:
            err.print(f"[yellow]warning:[/] skipped {esc(f.path)}: {esc(f.reason)}", highlight=False)
    if as_json:
        payload = [{"path": r.path, "predictions": [{"class": c, "probability": round(p, 6)} for c, p in r.top]}
                   for r in good]
        sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    elif as_csv:
        k = max((len(r.top) for r in good), default=0)
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["path"] + [f"{x}{i}" for i in range(1, k + 1) for x in ("class", "probability")])
        for r in good:
            w.writerow([r.path] + [v for c, p in r.top for v in (c, f"{p:.6f}")])
    else:
        table = Table(Column("image", overflow="fold"), *[f"#{i}" for i in range(1, min(top_k, len(predictor.classes)) + 1)])
        for r in good:
            table.add_row(esc(r.path), *[f"{esc(c)} {p * 100:.1f}%" for c, p in r.top])
        out.print(table)
    if sort_into and good:
        from finetune.predict import sort_into as copy_sorted

        log = copy_sorted(good, sort_into, min_confidence)
        err.print(esc(f"copied {len(good)} image(s) into {sort_into}/<class>/; log: {log}"), highlight=False)
    if bad:
        err.print(f"[yellow]{len(bad)} of {len(results) + len(missing)} input(s) skipped[/]")
    if not good:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------------ export


@app.command(epilog="Example: finetune export model.onnx --model runs/20261123-101500-resnet18/best.pt")
@_handle_errors
def export(
    out_path: Annotated[str, typer.Argument(metavar="OUT", help="Output file: .pt (torchvision state_dict + "
                                            "metadata), .safetensors, .pt2 (torch.export) or .onnx.",
                                            show_default=False)],
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Model file; repeat to export an ensemble "
                                                    "as one file (same classes and preprocessing). Default: the "
                                                    "latest run's best model.")] = None,
    check_images: Annotated[str | None, typer.Option(help="Images to verify the export on. Default: the "
                                                     "training data's val images.")] = None,
) -> None:
    """Write a model that loads without finetune, checked against PyTorch on real images."""
    from finetune.export import ATOL, RTOL, export_model

    with err.status(f"exporting {out_path}"):
        report = export_model(_model_paths(model), out_path, check_images)
    err.print(f"checked on {report.checked_images} images ({esc(report.image_source)}): max logit difference "
              f"{report.max_abs_diff:.2e} (tolerance {ATOL:g} + {RTOL:g}*|logit|), top-1 agrees "
              f"{report.top1_agree}/{report.checked_images}; {report.seconds:.1f} s", highlight=False)
    out.print(str(report.path), highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------------ evaluate


@app.command(epilog="Example: finetune evaluate ./images --model runs/20261123-101500-resnet18/best.pt --json")
@_handle_errors
def evaluate(
    data: Annotated[str, typer.Argument(help="Labelled folder: its val/ when it has train/ and val/, else every "
                                             "image of its class folders.", show_default=False)],
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Model file; repeat to evaluate an "
                                                    "ensemble beside each of its models. Default: the latest run's "
                                                    "best model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The full report as JSON on stdout.")] = False,
    wrong: Annotated[int, typer.Option(help="How many of the most confidently wrong images to list.")] = 10,
    tta: Annotated[bool, typer.Option(help="Test-time augmentation: average the logits of each image and its "
                                      "mirror image.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
) -> None:
    """Accuracy with a 95 % interval, per-class precision/recall/F1, confusion matrix, confident mistakes."""
    from finetune.evaluate import evaluate_folder

    with err.status("evaluating"):
        r = evaluate_folder(_model_paths(model), data, device, batch_size, wrong=wrong, tta=tta)
    if as_json:
        sys.stdout.write(json.dumps(r, indent=2, ensure_ascii=False) + "\n")
    low, high = r["accuracy_ci95"]
    err.print(f"[bold]accuracy[/] {_fmt_pct(r['accuracy'])} ({r['correct']}/{r['images']}), 95 % CI "
              f"{_fmt_pct(low)}-{_fmt_pct(high)} (Wilson)   on {esc(r['data'])}", highlight=False)
    table = Table("class", "precision", "recall", "F1", "support", title="per class", title_justify="left")
    for name, m in r["per_class"].items():
        table.add_row(esc(name), f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    macro = r["macro"]
    table.add_row("macro avg", f"{macro['precision']:.3f}", f"{macro['recall']:.3f}", f"{macro['f1']:.3f}",
                  str(r["images"]), style="bold")
    err.print(table)
    cm = Table("true \\ predicted", *map(esc, r["classes"]), title="confusion matrix", title_justify="left")
    for name, row in zip(r["classes"], r["confusion_matrix"]):
        cm.add_row(esc(name), *map(str, row))
    err.print(cm)
    if "members" in r:
        t = Table("model", "accuracy", "95 % CI", "macro F1", "ECE", title="ensemble and its members",
                  title_justify="left")
        for m in r["members"]:
            t.add_row(esc(m["model"]), _fmt_pct(m["accuracy"]), "-".join(map(_fmt_pct, m["accuracy_ci95"])),
                      f"{m['macro_f1']:.3f}", f"{m['ece']:.3f}")
        t.add_row(f"ensemble of {len(r['members'])}", _fmt_pct(r["accuracy"]),
                  "-".join(map(_fmt_pct, r["accuracy_ci95"])), f"{r['macro']['f1']:.3f}",
                  f"{r['calibration']['ece_before']:.3f}", style="bold")
        err.print(t)
    cal = r["calibration"]
    after = (f"; {cal['ece_after']:.3f} with the model's temperature {cal['temperature']:.3g}" if cal["fitted"]
             else " (of the averaged probabilities, each model with its own temperature)" if "members" in r
             else " (no temperature fitted: train with --calibrate)")
    err.print(f"[bold]calibration[/] expected calibration error {cal['ece_before']:.3f} raw{after}", highlight=False)
    if r["most_confident_wrong"]:
        w = Table("image", "true", "predicted", "probability", title="most confidently wrong", title_justify="left")
        for m in r["most_confident_wrong"]:
            w.add_row(esc(m["path"]), esc(m["true"]), esc(m["predicted"]), f"{m['probability']:.3f}")
        err.print(w)
    for s in r["skipped"]:
        err.print(f"[yellow]warning:[/] skipped {esc(s['path'])}: {esc(s['reason'])}", highlight=False)


# ------------------------------------------------------------------------------------------------ lr-find


@app.command("lr-find", epilog="Example: finetune lr-find ./images --model resnet50")
@_handle_errors
def lr_find(
    data: Annotated[str, typer.Argument(help="Dataset folder, as for train.", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="torchvision model name, as for train.")] = "resnet18",
    weights: Annotated[str, typer.Option(help="As for train.")] = "DEFAULT",
    mode: Annotated[str, typer.Option(help="finetune or feature-extract.")] = "finetune",
    optimizer: Annotated[str, typer.Option(help="sgd or adamw.")] = "sgd",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per step.")] = 32,
    augment: Annotated[str, typer.Option(help="none, light or standard.")] = "standard",
    start_lr: Annotated[float, typer.Option(help="First learning rate.")] = 1e-7,
    end_lr: Annotated[float, typer.Option(help="Last learning rate (the test stops earlier if the loss explodes).")
                      ] = 10.0,
    steps: Annotated[int, typer.Option(help="Steps from --start-lr to --end-lr.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    workers: Annotated[int, typer.Option("--workers", "-j", help="As for train.")] = -1,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Folder for lr_find.png and lr_find.json. "
                                               "Default: runs/lr-find-<date>-<time>-<model>.")] = None,
) -> None:
    """Learning-rate range test: plot loss against an exponentially rising lr and suggest a rate."""
    import time

    from finetune.checkpoint import write_text_atomic
    from finetune.config import TrainConfig
    from finetune.lrfind import lr_find as run_lr_find
    from finetune.report import write_lr_plot
    from finetune.train import RUNS_ROOT

    cfg = TrainConfig(data=data, model=model, weights=weights, mode=mode, optimizer=optimizer, batch_size=batch_size,
                      augment=augment, seed=seed, device=device, workers=workers)
    with err.status("lr range test"):
        result = run_lr_find(cfg, start_lr, end_lr, steps)
    folder = Path(output) if output else RUNS_ROOT / f"lr-find-{time.strftime('%Y%m%d-%H%M%S')}-{model}"
    plot = write_lr_plot(folder / "lr_find.png", result.lrs, result.losses, result.suggestion, result.min_loss_lr)
    write_text_atomic(folder / "lr_find.json", json.dumps({"lrs": result.lrs, "losses": result.losses,
                                                           "suggestion": result.suggestion,
                                                           "min_loss_lr": result.min_loss_lr}, indent=2))
    err.print(esc(f"{len(result.lrs)} steps; lowest smoothed loss at lr {result.min_loss_lr:.2g}; plot: {plot}; "
                  f"train with: finetune train {shlex.quote(data)} --model {model} --optimizer {optimizer} "
                  f"--lr {result.suggestion:.2g}"), highlight=False)
    out.print(f"{result.suggestion:.3g}")


# ------------------------------------------------------------------------------------------------ tune


def _seconds(text: str | None) -> float | None:
    """A time budget: 900, 900s, 15m or 2h."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        value = float(number) * unit
    except ValueError:
        raise typer.BadParameter(f"{text}: give seconds or a number with s, m or h, e.g. 30m", param_hint="--budget") \
            from None
    if value <= 0:
        raise typer.BadParameter(f"{text}: must be positive", param_hint="--budget")
    return value


@app.command(epilog="Example: finetune tune ./images --trials 30 --budget 1h --mode feature-extract")
@_handle_errors
def tune(
    data: Annotated[str, typer.Argument(help="Dataset folder, as for train.", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="torchvision model name, as for train.")] = "resnet18",
    weights: Annotated[str, typer.Option(help="As for train.")] = "DEFAULT",
    trials: Annotated[int, typer.Option(help="Trials in all: about 70 % coarse (wide ranges, --coarse-epochs), "
                                        "then fine (ranges narrowed around the best 3, --fine-epochs).")] = 20,
    coarse_epochs: Annotated[int, typer.Option(help="Epochs per stage-1 trial.")] = 3,
    fine_epochs: Annotated[int, typer.Option(help="Epochs per stage-2 trial.")] = 10,
    budget: Annotated[str | None, typer.Option(help="Time budget (900, 15m, 2h): no trial starts after it.")
                      ] = None,
    mode: Annotated[str, typer.Option(help="Modes to search: both, finetune or feature-extract (fast: backbone "
                                      "features are computed once and cached).")] = "both",
    seed: Annotated[int, typer.Option(help="Seed of the search (and of every trial's split and init).")] = 0,
    val_fraction: Annotated[float, typer.Option(help="As for train.")] = 0.2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    workers: Annotated[int, typer.Option("--workers", "-j", help="As for train.")] = -1,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Search folder. Default: "
                                               "runs/tune-<date>-<time>-<model>.")] = None,
) -> None:
    """Random hyper-parameter search, coarse then fine; writes every trial and the best settings (best.json)."""
    import time

    from rich.live import Live

    from finetune.config import TrainConfig
    from finetune.train import RUNS_ROOT
    from finetune.tune import MODES, Space, run_search

    if mode not in ("both", *MODES):
        raise typer.BadParameter(f"{mode}: choose both, finetune or feature-extract", param_hint="--mode")
    root = Path(output) if output else RUNS_ROOT / f"tune-{time.strftime('%Y%m%d-%H%M%S')}-{model}"
    base = TrainConfig(data=data, model=model, weights=weights, seed=seed, val_fraction=val_fraction, device=device,
                       workers=workers)
    space = Space(mode=MODES if mode == "both" else (mode,))
    rows: list = []

    def table() -> Table:
        t = Table("#", "stage", "mode", "optimizer", "lr", "wd", "dropout", "batch", "augment", "epochs",
                  "val acc", "s", title=f"finetune tune: {esc(str(root))}", title_justify="left")
        best = max((r.val_acc for r in rows if r.status == "ok"), default=None)
        for r in rows:
            p = r.params
            acc = _fmt_pct(r.val_acc) if r.status == "ok" else ("..." if r.status == "running" else r.status)
            t.add_row(str(r.number), str(r.stage), p["mode"], p["optimizer"], f"{p['lr']:.2g}",
                      f"{p['weight_decay']:.1g}", f"{p['dropout']:.2f}", str(p["batch_size"]), p["augment"],
                      str(r.epochs), acc, f"{r.seconds:.0f}",
                      style="bold green" if r.status == "ok" and r.val_acc == best else None)
        return t

    with Live(table(), console=err, refresh_per_second=4, transient=False) as live:
        def view(event: str, **kw) -> None:
            if event == "trial_start":
                rows.append(kw["trial"])
            if event == "stage":
                around = ", ".join(map(str, kw["around"])) or "none (no trial succeeded)"
                live.console.print(f"[bold]stage 2[/]: ranges narrowed around trials {around}")
            live.update(table())

        result = run_search(base, root, trials, coarse_epochs, fine_epochs, _seconds(budget), seed, space, view)
    if not err.is_terminal:
        err.print()  # Live leaves its last frame without a line end when stderr is a file or pipe
    if result.stopped_by_budget:
        err.print(f"[yellow]time budget spent[/]: {len(result.trials)} of {trials} trials ran")
    failed = sum(t.status != "ok" for t in result.trials)
    if failed:
        err.print(f"[yellow]{failed} trial(s) diverged[/] (loss NaN/inf: learning rate too high for them)")
    if result.best is None:
        raise FinetuneError("no trial finished: every one diverged; lower the learning rates (they are searched "
                            "log-uniformly) or check the data with `finetune check`", exit_code=6)
    err.print(esc(f"best: trial {result.best.number}, val accuracy {_fmt_pct(result.best.val_acc)}; all trials in "
                  f"{root / 'trials.csv'}; reproduce with: finetune train {shlex.quote(data)} --config "
                  f"{result.best_config}"), highlight=False)
    out.print(str(result.best_config), highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------------ check


@app.command(epilog="Example: finetune check ./images --json > report.json")
@_handle_errors
def check(
    data: Annotated[str, typer.Argument(help="Dataset folder, in either layout `train` accepts.",
                                        show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="The full report as JSON on stdout.")] = False,
    val_fraction: Annotated[float, typer.Option(help="As for train, when DATA has no val/ folder.")] = 0.2,
    seed: Annotated[int, typer.Option(help="As for train.")] = 0,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Reading threads.")] = 2,
) -> None:
    """Inspect a dataset before training: counts, unusable files, duplicates and train/val leakage."""
    from rich.progress import Progress

    from finetune.check import check_dataset

    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("checking", total=None)
        report = check_dataset(data, val_fraction, seed, workers,
                               on_progress=lambda i, n: progress.update(task, completed=i, total=n))
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    _render_check(report)


def _render_check(r: dict) -> None:
    err.print(f"[bold]{esc(r['root'])}[/]: {len(r['classes'])} classes, {r['images']} images, {r['usable']} usable "
              f"({r['layout']})", highlight=False)
    table = Table("class", "train", "val", title="images per class", title_justify="left")
    for c in r["classes"]:
        table.add_row(esc(c), str(r["counts"]["train"][c]), str(r["counts"]["val"][c]))
    err.print(table)
    for part, ratio in r["imbalance"].items():
        if ratio and ratio >= 1.5:
            err.print(f"[yellow]imbalance:[/] {part} largest class is {ratio:.1f}x the smallest")
    sizes = r["sizes"]
    if sizes["min"]:
        err.print(f"sizes: min {sizes['min'][0]}x{sizes['min'][1]}, median {sizes['median'][0]:g}x"
                  f"{sizes['median'][1]:g}, max {sizes['max'][0]}x{sizes['max'][1]}; modes "
                  + ", ".join(f"{m} {n}" for m, n in r["modes"].items()), highlight=False)
    if r["exif_rotated"]:
        err.print(f"{len(r['exif_rotated'])} photo(s) carry an EXIF rotation (applied when loading)")
    findings = [("would be skipped", [f"{s['path']}: {s['reason']}" for s in r["skipped"]])]
    dup = r["duplicates"]
    for key, label in (("train_val_leakage", "identical files in train and val (leakage)"),
                       ("across_classes", "identical files under different classes (conflicting labels)"),
                       ("within_class", "identical files within a class")):
        findings.append((label, [" = ".join(f"{m['split']}/{m['class']}: {m['path']}" for m in g) for g in dup[key]]))
    for label, items in findings:
        if items:
            err.print(f"[yellow]{len(items)} {label}:[/]")
            for item in items:
                err.print(f"  {esc(item)}", highlight=False)
    if not any(items for _, items in findings):
        err.print("[green]no unusable files, no duplicates[/]")


def main() -> None:
    """Entry point for `python -m finetune`."""
    app(prog_name="finetune")


if __name__ == "__main__":
    main()
