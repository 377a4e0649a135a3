"""`finetune predict`, `evaluate` and `export`: a trained model (or several) put to use."""

from __future__ import annotations

import contextlib
import csv
import sys
from typing import Annotated

import typer
from rich.table import Column, Table

from finetune import api
from finetune._util.files import dumps_json, latest_model
from finetune.cli import options as o
from finetune.cli.app import command
from finetune.cli.infer_ml import print_labels, render_multilabel
from finetune.cli.render import LazyProgress, err, esc, out, pct, warn
from finetune.config import MAX_PIXELS
from finetune.data.inputs import Failure, check_inputs, expand_inputs
from finetune.data.labelfile import LabelFileOptions
from finetune.errors import DatasetError, UsageError
from finetune.formats.export import ATOL, FORMATS, RTOL
from finetune.formats.int8 import CALIBRATION_COUNT, MAX_ACCURACY_DROP
from finetune.inference.evaluate import evaluate_folder
from finetune.inference.explain import Explainer, explain_into
from finetune.inference.loading import open_predictor, prepare_next
from finetune.inference.predictor import sort_into


def model_paths(models: list[str] | None) -> list[str]:
    """-m given once or more (an ensemble), else the latest run's best model."""
    return list(models) if models else [str(latest_model())]


def runtime_note(predictor) -> str:
    """", runtime openvino" (the runtimes of an ensemble's members, once each)."""
    return ", runtime " + predictor.runtime


def name_model(paths: list[str], description: str, given: bool, quiet: bool) -> None:
    """One line on stderr: which model (path, arch, classes, val accuracy), and why when it was not given."""
    if not quiet:
        why = "" if given else "; the latest run's, from runs/latest.json (-m chooses another)"
        err.print(f"[bold]model[/] {esc(', '.join(paths))} ({esc(description)}){why}", highlight=False)


@command(epilog="Example: finetune predict photo.jpg ./more_photos 'shots/*.png' -k 2 --json")
def predict(
    paths: Annotated[list[str], typer.Argument(metavar="IMAGES", show_default=False, help=(
        "Image files, folders (searched recursively), globs, or a label file (.csv, .tsv, .jsonl: its images)."))],
    model: o.Models = None,
    top_k: Annotated[int | None, typer.Option("--top-k", "-k", metavar="K", show_default=False, help=(
        "Classes to show per image (default 3). Multi-label models show every label at or above its threshold, "
        "and with -k also the K highest scores."))] = None,
    threshold: o.Threshold = None, tta: o.Tta = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV on stdout.")] = False,
    sort_into_dir: Annotated[str | None, typer.Option("--sort-into", metavar="FOLDER", help=(
        "Also copy each image into FOLDER/<predicted class>/ (multi-label: into each predicted label's folder, "
        "none/ for no label; never moves or overwrites; an identical copy already there is kept), logged in "
        "FOLDER/sorted.csv."))] = None,
    min_confidence: Annotated[float, typer.Option(metavar="P", help=(
        "With --sort-into: images whose top probability is below this go to unsure/."))] = 0.0,
    explain: o.Explain = None,
    batch_size: o.InferBatch = 32, device: o.InferDevice = "auto", runtime: o.Runtime = "auto",
    workers: o.InferWorkers = 2, max_pixels: o.InferMaxPixels = MAX_PIXELS, quiet: o.InferQuiet = False,
) -> None:
    """Classify images with a trained model: top-k classes with probabilities."""
    _check_predict_options(min_confidence, as_json, as_csv, top_k)
    files, unusable = expand_inputs(paths)
    check_inputs(files, unusable)
    chosen = model_paths(model)
    if explain and len(chosen) > 1:
        raise UsageError("--explain: an ensemble's members look at different things; explain one model (-m once)")
    explainer = Explainer(chosen[0], device, max_pixels) if explain else None  # refused before any prediction
    predictor = open_predictor(chosen, device, runtime, tta, max_pixels, threshold, needs_torch=bool(explain))
    name_model(chosen, predictor.info.describe() + runtime_note(predictor), bool(model), quiet)
    multi = predictor.multi_label
    # Multi-label: the labels above their thresholds; the top-k scores too when -k is given (always in JSON/CSV).
    k = min(top_k or (len(predictor.classes) if multi else 3), len(predictor.classes))
    with LazyProgress("predicting", quiet) as bar:
        bar.start(len(files))
        results = list(predictor.predict(files, k, batch_size, workers, bar.advance))
    good = [r for r in results if not isinstance(r, Failure)]
    bad = unusable + [r for r in results if isinstance(r, Failure)]
    for f in bad:
        warn(f"skipped {esc(f.path)}: {esc(f.reason)}")
    if multi:
        print_labels(good, as_json, as_csv, k, top_k is not None)
    else:
        _print_predictions(good, as_json, as_csv, k)
    _use_predictions(good, sort_into_dir, min_confidence, explainer, explain, k, quiet)
    if bad:
        err.print(f"[yellow]{len(bad)} of {len(good) + len(bad)} input(s) skipped[/]")
    if not good:
        raise DatasetError("none of the inputs could be used (each is named above, with why); nothing was predicted")
    if prepare_next(predictor, chosen, device, [good[0].path]) and not quiet:
        err.print("[dim]cached an ONNX export of this model: the next predictions with it start without torch[/]")


def _check_predict_options(min_confidence: float, as_json: bool, as_csv: bool, top_k: int | None) -> None:
    if not 0 <= min_confidence <= 1:
        raise UsageError(f"--min-confidence {min_confidence}: must be between 0 and 1")
    if as_json and as_csv:
        raise UsageError("--json and --csv: choose one")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k {top_k}: must be at least 1")


def _use_predictions(good: list, sort_into_dir, min_confidence: float, explainer, explain, k: int,
                     quiet: bool) -> None:
    """--sort-into copies, --explain pictures."""
    if sort_into_dir and good:
        done = sort_into(good, sort_into_dir, min_confidence)
        counts = ", ".join(f"{esc(name)} {n}" for name, n in done["folders"].items())
        err.print(f"sorted {len(good)} image(s) into {esc(sort_into_dir)}/ ({counts}; {done['copied']} copied now, "
                  f"the rest already there); log: {esc(str(done['log']))}", highlight=False)
    if explainer is not None and good:
        with LazyProgress("explaining", quiet) as bar:
            bar.start(len(good))
            written = explain_into(explainer, good, explain, bar.advance)
        err.print(f"explanations (Grad-CAM of the top class, and the top {k}): {len(written)} picture(s) in "
                  f"{esc(explain)}/", highlight=False)


def _print_predictions(good: list, as_json: bool, as_csv: bool, k: int) -> None:
    if as_json:
        payload = [{"path": r.path, "predictions": [{"class": c, "probability": round(p, 6)} for c, p in r.top]}
                   for r in good]
        sys.stdout.write(dumps_json(payload) + "\n")
    elif as_csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["path"] + [f"{x}{i}" for i in range(1, k + 1) for x in ("class", "probability")])
        for r in good:
            w.writerow([r.path] + [v for c, p in r.top for v in (c, f"{p:.6f}")])
    else:
        table = Table(Column("image", overflow="fold"), *[f"#{i}" for i in range(1, k + 1)])
        for r in good:
            table.add_row(esc(r.path), *[f"{esc(c)} {p * 100:.1f}%" for c, p in r.top])
        out.print(table)


@command(epilog="Example: finetune export model.xml --int8 --model runs/20261123-101500-resnet18/best.pt")
def export(
    out_path: Annotated[str, typer.Argument(metavar="OUT", show_default=False, help=(
        f"Output file, by suffix: {', '.join(FORMATS)} (.pt: torchvision state_dict + metadata; .pt2: "
        "torch.export program; .xml: OpenVINO IR, its weights in the .bin beside it)."))],
    model: Annotated[list[str] | None, typer.Option("--model", "-m", metavar="PATH", help=(
        "Model file; repeat to export an ensemble as one file (same classes and preprocessing). Default: the "
        "latest run's best model."))] = None,
    check_images: Annotated[str | None, typer.Option(metavar="IMAGES", help=(
        "Images to verify the export on. Default: the run's val images."))] = None,
    int8: o.Int8 = False, calibration_images: o.CalibrationImages = None,
    calibration_count: o.CalibrationCount = CALIBRATION_COUNT, max_accuracy_drop: o.MaxAccuracyDrop = MAX_ACCURACY_DROP,
    force: o.Force = False, quiet: o.InferQuiet = False,
) -> None:
    """Write a model that loads without finetune, checked against PyTorch on real images."""
    chosen = model_paths(model)
    status = contextlib.nullcontext() if quiet else err.status(f"{'quantizing' if int8 else 'exporting'} "
                                                               f"{esc(out_path)}{' to int8' if int8 else ''}")
    with status:
        report = api.export(chosen, out_path, check_images, int8=int8, calibration_images=calibration_images,
                            calibration_count=calibration_count, max_accuracy_drop=max_accuracy_drop, force=force)
    if int8:
        _render_int8(report, max_accuracy_drop, quiet)
        return
    if not quiet:
        _render_export(report)
    out.print(str(report.path), highlight=False, soft_wrap=True)


def _render_export(report) -> None:
    if report.multi_label:
        err.print(f"checked on {report.checked_images} images ({esc(report.image_source)}): max probability "
                  f"difference {report.max_abs_diff:.2e} (sigmoids; tolerance {ATOL:g}), every label agrees on "
                  f"{report.top1_agree}/{report.checked_images}; {report.seconds:.1f} s", highlight=False)
        return
    err.print(f"checked on {report.checked_images} images ({esc(report.image_source)}): max logit difference "
              f"{report.max_abs_diff:.2e} (tolerance {ATOL:g} + {RTOL:g}*|logit|), top-1 agrees "
              f"{report.top1_agree}/{report.checked_images}; {report.seconds:.1f} s", highlight=False)


def _render_int8(r, max_drop: float, quiet: bool) -> None:
    accuracy = (f"accuracy int8 {pct(r.int8_accuracy)} vs fp32 {pct(r.fp32_accuracy)} (allowed drop {max_drop:g} "
                "points)" if r.int8_accuracy is not None else "accuracy not checked (no labels)")
    if not quiet:
        err.print(f"int8, calibrated on {r.calibration_images} images ({esc(r.calibration_source)}); checked on "
                  f"{r.checked_images} images ({esc(r.image_source)}): top-1 agrees with fp32 on {pct(r.agreement)}, "
                  f"{accuracy}; {r.seconds:.1f} s", highlight=False)
    if r.forced:  # even with --quiet: the file kept failed its check
        warn("kept because of --force although the accuracy check " + ("failed" if r.int8_accuracy is not None
                                                                        else "could not run"))
    out.print(str(r.path), highlight=False, soft_wrap=True)


@command(epilog="Example: finetune evaluate ./images --model runs/20261123-101500-resnet18/best.pt --json")
@o.settings("path_col", "label_col", "label_sep", "image_dir")
def evaluate(
    data: Annotated[str, typer.Argument(metavar="DATA", show_default=False, help=(
        "Labelled folder: its val/ when it has train/ and val/, else every image of its class folders; or a label "
        "file: its test rows, else its val rows, else every row."))],
    model: o.Models = None, as_json: o.AsJson = False,
    wrong: Annotated[int, typer.Option(metavar="N", help="How many of the most confidently wrong images to list.")
                     ] = 10,
    threshold: o.Threshold = None, tta: o.Tta = False, batch_size: o.InferBatch = 32,
    device: o.InferDevice = "auto", runtime: o.Runtime = "auto", workers: o.InferWorkers = 2,
    max_pixels: o.InferMaxPixels = MAX_PIXELS, quiet: o.InferQuiet = False, **settings,
) -> None:
    """Accuracy with a 95 % interval, per-class precision/recall/F1, confusion matrix, confident mistakes
    (multi-label models: mAP, per-label metrics at the thresholds, the largest errors)."""
    chosen = model_paths(model)
    labels = LabelFileOptions(settings["path_col"], settings["label_col"], settings["label_sep"], False,
                              settings["image_dir"])
    with LazyProgress("evaluating", quiet) as bar:
        r = evaluate_folder(chosen, data, device, batch_size, workers, wrong, tta, max_pixels, bar.start, bar.advance,
                            threshold, labels, runtime)
    name_model(chosen, r["model_description"], bool(model), quiet)
    if as_json:
        sys.stdout.write(dumps_json(r) + "\n")
    if r.get("multi_label"):
        render_multilabel(r)
        return
    _render_evaluation(r)


def _render_evaluation(r: dict) -> None:
    low, high = r["accuracy_ci95"]
    err.print(f"[bold]accuracy[/] {pct(r['accuracy'])} ({r['correct']}/{r['images']}), 95 % CI {pct(low)}-{pct(high)} "
              f"(Wilson)   on {esc(r['data'])}", highlight=False)
    table = Table("class", "precision", "recall", "F1", "support", title="per class", title_justify="left")
    for name, m in r["per_class"].items():
        table.add_row(esc(name), f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    macro = r["macro"]
    table.add_row("macro avg", f"{macro['precision']:.3f}", f"{macro['recall']:.3f}", f"{macro['f1']:.3f}",
                  str(r["images"]), style="bold")
    err.print(table)
    if len(r["classes"]) <= 20:
        cm = Table("true \\ predicted", *map(esc, r["classes"]), title="confusion matrix", title_justify="left")
        for name, row in zip(r["classes"], r["confusion_matrix"]):
            cm.add_row(esc(name), *map(str, row))
        err.print(cm)
    if "members" in r:
        _render_members(r)
    cal = r["calibration"]
    after = (f"; {cal['ece_after']:.3f} with the model's temperature {cal['temperature']:.3g}" if cal["fitted"]
             else " (of the averaged probabilities, each model with its own temperature)" if "members" in r
             else " (no temperature fitted: train with --calibrate)")
    err.print(f"[bold]calibration[/] expected calibration error {cal['ece_before']:.3f} raw{after}", highlight=False)
    if r["most_confident_wrong"]:
        w = Table("image", "true", "predicted", "probability", title="most confidently wrong", title_justify="left")
        for m in r["most_confident_wrong"]:
            w.add_row(esc(m["path"]), esc(m["true"]), esc(m["predicted"]), f"{m['probability']:.3f}")
        err.print(w)
    for s in r["skipped"]:
        warn(f"skipped {esc(s['path'])}: {esc(s['reason'])}")


def _render_members(r: dict) -> None:
    t = Table("model", "accuracy", "95 % CI", "macro F1", "ECE", title="ensemble and its members", title_justify="left")
    for m in r["members"]:
        t.add_row(esc(m["model"]), pct(m["accuracy"]), "-".join(map(pct, m["accuracy_ci95"])), f"{m['macro_f1']:.3f}",
                  f"{m['ece']:.3f}")
    t.add_row(f"ensemble of {len(r['members'])}", pct(r["accuracy"]), "-".join(map(pct, r["accuracy_ci95"])),
              f"{r['macro']['f1']:.3f}", f"{r['calibration']['ece_before']:.3f}", style="bold")
    err.print(t)
