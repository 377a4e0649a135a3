"""Renders the library's training events on stderr: progress bars with live loss, one line per epoch,
warnings, and the run header (data, device, precision, weights, crop sizes)."""

from __future__ import annotations

import os

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from finetune.cli.render import err, esc, pct
from finetune.config import IMBALANCE_WARNING
from finetune.events import Observer


class TrainView(Observer):
    """Training's events on stderr: the run header, progress bars and a line per epoch."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err, transient=True,
                                 disable=quiet)
        self.epoch_task = self.batch_task = self.decode_task = self.lr_task = None
        self.epochs = 0
        self.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.started:
            self.progress.stop()

    def add_task(self, description: str, **kwargs):
        """A progress bar; the display starts with the first one (an early error leaves no stray output)."""
        if not self.started:
            self.progress.start()
            self.started = True
        return self.progress.add_task(description, info="", **kwargs)

    def log(self, msg: str) -> None:
        if not self.quiet:
            self.progress.console.print(msg, highlight=False, soft_wrap=True)

    def warn(self, msg: str) -> None:
        self.log(f"[yellow]warning:[/] {msg}")

    def _drop_task(self, name: str) -> None:
        task = getattr(self, name)
        if task is not None:
            self.progress.remove_task(task)
            setattr(self, name, None)

    def on_dataset(self, split, device, weights, processes=1):
        counts = split.counts()
        per_class = ", ".join(f"{esc(c)} {counts['train'][c]}/{counts['val'][c]}" for c in split.classes[:12])
        more = f", ... ({len(split.classes)} classes)" if len(split.classes) > 12 else ""
        self.log(f"[bold]data[/] {esc(split.root)}: {len(split.classes)} classes, {len(split.train)} train / "
                 f"{len(split.val)} val images ({esc(split.layout)}); per class train/val: {per_class}{more}")
        ddp = f" x {processes} processes (DistributedDataParallel)" if processes > 1 else ""
        self.log(f"[bold]device[/] {device}{ddp}   [bold]weights[/] {esc(weights)}")
        if split.imbalance() >= IMBALANCE_WARNING:
            self.warn(f"imbalanced classes: the largest has {split.imbalance():.1f}x the images of the smallest; "
                      + ("consider --balance weighted-loss (pos_weight per label)" if split.multi_label
                         else "consider --balance weighted-loss or sampler"))

    def on_fold_start(self, fold, folds, output):
        self.log(f"[bold]fold {fold} of {folds}[/] {esc(output)}")

    def on_plan(self, why):
        self.log(f"[bold]plan[/] {esc(why)}")

    def on_recipe(self, why, train_size, eval_size, augment):
        self.log(f"[bold]recipe[/] train crop {train_size} / eval crop {eval_size} px; {esc(why)}")

    def on_planned(self, epochs, phase_epochs, epoch_seconds, budget):
        self.epochs = epochs
        if self.epoch_task is not None:
            self.progress.update(self.epoch_task, total=epochs)
        after = f" (after the probe: {epochs} in all)" if epochs != phase_epochs else ""
        self.log(f"[bold]time budget[/] {budget / 60:.3g} min: a fine-tuning epoch takes {epoch_seconds:.1f} s, so "
                 f"the run fine-tunes for {phase_epochs} epoch(s){after}; the lr schedule spans them")

    def on_precision(self, precision):
        self.log(f"[bold]precision[/] {esc(precision)}")

    def on_decode_start(self, total, keep, budget_gb=None):
        if not keep:
            self.log(f"[bold]streaming[/] images from disk each epoch: decoded, they would not fit the "
                     f"{budget_gb:g} GiB RAM budget (FINETUNE_RAM_CACHE_GB)")
        self.decode_task = self.add_task("decoding" if keep else "checking", total=total)

    def on_decode_advance(self, n):
        self.progress.advance(self.decode_task, n)

    def on_skipped(self, files, root):
        for path, reason in files[:20]:
            self.warn(f"skipped {esc(os.path.relpath(path, root))}: {esc(reason)}")
        more = f" ({len(files) - 20} more in results.json)" if len(files) > 20 else ""
        self.log(f"[yellow]{len(files)} file(s) skipped[/]{more} (--strict makes this an error)")

    def on_missing_rows(self, rows, root, data):
        line, path = rows[0]
        self.warn(f"{len(rows)} row(s) of {esc(data)} name no image under {esc(root)}, e.g. line {line}: {esc(path)}; "
                  "those rows are skipped (all in results.json; --strict makes this an error)")

    def on_note(self, text):
        self.warn(esc(text))

    def on_thresholds(self, thresholds, images, f1, f1_cross_fitted):
        shown = ", ".join(f"{esc(c)} {t:.2f}" for c, t in list(thresholds.items())[:12])
        more = f", ... ({len(thresholds)} labels)" if len(thresholds) > 12 else ""
        self.log(f"[bold]thresholds[/] per label, fitted on {images} val images (best F1, at least 0.1): {shown}"
                 f"{more}; stored in the model")

    def on_features(self, cached, views):
        self._drop_task("decode_task")
        what = "reused from cache" if cached else f"computing once ({views} view(s) per training image)"
        self.log(f"[bold]features[/] frozen backbone: {what}")

    def on_start(self, run_dir, epochs, batches, lr, first, sizes, resumed_from=None):
        self._drop_task("decode_task")
        self.epochs = epochs
        how = f"lr {lr:.3g}, {batches} batches/epoch, train crop {sizes[0]} / eval crop {sizes[1]} px" if lr \
            else "the head fitted once on the cached features"
        self.log(f"[bold]run[/] {esc(str(run_dir))}   {how}")
        if first > 1:
            grown = f"; --epochs {epochs} extends the {resumed_from}-epoch run: the lr schedule now spans " \
                    f"{epochs} epochs and continues from epoch {first - 1}" if resumed_from and epochs > resumed_from \
                else ""
            self.log(f"[bold]resuming[/] at epoch {first} of {epochs}{grown}")
        self.epoch_task = self.add_task("epochs", total=epochs, completed=first - 1)
        self.batch_task = self.add_task("batches", total=batches)

    def on_epoch_start(self, epoch):
        self.progress.reset(self.batch_task)
        self.progress.update(self.epoch_task, info=f"epoch {epoch}")

    def on_batch(self, step, loss, size):
        if self.batch_task is not None:
            self.progress.update(self.batch_task, completed=step, info=f"loss {loss:.4f}")

    def on_initial_loss(self, loss, expected, suspicious):
        if suspicious:
            self.warn(f"initial loss {loss:.3f} is far from ln(classes) = {expected:.3f}, what a fresh classifier "
                      "head should give: check the labels and the preprocessing (or the weights)")

    def on_early_stop(self, epoch, best_epoch, patience):
        self.log(f"early stop: no better val accuracy for {patience} epoch(s) since epoch {best_epoch}")

    def on_calibrated(self, temperature, ece_before, ece_cross_fitted, images):
        self.log(f"[bold]calibrated[/] temperature {temperature:.3g} fitted on {images} val images: expected "
                 f"calibration error {ece_before:.3f} raw -> {ece_cross_fitted:.3f} calibrated (measured on the "
                 "half of val that each fit did not see)")

    def on_report(self, paths):
        self.log(f"[bold]report[/] {esc(str(paths['report']))}")

    def on_report_failed(self, reason):
        self.warn(f"could not draw the run's pictures ({esc(reason)}); the model and results.json are saved")

    def on_epoch_end(self, row, improved):
        self.progress.advance(self.epoch_task)
        mark = " [green]*best[/]" if improved else ""
        w = len(str(self.epochs or row["epoch"]))
        mean_ap = "" if row.get("val_map") is None else f"  mAP {row['val_map']:.3f}"
        self.log(f"epoch {row['epoch']:>{w}}/{self.epochs or '?'}  train loss {row['train_loss']:.4f} acc "
                 f"{pct(row['train_acc']):>6}  val loss {row['val_loss']:.4f} acc {pct(row['val_acc']):>6}{mean_ap}"
                 f"  {'lr ' + format(row['lr'], '.2e') if row['lr'] is not None else 'probe      '}  "
                 f"{row['seconds']:.1f}s{mark}")

    def on_augmentation_strong(self, augment, epochs, train_acc, val_acc):
        self.warn(f"train accuracy stayed below val for {epochs} epochs ({pct(train_acc)} against {pct(val_acc)}): the "
                  f"{esc(augment)} augmentation is too strong for these photos; try --augment "
                  f"{'light' if augment != 'light' else 'none'}")

    def on_update_ratio(self, group, ratio, band, advice):
        self.warn(f"{group} update/weight ratio {ratio:.1e} is outside the healthy {band[0]:g}..{band[1]:g} for a "
                  f"{'pretrained backbone' if group == 'backbone' else 'new head'}: {advice}")

    def on_label_issues(self, suspects=None, skipped=None, **_):
        if suspects is not None:  # feature-extract runs; a fine-tuned run's report says how to get them
            self.log(f"[bold]labels[/] {len(suspects)} likely label error(s) among the train and val images "
                     "(out-of-sample probes + cleanlab): see report.html")

    def on_probe(self, l2, cv_loss, tried):
        self.log(f"[bold]probe[/] linear head fitted to convergence (L-BFGS); L2 {l2:.2g} chosen from {tried} by "
                 f"cross-validation on the training images (held-out loss {cv_loss:.3f})")

    def on_init_from(self, path, head_kept, classes):
        what = "head kept (same classes)" if head_kept else \
            f"head replaced (it was for {len(classes)} other classes: {esc(', '.join(classes[:6]))}" + \
            (" ..." if len(classes) > 6 else "") + ")"
        self.log(f"[bold]init from[/] {esc(str(path))}: its weights and preprocessing; {what}")

    def on_tracking(self, where):
        for name, place in where.items():
            self.log(f"[bold]{name}[/] {esc(place)}")

    def on_tracking_failed(self, tracker, reason):
        self.warn(f"--log {tracker} stopped recording ({esc(reason)}); the run goes on, its files are in the run "
                  "folder")

    def on_lr_find_start(self, steps):
        self._drop_task("decode_task")
        self.lr_task = self.add_task("lr range test", total=steps)

    def on_lr_find_step(self, step, lr, loss):
        self.progress.update(self.lr_task, completed=step, info=f"lr {lr:.2e}  loss {loss:.4f}")
