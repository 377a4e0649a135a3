"""How predict and evaluate show a multi-label model's results: the labels at or above their thresholds (and the
top-k scores), and mAP, F1, exact match, Hamming loss and the per-label table."""

from __future__ import annotations

import csv
import sys

from rich.table import Column, Table

from finetune._util.files import dumps_json
from finetune.cli.render import err, esc, out, pct, warn


def print_labels(good: list, as_json: bool, as_csv: bool, k: int, show_top: bool) -> None:
    """Every image's predicted labels; JSON and CSV carry the top-k scores too, the table only with -k."""
    if as_json:
        payload = [{"path": r.path, "labels": [{"class": c, "probability": round(p, 6)} for c, p in r.labels],
                    "predictions": [{"class": c, "probability": round(p, 6)} for c, p in r.top[:k]]} for r in good]
        sys.stdout.write(dumps_json(payload) + "\n")
    elif as_csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["path", "labels"] + [f"{x}{i}" for i in range(1, k + 1) for x in ("class", "probability")])
        for r in good:
            w.writerow([r.path, ";".join(c for c, _ in r.labels)] + [v for c, p in r.top[:k] for v in (c, f"{p:.6f}")])
    else:
        table = Table(Column("image", overflow="fold"), Column("labels", overflow="fold"),
                      *([f"#{i}" for i in range(1, k + 1)] if show_top else []))
        for r in good:
            labels = ", ".join(f"{esc(c)} {p * 100:.1f}%" for c, p in r.labels) or "[dim](none)[/]"
            table.add_row(esc(r.path), labels, *([f"{esc(c)} {p * 100:.1f}%" for c, p in r.top[:k]] if show_top
                                                  else []))
        out.print(table)


def render_multilabel(r: dict) -> None:
    """evaluate's tables on stderr for a multi-label model."""
    ci = r["ci95"]
    err.print(f"[bold]mAP[/] {r['map_macro']:.3f} macro (95 % CI {ci['map_macro'][0]:.3f}-{ci['map_macro'][1]:.3f}, "
              f"bootstrap), {r['map_micro']:.3f} micro   [bold]F1[/] {r['f1_macro']:.3f} macro at the thresholds "
              f"(95 % CI {ci['f1_macro'][0]:.3f}-{ci['f1_macro'][1]:.3f})   on {esc(r['data'])}", highlight=False)
    err.print(f"[bold]exact match[/] {pct(r['subset_accuracy'])} ({r['exact_matches']}/{r['images']} images with every "
              f"label right)   [bold]Hamming loss[/] {r['hamming_loss']:.4f}", highlight=False)
    table = Table("label", "AP", "precision", "recall", "F1", "support", "threshold", "tp", "fp", "fn", "tn",
                  title="per label", title_justify="left")
    for name, m in r["per_class"].items():
        c = m["counts"]
        table.add_row(esc(name), f"{m['ap']:.3f}", f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}",
                      str(m["support"]), f"{m['threshold']:.3f}", *(str(c[x]) for x in ("tp", "fp", "fn", "tn")))
    macro = r["macro"]
    table.add_row("macro avg", f"{macro['ap']:.3f}", f"{macro['precision']:.3f}", f"{macro['recall']:.3f}",
                  f"{macro['f1']:.3f}", str(r["images"]), "", "", "", "", "", style="bold")
    err.print(table)
    if r["largest_errors"]:
        w = Table("image", "true", "missed", "invented", title="largest errors", title_justify="left")
        for m in r["largest_errors"]:
            w.add_row(esc(m["path"]), esc(", ".join(m["true"])), esc(", ".join(f"{c} {p:.2f}" for c, p in m["missed"])),
                      esc(", ".join(f"{c} {p:.2f}" for c, p in m["invented"])))
        err.print(w)
    for s in r["skipped"]:
        warn(f"skipped {esc(s['path'])}: {esc(s['reason'])}")
