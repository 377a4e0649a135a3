"""`finetune train`: the options typed -> one call of finetune.train (the library builds the run's TrainConfig from
them) -> rendered results."""

from __future__ import annotations

import os
import shlex

import typer
from rich.table import Table

from finetune._util import ddp
from finetune.api import CrossValidation, Run
from finetune.api import train as finetune_train
from finetune.cli import options as o
from finetune.cli.app import command, state
from finetune.cli.render import err, esc, out, pct
from finetune.cli.views import TrainView
from finetune.config import SETTINGS
from finetune.errors import Interrupted, UsageError
from finetune.training.resume import STATE_FILE

# Every setting but the DATA argument and what no option sets (given: what the user typed, recorded).
TRAIN_SETTINGS = tuple(name for name in o.SETTINGS)


@command(epilog="Example: finetune train ./images --model resnet50 --epochs 15")
@o.settings(*TRAIN_SETTINGS)
def train(
    ctx: typer.Context, data: o.OptionalData = None, gpus: o.Gpus = 1, resume: o.Resume = None,
    config: o.Config = None, quiet: o.Quiet = False, **settings,
) -> None:
    """Fine-tune a pretrained torchvision model on a folder of photos."""
    if gpus != 1:
        raise typer.Exit(_launch(ctx, gpus, settings["device"]))
    world = ddp.init(settings["device"])
    quiet = quiet or not world.main
    given = {name: value for name, value in given_settings(ctx).items() if name != "data"}
    result = _run(lambda view, stop: finetune_train(data, config=config, resume=resume, observer=view, stop=stop,
                                                    **given), quiet, world.distributed)
    if not world.main:
        return
    if isinstance(result, Run):
        _summary(result, quiet)
        out.print(str(result.model_path), highlight=False, soft_wrap=True)
    else:
        _folds(result, quiet)


def given_settings(ctx: typer.Context) -> dict:
    """The settings typed on the command line (not defaults), by name, as the options parsed them."""
    return {name: value for name, value in ctx.params.items() if name in SETTINGS and _typed(ctx, name)}


def _typed(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _run(call, quiet: bool, several: bool):
    """call(view, stop): the library's run, stopped cleanly by a first Ctrl-C/SIGTERM (after the step), with how to
    go on."""
    requested = {"signal": 0}

    def soft_stop(signum: int) -> None:
        requested["signal"] = signum
        if ddp.current().main:
            err.print("[yellow]stopping after this step (again to stop at once)[/]")

    state["soft_stop"] = soft_stop
    try:
        with TrainView(quiet) as view:
            return call(view, lambda: requested["signal"])
    except Interrupted as e:
        if ddp.current().main:
            _interrupted(e.run_dir, several)
        if e.collective:  # all ranks stopped at the same step; rank 0 said how to resume
            ddp.leave_together()
        raise typer.Exit(e.exit_code) from None
    finally:
        state["soft_stop"] = None


def _interrupted(run, several: bool) -> None:
    """How to go on after Ctrl-C / SIGTERM: the best model so far and the resume command."""
    if run is not None and (run / STATE_FILE).is_file():
        err.print("[yellow]interrupted[/]: " + esc(
            f"best model so far in {run / 'best.pt'}; resume with: finetune train --resume {shlex.quote(str(run))}"
            + (" (with --gpus N or under torchrun again, any number of processes)" if several else "")),
            highlight=False)
    else:
        err.print("[yellow]interrupted[/] before the first epoch completed: nothing to resume")


def _summary(result: Run, quiet: bool) -> None:
    if not quiet:
        table = Table(title="finetune train", show_header=False, title_justify="left")
        best = next(r for r in result.history if r["epoch"] == result.best_epoch)
        metrics = result.summary.get("val_metrics") or {}
        low, high = metrics.get("accuracy_ci95", (None, None))
        interval = f" (95 % interval {pct(low)}-{pct(high)})" if low is not None else ""
        scores = multilabel_rows(metrics) if metrics.get("multi_label") else [
            ("val accuracy", pct(result.best_val_acc) + interval), ("val loss", f"{result.best_val_loss:.4f}"),
            ("train accuracy", pct(best["train_acc"]))]
        for key, value in (("best epoch", f"{result.best_epoch} of {len(result.history)}"), *scores,
                           ("classes", ", ".join(result.classes[:20]) + (" ..." if len(result.classes) > 20 else "")),
                           ("device", result.device), ("time", f"{result.seconds:.1f} s"),
                           ("model", str(result.model_path))):
            table.add_row(key, esc(value))
        err.print(table)
    v = result.sanity
    if v is not None:
        if v["passed"]:
            err.print(f"[green]sanity check passed[/]: 100 % on the {v['images']} images by epoch {v['epoch']}; "
                      "the model, labels and preprocessing can learn")
        else:
            err.print(f"[yellow]sanity check failed[/]: {pct(v['best_acc'])} at best on the images it trained on. "
                      "Usually: labels that do not match the images, broken preprocessing, a learning rate far too "
                      "low or high, or too few --epochs; try more epochs or another --lr first")


def multilabel_rows(m: dict) -> list[tuple[str, str]]:
    """The multi-label scores as (name, value) rows: mAP and F1 with their intervals, exact match, Hamming loss."""
    ci = m.get("ci95", {})

    def shown(key: str) -> str:
        low, high = ci.get(key, (None, None))
        return f"{m[key]:.3f}" + (f" (95 % interval {low:.3f}-{high:.3f})" if low is not None else "")

    cross = m.get("f1_macro_cross_fitted")
    return [("val mAP", f"{shown('map_macro')} macro; {m['map_micro']:.3f} micro"),
            ("val F1", f"{shown('f1_macro')} macro at the fitted thresholds"
             + (f"; {cross:.3f} on the half of val each fit did not see" if cross is not None else "")),
            ("exact match", f"{pct(m['subset_accuracy'])} ({m['exact_matches']}/{m['images']} images with every "
                            "label right)"),
            ("Hamming loss", f"{m['hamming_loss']:.4f}")]


def _folds(summary: CrossValidation, quiet: bool) -> None:
    """--folds K: the mean and spread of the folds' val accuracy, and the ensemble they form."""
    if not quiet:
        table = Table("fold", "val images", "best epoch", "val accuracy", "model",
                      title=f"{len(summary['folds'])}-fold cross-validation", title_justify="left")
        for f in summary["folds"]:
            table.add_row(str(f["fold"]), str(f["val_images"]), str(f["best_epoch"]), pct(f["val_acc"]),
                          esc(f["model"]))
        table.add_row("mean ± sd", str(summary["images"]), "", f"{pct(summary['mean_val_acc'])} ± "
                      f"{100 * summary['sd_val_acc']:.1f}", esc(summary["path"]), style="bold")
        if "mean_val_map" in summary:
            table.caption = f"multi-label: val mAP {summary['mean_val_map']:.3f} ± {summary['sd_val_map']:.3f} " \
                            "(accuracy above is exact match)"
        err.print(table)
        models = " ".join(f"-m {shlex.quote(f['model'])}" for f in summary["folds"])
        err.print(esc(f"the fold models form an ensemble: finetune predict PHOTOS {models}"), highlight=False)
    out.print(summary["path"], highlight=False, soft_wrap=True)


def _launch(ctx: typer.Context, gpus: int, device: str) -> int:
    """--gpus N: this same command in N processes under torchrun (standalone, this machine); its exit code."""
    import torch

    if gpus < 1:
        raise UsageError(f"--gpus {gpus}: must be at least 1")
    if "WORLD_SIZE" in os.environ:
        raise UsageError("--gpus: already running under torchrun; leave --gpus out (torchrun's --nproc-per-node "
                         "sets the number of processes)")
    if device.strip().lower() != "cpu" and torch.cuda.device_count() < gpus:
        raise UsageError(f"--gpus {gpus}: this machine has {torch.cuda.device_count()} CUDA GPU(s); ask for at most "
                         f"that many (or --device cpu for {gpus} CPU processes)")
    return ddp.launch([*(["--debug"] if state["debug"] else []), "train",
                               *command_line(ctx, skip={"gpus"})], gpus)


def command_line(ctx: typer.Context, skip: set[str] = frozenset(), extra: dict | None = None) -> list[str]:
    """The options and arguments typed for this command (except those in skip), as a command line; extra
    adds or replaces options by parameter name."""
    extra = extra or {}
    args: list[str] = []
    for param in ctx.command.params:
        if param.name in skip or not (param.name in extra or _typed(ctx, param.name)):
            continue
        args += _spell(param, extra.get(param.name, ctx.params.get(param.name)))
    return args


def _spell(param, value) -> list[str]:
    if param.param_type_name == "argument":
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    if param.is_flag and param.secondary_opts:
        return [param.opts[0] if value else param.secondary_opts[0]]
    if param.is_flag:
        return [param.opts[0]] if value else []
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in (param.opts[0], str(v))]
    return [param.opts[0], str(value)]
