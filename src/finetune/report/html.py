"""report.html: one offline page per run (pictures embedded) with what results.json holds, in words:
accuracy with its interval, per-class metrics, confusions, mistakes by file name, skipped files, the
history, and the settings as they were used."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from finetune._util.files import write_text_atomic
from finetune.inference.explain import heatmaps_for
from finetune.metrics.classification import top_confusions
from finetune.report.multilabel import multilabel_facts, multilabel_sections
from finetune.viz import multilabel as pictures_ml
from finetune.viz import pictures

HISTORY_COLUMNS = (("epoch", "epoch"), ("train_loss", "train loss"), ("train_acc", "train acc"),
                   ("val_loss", "val loss"), ("val_acc", "val acc"), ("lr", "lr"))
PICTURES = (("curves", "Training curves"), ("probe", "The linear probe's L2 search"), ("confusion", "Confusion"),
            ("wrong", "Most confidently wrong validation images (heat: what drove the prediction, Grad-CAM)"),
            ("reliability", "Calibration (reliability)"), ("filters", "First-layer filters"),
            ("label_issues", "Likely label errors (given / suggested label)"))
# Settings shown as used: the key of what was used instead of the requested value, and the label.
USED_INSTEAD = {"lr": "lr_used", "train_size": "train_size_used", "amp": "precision", "weights": "base_weights"}
NOT_SHOWN = set(USED_INSTEAD.values()) | {"preprocessing", "classes", "plan", "recipe"}


def write_report(run_dir: str | os.PathLike, *, history: list[dict], classes: list[str], wrong: list[dict],
                 filters_before, filters_after, config: dict, summary: dict, model=None) -> dict[str, Path]:
    """Write the run's pictures and report.html into run_dir; return their paths. With model (its file), the
    wrong images carry a Grad-CAM heatmap of the predicted class where finetune[explain] is installed."""
    run_dir = Path(run_dir)
    best_epoch = summary.get("best_epoch")
    metrics = summary.get("val_metrics") or {}
    matrix = metrics.get("confusion_matrix") or [[0] * len(classes) for _ in classes]
    root = config.get("data_root") or config.get("data")  # a label file's paths start at its image folder
    tiles = [w | {"path": os.path.join(root, w["path"]) if root else w["path"]} for w in wrong]
    probe = summary.get("probe")
    if probe and probe.get("grid") and not any(row.get("lr") for row in history):  # the probe alone: no epochs
        paths = {"probe": pictures.probe_search(run_dir / "curves.png", probe, history)}
    else:
        paths = {"curves": pictures.curves(run_dir / "curves.png", history, best_epoch)}
    if metrics.get("multi_label"):  # per-class 2x2 counts and co-occurrence instead of a confusion matrix
        paths["confusion"] = pictures_ml.label_counts(run_dir / "confusion.png", metrics, classes, best_epoch)
        paths["wrong"] = pictures_ml.wrong_labels(run_dir / "wrong.png", tiles)
    else:
        paths["confusion"] = pictures.confusion(run_dir / "confusion.png", matrix, classes, best_epoch,
                                                top_confusions(matrix, classes, pictures.TOP_CONFUSIONS))
        paths["wrong"] = pictures.wrong(run_dir / "wrong.png", tiles, heatmaps_for(model, tiles) if model else None)
    suspects = (summary.get("label_issues") or {}).get("suspects")
    if suspects:
        paths["label_issues"] = pictures.wrong(run_dir / "label_issues.png", [
            {"path": os.path.join(root, s["path"]) if root else s["path"], "true": s["given"],
             "predicted": s["suggested"], "probability": s["confidence"]} for s in suspects], words=("given", "sugg."))
    # Runs whose first layer could not be found, or did not move (a frozen backbone), get no filters picture.
    if filters_before is not None and filters_after is not None:
        drawn = pictures.filters(run_dir / "filters.png", filters_before, filters_after)
        if drawn is not None:
            paths["filters"] = drawn
    if summary.get("calibration"):
        paths["reliability"] = pictures.reliability(run_dir / "reliability.png", summary["calibration"])
    page = _html(paths, run_dir.name, history=history, classes=classes, config=config, summary=summary, wrong=wrong)
    paths["report"] = write_text_atomic(run_dir / "report.html", page)
    return paths


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
td.text { text-align: left; word-break: break-all; }
tr.best td { font-weight: 700; background: #eef6ee; }
table.config td { text-align: left; font-family: ui-monospace, monospace; word-break: break-all; }
"""


def _facts(config: dict, classes: list[str], summary: dict) -> list[tuple[str, object]]:
    metrics = summary.get("val_metrics") or {}
    if metrics.get("multi_label"):
        return multilabel_facts(config, classes, summary)
    acc, seconds = summary.get("best_val_acc"), summary.get("seconds")
    interval = metrics.get("accuracy_ci95")
    shown = f"{100 * acc:.1f} %" if acc is not None else None
    if interval and acc is not None:
        shown += (f" ({metrics['correct']}/{metrics['images']}; 95 % interval {100 * interval[0]:.1f}-"
                  f"{100 * interval[1]:.1f} %, Wilson)")
    facts = [("arch", config.get("model")), ("base weights", config.get("base_weights")), ("data", config.get("data")),
             ("classes", ", ".join(classes) if len(classes) <= 20 else f"{len(classes)} classes"),
             ("plan", (config.get("plan") or {}).get("why")), ("recipe", config.get("recipe")),
             ("best epoch", summary.get("best_epoch")),
             ("best val accuracy", shown),
             ("time", None if seconds is None else f"{seconds:.0f} s")]
    cal = summary.get("calibration")
    if cal:
        text = f"{cal['ece_before']:.3f} raw"
        if cal.get("fitted"):
            text += (f"; {cal.get('ece_cross_fitted', cal['ece_after']):.3f} with a temperature fitted on the other "
                     f"half of val (temperature {cal['temperature']:.3g}, fitted on all of val for the model)")
        facts.append(("expected calibration error", text))
    return facts


def _table(header: list[str], rows: list[list], css: str = "") -> list[str]:
    e = html.escape
    out = [f"<table{css}>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="text">{e(str(v))}</td>' if isinstance(v, str) and i == 0
                                    else f"<td>{e(str(v))}</td>" for i, v in enumerate(row)) + "</tr>")
    return out + ["</table>"]


def _sections(summary: dict, classes: list[str], wrong: list[dict]) -> list[str]:
    metrics = summary.get("val_metrics") or {}
    out = []
    if metrics.get("multi_label"):
        out += multilabel_sections(metrics, wrong, _table)
        wrong = []
    elif metrics.get("per_class"):
        rows = [[c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", m["support"]]
                for c, m in metrics["per_class"].items()]
        macro = metrics["macro"]
        rows.append(["macro average", f"{macro['precision']:.3f}", f"{macro['recall']:.3f}", f"{macro['f1']:.3f}",
                     metrics["images"]])
        out += ["<h2>Per class (validation)</h2>", *_table(["class", "precision", "recall", "F1", "support"], rows)]
        confusions = top_confusions(metrics["confusion_matrix"], classes, 20)
        if confusions:
            out += ["<h2>Top confusions</h2>",
                    *_table(["true", "predicted", "images"], [[c["true"], c["predicted"], c["count"]]
                                                              for c in confusions])]
    if wrong:
        out += ["<h2>Most confidently wrong (files)</h2>",
                *_table(["image", "true", "predicted", "probability"],
                        [[w["path"], w["true"], w["predicted"], f"{w['probability']:.3f}"] for w in wrong])]
    out += _label_issues(summary.get("label_issues"))
    skipped = summary.get("skipped") or []
    out += [f"<h2>Skipped files ({len(skipped)})</h2>"]
    out += _table(["file", "reason"], [[s["path"], s["reason"]] for s in skipped]) if skipped \
        else ["<p>none: every file was used</p>"]
    return out


def _label_issues(issues: dict | None) -> list[str]:
    """Likely label errors of a feature-extract run (out-of-sample probes + cleanlab), or why there are none."""
    if not issues:
        return []
    out = ["<h2>Likely label errors</h2>"]
    if "skipped" in issues:
        return out + [f"<p>not computed: {html.escape(issues['skipped'])}</p>"]
    out.append(f"<p>{len(issues['suspects'])} image(s) flagged by confident learning on out-of-sample probabilities "
               f"({issues['folds']} linear probes on the pretrained backbone's features, each scoring the images it "
               f"was not fitted on; their accuracy {100 * issues['out_of_sample_accuracy']:.1f} %)</p>")
    rows = [[s["path"], s["split"], s["given"], s["suggested"], f"{s['confidence']:.3f}"] for s in issues["suspects"]]
    return out + (_table(["image", "split", "given", "suggested", "confidence"], rows) if rows else [])


def _settings(config: dict) -> list[list]:
    rows = []
    for key, value in config.items():
        if key in NOT_SHOWN:
            continue
        used = USED_INSTEAD.get(key)
        value = config.get(used, value) if used else value
        rows.append([key, value if isinstance(value, str) else json.dumps(value, default=str)])
    return rows


def _html(paths: dict[str, Path], run_name: str, *, history: list[dict], classes: list[str], config: dict,
          summary: dict, wrong: list[dict]) -> str:
    e = html.escape
    best_epoch = summary.get("best_epoch")
    out = ["<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>finetune report: {e(run_name)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
           "<h1>finetune training report</h1>", "<dl>"]
    out += [f"<dt>{e(k)}</dt><dd>{e('' if v is None else str(v))}</dd>" for k, v in _facts(config, classes, summary)]
    out.append("</dl>")
    for key, title in PICTURES:
        if key in paths:  # embedded, so the page is one file that can be mailed or opened offline
            data = base64.b64encode(paths[key].read_bytes()).decode("ascii")
            out += [f"<h2>{e(title)}</h2>", f'<img alt="{e(title)}" src="data:image/png;base64,{data}">']
    out += _sections(summary, classes, wrong)
    out += ["<h2>History</h2>", "<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for _, h in HISTORY_COLUMNS) + "</tr>"]
    for row in history:
        css = ' class="best"' if row.get("epoch") == best_epoch else ""
        out.append(f"<tr{css}>" + "".join(f"<td>{e(_cell(k, row.get(k)))}</td>" for k, _ in HISTORY_COLUMNS)
                   + "</tr>")
    out += ["</table>", "<h2>Settings (as used)</h2>", *_table(["setting", "value"], _settings(config),
                                                               ' class="config"')]
    return "\n".join(out + ["</body>", "</html>", ""])


def _cell(key: str, value) -> str:
    if value is None:
        return ""
    if key.endswith("_acc"):
        return f"{100 * value:.1f} %"
    if key.endswith("_loss"):
        return f"{value:.4f}"
    return f"{value:.3g}" if key == "lr" else str(value)
