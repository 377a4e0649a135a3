"""What `check --labels` found, on stderr: likely label errors as a ranked table, near-duplicates like check's
exact duplicates, outliers, and where the suspects were copied for review."""

from __future__ import annotations

from rich.table import Column, Table

from finetune.cli.render import err, esc, pct
from finetune.cli.views import TrainView

SHOWN = 30  # rows of each list on the terminal; --json has them all


class TrustView(TrainView):
    """Training's view of the embedding pass (data, decoding, features), plus the label heads."""

    def on_label_heads(self, images, folds):
        self._drop_task("decode_task")
        self.log(f"[bold]label issues[/] {folds} linear heads, each scoring the images it was not fitted on "
                 f"({images} images), then confident learning (cleanlab)")


def _more(items: list) -> str:
    return f"  ... {len(items) - SHOWN} more (--json lists them all)" if len(items) > SHOWN else ""


def render_trust(r: dict) -> None:
    """The label suspects, near-duplicate groups, outliers and the review folder."""
    labels = r["labels"]
    suspects = labels["suspects"]
    err.print(f"[bold]labels[/] out-of-sample accuracy of the {labels['folds']} heads: "
              f"{pct(labels['out_of_sample_accuracy'])} on {labels['images']} images", highlight=False)
    if suspects:
        t = Table("#", Column("image", overflow="fold"), "split", "given", "suggested", "confidence",
                  title=f"{len(suspects)} likely label error(s), most likely first", title_justify="left")
        for i, s in enumerate(suspects[:SHOWN], 1):
            t.add_row(str(i), esc(s["path"]), s["split"], esc(s["given"]), esc(s["suggested"]),
                      f"{s['confidence']:.2f}")
        err.print(t)
        if _more(suspects):
            err.print(_more(suspects))
    else:
        err.print("[green]no likely label errors[/]")
    near = r["near_duplicates"]
    for key, label in (("train_val_leakage", "near-duplicates in train and val (leakage)"),
                       ("across_classes", "near-duplicates under different classes (conflicting labels)"),
                       ("within_class", "near-duplicates within a class")):
        groups = near[key]
        if groups:
            err.print(f"[yellow]{len(groups)} {label}[/] (cosine similarity >= {near['threshold']:g}):")
            for g in groups[:SHOWN]:
                members = " ~ ".join(f"{m['split']}/{m['class']}: {m['path']}" for m in g["members"])
                err.print(f"  {esc(members)} ({g['similarity']:.3f})", highlight=False)
    outliers = r["outliers"]["images"]
    if outliers:
        err.print(f"[yellow]{len(outliers)} outlier(s)[/] (farthest from their {r['outliers']['neighbours']} nearest "
                  "neighbours, most atypical first: look for a wrong subject, a blank or a damaged photo):")
        for o in outliers[:SHOWN]:
            err.print(f"  {esc(o['split'])}/{esc(o['class'])}: {esc(o['path'])} (distance {o['distance']:.3f})",
                      highlight=False)
    if not any(near[k] for k in ("train_val_leakage", "across_classes", "within_class")) and not outliers:
        err.print("[green]no near-duplicates, no outliers[/]")
    review = r.get("review")
    if review:
        folders = ", ".join(f"{esc(k)} {v}" for k, v in review["folders"].items()) or "none"
        err.print(f"review: {review['copied']} copied now ({folders}); list: {esc(review['log'])}", highlight=False)
