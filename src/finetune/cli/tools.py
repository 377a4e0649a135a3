"""`finetune check`, `lr-find` and `tune`: looking at the data and searching settings before a real run."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live
from rich.progress import Progress
from rich.table import Table

from finetune import api
from finetune._util.extras import require
from finetune._util.files import dumps_json, timestamped_dir
from finetune.cli import options as o
from finetune.cli.app import command, state
from finetune.cli.render import err, esc, out, pct
from finetune.cli.train import command_line, given_settings
from finetune.cli.trust import TrustView, render_trust
from finetune.cli.views import TrainView
from finetune.config import MODES, TrainConfig
from finetune.data.labelfile import options_from
from finetune.errors import DivergedError, FinetuneError, Interrupted, ResourceError, UsageError
from finetune.quality.doctor import check_dataset
from finetune.quality.label_errors import check_trust
from finetune.quality.near_duplicates import NEAR_DUPLICATE
from finetune.training.label_issues import LABEL_FOLDS, require_cleanlab


@command(epilog="Example: finetune check ./images --labels --review-into ./to-review --json > report.json")
@o.settings("val_fraction", "seed", "max_pixels", "path_col", "label_col", "label_sep", "multi_label", "image_dir",
            "model", "weights", "device", "batch_size")
def check(
    data: o.Data, as_json: o.AsJson = False,
    workers: Annotated[int, typer.Option("--workers", "-j", metavar="N", help="Reading threads.")] = 2,
    labels: o.Labels = False, label_folds: o.LabelFolds = LABEL_FOLDS, similarity: o.Similarity = NEAR_DUPLICATE,
    review: o.ReviewInto = None, **settings,
) -> None:
    """Inspect a dataset before training: counts, unusable files, duplicates and train/val leakage; with --labels,
    likely label errors, near-duplicates and outliers."""
    cfg = TrainConfig(data=data, workers=workers, **settings)
    if review and not labels:
        raise UsageError("--review-into: copies the suspects --labels finds; add --labels")
    if labels:
        require_cleanlab()  # before any work: a missing extra is said at once
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("checking", total=None)
        report = check_dataset(data, cfg.val_fraction, cfg.seed, workers, cfg.max_pixels,
                               on_progress=lambda i, n: progress.update(task, completed=i, total=n),
                               labels=options_from(cfg))
    if labels:
        if report.get("multi_label"):
            raise UsageError("--labels: label errors are ranked for single-label data (one class per image); this "
                             "dataset is multi-label")
        with TrustView(False) as view:
            report |= check_trust(cfg, label_folds, similarity, review, view)
    if as_json:
        sys.stdout.write(dumps_json(report) + "\n")
    _render_check(report)
    if labels:
        render_trust(report)


def _render_check(r: dict) -> None:
    files = r["usable"] + len(r["skipped"])
    err.print(f"[bold]{esc(r['root'])}[/]: {len(r['classes'])} classes, {files} files: {r['usable']} usable images, "
              f"{len(r['skipped'])} skipped ({r['layout']})", highlight=False)
    table = Table("class", "train", "val", title="images per class", title_justify="left")
    for c in r["classes"]:
        table.add_row(esc(c), str(r["counts"]["train"][c]), str(r["counts"]["val"][c]))
    err.print(table)
    for part, ratio in r["imbalance"].items():
        if ratio and ratio >= r["imbalance_warning"]:
            err.print(f"[yellow]imbalance:[/] {part} largest class is {ratio:.1f}x the smallest")
    sizes = r["sizes"]
    if sizes["min"]:
        err.print(f"sizes: min {sizes['min'][0]}x{sizes['min'][1]}, median {sizes['median'][0]:g}x"
                  f"{sizes['median'][1]:g}, max {sizes['max'][0]}x{sizes['max'][1]}; modes "
                  + ", ".join(f"{m} {n}" for m, n in r["modes"].items()), highlight=False)
    if r["exif_rotated"]:
        err.print(f"{len(r['exif_rotated'])} photo(s) carry an EXIF rotation (applied when loading)")
    missing = r["rows_without_image"]
    if missing:
        err.print(f"[yellow]{len(missing)} row(s) name no image[/] (skipped by train; --strict stops), e.g. "
                  + esc(", ".join(f"line {m['line']}: {m['path']}" for m in missing[:3])), highlight=False)
    for note in r["notes"]:
        err.print(f"[yellow]note:[/] {esc(note)}", highlight=False)
    findings = [("skipped", [f"{s['path']}: {s['reason']}" for s in r["skipped"]])]
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


@command("lr-find", epilog="Example: finetune lr-find ./images --model resnet50")
@o.settings("model", "weights", "path_col", "label_col", "label_sep", "multi_label", "image_dir", "mode", "optimizer",
            "batch_size", "augment", "seed", "device", "workers")
def lr_find(
    ctx: typer.Context, data: o.Data,
    start_lr: Annotated[float, typer.Option(metavar="LR", help="First learning rate.")] = 1e-7,
    end_lr: Annotated[float, typer.Option(metavar="LR", help=(
        "Last learning rate (the test stops earlier once the loss explodes)."))] = 10.0,
    steps: Annotated[int, typer.Option(metavar="N", help="Steps from --start-lr to --end-lr.")] = 100,
    output: Annotated[str | None, typer.Option("--output", "-o", metavar="FOLDER", help=(
        "Folder for lr_find.png and lr_find.json. Default: runs/lr-find-<date>-<time>-<model>."))] = None,
    quiet: o.Quiet = False, **settings,
) -> None:
    """Learning-rate range test: plot loss against an exponentially rising lr and suggest a rate."""
    given = {name: value for name, value in given_settings(ctx).items() if name in settings}
    with TrainView(quiet) as view:
        result = api.lr_find(data, start_lr=start_lr, end_lr=end_lr, steps=steps, output=output, observer=view,
                             **given)
    files = result.files
    again = command_line(ctx, skip={"start_lr", "end_lr", "steps", "output", "quiet"},
                         extra={} if settings["mode"] != "auto" else {"mode": "finetune"})
    err.print(esc(f"{len(result.lrs)} steps; lowest smoothed loss at lr {result.min_loss_lr:.2g}; plot: "
                  f"{files['plot']}; train with: finetune train {shlex.join(again)} --lr {result.suggestion:.2g}"),
              highlight=False)
    out.print(f"{result.suggestion:.3g}")


def _trials_table(rows: list, title: str) -> Table:
    t = Table("#", "by", "mode", "optimizer", "lr", "wd", "dropout", "batch", "augment", "epochs", "val acc", "s",
              title=title, title_justify="left")
    best = max((r.val_acc for r in rows if r.status == "ok"), default=None)
    for r in rows:
        p = r.params
        acc = pct(r.val_acc) if r.val_acc is not None else "..."
        acc += {"ok": "", "running": "", "pruned": " pruned"}.get(r.status, f" {r.status}")
        t.add_row(str(r.number), r.sampler, p.get("mode", "?"), p.get("optimizer", "?"), f"{p.get('lr', 0):.2g}",
                  f"{p.get('weight_decay', 0):.1g}", f"{p.get('dropout', 0):.2f}", str(p.get("batch_size", "?")),
                  p.get("augment", "?"), f"{r.epochs_run}/{r.epochs}", acc, f"{r.seconds:.0f}",
                  style="bold green" if r.status == "ok" and r.val_acc == best else None)
    return t


@command(epilog="Example: finetune tune ./images --trials 30 --budget 1h --mode feature-extract")
@o.settings("model", "weights", "seed", "val_fraction", "path_col", "label_col", "label_sep", "multi_label",
            "image_dir", "device", "workers")
def tune(
    ctx: typer.Context, data: o.Data,
    trials: Annotated[int, typer.Option(metavar="N", help=(
        "Trials in the search in all: about 30 % random, then TPE (Optuna). The same command again resumes an "
        "interrupted search; a larger N adds trials to a finished one."))] = 20,
    coarse_epochs: Annotated[int, typer.Option(metavar="N", help=(
        "Epochs every trial runs before the pruner may stop it."))] = 3,
    fine_epochs: Annotated[int, typer.Option(metavar="N", help=(
        "Epochs of a trial the pruner lets run to the end."))] = 10,
    pruner: Annotated[str, typer.Option(metavar="NAME", help=(
        "Stops worse trials early from their val accuracy per epoch: median (below the median of finished trials "
        "at the same epoch), halving (successive halving), none."))] = "median",
    budget: Annotated[str | None, typer.Option(metavar="TIME", help=(
        "Time budget (900, 15m, 2h): no trial starts after it."))] = None,
    mode: Annotated[str, typer.Option(metavar="MODE", help=(
        "Modes to search: both, finetune or feature-extract (fast: backbone features computed once, cached)."))
                    ] = "both",
    output: Annotated[str | None, typer.Option("--output", "-o", metavar="FOLDER", help=(
        "Search folder (the study is FOLDER/study.db). Default: runs/tune-<date>-<time>-<model>."))] = None,
    **settings,
) -> None:
    """Hyper-parameter search (Optuna: TPE, pruning); writes every trial and the best settings (best.json)."""
    if mode not in ("both", *MODES):
        raise UsageError(f"--mode {mode}: choose both, {', '.join(MODES)}")
    require("optuna", "tune", "finetune tune")  # before the live table starts
    root = Path(output) if output else timestamped_dir("tune", settings["model"])
    given = {name: value for name, value in given_settings(ctx).items() if name in settings}
    result = _live_search(root, lambda view, stop: api.tune(
        data, trials=trials, coarse_epochs=coarse_epochs, fine_epochs=fine_epochs, budget=budget, pruner=pruner,
        modes=MODES if mode == "both" else (mode,), output=root, observer=view, stop=stop, **given))
    _tune_outcome(result, trials, data, root)


def _live_search(root: Path, search):
    """search(view, stop) under a live table of its trials; a first Ctrl-C/SIGTERM stops after the running
    trial's step, and says how to resume."""
    rows: list = []
    title = f"finetune tune: {esc(str(root))}"
    requested = {"signal": 0}

    def soft_stop(signum: int) -> None:
        requested["signal"] = signum
        err.print("[yellow]stopping after this step (again to stop at once)[/]")

    state["soft_stop"] = soft_stop
    try:
        with Live(_trials_table(rows, title), console=err, refresh_per_second=4, transient=False) as live:
            def view(event: str, **kw) -> None:
                if event == "resumed":
                    rows.extend(kw["trials"])
                    live.console.print(f"[bold]resuming[/] the search in {esc(str(root))}: {kw['finished']} of "
                                       f"{kw['total']} trials done")
                if event == "trial_start":
                    rows.append(kw["trial"])
                live.update(_trials_table(rows, title))

            result = search(view, lambda: requested["signal"])
    except Interrupted as e:
        err.print(esc(f"interrupted: the study is in {root / 'study.db'}; resume with the same command"),
                  highlight=False)
        raise typer.Exit(e.exit_code) from None
    finally:
        state["soft_stop"] = None
    if not err.is_terminal:
        err.print()  # Live leaves its last frame without a line end when stderr is a file or pipe
    return result


def _tune_outcome(result, trials: int, data: str, root: Path) -> None:
    if result.stopped_by_budget:
        finished = sum(t.status != "interrupted" for t in result.trials)
        err.print(f"[yellow]time budget spent[/]: {finished} of {trials} trials finished; the same command "
                  "resumes the search")
    pruned = sum(t.status == "pruned" for t in result.trials)
    if pruned:
        err.print(f"{pruned} trial(s) stopped early by the pruner (val accuracy below the other trials')")
    diverged = sum(t.status == "diverged" for t in result.trials)
    if diverged:
        err.print(f"[yellow]{diverged} trial(s) diverged[/] (loss NaN/inf: learning rate too high for them)")
    failed = [t for t in result.trials if t.status == "failed"]
    if failed:
        err.print(esc(f"{len(failed)} trial(s) failed, e.g. trial {failed[0].number}: {failed[0].error}"),
                  style="yellow", highlight=False)
    if result.best is None:
        raise _no_trial_finished(diverged, failed)
    err.print(esc(f"best: trial {result.best.number}, val accuracy {pct(result.best.val_acc)}; all trials in "
                  f"{root / 'trials.csv'}; reproduce with: finetune train {shlex.quote(data)} --config "
                  f"{result.best_config}"), highlight=False)
    out.print(str(result.best_config), highlight=False, soft_wrap=True)


def _no_trial_finished(diverged: int, failed: list) -> FinetuneError:
    """Why a search ended with no finished trial, as its exit code says: learning rates too high (6), or memory,
    disk or the --budget's time run out (5)."""
    if diverged:
        return DivergedError("no trial finished: every one diverged (or the budget ended first); lower the learning "
                             "rates (they are searched log-uniformly) or check the data with `finetune check`")
    if failed:
        return ResourceError(f"no trial finished: {len(failed)} failed, e.g. trial {failed[0].number}: "
                             f"{failed[0].error}")
    return ResourceError("no trial finished within --budget; give it more time (the same command resumes the search)")
