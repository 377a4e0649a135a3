"""The pictures of a multi-label run, in place of the confusion matrix and the wrong-image tiles: per-class 2x2
counts beside the label co-occurrence, and the images with the largest errors, labels missed and invented.

Bounded like pictures.py whatever the class count: the co-occurrence matrix up to MATRIX_UP_TO classes, the most
frequent pairs as bars beyond; counts for at most MAX_COUNT_ROWS classes (the rarest first)."""

from __future__ import annotations

from pathlib import Path

from finetune.viz.pictures import MATRIX_UP_TO, plain, save, subplots, tiles

MAX_COUNT_ROWS = 40
TOP_PAIRS = 25


def label_counts(path: Path, report: dict, classes: list[str], best_epoch) -> Path:
    """Left: per class tp / fn / fp stacked bars at the thresholds (tn as a number). Right: how often two labels
    are on the same val image (true labels; the diagonal is each label's support)."""
    import numpy as np

    per = report["per_class"]
    shown = sorted(classes, key=lambda c: per[c]["support"])[:MAX_COUNT_ROWS]
    n = len(classes)
    fig, axes = subplots(1, 2, figsize=(13, max(4.5, 2 + 0.32 * max(len(shown), min(n, MATRIX_UP_TO) * 0.8))))
    left, right = axes[0]
    rows = range(len(shown))
    left_edge = np.zeros(len(shown))
    for key, colour, label in (("tp", "tab:green", "true positive"), ("fn", "tab:orange", "missed (fn)"),
                               ("fp", "tab:red", "invented (fp)")):
        values = np.array([per[c]["counts"][key] for c in shown])
        left.barh(rows, values, left=left_edge, color=colour, label=label)
        left_edge += values
    for i, c in enumerate(shown):
        left.text(left_edge[i], i, f"  tn {per[c]['counts']['tn']}", va="center", fontsize=7)
    left.set_yticks(list(rows), [plain(c) for c in shown], fontsize=max(5.0, min(9.0, 240 / max(len(shown), 1))))
    left.invert_yaxis()
    left.set(xlabel="val images", title=f"per-class counts at the thresholds (best epoch {best_epoch})"
             + (f"; {len(shown)} rarest of {n}" if len(shown) < n else ""))
    left.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _cooccurrence(right, np.asarray(report["cooccurrence"], dtype=np.int64), classes)
    return save(fig, path)


def _cooccurrence(ax, matrix, classes: list[str]) -> None:
    import numpy as np

    n = len(classes)
    if n > MATRIX_UP_TO:
        pairs = sorted(((int(matrix[i, j]), i, j) for i in range(n) for j in range(i + 1, n) if matrix[i, j]),
                       reverse=True)[:TOP_PAIRS]
        if not pairs:
            ax.text(0.5, 0.5, "no two labels on one val image", ha="center", va="center")
            ax.axis("off")
            return
        ax.barh(range(len(pairs)), [p[0] for p in pairs], color="tab:purple")
        ax.set_yticks(range(len(pairs)), [plain(f"{classes[i]} + {classes[j]}") for _, i, j in pairs], fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel="val images", title=f"labels most often together ({n} classes)")
        return
    ax.figure.colorbar(ax.imshow(matrix, cmap="Purples", vmin=0), ax=ax, shrink=0.8)
    labels = [plain(c) for c in classes]
    small = max(4.0, min(10.0, 200 / n))
    ax.set_xticks(range(n), labels, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center", fontsize=small)
    ax.set_yticks(range(n), labels, fontsize=small)
    ax.set_title("labels together on val images\n(diagonal: each label's support)")
    if n <= 30:
        dark = matrix.max() / 2 if matrix.size else 0
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=small, color="white" if value > dark
                    else "black")


def wrong_labels(path: Path, items: list[dict]) -> Path:
    """The images with the largest errors: each tile says which labels were missed and which invented."""
    def title(item: dict) -> str:
        missed = ", ".join(f"{c} {p:.2f}" for c, p in item["missed"]) or "none"
        invented = ", ".join(f"{c} {p:.2f}" for c, p in item["invented"]) or "none"
        return (f"{Path(item['path']).name[:28]}\ntrue: {', '.join(item['true']) or 'none'}\n"
                f"missed: {missed[:40]}\ninvented: {invented[:40]}")

    return tiles(path, items, title, "every label right on the validation images", (3.4, 4.8), 7)
