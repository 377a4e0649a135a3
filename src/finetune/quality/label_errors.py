"""`check --labels`: every image embedded once by a pretrained backbone, then a review queue of the labels the
out-of-sample heads disagree with (finetune.training.label_issues) with an estimate of how many labels are wrong,
near-duplicates and outliers (finetune.quality.near_duplicates) from the same features, and the queue copied out for
a person to look at. Features come through training's own path (finetune.training.features), so they are computed
once and cached on disk.

The queue is not a count of wrong labels: where the heads are weak (a fine-grained set, few photos), most of their
confident disagreements are their own mistakes. The share of wrong labels is estimated apart, where the heads are
rarely wrong (noise_estimate).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from finetune._util.files import write_csv_atomic
from finetune.config import TrainConfig, validate
from finetune.errors import UsageError
from finetune.inference.predictor import copy_into
from finetune.metrics.classification import wilson_interval
from finetune.models.registry import build_network
from finetune.models.weights import resolve_weights
from finetune.quality.near_duplicates import NEAR_DUPLICATE, near_duplicates
from finetune.training.label_issues import (
    LABEL_FOLDS,
    Embeddings,
    fold_count,
    out_of_sample_probabilities,
    rank_label_issues,
    require_cleanlab,
    suspect,
)
from finetune.training.probe import ProbeEpochs
from finetune.training.setup import prepare, silent, torch_flags

REVIEW_LOG = "review.csv"
# The share of the images, those the heads are surest about, whose disagreement with their labels estimates the
# share of wrong labels. There the heads are rarely wrong, so a disagreement is mostly a wrong label; a photo filed
# under the wrong class is scored by heads that never saw it, so it is as likely as any to be among them. Measured
# with MobileNetV2 features against labels flipped at random (benchmarks/suggest_noise.py): on the dog breeds (120
# breeds, heads agreeing with 65 % of the labels) it read 6.0 % (interval 3.5-10.2 %) on the labels as given, where
# cleanlab queued 22 %, and 8.0-8.5 %, 10.0-13.5 %, 20.5-28.0 % with 5, 10, 20 % flipped (3 draws each); on
# ants/bees (96 %) 0.0 %, then 3.8-6.3 %, 6.3-15.2 %, 13.9-27.8 %, its interval holding the flipped share 10 times
# in 10 (7 in 10 on the dogs, where it leans high by the heads' own mistakes).
SUREST = 0.2


def check_family(model: str, weights: str) -> None:
    """Refuse (exit 2) a model whose head does not read one feature vector per image (SqueezeNet's conv head)."""
    choice = resolve_weights(model, weights)
    net = build_network(model, 2)
    if not net.head_gives_logits(choice.preprocessing.crop_size):
        raise UsageError(f"--model {model}: its head is not a linear layer on one feature vector per image, so it "
                         "gives no embedding to compare images with; use another family, e.g. resnet18 or "
                         "mobilenet_v2")


def embed(cfg: TrainConfig, emit=silent) -> Embeddings:
    """Frozen-backbone features (eval preprocessing, no augmentation) of every image; cached like training's."""
    import torch

    check_family(cfg.model, cfg.weights)
    cfg = validate(dataclasses.replace(cfg, mode="feature-extract", solver="lbfgs", augment="none", folds=0, fold=0,
                                       overfit=0))
    with torch_flags(cfg):
        p = prepare(cfg, emit)
    if not isinstance(p.epochs, ProbeEpochs):  # check_family refuses these first; never a silent wrong answer
        raise UsageError(f"--model {cfg.model}: no feature vector per image")
    split = p.split
    samples = split.train + split.val
    return Embeddings(split.root, split.classes, [s.path for s in samples], [s.label for s in samples],
                      ["train"] * len(split.train) + ["val"] * len(split.val),
                      torch.cat([p.epochs.train_feats[0], p.epochs.val_feats]).float(), list(split.skipped),
                      p.choice.label)


def check_review_folder(root: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Refuse a review folder inside the dataset: the copies would be read as training images next time."""
    root, dest = Path(root).resolve(), Path(dest).resolve()
    if dest == root or root in dest.parents:
        raise UsageError(f"--review-into {dest}: inside the dataset {root}; the copies would become training "
                         "images. Choose a folder outside it")


def review_into(suspects: list[dict], root: str, dest: str | os.PathLike) -> dict:
    """Copy each suspect into dest/<given>-><suggested>/ (copies: the dataset is never moved or edited) and log
    them in dest/review.csv. An identical copy already there is kept; a different file of the same name gets a
    numbered name."""
    dest = Path(dest)
    check_review_folder(root, dest)
    rows, folders = [], {}
    for s in suspects:
        folder = dest / f"{s['given']}->{s['suggested']}"
        folder.mkdir(parents=True, exist_ok=True)
        target, copied = copy_into(Path(root) / s["path"], folder)
        folders[folder.name] = folders.get(folder.name, 0) + 1
        rows.append(s | {"copied_to": str(target), "action": "copied" if copied else "already there"})
    log = write_csv_atomic(dest / REVIEW_LOG, ["path", "split", "given", "suggested", "confidence",
                                               "given_probability", "quality", "copied_to", "action"], rows)
    return {"folders": dict(sorted(folders.items())), "log": str(log), "copied": sum(r["action"] == "copied"
                                                                                   for r in rows)}


def check_trust(cfg: TrainConfig, folds: int = LABEL_FOLDS, similarity: float = NEAR_DUPLICATE,
                review: str | None = None, emit=silent) -> dict:
    """`check --labels`: label issues, near-duplicates and outliers from one embedding of every image (JSON-ready);
    with review, the suspects copied into that folder for a person to look at."""
    require_cleanlab()
    if not -1 <= similarity <= 1:
        raise UsageError(f"--similarity {similarity}: a cosine similarity, between -1 and 1 (default "
                         f"{NEAR_DUPLICATE})")
    if folds < 2:
        raise UsageError(f"--label-folds {folds}: at least 2 (each image is scored by heads fitted without it)")
    if review:
        check_review_folder(cfg.data, review)
    emb = embed(cfg, emit)
    emit("label_heads", images=len(emb.paths), folds=fold_count(emb.labels, emb.classes, folds))
    out = {"labels": review_queue(emb, folds, cfg.seed), "near_duplicates": near_duplicates(emb, similarity)}
    out["outliers"] = out["near_duplicates"].pop("outliers")
    if review:
        out["review"] = review_into(out["labels"]["suspects"], emb.root, review)
    return out




def review_queue(emb: Embeddings, folds: int = LABEL_FOLDS, seed: int = 0) -> dict:
    """The labels to review, most suspicious first (cleanlab's ranking of the heads' confident disagreements), with
    how often the heads agree with the labels and the estimated share of wrong labels (JSON-ready)."""
    k = fold_count(emb.labels, emb.classes, folds)  # a class too small is named before any work
    probs = out_of_sample_probabilities(emb.features, emb.labels, len(emb.classes), folds, seed, emb.paths, emb.root)
    flagged, quality = rank_label_issues(emb.labels, probs)
    accuracy = float((probs.argmax(1) == probs.new_tensor(emb.labels).long()).float().mean())
    return {"folds": k, "images": len(emb.labels), "out_of_sample_accuracy": accuracy, "weights": emb.weights,
            "noise_estimate": noise_estimate(emb.labels, probs),
            "suspects": [suspect(emb, i, probs[i], quality[i]) for i in flagged]}


def noise_estimate(labels: list[int], probs, surest: float = SUREST) -> dict:
    """The share of wrong labels, estimated as the share the heads contradict among the images they are surest
    about (a Wilson 95 % interval around it); it also counts the heads' own mistakes there, so it leans high."""
    import torch

    probs = torch.as_tensor(probs, dtype=torch.float32)
    confidence, predicted = probs.max(1)
    basis = max(1, min(len(labels), round(surest * len(labels))))
    top = confidence.argsort(descending=True, stable=True)[:basis]
    disagree = int((predicted[top] != torch.as_tensor(labels)[top]).sum())
    low, high = wilson_interval(disagree, basis)
    return {"rate": disagree / basis, "ci95": [low, high], "images": len(labels), "basis_images": basis,
            "basis_disagreeing": disagree, "expected_wrong": round(disagree / basis * len(labels)),
            "method": f"labels the heads contradict among the {surest:.0%} of images they are surest about"}
