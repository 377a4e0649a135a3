"""The multi-label parts of report.html: mAP and F1 with their intervals, subset accuracy and Hamming loss in
the facts; per-class AP, precision, recall, F1, threshold and 2x2 counts; the mistakes by labels missed and
invented."""

from __future__ import annotations


def _interval(value, interval) -> str:
    if value is None:
        return ""
    text = f"{value:.3f}"
    if interval and None not in interval:
        text += f" (95 % interval {interval[0]:.3f}-{interval[1]:.3f}, bootstrap over images)"
    return text


def multilabel_facts(config: dict, classes: list[str], summary: dict) -> list[tuple[str, object]]:
    m = summary.get("val_metrics") or {}
    ci = m.get("ci95") or {}
    seconds = summary.get("seconds")
    facts = [("arch", config.get("model")), ("base weights", config.get("base_weights")), ("data", config.get("data")),
             ("labels", ", ".join(classes) if len(classes) <= 20 else f"{len(classes)} labels"),
             ("task", "multi-label: one sigmoid per label, per-label thresholds fitted on val"),
             ("best epoch", summary.get("best_epoch")),
             ("val mAP (macro)", _interval(m.get("map_macro"), ci.get("map_macro"))),
             ("val mAP (micro)", _interval(m.get("map_micro"), ci.get("map_micro"))),
             ("val F1 (macro, at the thresholds)", _interval(m.get("f1_macro"), ci.get("f1_macro"))),
             ("val F1 with thresholds fitted on the other half of val", _interval(m.get("f1_macro_cross_fitted"),
                                                                                  None)),
             ("exact-match (subset) accuracy", f"{100 * m.get('subset_accuracy', 0):.1f} % "
                                               f"({m.get('exact_matches')}/{m.get('images')})"),
             ("Hamming loss", f"{m.get('hamming_loss', 0):.4f} (share of wrong image-label decisions)"),
             ("time", None if seconds is None else f"{seconds:.0f} s")]
    cal = summary.get("calibration")
    if cal:
        text = f"{cal['ece_before']:.3f} raw, over every (image, label) decision"
        if cal.get("fitted"):
            text += f"; {cal['ece_after']:.3f} with the shared temperature {cal['temperature']:.3g}"
        facts.append(("expected calibration error", text))
    return facts


def multilabel_sections(m: dict, wrong: list[dict], table) -> list[str]:
    """HTML lines: the per-class table, then the mistakes (table is report._table)."""
    rows = [[c, f"{x['ap']:.3f}", f"{x['precision']:.3f}", f"{x['recall']:.3f}", f"{x['f1']:.3f}", x["support"],
             f"{x['threshold']:.3f}", x["counts"]["tp"], x["counts"]["fp"], x["counts"]["fn"], x["counts"]["tn"]]
            for c, x in m["per_class"].items()]
    macro = m["macro"]
    rows.append(["macro average", f"{macro['ap']:.3f}", f"{macro['precision']:.3f}", f"{macro['recall']:.3f}",
                 f"{macro['f1']:.3f}", m["images"], "", "", "", "", ""])
    out = ["<h2>Per label (validation)</h2>",
           *table(["label", "AP", "precision", "recall", "F1", "support", "threshold", "tp", "fp", "fn", "tn"], rows)]
    if wrong:
        out += ["<h2>Largest errors (files)</h2>",
                *table(["image", "true", "predicted", "missed", "invented"],
                       [[w["path"], ", ".join(w["true"]), ", ".join(w["predicted"]),
                         ", ".join(f"{c} {p:.2f}" for c, p in w["missed"]),
                         ", ".join(f"{c} {p:.2f}" for c, p in w["invented"])] for w in wrong])]
    return out
