"""Pictures of a training run (curves, confusion matrix, mistakes, first-layer filters) and one offline HTML page."""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path

from finetune.checkpoint import atomic_write, write_text_atomic

DPI = 110  # sharp on a laptop screen while keeping each PNG well under a megabyte
MAX_WRONG = 16  # a 4x4 grid stays readable; the full list is in evaluate's JSON
MAX_FILTERS = 64  # resnet/vgg/efficientnet stems have 32-64 filters; an 8x8 grid shows them all
THUMB = 224  # the size the model saw, so a tile shows roughly what it classified
HISTORY_COLUMNS = (("epoch", "epoch"), ("train_loss", "train loss"), ("train_acc", "train acc"),
                   ("val_loss", "val loss"), ("val_acc", "val acc"), ("lr", "lr"))


def write_report(run_dir: str | os.PathLike, *, history: list[dict], classes: list[str],
                 confusion: list[list[int]], wrong: list[dict], filters_before, filters_after, config: dict,
                 summary: dict) -> dict[str, Path]:
    """Write curves.png, confusion.png, wrong.png, filters.png and report.html into run_dir; return their paths."""
    run_dir = Path(run_dir)
    best_epoch = summary.get("best_epoch")
    paths = {
        "curves": _curves(run_dir / "curves.png", history, best_epoch),
        "confusion": _confusion(run_dir / "confusion.png", confusion, classes, best_epoch),
        "wrong": _wrong(run_dir / "wrong.png", wrong),
    }
    # Runs whose first layer could not be found (or a caller that skips it) simply get no filters picture.
    if filters_before is not None and filters_after is not None:
        paths["filters"] = _filters(run_dir / "filters.png", filters_before, filters_after)
    if summary.get("calibration"):
        paths["reliability"] = write_reliability(run_dir / "reliability.png", summary["calibration"])
    paths["report"] = write_text_atomic(run_dir / "report.html",
                                        _html(paths, run_dir.name, history=history, classes=classes,
                                              config=config, summary=summary))
    return paths


def _subplots(rows: int = 1, cols: int = 1, **figure_kw):
    """A standalone Figure (Agg canvas): no pyplot, so no global backend switch and no figure registry to leak."""
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **figure_kw)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _plain(text) -> str:
    # Matplotlib reads text between two "$" as math; a class or file named "$5 notes" must print as is.
    return str(text).replace("$", r"\$")


def _curves(path: Path, history: list[dict], best_epoch) -> Path:
    epochs = [row["epoch"] for row in history]

    def column(key, scale=1.0):
        return [math.nan if row.get(key) is None else row[key] * scale for row in history]

    fig, axes = _subplots(1, 3, figsize=(15, 4.2))
    loss, acc, lr = axes[0]
    marker = "o" if len(history) <= 30 else None  # dots help a short run, clutter a long one
    loss.plot(epochs, column("train_loss"), marker=marker, label="train")
    loss.plot(epochs, column("val_loss"), marker=marker, label="val")
    loss.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    acc.plot(epochs, column("train_acc", 100), marker=marker, label="train")
    acc.plot(epochs, column("val_acc", 100), marker=marker, label="val")
    acc.set(title="accuracy", xlabel="epoch", ylabel="accuracy (%)")
    rates = column("lr")
    lr.plot(epochs, rates, marker=marker, color="tab:green", label="lr")
    lr.set(title="learning rate", xlabel="epoch", ylabel="lr")
    if any(r > 0 for r in rates):  # log of nothing positive would leave an empty, warning axis
        lr.set_yscale("log")
    for ax in (loss, acc, lr):
        if best_epoch in epochs:
            ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, path)


def _confusion(path: Path, confusion: list[list[int]], classes: list[str], best_epoch) -> Path:
    import numpy as np

    counts = np.asarray(confusion, dtype=np.int64).reshape(len(classes), len(classes))
    n = len(classes)
    side = min(3 + 0.5 * n, 40)  # half an inch per cell, capped so 1000 classes still make a PNG
    fig, axes = _subplots(figsize=(side + 1, side))
    ax = axes[0, 0]
    image = ax.imshow(counts, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.8)
    labels = [_plain(c) for c in classes]
    ax.set_xticks(range(n), labels, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), labels)
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix (best epoch {best_epoch})")
    fontsize = max(4.0, min(11.0, 200 / max(n, 1)))
    dark = counts.max() / 2 if counts.size else 0
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=fontsize,
                color="white" if value > dark else "black")  # stays readable on the dark cells
    return _save(fig, path)


def _wrong(path: Path, wrong: list[dict]) -> Path:
    from matplotlib.patches import Rectangle

    items = wrong[:MAX_WRONG]
    if not items:
        fig, axes = _subplots(figsize=(5, 2))
        ax = axes[0, 0]
        ax.text(0.5, 0.5, "no mistakes on the validation images", ha="center", va="center", fontsize=12)
        ax.axis("off")
        return _save(fig, path)
    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = _subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows))
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items):
        image = _thumbnail(item["path"])
        if image is None:
            ax.add_patch(Rectangle((0, 0), 1, 1, color="0.92", transform=ax.transAxes))
            ax.text(0.5, 0.5, "could not read\n" + _plain(Path(item["path"]).name), ha="center", va="center",
                    fontsize=8, wrap=True, transform=ax.transAxes)
        else:
            ax.imshow(image)
        ax.set_title(_plain(f"true {item['true']} / pred {item['predicted']} ({item['probability']:.2f})"),
                     fontsize=9)
    return _save(fig, path)


def _thumbnail(path):
    from finetune.data import load_image

    try:
        # The training loader: EXIF rotation, 16-bit and alpha handled, decompression bombs refused.
        image = load_image(path, min_side=THUMB)
        image.thumbnail((THUMB, THUMB))
        return image
    except Exception:  # noqa: BLE001 - a moved or broken file must not cost the whole report
        return None


def _filters(path: Path, before, after) -> Path:
    fig, axes = _subplots(1, 2, figsize=(10, 5.4))
    for ax, weights, title in zip(axes[0], (before, after), ("before", "after")):
        mosaic, gray = _filter_mosaic(weights)
        ax.imshow(mosaic, cmap="gray" if gray else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    return _save(fig, path)


def _filter_mosaic(weights):
    """[out, in, k, k] filters as one grid image in 0..1: RGB when in == 3, else the mean over inputs."""
    import numpy as np

    if hasattr(weights, "detach"):  # a torch tensor, possibly on a GPU, without importing torch here
        weights = weights.detach().float().cpu().numpy()
    w = np.asarray(weights, dtype=np.float32)[:MAX_FILTERS]
    rgb = w.shape[1] == 3
    tiles = w.transpose(0, 2, 3, 1) if rgb else w.mean(axis=1, keepdims=True).transpose(0, 2, 3, 1)
    # Each filter on its own scale: a global scale would show the few large filters and hide the rest.
    low = tiles.min(axis=(1, 2, 3), keepdims=True)
    span = tiles.max(axis=(1, 2, 3), keepdims=True) - low
    tiles = np.where(span > 0, (tiles - low) / np.where(span > 0, span, 1), 0.5)
    n, k_h, k_w, channels = tiles.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    mosaic = np.ones((rows * (k_h + 1) + 1, cols * (k_w + 1) + 1, channels), dtype=np.float32)  # white gutters
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        mosaic[1 + r * (k_h + 1):(r + 1) * (k_h + 1), 1 + c * (k_w + 1):(c + 1) * (k_w + 1)] = tile
    return (mosaic, False) if rgb else (mosaic[..., 0], True)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: 600; }
dd { margin: 0; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
tr.best td { font-weight: 700; background: #eef6ee; }
table.config td { text-align: left; font-family: ui-monospace, monospace; word-break: break-all; }
"""

PICTURES = (("curves", "Training curves"), ("confusion", "Confusion matrix"),
            ("wrong", "Most confidently wrong validation images"), ("reliability", "Calibration (reliability)"),
            ("filters", "First-layer filters"))


def _html(paths: dict[str, Path], run_name: str, *, history: list[dict], classes: list[str], config: dict, summary: dict) -> str:
    e = html.escape
    best_epoch = summary.get("best_epoch")
    best_acc = summary.get("best_val_acc")
    seconds = summary.get("seconds")
    facts = [
        ("arch", config.get("model")),
        ("data", config.get("data")),
        ("classes", ", ".join(classes)),
        ("best epoch", best_epoch),
        ("best val accuracy", None if best_acc is None else f"{100 * best_acc:.1f} %"),
        ("time", None if seconds is None else f"{seconds:.0f} s"),
    ]
    cal = summary.get("calibration")
    if cal:
        facts.append(("expected calibration error", f"{cal['ece_before']:.3f}" + (
            f" raw, {cal['ece_after']:.3f} at temperature {cal['temperature']:.3g}" if cal.get("fitted") else "")))
    out = ["<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>finetune report: {e(run_name)}</title>",
           f"<style>{CSS}</style>", "</head>", "<body>", "<h1>finetune training report</h1>", "<dl>"]
    out += [f"<dt>{e(k)}</dt><dd>{e('' if v is None else str(v))}</dd>" for k, v in facts]
    out.append("</dl>")
    for key, title in PICTURES:
        if key in paths:
            # Embedded, so the page is one file that can be mailed or opened offline.
            data = base64.b64encode(paths[key].read_bytes()).decode("ascii")
            out += [f"<h2>{e(title)}</h2>", f'<img alt="{e(title)}" src="data:image/png;base64,{data}">']
    out += ["<h2>History</h2>", "<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for _, h in HISTORY_COLUMNS) + "</tr>"]
    for row in history:
        css = ' class="best"' if row.get("epoch") == best_epoch else ""
        out.append(f"<tr{css}>" + "".join(f"<td>{e(_cell(k, row.get(k)))}</td>" for k, _ in HISTORY_COLUMNS)
                   + "</tr>")
    out += ["</table>", "<h2>Config</h2>", '<table class="config">', "<tr><th>key</th><th>value</th></tr>"]
    for key, value in config.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out.append(f"<tr><td>{e(str(key))}</td><td>{e(text)}</td></tr>")
    out += ["</table>", "</body>", "</html>", ""]
    return "\n".join(out)


def _cell(key: str, value) -> str:
    if value is None:
        return ""
    if key.endswith("_acc"):
        return f"{100 * value:.1f} %"
    if key.endswith("_loss"):
        return f"{value:.4f}"
    if key == "lr":
        return f"{value:.3g}"
    return str(value)


def write_reliability(path, calibration: dict) -> Path:
    """Reliability diagram: accuracy against confidence per bin (a calibrated model follows the diagonal),
    raw and, when a temperature was fitted, after it; bar width is the bin, the label its image count."""
    fitted = calibration.get("fitted")
    panels = [("raw", calibration["bins_before"], calibration["ece_before"])]
    if fitted:
        panels.append((f"temperature {calibration['temperature']:.3g}", calibration["bins_after"],
                       calibration["ece_after"]))
    fig, axes = _subplots(1, len(panels), figsize=(5 * len(panels), 4.8))
    for ax, (name, bins, ece) in zip(axes.flat, panels):
        used = [b for b in bins if b["count"]]
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
        ax.bar([(b["low"] + b["high"]) / 2 for b in used], [b["accuracy"] for b in used],
               width=[b["high"] - b["low"] for b in used], edgecolor="black", color="tab:blue", alpha=0.7,
               label="accuracy in bin")
        ax.scatter([b["confidence"] for b in used], [b["accuracy"] for b in used], color="tab:red", s=12, zorder=3,
                   label="mean confidence")
        for b in used:
            ax.text((b["low"] + b["high"]) / 2, min(b["accuracy"] + 0.02, 0.97), str(b["count"]), ha="center",
                    fontsize=7)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy",
               title=f"{name}: ECE {ece:.3f} on {calibration['images']} val images")
        ax.legend(loc="upper left", fontsize=8)
    return _save(fig, Path(path))


def write_lr_plot(path, lrs: list[float], losses: list[float], suggestion: float, min_loss_lr: float) -> Path:
    """The lr range test: smoothed loss against learning rate (log scale), with the suggestion marked."""
    fig, axes = _subplots(figsize=(7, 4.5))
    ax = axes[0, 0]
    ax.plot(lrs, losses, color="tab:blue")
    ax.set_xscale("log")
    ax.axvline(suggestion, color="tab:green", linestyle="--", label=f"suggested lr {suggestion:.2g}")
    ax.axvline(min_loss_lr, color="gray", linestyle=":", label=f"lowest loss at {min_loss_lr:.2g}")
    ax.set(title="learning-rate range test", xlabel="learning rate", ylabel="loss (smoothed)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, Path(path))
