"""What `check --labels` found, on stderr: how often the heads agree with the labels, the estimated share of wrong
labels, the queue of labels to review first (never read as a count of wrong ones), near-duplicates like check's exact
duplicates, outliers, and where the queue was copied for review."""

from __future__ import annotations

from rich.table import Column, Table

from finetune.cli.render import err, esc, pct
from finetune.cli.views import TrainView

SHOWN = 30  # rows of each list on the terminal; --json has them all


class TrustView(TrainView):
    """Training's view of the embedding pass (data, decoding, features), plus the label heads."""

    def on_label_heads(self, images, folds):
        self._drop_task("decode_task")
        self.log(f"[bold]labels[/] {folds} linear heads, each scoring the images it was not fitted on "
                 f"({images} images), then confident learning (cleanlab) to rank what to review")


def _more(items: list) -> str:
    return f"  ... {len(items) - SHOWN} more (--json lists them all)" if len(items) > SHOWN else ""


def render_labels(labels: dict) -> None:
    """How often the heads agree with the labels, the estimated share of wrong labels, then the queue to review:
    never a count that reads as that many wrong labels."""
    suspects, n = labels["suspects"], labels["images"]
    err.print(f"[bold]labels[/] the {labels['folds']} heads (each scoring the images it was not fitted on) agree with "
              f"{pct(labels['out_of_sample_accuracy'])} of the {n} labels", highlight=False)
    est = labels.get("noise_estimate")
    if est:
        low, high = est["ci95"]
        err.print(f"[bold]wrong labels[/] estimated {pct(est['rate'])} (95 % interval {pct(low)}-{pct(high)}), about "
                  f"{est['expected_wrong']} of {n}: the {est['basis_disagreeing']} disagreements among the "
                  f"{est['basis_images']} images the heads are surest about (it counts their own mistakes there "
                  "too)", highlight=False)
    if not suspects:
        err.print("[green]nothing to review: the heads disagree confidently with no label[/]")
        return
    t = Table("#", Column("image", overflow="fold"), "split", "given", "heads' choice", "probability",
              title=(f"review these {len(suspects)} first, most suspicious first" if len(suspects) > 1 else
                     "review this one first"), title_justify="left")
    for i, s in enumerate(suspects[:SHOWN], 1):
        t.add_row(str(i), esc(s["path"]), s["split"], esc(s["given"]), esc(s["suggested"]), f"{s['confidence']:.2f}")
    err.print(t)
    if _more(suspects):
        err.print(_more(suspects))
    err.print(_queue_note(len(suspects), est, labels["out_of_sample_accuracy"]), highlight=False)


def _queue_note(queued: int, est: dict | None, accuracy: float) -> str:
    """What the queue is: the heads' confident disagreements, a list to work down, not a count of wrong labels."""
    photos = f"the {queued} photos" if queued > 1 else "the photo"
    note = (f"the queue holds {photos} where the heads confidently prefer another class: where to look first, not a "
            "count of wrong labels")
    if est and est["ci95"][1] * est["images"] < queued:
        note += (f": even the high end of the estimate ({round(est['ci95'][1] * est['images'])} wrong labels in all) "
                 f"is below it, so many are the heads' own mistakes (they are right {pct(accuracy)} of the time). "
                 "Work down the list and stop when the photos stop being mislabelled")
    return note


def render_trust(r: dict) -> None:
    """The review queue of labels, near-duplicate groups, outliers and the review folder."""
    render_labels(r["labels"])
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
