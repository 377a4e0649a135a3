"""`check --labels`: every image embedded once by a pretrained backbone, then likely label errors
(finetune.training.label_issues), near-duplicates and outliers (finetune.quality.near_duplicates) from the same features, and the
suspects copied out for a person to look at. Features come through training's own path
(finetune.training.features), so they are computed once and cached on disk.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from finetune._util.files import write_csv_atomic
from finetune.config import TrainConfig
from finetune.errors import UsageError
from finetune.inference.predictor import copy_into
from finetune.models.registry import build_network
from finetune.models.weights import resolve_weights
from finetune.quality.near_duplicates import NEAR_DUPLICATE, near_duplicates
from finetune.training.label_issues import LABEL_FOLDS, Embeddings, fold_count, label_issues, require_cleanlab
from finetune.training.probe import ProbeEpochs
from finetune.training.setup import prepare, silent, torch_flags

REVIEW_LOG = "review.csv"


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
    cfg = dataclasses.replace(cfg, mode="feature-extract", solver="lbfgs", augment="none", folds=0, fold=0,
                              overfit=0)
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
    out = {"labels": label_issues(emb, folds, cfg.seed), "near_duplicates": near_duplicates(emb, similarity)}
    out["outliers"] = out["near_duplicates"].pop("outliers")
    if review:
        out["review"] = review_into(out["labels"]["suspects"], emb.root, review)
    return out


