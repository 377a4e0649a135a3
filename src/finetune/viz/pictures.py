"""The pictures of a run: curves, confusion (a matrix, or the top confusions when classes are many), the
most confidently wrong images, first-layer filters and their change, reliability, the lr range test.

Every picture is bounded in size and work whatever the class count; matplotlib is imported only here,
inside the functions, with standalone Figures (no pyplot state)."""

from __future__ import annotations

import math
from pathlib import Path

from finetune._util.files import atomic_write
from finetune.data.images import load_image

DPI = 110  # sharp on a laptop screen while keeping each PNG well under a megabyte
MAX_WRONG = 16  # a 4x4 grid stays readable; the full list is in results.json
MAX_FILTERS = 64  # resnet/vgg/efficientnet stems have 32-64 filters; an 8x8 grid shows them all
THUMB = 224  # the size the model saw, so a tile shows roughly what it classified
CELL_NUMBERS_UP_TO = 30  # classes: beyond, numbers in cells are unreadable (and cost memory and time)
MATRIX_UP_TO = 60  # classes: beyond, a matrix is a texture; the top confusions are shown instead
TOP_CONFUSIONS = 25
UNCHANGED = 1e-6  # relative change of the first layer below which its "after" picture says nothing new


def subplots(rows: int = 1, cols: int = 1, **figure_kw):
    """A standalone Figure (Agg canvas): no pyplot, so no global backend switch and no figure registry to leak."""
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **figure_kw)
    return fig, fig.subplots(rows, cols, squeeze=False)


def save(fig, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def plain(text) -> str:
    # Matplotlib reads text between two "$" as math; a class or file named "$5 notes" must print as is.
    return str(text).replace("$", r"\$")


def curves(path: Path, history: list[dict], best_epoch) -> Path:
    epochs = [row["epoch"] for row in history]

    def column(key, scale=1.0):
        return [math.nan if row.get(key) is None else row[key] * scale for row in history]

    fig, axes = subplots(1, 3, figsize=(15, 4.2))
    loss, acc, lr = axes[0]
    marker = "o" if len(history) <= 30 else None  # dots help a short run, clutter a long one
    for ax, key, scale in ((loss, "loss", 1.0), (acc, "acc", 100)):
        ax.plot(epochs, column(f"train_{key}", scale), marker=marker, label="train")
        ax.plot(epochs, column(f"val_{key}", scale), marker=marker, label="val")
    loss.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
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
    return save(fig, path)


def probe_search(path: Path, probe: dict, history: list[dict]) -> Path:
    """What a probe run did: the cross-validated held-out loss of each L2 strength tried (log scale), the chosen one
    marked, with the fitted probe's train and val accuracy; a probe has no epochs to draw curves over."""
    grid = sorted(probe["grid"])
    fig, axes = subplots(1, 1, figsize=(7.5, 4.2))
    ax = axes[0, 0]
    ax.plot([g[0] for g in grid], [g[1] for g in grid], marker="o", label="held-out loss (cross-validated on the train images)")
    ax.axvline(probe["l2"], color="gray", linestyle="--", linewidth=1, label=f"chosen L2 {probe['l2']:.2g}")
    ax.set_xscale("log")
    row = history[-1] if history else {}
    scores = f"train {100 * row['train_acc']:.1f} %, val {100 * row['val_acc']:.1f} %" if row else ""
    ax.set(title=f"linear probe: L2 strength searched by cross-validation ({scores})", xlabel="L2 strength",
           ylabel="cross-entropy on held-out folds")
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


def confusion(path: Path, matrix: list[list[int]], classes: list[str], best_epoch, top: list[dict]) -> Path:
    """The confusion matrix up to MATRIX_UP_TO classes (numbers in cells up to CELL_NUMBERS_UP_TO); beyond,
    the most frequent confusions as bars."""
    import numpy as np

    n = len(classes)
    if n > MATRIX_UP_TO:
        return _top_confusions(path, top, n, best_epoch)
    counts = np.asarray(matrix, dtype=np.int64).reshape(n, n)
    side = 3 + 0.35 * n
    fig, axes = subplots(figsize=(side + 1, side))
    ax = axes[0, 0]
    fig.colorbar(ax.imshow(counts, cmap="Blues", vmin=0), ax=ax, shrink=0.8)
    labels = [plain(c) for c in classes]
    small = max(4.0, min(11.0, 200 / n))
    ax.set_xticks(range(n), labels, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center", fontsize=small)
    ax.set_yticks(range(n), labels, fontsize=small)
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix (best epoch {best_epoch})")
    if n <= CELL_NUMBERS_UP_TO:
        dark = counts.max() / 2 if counts.size else 0
        for (i, j), value in np.ndenumerate(counts):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=small,
                    color="white" if value > dark else "black")  # stays readable on the dark cells
    return save(fig, path)


def _top_confusions(path: Path, top: list[dict], n: int, best_epoch) -> Path:
    items = top[:TOP_CONFUSIONS]
    fig, axes = subplots(figsize=(10, 1.5 + 0.3 * max(len(items), 1)))
    ax = axes[0, 0]
    if not items:
        ax.text(0.5, 0.5, "no confusions on the validation images", ha="center", va="center")
        ax.axis("off")
    else:
        ax.barh(range(len(items)), [t["count"] for t in items], color="tab:blue")
        ax.set_yticks(range(len(items)), [plain(f"{t['true']} -> {t['predicted']}") for t in items], fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel="validation images")
    ax.set_title(f"most frequent confusions, true -> predicted ({n} classes; best epoch {best_epoch})")
    return save(fig, path)


def wrong(path: Path, items: list[dict], heatmaps: dict | None = None, words: tuple[str, str] = ("true", "pred")
          ) -> Path:
    """The most confidently wrong images (or any images with two labels: words names them); with heatmaps
    ({path: Grad-CAM map}), each under its map."""
    def title(item: dict) -> str:
        return (f"{Path(item['path']).name[:28]}\n{words[0]} {item['true']} / {words[1]} {item['predicted']} "
                f"({item['probability']:.2f})")

    return tiles(path, items, title, "no mistakes on the validation images", (3.2, 3.7), 8, heatmaps)


def tiles(path: Path, items: list[dict], title, empty: str, size: tuple[float, float], fontsize: int,
          heatmaps: dict | None = None) -> Path:
    """Up to MAX_WRONG images ({"path": ...} items) four to a row, each titled title(item), under its heatmap
    where heatmaps has one; a picture saying `empty` when there are none."""
    from matplotlib.patches import Rectangle

    items = items[:MAX_WRONG]
    if not items:
        fig, axes = subplots(figsize=(5, 2))
        axes[0, 0].text(0.5, 0.5, empty, ha="center", va="center", fontsize=12)
        axes[0, 0].axis("off")
        return save(fig, path)
    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows))
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items):
        image = _thumbnail(item["path"])
        if image is None:
            ax.add_patch(Rectangle((0, 0), 1, 1, color="0.92", transform=ax.transAxes))
            ax.text(0.5, 0.5, "could not read", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        else:
            heat = (heatmaps or {}).get(item["path"])
            ax.imshow(image if heat is None else blend(image, heat))
        ax.set_title(plain(title(item)), fontsize=fontsize)
    return save(fig, path)


def _thumbnail(path):
    try:
        # The training loader: EXIF rotation, 16-bit and alpha handled, non-regular files and bombs refused.
        image = load_image(path, min_side=THUMB)
        image.thumbnail((THUMB, THUMB))
        return image
    except Exception:  # noqa: BLE001 - a moved or broken file must not cost the whole report
        return None


def blend(image, heat, side: int = THUMB, alpha: float = 0.6):
    """The photo shrunk to side (longer side) under a heatmap in [0, 1] of any size, as an RGB float array; the
    colour is opaque where the heat is high and absent where it is 0, so the cold parts show the photo as it is."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    small = image.copy()
    small.thumbnail((side, side))
    heat = Image.fromarray(np.asarray(heat, dtype=np.float32), "F").resize(small.size, Image.BILINEAR)
    heat = np.clip(np.asarray(heat), 0, 1)
    weight = alpha * np.sqrt(heat)[..., None]
    colours = colormaps["jet"](heat)[..., :3]
    return np.clip((1 - weight) * np.asarray(small, dtype=np.float32) / 255 + weight * colours, 0, 1)


def relative_change(before, after) -> float:
    """||after - before|| / ||before|| of the first layer's filters."""
    import numpy as np

    b, a = (np.asarray(_numpy(w), dtype=np.float64) for w in (before, after))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _numpy(weights):
    return weights.detach().float().cpu().numpy() if hasattr(weights, "detach") else weights


def filters(path: Path, before, after) -> Path | None:
    """Before, after and the change (each filter's difference on its own scale); None when nothing moved."""
    import numpy as np

    change = relative_change(before, after)
    if change < UNCHANGED:
        return None
    before, after = _numpy(before), _numpy(after)
    panels = (("before", before), ("after", after), (f"change ({change:.1%} of the weights' norm)",
                                                     np.asarray(after, np.float32) - np.asarray(before, np.float32)))
    fig, axes = subplots(1, 3, figsize=(15, 5.6))
    for ax, (title, weights) in zip(axes[0], panels):
        mosaic, gray = _filter_mosaic(weights)
        ax.imshow(mosaic, cmap="gray" if gray else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    return save(fig, path)


def _filter_mosaic(weights):
    """[out, in, k, k] filters as one grid image in 0..1: RGB when in == 3, else the mean over inputs."""
    import numpy as np

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


def reliability(path, calibration: dict) -> Path:
    """Reliability diagram: accuracy against confidence per bin (a calibrated model follows the diagonal),
    raw and, when a temperature was fitted, after it; bar width is the bin, the label its image count."""
    panels = [("raw", calibration["bins_before"], calibration["ece_before"])]
    if calibration.get("fitted"):
        panels.append((f"temperature {calibration['temperature']:.3g}", calibration["bins_after"],
                       calibration["ece_after"]))
    fig, axes = subplots(1, len(panels), figsize=(5 * len(panels), 4.8))
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
    return save(fig, Path(path))


def lr_plot(path, lrs: list[float], losses: list[float], suggestion: float, min_loss_lr: float) -> Path:
    """The lr range test: smoothed loss against learning rate (log scale), with the suggestion marked."""
    fig, axes = subplots(figsize=(7, 4.5))
    ax = axes[0, 0]
    ax.plot(lrs, losses, color="tab:blue")
    ax.set_xscale("log")
    ax.axvline(suggestion, color="tab:green", linestyle="--", label=f"suggested lr {suggestion:.2g}")
    ax.axvline(min_loss_lr, color="gray", linestyle=":", label=f"lowest loss at {min_loss_lr:.2g}")
    ax.set(title="learning-rate range test", xlabel="learning rate", ylabel="loss (smoothed)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save(fig, Path(path))
